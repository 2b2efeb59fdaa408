"""Kronecker family (KronA, KAdaptation, peft LoKr): ΔW = s·(A ⊗ B).

A: (a_out, a_in), B: (b_out, b_in) with out = a_out·b_out, in = a_in·b_in. Either factor may be a
low-rank pair (L, R) meaning L @ R (LoKr's w1_a/w1_b, w2_a/w2_b). Computed as the h = 1 case of
:mod:`.kron_sum` — (A ⊗ B)·vec(X) = vec(A·X·Bᵀ) — so ΔW is never built.
"""
from __future__ import annotations

import torch

from .. import registry
from ..validate import check_base, check_same_device, check_scaling, fail
from .factors import check_factor, compose_factor, factor_shape, factor_tensors
from .kron_sum import TorchKronSumKernels, apply_kron_sum

FAMILY = "kronecker"


def delta_weight(A, B, scaling: float = 1.0) -> torch.Tensor:
    """Materialised ΔW = s·kron(A, B) (pairs composed). Reference, tests and merging only."""
    A = A[0] @ A[1] if isinstance(A, (tuple, list)) else A
    B = B[0] @ B[1] if isinstance(B, (tuple, list)) else B
    return torch.kron(A, B) * scaling


registry.register_family(FAMILY, delta_weight)
registry.register_kernels(FAMILY, "torch", TorchKronSumKernels)


def kronecker_linear(x, weight, bias, A, B, scaling=1.0, backend="auto", *, name=None):
    """``y = x·Wᵀ + b + x·(s·A⊗B)ᵀ``; x: (..., in), weight: (out, in) frozen; A, B or pairs."""
    where = name or "kronecker_linear"
    out_f, in_f = check_base(where, x, weight, bias)
    device = check_same_device(where, x=x, weight=weight, bias=bias,
                               **{f"A[{i}]": t for i, t in enumerate(factor_tensors(A))},
                               **{f"B[{i}]": t for i, t in enumerate(factor_tensors(B))})
    A = compose_factor(where, "A", A)  # A is the small factor: form it
    B = check_factor(where, "B", B)    # B may stay factored (see kron_sum.apply_kron_sum)
    (a_out, a_in), (b_out, b_in) = A.shape, factor_shape(B)
    if a_out * b_out != out_f or a_in * b_in != in_f:
        fail(where, f"A {tuple(A.shape)} ⊗ B {(b_out, b_in)} gives ({a_out * b_out}, {a_in * b_in}); "
                    f"expected weight's shape ({out_f}, {in_f})")
    scaling = check_scaling(where, scaling)
    B3 = (B[0].unsqueeze(0), B[1].unsqueeze(0)) if isinstance(B, tuple) else B.unsqueeze(0)
    return apply_kron_sum(FAMILY, x, weight, bias, A.unsqueeze(0), B3, scaling, backend, device)
