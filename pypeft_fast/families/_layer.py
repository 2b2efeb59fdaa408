"""The frozen layer part of a :class:`~pypeft_fast.registry.Kernels` class, written once.

Every family computes ``y = x·Wᵀ + b + δ(x)`` and ``dx = gy·W + δ'(gy)``; the frozen GEMMs and the
bias are the same for every backend. A backend that implements only the delta subclasses
:class:`DeltaKernels` and defines::

    delta_prepare(x2d, params, aux, hp)                            -> pre   (optional; None)
    delta_forward(y, pre, x2d, params, aux, hp)                    -> (y + δ(x), extras)
    delta_backward(dx, gy2d, x2d, params, aux, extras, hp, needs_dparams)
                                                                   -> (dx + δ'(gy) | None, dparams)

``pre`` is what the delta computes from x before the frozen GEMM runs (low-rank: u = drop(x)·Aᵀ,
so that a transient dropped copy of x is gone before y is allocated), ``y`` is
``F.linear(x2d, weight, bias)`` (activation dtype) and ``dx`` is ``gy2d @ weight``, or None when
x needs no gradient (then ``weight`` is a shape-only stand-in and never read). The
delta is accumulated into them — in place (one fused GEMM / native op writing the frozen GEMM's
output) or summed in the accumulation dtype and rounded once (``_accumulate.py``) — so the split
adds no pass over n-sized tensors. Kernels whose delta changes the frozen product itself (DoRA's
column scale, LoHa's dense W + ΔW, Triton's one fused kernel) implement ``forward``/``backward``
whole.
"""
from __future__ import annotations

import torch.nn.functional as F


class DeltaKernels:
    """``forward``/``backward`` of the frozen layer around a subclass's delta (module docstring)."""

    @staticmethod
    def delta_prepare(x2d, params, aux, hp):
        return None

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp):
        pre = cls.delta_prepare(x2d, params, aux, hp)
        return cls.delta_forward(F.linear(x2d, weight, bias), pre, x2d, params, aux, hp)

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        dx = gy2d @ weight if needs_dx else None
        return cls.delta_backward(dx, gy2d, x2d, params, aux, extras, hp, needs_dparams)
