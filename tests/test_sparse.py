"""Sparse-masked family: ΔW = s·(M ⊙ D) from (values, indices); vs float64; index checks."""
import pytest
import torch

import pypeft_fast as pf
from pypeft_fast.families.sparse import delta_weight, layout_for
from pypeft_fast.reference import reference_linear
from numerics import DTYPE_CASES, Case, check_case, cpu_backends, rand


def random_indices(n_out, n_in, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_out * n_in, generator=g)[:nnz]
    return torch.stack([flat // n_in, flat % n_in])


def sparse_case(density=0.05, n_out=67, n_in=129, lead=(2, 37), seed=9, bias=True, scaling=0.9, nnz=None):
    nnz = max(1, round(density * n_out * n_in)) if nnz is None else nnz
    indices = random_indices(n_out, n_in, nnz, seed)
    frozen = {"x": rand(*lead, n_in, seed=seed), "weight": rand(n_out, n_in, seed=seed + 1) / n_in**0.5}
    if bias:
        frozen["bias"] = rand(n_out, seed=seed + 2)
    params = {"values": rand(nnz, seed=seed + 3)}

    def op(x, weight, values, indices, backend, bias=None):
        return pf.sparse_linear(x, weight, bias, values, indices, scaling, backend)

    def ref(x, weight, values, indices, bias=None):
        return reference_linear(x, weight, bias, delta_weight(values, indices, (n_out, n_in), scaling))

    return Case(op, ref, frozen, params, ("x", "values") + (("bias",) if bias else ()), {"indices": indices})


# The family's cases for the generic tests (autocast, the shared Function, CUDA): variant ->
# builder, read by numerics.declared_cases for every declared family.
CASES = {
    "sparse": lambda: sparse_case(),
}


@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("backend", cpu_backends("sparse"))
def test_sparse_matches_float64(backend, dtype_case):
    check_case(sparse_case(), backend, dtype_case)


@pytest.mark.parametrize("backend", cpu_backends("sparse"))
@pytest.mark.parametrize("kw", [dict(nnz=1), dict(density=1.0), dict(density=0.3, lead=(97,), bias=False),
                                dict(n_out=1, n_in=1, nnz=1, lead=(5,))])
def test_sparse_densities_from_one_entry_to_full(backend, kw):
    check_case(sparse_case(**kw), backend, "fp32")


def test_sparse_empty_mask_is_the_frozen_layer():
    x, W, b = torch.randn(4, 9), torch.randn(5, 9), torch.randn(5)
    v = torch.zeros(0, requires_grad=True)
    y = pf.sparse_linear(x, W, b, v, torch.zeros(2, 0, dtype=torch.int64))
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b))
    y.sum().backward()
    assert v.grad.shape == (0,)


def test_sparse_gradcheck_float64():
    W = rand(6, 11, seed=1)
    x, v = rand(5, 11, seed=2).requires_grad_(True), rand(9, seed=3).requires_grad_(True)
    idx = random_indices(6, 11, 9, seed=4)
    assert torch.autograd.gradcheck(lambda x, v: pf.sparse_linear(x, W, None, v, idx, 0.5, "torch"), (x, v))


def test_sparse_layout_is_built_once_per_mask():
    idx = random_indices(7, 5, 6, seed=1)
    first = layout_for("t", idx, 7, 5)
    assert layout_for("t", idx, 7, 5) is first
    idx[0, 0] = (idx[0, 0] + 1) % 7  # in-place change of the mask: rebuilt (and revalidated)
    try:
        assert layout_for("t", idx, 7, 5) is not first
    except ValueError as e:  # the change may have created a duplicate, which must be reported
        assert "duplicated" in str(e)


@pytest.mark.parametrize("indices, match", [
    (torch.tensor([[0, 1], [2, 9]]), r"cols \(indices\[1\]\) span \[2, 9\]; expected values in \[0, 9\)"),
    (torch.tensor([[0, 5], [2, 3]]), r"rows \(indices\[0\]\) span \[0, 5\]; expected values in \[0, 5\)"),
    (torch.tensor([[-1, 1], [2, 3]]), r"rows \(indices\[0\]\) span \[-1, 1\]"),
    (torch.tensor([[1, 1], [2, 2]]), r"1 duplicated \(row, col\) entries"),
    (torch.tensor([[1, 2], [2, 2]], dtype=torch.int32), r"indices has dtype torch.int32; expected torch.int64"),
    (torch.tensor([[1, 2], [2, 2], [0, 0]]), r"indices has shape \(3, 2\); expected \(2, nnz\)"),
    (torch.tensor([1, 2]), r"indices has shape \(2,\); expected \(2, nnz\)"),
])
def test_sparse_bad_indices(indices, match):
    with pytest.raises(ValueError, match=match):
        pf.sparse_linear(torch.randn(3, 9), torch.randn(5, 9), None, torch.randn(2), indices, name="enc.0.fc")


def test_sparse_values_must_match_nnz():
    with pytest.raises(ValueError, match=r"values has shape \(3,\); expected \(2,\)"):
        pf.sparse_linear(torch.randn(3, 9), torch.randn(5, 9), None, torch.randn(3), torch.tensor([[0, 1], [2, 3]]))
