"""Kronecker family: ΔW = s·(A ⊗ B), factors dense or low-rank pairs; vs float64."""
import pytest
import torch

import pypeft_fast as pf
from pypeft_fast.families.kronecker import delta_weight
from pypeft_fast.reference import reference_linear
from numerics import DTYPE_CASES, Case, check_case, cpu_backends, rand


def kron_case(a=(5, 3), b=(7, 43), lead=(2, 37), a_rank=None, b_rank=None, seed=3, bias=True, scaling=0.6):
    """Non-square factors: out = 5·7 = 35, in = 3·43 = 129; optional low-rank pairs."""
    n_out, n_in = a[0] * b[0], a[1] * b[1]
    frozen = {"x": rand(*lead, n_in, seed=seed), "weight": rand(n_out, n_in, seed=seed + 1) / n_in**0.5}
    if bias:
        frozen["bias"] = rand(n_out, seed=seed + 2)
    params = {}
    for name, shape, rank, s in (("A", a, a_rank, seed + 3), ("B", b, b_rank, seed + 5)):
        if rank is None:
            params[name] = rand(*shape, seed=s) / shape[1] ** 0.5
        else:
            params[name + "L"] = rand(shape[0], rank, seed=s)
            params[name + "R"] = rand(rank, shape[1], seed=s + 1) / shape[1] ** 0.5

    def factors(kw):
        A = kw.pop("A") if "A" in kw else (kw.pop("AL"), kw.pop("AR"))
        B = kw.pop("B") if "B" in kw else (kw.pop("BL"), kw.pop("BR"))
        return A, B

    def op(x, weight, backend, bias=None, **kw):
        A, B = factors(kw)
        return pf.kronecker_linear(x, weight, bias, A, B, scaling, backend)

    def ref(x, weight, bias=None, **kw):
        A, B = factors(kw)
        return reference_linear(x, weight, bias, delta_weight(A, B, scaling))

    grads = ("x",) + tuple(params) + (("bias",) if bias else ())
    return Case(op, ref, frozen, params, grads)


# The family's cases for the generic tests (autocast, the shared Function, CUDA): variant ->
# builder, read by numerics.declared_cases for every declared family.
CASES = {
    "kronecker": lambda: kron_case(),
    "kronecker-lowrank-B": lambda: kron_case(b_rank=2),
    "kronecker-lowrank-factors": lambda: kron_case(a_rank=2, b_rank=3),
}


@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("backend", cpu_backends("kronecker"))
def test_kronecker_matches_float64(backend, dtype_case):
    check_case(kron_case(), backend, dtype_case)


@pytest.mark.parametrize("backend", cpu_backends("kronecker"))
@pytest.mark.parametrize("shape", [
    dict(a_rank=2, b_rank=1),                    # both factors low-rank (LoKr w1_a/w1_b, w2_a/w2_b)
    dict(a=(1, 1), b=(67, 129)),                 # A scalar
    dict(a=(67, 129), b=(1, 1), bias=False),     # B scalar
    dict(a=(4, 16), b=(16, 4), b_rank=3, lead=(97,)),
])
def test_kronecker_awkward_factors(backend, shape):
    check_case(kron_case(**shape), backend, "fp32")


def test_kronecker_gradcheck_float64():
    W = rand(6, 12, seed=1)
    x, A, BL, BR = rand(5, 12, seed=2), rand(2, 3, seed=3), rand(3, 1, seed=4), rand(1, 4, seed=5)
    for t in (x, A, BL, BR):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, A, BL, BR: pf.kronecker_linear(x, W, None, A, (BL, BR), 0.5, "torch"), (x, A, BL, BR))


@pytest.mark.parametrize("A, B, match", [
    (torch.randn(5, 3), torch.randn(7, 42), r"A \(5, 3\) ⊗ B \(7, 42\) gives \(35, 126\); expected weight's shape \(35, 129\)"),
    (torch.randn(5, 3, 1), torch.randn(7, 43), r"A must be 2-D"),
    ((torch.randn(5, 2), torch.randn(3, 3)), torch.randn(7, 43), r"A = L @ R needs .* matching k"),
    ((torch.randn(5, 0), torch.randn(0, 3)), torch.randn(7, 43), r"A\[0\] has an empty dimension"),
])
def test_kronecker_bad_factors(A, B, match):
    with pytest.raises(ValueError, match=match):
        pf.kronecker_linear(torch.randn(3, 129), torch.randn(35, 129), None, A, B)
