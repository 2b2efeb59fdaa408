"""PHM / Compacter family: ΔW = s·Σᵢ Aᵢ ⊗ Bᵢ, Bᵢ dense or rank-k pairs; vs float64."""
import pytest
import torch

import pypeft_fast as pf
from pypeft_fast.families.phm import delta_weight
from pypeft_fast.reference import reference_linear
from numerics import DTYPE_CASES, Case, check_case, cpu_backends, rand


def phm_case(n=2, a=(3, 5), b=(23, 26), lead=(2, 37), rank=None, seed=5, bias=True, scaling=0.8):
    """out = 3·23 = 69, in = 5·26 = 130."""
    n_out, n_in = a[0] * b[0], a[1] * b[1]
    frozen = {"x": rand(*lead, n_in, seed=seed), "weight": rand(n_out, n_in, seed=seed + 1) / n_in**0.5}
    if bias:
        frozen["bias"] = rand(n_out, seed=seed + 2)
    params = {"A": rand(n, *a, seed=seed + 3)}
    if rank is None:
        params["B"] = rand(n, *b, seed=seed + 4) / n_in**0.5
    else:
        params["S"] = rand(n, b[0], rank, seed=seed + 4)
        params["T"] = rand(n, rank, b[1], seed=seed + 5) / n_in**0.5

    def fac(kw):
        return kw.pop("A"), (kw.pop("B") if "B" in kw else (kw.pop("S"), kw.pop("T")))

    def op(x, weight, backend, bias=None, **kw):
        A, B = fac(kw)
        return pf.phm_linear(x, weight, bias, A, B, scaling, backend)

    def ref(x, weight, bias=None, **kw):
        A, B = fac(kw)
        return reference_linear(x, weight, bias, delta_weight(A, B, scaling))

    return Case(op, ref, frozen, params, ("x",) + tuple(params) + (("bias",) if bias else ()))


# The family's cases for the generic tests (autocast, the shared Function, CUDA): variant ->
# builder, read by numerics.declared_cases for every declared family.
CASES = {
    "phm": lambda: phm_case(),
    "phm-rank-k": lambda: phm_case(rank=1),   # Compacter's rank-1 fast weights
    "phm-rank-2": lambda: phm_case(rank=2),
}


@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("backend", cpu_backends("phm"))
@pytest.mark.parametrize("n", [2, 4])
def test_phm_matches_float64(backend, dtype_case, n):
    check_case(phm_case(n=n), backend, dtype_case)


@pytest.mark.parametrize("backend", cpu_backends("phm"))
@pytest.mark.parametrize("kw", [dict(n=4, rank=1), dict(n=2, rank=3, bias=False), dict(n=3, a=(4, 4), b=(16, 32), lead=(97,))])
def test_phm_rank_k_fast_weights(backend, kw):
    check_case(phm_case(**kw), backend, "fp32")


def test_phm_gradcheck_float64():
    W = rand(6, 12, seed=1)
    x, A, S, T = rand(5, 12, seed=2), rand(2, 2, 3, seed=3), rand(2, 3, 1, seed=4), rand(2, 1, 4, seed=5)
    for t in (x, A, S, T):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, A, S, T: pf.phm_linear(x, W, None, A, (S, T), 0.5, "torch"), (x, A, S, T))


@pytest.mark.parametrize("A, B, match", [
    (torch.randn(2, 3, 5), torch.randn(4, 23, 26), r"A has 2 terms .* but B has 4"),
    (torch.randn(2, 3, 5), torch.randn(2, 23, 25), r"gives \(69, 125\); expected weight's shape \(69, 130\)"),
    (torch.randn(3, 5), torch.randn(2, 23, 26), r"A must be 3-D, got shape \(3, 5\)"),
    (torch.randn(2, 3, 5), (torch.randn(2, 23, 2), torch.randn(2, 3, 26)), r"B = L @ R needs"),
])
def test_phm_bad_factors(A, B, match):
    with pytest.raises(ValueError, match=match):
        pf.phm_linear(torch.randn(3, 130), torch.randn(69, 130), None, A, B)
