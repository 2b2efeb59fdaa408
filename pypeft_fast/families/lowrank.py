"""Low-rank family (LoRA): ΔW = s·B·A, with optional dropout on the adapter's input.

Shapes: x2d (n, in), W (out, in), A (r, in), B (out, r), u = drop(x)·Aᵀ (n, r).

Forward::

    y = x·Wᵀ + b + s·u·Bᵀ,        u = drop(x)·Aᵀ,   drop(x) = x ⊙ m / (1-p)

Backward (t = s·gy·B, (n, r))::

    dx = gy·W + drop'(t·A)        drop'(z) = z ⊙ m / (1-p)   (same mask, rebuilt from the seed)
    dA = tᵀ·drop(x)               drop(x) rebuilt from x and the mask, used, dropped
    dB = s·gyᵀ·u

Saved: x (the caller's tensor), u (n×r, float32) and the 8-byte seed. The dropped copy of x and
its mask are never kept between forward and backward; backward rebuilds the mask once (a
transient bool n×in) for both dx and dA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import registry
from ..function import DeltaLinearFunction
from ..philox import apply_keep, draw_seed, dropout_rows, keep_rows
from ..validate import (
    check_base, check_param, check_same_device, check_scaling, compute_dtype, fail,
)
from ._accumulate import add_into, addmm_into

FAMILY = "lowrank"


@dataclass(frozen=True)
class LowRankHP:
    scaling: float
    dropout: float


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Materialised ΔW = s·B·A, (out, in). Reference, tests and merging only."""
    return (B @ A) * scaling


def _dropped(x2d, aux, hp, dtype):
    if hp.dropout == 0.0:
        return x2d.to(dtype)
    return dropout_rows(x2d, aux[0], hp.dropout, dtype=dtype)


class TorchLowRank:
    """The pure-PyTorch kernels: three GEMMs forward (one fused add), four backward."""

    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        A, B = params
        cd = compute_dtype(x2d, A, B)
        u = _dropped(x2d, aux, hp, cd) @ A.to(cd).t()
        y = F.linear(x2d, weight, bias)
        y = addmm_into(y, u, B.to(cd).t(), alpha=hp.scaling)
        return y, (u,)

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        A, B = params
        (u,) = extras
        need_dA, need_dB = needs_dparams
        cd = compute_dtype(x2d, A, B)
        gyc = gy2d.to(cd)
        dx = dA = dB = None
        keep = None
        if needs_dx or need_dA:
            t = (gyc @ B.to(cd)).mul_(hp.scaling)  # (n, r)
            if hp.dropout:  # the forward's mask, rebuilt once for both uses
                keep = keep_rows(aux[0], *x2d.shape, hp.dropout, device=x2d.device)
        if needs_dx:
            dx = gy2d @ weight
            if keep is None:
                dx = addmm_into(dx, t, A.to(cd))
            else:
                dx = add_into(dx, apply_keep(t @ A.to(cd), keep, hp.dropout, inplace=True))
        if need_dA:
            xd = x2d.to(cd) if keep is None else apply_keep(x2d.to(cd), keep, hp.dropout)
            dA = (t.t() @ xd).to(A.dtype)
        if need_dB:
            dB = (gyc.t() @ u).mul_(hp.scaling).to(B.dtype)
        return dx, (dA, dB)


registry.register_family(FAMILY, delta_weight)
registry.register_kernels(FAMILY, "torch", TorchLowRank)


def lowrank_linear(x, weight, bias, A, B, scaling=1.0, dropout=0.0, seed=None, backend="auto",
                   *, name=None):
    """``y = x·Wᵀ + b + scaling·(drop(x)·Aᵀ)·Bᵀ`` without keeping drop(x).

    x: (..., in); weight: (out, in), frozen; bias: (out,) or None; A: (r, in) (peft's
    ``lora_A.weight``); B: (out, r) (``lora_B.weight``). ``dropout`` p in [0, 1); the mask is
    Philox-generated from ``seed`` (an int or 0-d int64 tensor; None draws one from torch's
    default generator, so checkpoint recomputation sees the same mask).
    """
    where = name or "lowrank_linear"
    out_f, in_f = check_base(where, x, weight, bias)
    check_param(where, "A", A, dim=2)
    r = A.shape[0]
    check_param(where, "A", A, expected_shape=(r, in_f))
    check_param(where, "B", B, expected_shape=(out_f, r))
    device = check_same_device(where, x=x, weight=weight, bias=bias, A=A, B=B)
    scaling = check_scaling(where, scaling)
    if isinstance(dropout, torch.Tensor) or not (0.0 <= float(dropout) < 1.0):
        fail(where, f"dropout must be a float in [0, 1), got {dropout!r}")
    dropout = float(dropout)
    aux = ()
    if dropout > 0.0:
        if seed is None:
            seed = draw_seed()
        elif isinstance(seed, int):
            seed = torch.tensor(seed, dtype=torch.int64)
        elif not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.dim() == 0):
            fail(where, f"seed must be an int or a 0-d int64 tensor, got {seed!r}")
        aux = (seed.cpu(),)
    _, kernels = registry.resolve(FAMILY, backend, device)
    return DeltaLinearFunction.apply(
        kernels, LowRankHP(scaling, dropout), 2, x, weight, bias, A, B, *aux
    )


__all__ = ["lowrank_linear", "delta_weight", "LowRankHP", "TorchLowRank"]
