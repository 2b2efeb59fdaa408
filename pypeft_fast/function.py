"""The one autograd Function behind every family: ``y = x·Wᵀ + b + x·ΔWᵀ`` with ΔW never built.

Forward  (x: (..., in), W: (out, in) frozen, b: (out,) or None, params: the family's delta factors)::

    y2d, extras = kernels.forward(x2d, W, b, params, aux, hp)        # x2d = x viewed as (n, in)

Backward (gy: (..., out))::

    dx2d, dparams = kernels.backward(gy2d, x2d, W, params, aux, extras, hp, needs...)
    db = Σ_rows gy2d

What is saved: the caller's ``x`` (the same tensor, never a reshaped copy), the parameters and the
factor-sized ``extras`` the family kernels return; the frozen weight only when x needs a gradient
(as ``F.linear`` does). ``aux`` tensors — a dropout seed, a mask's cached CSR layout, under autocast
DoRA's uncast frozen W — are per-mask constants shared by every step, not activations: they ride on
``ctx`` like the hyperparameters. Everything n×in that the backward needs beyond x (a dropped copy
of x, a reshaped x) is rebuilt there. When dx is not needed the kernels get a shape-only stand-in
for the weight (a stride-0 view of one element): they read its shape, never its data.

Autocast (``torch.autocast``, any device): :func:`delta_linear` — the entry every family's public
function calls — does what autocast does to the frozen ``F.linear``: x, W and b (float32/float16/
bfloat16, never float64) are cast to the autocast dtype (differentiable casts: dx comes back in
x's dtype), then the Function runs with autocast disabled. The kernels then see the case they
already serve for a bf16 base with fp32 adapters: the frozen GEMM in the autocast dtype, the
delta branch accumulated in float32 from the parameters as they are (peft rounds its adapter
term to bf16 — A and B for LoRA, the formed ΔW for LoKr, W + ΔW for SHiRA —; we do not, so the
parameter gradients are float32 sums, never rounded to bf16), y in the autocast dtype. What is
saved is the bf16 x once (the float32 x is not kept), the parameters themselves, no casts of them.
"""
from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on ``device_type``, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype autocast hands ``t`` to ``F.linear`` in: ``dtype`` for a floating, non-float64
    tensor (None: autocast off), else t's own. The argument checks read it without casting."""
    if dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return dtype


def autocast_cast(t, dtype: torch.dtype | None):
    """``t`` as autocast would hand it to ``F.linear`` (:func:`autocast_cast_dtype`); anything
    that is not a tensor unchanged."""
    if not isinstance(t, torch.Tensor):
        return t
    target = autocast_cast_dtype(t, dtype)
    return t if target == t.dtype else t.to(target)


def without_autocast(device_type: str, fn, *args):
    """``fn(*args)`` with autocast off on ``device_type``. The context is entered only when
    autocast is on: entering and leaving it costs about as much as a small op (≈ 4 µs a call
    here), twice per layer and step."""
    if not torch.is_autocast_enabled(device_type):
        return fn(*args)
    with torch.autocast(device_type, enabled=False):
        return fn(*args)


def delta_linear(kernels, hp, n_params, x, weight, bias, *tensors):
    """``y = x·Wᵀ + b + x·ΔWᵀ`` through ``kernels``: the one call every family's public function
    makes (after its checks). Under autocast x, W and b are cast as autocast casts ``F.linear``'s
    (see the module docstring); ``tensors`` = the ``n_params`` delta parameters, then aux."""
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight, bias = (autocast_cast(t, dtype) for t in (x, weight, bias))
    return DeltaLinearFunction.apply(kernels, hp, n_params, x, weight, bias, *tensors)


class DeltaLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, hp, n_params, x, weight, bias, *tensors):
        params, aux = tensors[:n_params], tensors[n_params:]
        x2d = x.reshape(-1, x.shape[-1])
        # inputs were cast by delta_linear
        y2d, extras = without_autocast(x.device.type, kernels.forward, x2d, weight, bias, params,
                                       aux, hp)
        ctx.kernels, ctx.hp, ctx.n_params, ctx.aux = kernels, hp, n_params, aux
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.keeps_weight = ctx.needs_input_grad[3]
        ctx.weight_meta = (weight.shape, weight.dtype, weight.device)
        ctx.save_for_backward(x, *params, *extras, *((weight,) if ctx.keeps_weight else ()))
        return y2d.view(*x.shape[:-1], y2d.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        # Indexing, not `x, *rest = ...; rest.pop()`: torch 2.11's dynamo models the starred
        # target as a tuple and cannot trace .pop() (a graph break under torch.compile).
        saved = ctx.saved_tensors
        x = saved[0]
        if ctx.keeps_weight:
            weight, rest = saved[-1], saved[1:-1]
        else:
            shape, dtype, device = ctx.weight_meta
            weight = torch.zeros((), dtype=dtype, device=device).expand(shape)
            rest = saved[1:]
        params = tuple(rest[: ctx.n_params])
        extras = tuple(rest[ctx.n_params :])
        aux = ctx.aux
        needs = ctx.needs_input_grad  # (kernels, hp, n_params, x, weight, bias, *params, *aux)
        needs_dx = needs[3]
        needs_dbias = ctx.bias_dtype is not None and needs[5]
        needs_dparams = tuple(needs[6 : 6 + ctx.n_params])
        gy2d = gy.reshape(-1, gy.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        dx2d, dparams = without_autocast(  # backward may run inside autocast
            x.device.type, ctx.kernels.backward,
            gy2d, x2d, weight, params, aux, extras, ctx.hp, needs_dx, needs_dparams,
        )
        dx = dx2d.view(x.shape) if dx2d is not None else None
        dbias = None
        if needs_dbias:  # summed in float32, or float64 for a float64 bias
            sum_dtype = torch.promote_types(torch.float32, ctx.bias_dtype)
            dbias = gy2d.sum(0, dtype=sum_dtype).to(ctx.bias_dtype)
        return (None, None, None, dx, None, dbias, *dparams, *([None] * len(aux)))
