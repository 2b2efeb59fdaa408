"""The torch path's forms for a rank-k B (``kronecker.factored_kernels``): A folded into T (a rank
a_out·h·k LoRA, ``TorchKroneckerFoldedA``) and the chain X·Tᵀ → A → S (``TorchKroneckerFactoredB``,
bmm for h = 1, einsum for h > 1), each vs float64, with every and with a partial set of gradients."""
import dataclasses

import pytest

from pypeft_fast.families import kronecker
import torch

from numerics import DTYPE_CASES, assert_within, check_case
from test_phm import phm_case

# (phm_case kwargs, the kernels factored_kernels must pick for them)
FORMS = {
    "folded-h4": (dict(n=4, rank=1, a=(4, 4), b=(16, 32), lead=(3, 29)), kronecker.TorchKroneckerFoldedA),
    "folded-h1": (dict(n=1, rank=2, a=(9, 5), b=(23, 26)), kronecker.TorchKroneckerFoldedA),
    "chain-h1": (dict(n=1, rank=4, a=(9, 5), b=(23, 26)), kronecker.TorchKroneckerFactoredB),
    "chain-h4": (dict(n=4, rank=3, a=(4, 4), b=(23, 26)), kronecker.TorchKroneckerFactoredB),
}


def form_case(form, grads=None):
    kw, expected = FORMS[form]
    case = phm_case(**kw)
    A, S = case.params["A"], case.params["S"]
    b_shape = (S.shape[1], case.params["T"].shape[2])
    assert kronecker.factored_is_cheaper(A.shape, b_shape, S.shape[2]), f"{form}: B would be formed"
    assert kronecker.factored_kernels(A.shape, S.shape[2]) is expected, f"{form}: not {expected.__name__}"
    return case if grads is None else dataclasses.replace(case, grads=grads)


@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("form", list(FORMS))
def test_rank_k_form_matches_float64(form, dtype_case):
    check_case(form_case(form), "torch", dtype_case)


@pytest.mark.parametrize("grads", [("S",), ("A", "T"), ("x", "T"), ("x",)])
@pytest.mark.parametrize("form", list(FORMS))
def test_rank_k_form_partial_gradients(form, grads):
    check_case(form_case(form, grads), "torch", "fp32")


@pytest.mark.parametrize("name,rank,tokens", [("phm", 16, 1024), ("phm", 64, 1024), ("phm", 8, 1024)])
def test_rank_k_phm_dA_at_real_token_counts(name, rank, tokens):
    """dA sums n·k products of the per-token G and Z (each already a rounded fp32 GEMM result):
    in fp32 that sum was 4–10× plain PyTorch's error at BERT-base's query with 1024 tokens (the
    micro-benchmark's correctness check failed); it is summed in float64 now."""
    from pypeft_fast import workloads

    w = workloads.make_case(name, "bert-base/query", rank, tokens)
    y = w.ours("torch")()
    y.backward(w.gy)
    y64, g64 = w.expected(torch.float64, "ours")
    yb, gb = w.expected(None, "ours")
    assert_within(f"{name} y", y, y64, yb, yb.dtype)
    for k, p in w.params.items():
        assert_within(f"{name} d{k}", p.grad, g64[k], gb[k], gb[k].dtype)
