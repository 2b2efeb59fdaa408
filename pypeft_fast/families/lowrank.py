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

Variants of the same family (same public function, same registry entry; each backend's kernels
say which calls they serve through ``supports``, see :mod:`pypeft_fast.registry`):

* DoRA — ``magnitude=m`` (and ``lora_bias=b_B``): :mod:`.lowrank_dora`;
* parallel adapters — ``activation=`` between A and B, ``gate=(w_g, b_g)``: :mod:`.lowrank_adapter`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import registry
from ..function import autocast_cast_dtype, autocast_dtype, delta_linear
from ..philox import apply_keep, draw_seed, dropout_rows, keep_rows
from ..validate import (
    check_base, check_dropout, check_param, check_same_device, check_scaling, check_seed,
    compute_dtype, fail,
)
from ._accumulate import add_into, addmm_into, rank_nt_mm, rank_t_mm
from ._layer import DeltaKernels
from .lowrank_adapter import ACTIVATIONS, TorchParallelAdapter
from .lowrank_dora import TorchDoRA

FAMILY = "lowrank"


@dataclass(frozen=True)
class LowRankHP:
    scaling: float
    dropout: float
    magnitude: bool = False       # DoRA: params (A, B, m[, b_B])
    activation: str | None = None  # parallel adapter: f between A and B
    gate: bool = False            # UniPELT gate: params (A, B, w_g, b_g)

    @property
    def variant(self) -> str | None:
        if self.magnitude:
            return "dora"
        if self.activation is not None or self.gate:
            return "adapter"
        return None


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Materialised ΔW = s·B·A, (out, in). Reference, tests and merging only."""
    return (B @ A) * scaling


class TorchLowRank(DeltaKernels):
    """The pure-PyTorch kernels: three GEMMs forward (one fused add), four backward; the DoRA
    and parallel-adapter variants run their own kernels (``VARIANTS``).

    The delta around the frozen layer (:class:`DeltaKernels`): ``u = drop(x)·Aᵀ`` before the
    frozen GEMM, ``y += s·u·Bᵀ``; backward ``t = s·gy·B``, ``dB = s·gyᵀ·u`` and, through
    :meth:`dropout_grads`, ``dx += drop'(t·A)``, ``dA = tᵀ·drop(x)``. A backend with its own
    dropout kernels overrides :meth:`down` and :meth:`dropout_grads` only."""

    VARIANTS = {"dora": TorchDoRA, "adapter": TorchParallelAdapter}
    t_mm = staticmethod(rank_t_mm)  # aᵀ·b over tokens: dA, dB
    nt_mm = staticmethod(rank_nt_mm)  # a·bᵀ against a factor: u = x·Aᵀ, t = gy·B
    update_into = staticmethod(addmm_into)  # y + α·u·Bᵀ, dx + t·A in y's / dx's dtype

    @staticmethod
    def operand(t, cd):
        """An activation (x, gy) as the rank products take it: converted to the accumulation
        dtype ``cd`` (a native backend that reads other dtypes returns it as it is)."""
        return t.to(cd)

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp):
        if hp.variant is not None:
            return cls.VARIANTS[hp.variant].forward(x2d, weight, bias, params, aux, hp)
        return super().forward(x2d, weight, bias, params, aux, hp)

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        if hp.variant is not None:
            return cls.VARIANTS[hp.variant].backward(gy2d, x2d, weight, params, aux, extras, hp,
                                                     needs_dx, needs_dparams)
        return super().backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams)

    @classmethod
    def down(cls, x2d, Ac, aux, hp):
        """``u = drop(x)·Aᵀ`` (n, r) in Ac's dtype."""
        if hp.dropout == 0.0:
            return cls.nt_mm(cls.operand(x2d, Ac.dtype), Ac)
        return cls.nt_mm(dropout_rows(x2d, aux[0], hp.dropout, dtype=Ac.dtype), Ac)

    @classmethod
    def dropout_grads(cls, dx, t, x2d, Ac, aux, hp, need_dA):
        """``(dx + drop'(t·A) or None, tᵀ·drop(x) or None)``: the forward's mask rebuilt once
        for both uses."""
        keep = keep_rows(aux[0], *x2d.shape, hp.dropout, device=x2d.device) if hp.dropout else None
        if dx is not None:
            if keep is None:
                dx = cls.update_into(dx, t, Ac)
            else:
                dx = add_into(dx, apply_keep(t @ Ac, keep, hp.dropout, inplace=True))
        dA = None
        if need_dA:
            xd = cls.operand(x2d, Ac.dtype) if keep is None else apply_keep(x2d.to(Ac.dtype), keep, hp.dropout)
            dA = cls.t_mm(t, xd)
        return dx, dA

    @classmethod
    def delta_prepare(cls, x2d, params, aux, hp):
        A, B = params
        return cls.down(x2d, A.to(compute_dtype(x2d, A, B)), aux, hp)

    @classmethod
    def delta_forward(cls, y, u, x2d, params, aux, hp):
        B = params[1]
        return cls.update_into(y, u, B.to(u.dtype).t(), alpha=hp.scaling), (u,)

    @classmethod
    def delta_backward(cls, dx, gy2d, x2d, params, aux, extras, hp, needs_dparams):
        A, B = params
        (u,) = extras
        need_dA, need_dB = needs_dparams
        cd = compute_dtype(x2d, A, B)
        gyc = cls.operand(gy2d, cd)
        dA = dB = None
        if dx is not None or need_dA:
            t = cls.nt_mm(gyc, B.to(cd).t()).mul_(hp.scaling)  # (n, r)
            dx, dA = cls.dropout_grads(dx, t, x2d, A.to(cd), aux, hp, bool(need_dA))
            dA = None if dA is None else dA.to(A.dtype)
        if need_dB:
            dB = cls.t_mm(u, gyc).mul_(hp.scaling).t().contiguous().to(B.dtype)
        return dx, (dA, dB)


