"""Hypercomplex (PHM / Compacter) family: ΔW = s·Σᵢ Aᵢ ⊗ Bᵢ.

A: (n, a_out, a_in) — Compacter's shared "slow" rule matrices; B: (n, b_out, b_in), or a pair
(S: (n, b_out, k), T: (n, k, b_in)) meaning Bᵢ = Sᵢ @ Tᵢ (Compacter's rank-k "fast" weights).
Computed by :mod:`.kronecker`; ΔW is never built.
"""
from __future__ import annotations

import torch

from .. import registry
from ..validate import check_base, check_param, check_same_device, check_scaling, fail, shape_str
from .factors import check_factor, factor_shape, factor_tensors
from .kronecker import TorchKroneckerKernels, apply_kronecker

FAMILY = "phm"


def delta_weight(A, B, scaling: float = 1.0) -> torch.Tensor:
    """Materialised ΔW = s·Σᵢ kron(A[i], B[i]). Reference, tests and merging only."""
    B = B[0] @ B[1] if isinstance(B, (tuple, list)) else B
    return sum(torch.kron(A[i], B[i]) for i in range(A.shape[0])) * scaling


registry.register_family(FAMILY, delta_weight)
registry.register_kernels(FAMILY, "torch", TorchKroneckerKernels)


def phm_linear(x, weight, bias, A, B, scaling=1.0, backend="auto", *, name=None):
    """``y = x·Wᵀ + b + x·(s·Σᵢ Aᵢ⊗Bᵢ)ᵀ``; x: (..., in), weight: (out, in) frozen."""
    where = name or "phm_linear"
    out_f, in_f = check_base(where, x, weight, bias)
    check_same_device(where, x=x, weight=weight, bias=bias, A=A,
                      **{f"B[{i}]": t for i, t in enumerate(factor_tensors(B))})
    check_param(where, "A", A, dim=3)
    B = check_factor(where, "B", B, batched=True)
    n, a_out, a_in = A.shape
    b_shape = factor_shape(B)
    if b_shape[0] != n:
        fail(where, f"A has {n} terms (shape {shape_str(A)}) but B has {b_shape[0]} "
                    f"(shape {b_shape}); expected the same leading n")
    _, b_out, b_in = b_shape
    if a_out * b_out != out_f or a_in * b_in != in_f:
        fail(where, f"Σ A[i] ⊗ B[i] with A {shape_str(A)}, B {b_shape} gives "
                    f"({a_out * b_out}, {a_in * b_in}); expected weight's shape ({out_f}, {in_f})")
    scaling = check_scaling(where, scaling)
    return apply_kronecker(FAMILY, where, x, weight, bias, A, B, scaling, backend)
