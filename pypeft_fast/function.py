"""The one autograd Function behind every family: ``y = x·Wᵀ + b + x·ΔWᵀ`` with ΔW never built.

Forward  (x: (..., in), W: (out, in) frozen, b: (out,) or None, params: the family's delta factors)::

    y2d, extras = kernels.forward(x2d, W, b, params, aux, hp)        # x2d = x viewed as (n, in)

Backward (gy: (..., out))::

    dx2d, dparams = kernels.backward(gy2d, x2d, W, params, aux, extras, hp, needs...)
    db = Σ_rows gy2d

What is saved: the caller's ``x`` (the same tensor, never a reshaped copy), the frozen weight, the
parameters, ``aux`` and the factor-sized ``extras`` the family kernels return. Everything n×in that
the backward needs beyond x (a dropped copy of x, a reshaped x) is rebuilt there.
"""
from __future__ import annotations

import torch


class DeltaLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, hp, n_params, x, weight, bias, *tensors):
        params, aux = tensors[:n_params], tensors[n_params:]
        x2d = x.reshape(-1, x.shape[-1])
        y2d, extras = kernels.forward(x2d, weight, bias, params, aux, hp)
        ctx.kernels, ctx.hp, ctx.n_params, ctx.n_aux = kernels, hp, n_params, len(aux)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, *params, *aux, *extras)
        return y2d.view(*x.shape[:-1], y2d.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, weight, *rest = ctx.saved_tensors
        params = tuple(rest[: ctx.n_params])
        aux = tuple(rest[ctx.n_params : ctx.n_params + ctx.n_aux])
        extras = tuple(rest[ctx.n_params + ctx.n_aux :])
        needs = ctx.needs_input_grad  # (kernels, hp, n_params, x, weight, bias, *params, *aux)
        needs_dx = needs[3]
        needs_dbias = ctx.bias_dtype is not None and needs[5]
        needs_dparams = tuple(needs[6 : 6 + ctx.n_params])
        gy2d = gy.reshape(-1, gy.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        dx2d, dparams = ctx.kernels.backward(
            gy2d, x2d, weight, params, aux, extras, ctx.hp, needs_dx, needs_dparams
        )
        dx = dx2d.view(x.shape) if dx2d is not None else None
        dbias = gy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if needs_dbias else None
        return (None, None, None, dx, None, dbias, *dparams, *([None] * ctx.n_aux))
