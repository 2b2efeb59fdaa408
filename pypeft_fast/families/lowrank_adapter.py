"""Parallel adapters on the low-rank family: an activation between A and B, and UniPELT's gate.

``lowrank_linear(..., activation=f, gate=(w_g, b_g))`` (He et al. 2022's parallel adapter,
MAM adapter; UniPELT's gated sublayer)::

    y = x·Wᵀ + b + s·γ ⊙ (f(u)·Bᵀ),    u = drop(x)·Aᵀ (n × r),   γ = σ(x·w_g + b_g) (n × 1)

(γ ≡ 1 without a gate; f = identity is LoRA). Backward, with h = f(u), q = gy·B (n × r)::

    dB   = s·(γ ⊙ gy)ᵀ·h
    dγ   = s·Σ_r h ⊙ q,    dℓ = dγ ⊙ γ(1-γ),   dw_g = xᵀ·dℓ,   db_g = Σ dℓ,   dx += dℓ·w_gᵀ
    du   = f'(u) ⊙ (s·γ ⊙ q)
    dA   = duᵀ·drop(x),    dx = gy·W + drop'(du·A) (+ the gate term)

Saved besides x: u (the n × r pre-activation, float32) and γ (n × 1); f(u) and f'(u) are
rebuilt from u. Nothing n × in beyond x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..philox import apply_keep, dropout_rows, keep_rows
from ..validate import compute_dtype
from ._accumulate import add_into, addmm_into, rank_t_mm

ACTIVATIONS = {
    "relu": (torch.relu, lambda g, u: torch.ops.aten.threshold_backward(g, u, 0)),
    "gelu": (F.gelu, lambda g, u: torch.ops.aten.gelu_backward(g, u)),
    "silu": (F.silu, lambda g, u: torch.ops.aten.silu_backward(g, u)),
}
"""activation name → (f, (grad, u) ↦ grad ⊙ f'(u)); exact erf GELU, as ``nn.GELU()``."""


def _act(hp, u):
    return u if hp.activation is None else ACTIVATIONS[hp.activation][0](u)


class TorchParallelAdapter:
    """params = (A, B[, w_g (in,), b_g (1,)])."""

    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        A, B = params[:2]
        cd = compute_dtype(x2d, *params)
        xd = x2d.to(cd) if hp.dropout == 0.0 else dropout_rows(x2d, aux[0], hp.dropout, dtype=cd)
        u = xd @ A.to(cd).t()
        h = _act(hp, u)
        gate = None
        if hp.gate:
            w_g, b_g = params[2:4]
            gate = torch.sigmoid(torch.addmv(b_g.to(cd), x2d.to(cd), w_g.to(cd)))   # (n,)
            h = h * gate.unsqueeze(1)
        y = addmm_into(F.linear(x2d, weight, bias), h, B.to(cd).t(), alpha=hp.scaling)
        return y, (u,) if gate is None else (u, gate)

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        A, B = params[:2]
        u = extras[0]
        gate = extras[1] if hp.gate else None
        cd = compute_dtype(x2d, *params)
        s, p = hp.scaling, hp.dropout
        Ac, Bc = A.to(cd), B.to(cd)
        gyc = gy2d.to(cd)
        h = _act(hp, u)
        q = gyc @ Bc                                          # (n, r)
        keep = keep_rows(aux[0], *x2d.shape, p, device=x2d.device) if p else None
        grads = [None] * len(params)
        dlogit = None
        if gate is not None:
            if needs_dx or needs_dparams[2] or needs_dparams[3]:
                dlogit = (h * q).sum(1).mul_(s).mul_(gate * (1 - gate))   # (n,)
            if needs_dparams[2]:
                grads[2] = (x2d.to(cd).t() @ dlogit).to(params[2].dtype)
            if needs_dparams[3]:
                grads[3] = dlogit.sum().reshape(1).to(params[3].dtype)
        if needs_dparams[1]:
            hg = h if gate is None else h * gate.unsqueeze(1)
            grads[1] = rank_t_mm(hg, gyc).mul_(s).t().contiguous().to(B.dtype)
        dx = None
        if needs_dx or needs_dparams[0]:
            dh = q.mul_(s) if gate is None else q.mul_(s).mul_(gate.unsqueeze(1))
            du = dh if hp.activation is None else ACTIVATIONS[hp.activation][1](dh, u)
            if needs_dx:
                dx = gy2d @ weight
                if keep is None and dlogit is None:
                    dx = addmm_into(dx, du, Ac)
                else:
                    back = du @ Ac
                    if keep is not None:
                        back = apply_keep(back, keep, p, inplace=True)
                    if dlogit is not None:
                        back.addr_(dlogit, params[2].to(cd))
                    dx = add_into(dx, back)
            if needs_dparams[0]:
                xd = x2d.to(cd) if keep is None else apply_keep(x2d.to(cd), keep, p)
                grads[0] = rank_t_mm(du, xd).to(A.dtype)
        return dx, tuple(grads)