registry.register_family(FAMILY, delta_weight)
registry.register_kernels(FAMILY, "torch", TorchLowRank)


def lowrank_linear(x, weight, bias, A, B, scaling=1.0, dropout=0.0, seed=None, backend="auto",
                   *, name=None, magnitude=None, lora_bias=None, activation=None, gate=None):
    """``y = x·Wᵀ + b + scaling·(drop(x)·Aᵀ)·Bᵀ`` without keeping drop(x).

    x: (..., in); weight: (out, in), frozen; bias: (out,) or None; A: (r, in) (peft's
    ``lora_A.weight``); B: (out, r) (``lora_B.weight``). ``dropout`` p in [0, 1); the mask is
    Philox-generated from ``seed`` (an int or 0-d int64 tensor; None draws one from torch's
    default generator, so checkpoint recomputation sees the same mask).

    DoRA: ``magnitude`` m (out,) (peft's ``lora_magnitude_vector[...].weight``) makes it
    peft's DoRA (:mod:`.lowrank_dora`); ``lora_bias`` b_B (out,) is peft's ``lora_B.bias``
    (DoRA only: plain LoRA folds s·b_B into ``bias``). Parallel adapter: ``activation`` one of
    None, "relu", "gelu", "silu" between A and B; ``gate`` a pair (w_g (in,), b_g (1,)) for
    UniPELT's per-token gate σ(x·w_g + b_g) on the delta (:mod:`.lowrank_adapter`).
    """
    where = name or "lowrank_linear"
    out_f, in_f = check_base(where, x, weight, bias)
    check_param(where, "A", A, dim=2)
    r = A.shape[0]
    check_param(where, "A", A, expected_shape=(r, in_f))
    check_param(where, "B", B, expected_shape=(out_f, r))
    check_same_device(where, x=x, weight=weight, bias=bias, A=A, B=B)
    scaling = check_scaling(where, scaling)
    dropout = check_dropout(where, dropout)
    extra = _variant_params(where, out_f, in_f, magnitude, lora_bias, activation, gate)
    if extra:
        check_same_device(where, x=x, **{f"param {i + 3}": t for i, t in enumerate(extra)})
    aux = ()
    if dropout > 0.0:  # a caller's seed is copied (it may reuse its tensor before backward)
        aux = (draw_seed() if seed is None else check_seed(where, seed),)
    if magnitude is not None and _autocast_casts(weight):  # DoRA's norm reads W, not the cast
        aux = (*aux, weight)                                # (lowrank_dora.norm_weight)
    hp = LowRankHP(scaling, dropout, magnitude is not None, activation, gate is not None)
    kernels = registry.kernels_for(FAMILY, backend, where, x, weight, (A, B, *extra), aux, hp)
    return delta_linear(kernels, hp, 2 + len(extra), x, weight, bias, A, B, *extra, *aux)


def _autocast_casts(weight) -> bool:
    """Whether autocast, if on, hands the frozen GEMMs a cast of ``weight`` (another tensor)."""
    dtype = autocast_dtype(weight.device.type)
    return dtype is not None and autocast_cast_dtype(weight, dtype) != weight.dtype


def _variant_params(where, out_f, in_f, magnitude, lora_bias, activation, gate) -> tuple:
    """The DoRA / parallel-adapter parameters after ``A, B``, checked."""
    if activation is not None and activation not in ACTIVATIONS:
        fail(where, f"activation must be None or one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if magnitude is None:
        if lora_bias is not None:
            fail(where, "lora_bias is DoRA's (with magnitude=); for plain LoRA add scaling·b_B "
                        "to bias")
        if gate is None:
            return ()
        if not isinstance(gate, (tuple, list)) or len(gate) != 2:
            fail(where, f"gate must be a pair (w_g (in,), b_g (1,)), got {type(gate).__name__}")
        check_param(where, "gate[0]", gate[0], expected_shape=(in_f,))
        check_param(where, "gate[1]", gate[1], expected_shape=(1,))
        return tuple(gate)
    if activation is not None or gate is not None:
        fail(where, "magnitude (DoRA) cannot be combined with activation= or gate=")
    check_param(where, "magnitude", magnitude, expected_shape=(out_f,))
    if lora_bias is None:
        return (magnitude,)
    check_param(where, "lora_bias", lora_bias, expected_shape=(out_f,))
    return (magnitude, lora_bias)


__all__ = ["lowrank_linear", "delta_weight", "LowRankHP", "TorchLowRank"]
