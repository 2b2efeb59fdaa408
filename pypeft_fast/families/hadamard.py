"""Hadamard family (LoHa, FedPara): ΔW = s·(W1a·W1b) ⊙ (W2a·W2b).

Shapes: x2d (n, in), W (out, in), W1a (out, r1), W1b (r1, in), W2a (out, r2), W2b (r2, in);
M1 = W1a·W1b and M2 = W2a·W2b are (out, in); R = r1·r2.

Two exact ways to apply ΔW, chosen per op by a cost model (:func:`plan_for`, measured in
bench/NOTES.md "Hadamard"):

**factored (Khatri–Rao)** — ΔW is a rank-R product of column-wise Hadamard factors, never built::

    Ka[i, (p,q)] = W1a[i,p]·W2a[i,q]     (out, R)      ΔW = s·Ka·Kb
    Kb[(p,q), j] = W1b[p,j]·W2b[q,j]     (R, in)

    forward   u = x·Kbᵀ (n, R);  y = x·Wᵀ + b + s·u·Kaᵀ
    backward  t = s·gy·Ka (n, R);  dx = gy·W + t·Kb
              dKa = s·gyᵀ·u (u rebuilt, not saved);  dKb = tᵀ·x
              dW1a[i,p] = Σ_q dKa[i,(p,q)]·W2a[i,q]    dW2a[i,q] = Σ_p dKa[i,(p,q)]·W1a[i,p]
              dW1b[p,j] = Σ_q dKb[(p,q),j]·W2b[q,j]    dW2b[q,j] = Σ_p dKb[(p,q),j]·W1b[p,j]

**dense** — ΔW formed once per op into a transient (the one family where a weight-sized
transient is allowed: it never outlives the op and is never saved; backward rebuilds it)::

    forward   W' = W + s·M1⊙M2;  y = x·W'ᵀ + b                        (one GEMM)
    backward  dx = gy·W'  (W' rebuilt)
              G = s·gyᵀ·x (out, in);  dW1a = (G⊙M2)·W1bᵀ,  dW1b = W1aᵀ·(G⊙M2)
                                     dW2a = (G⊙M1)·W2bᵀ,  dW2b = W2aᵀ·(G⊙M1)

The three parts — forward, dx, factor gradients — are chosen independently
(:class:`HadamardPlan`). Saved for backward: x and the four factors, nothing else.
On CPU the cpp kernels (``pypeft_fast.native.NativeHadamard``) run the dense form's W' and its
four factor gradients in one native pass each, and G on MKL's bf16 → float32 GEMM for a bf16 x
where the CPU has AMX; the plan reads each kernels' prices (:class:`DenseCosts`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import registry
from ..function import autocast_cast_dtype, autocast_dtype, delta_linear
from ..validate import check_base, check_param, check_same_device, check_scaling, compute_dtype, fail
from ._accumulate import addmm_into

FAMILY = "hadamard"
METHODS = ("factored", "dense")


@dataclass(frozen=True)
class HadamardPlan:
    """Which form computes each part of the op: ``"factored"`` (Khatri–Rao) or ``"dense"``."""

    forward: str
    dx: str
    grads: str

    def __post_init__(self):
        for part in ("forward", "dx", "grads"):
            if getattr(self, part) not in METHODS:
                raise ValueError(f"HadamardPlan.{part} must be one of {METHODS}, got {getattr(self, part)!r}")


@dataclass(frozen=True)
class HadamardHP:
    scaling: float
    plan: HadamardPlan


# --- the cost model (FLOPs + BYTE_WEIGHT · bytes of fp32 transients; bench/NOTES.md "Hadamard") ---

BYTE_WEIGHT = float(os.environ.get("PYPEFT_FAST_HADAMARD_BYTE_WEIGHT", 16.0))
"""GEMM FLOPs that one byte of elementwise traffic over a weight-sized fp32 transient costs.
On the 2-core EPYC shared with other jobs (bench/bench_hadamard.py, bench/NOTES.md "Hadamard")
the dense form's passes over out×in transients ran 5–20× slower per byte than an idle machine's
0.5–1 FLOP/byte: 16 reproduces the measured winners (factored forward and dx at r = 8, dense at
r = 16); on an idle machine (0.5–1) the r = 8 forward would tip to dense, by ≈ 1–2 ms a layer."""


@dataclass(frozen=True)
class DenseCosts:
    """What the kernels' dense form costs beyond its GEMM FLOPs, in the units of
    :func:`part_costs`: ``gram`` — one FLOP of G = s·gyᵀ·x in float32-GEMM FLOPs (1: the operands
    upcast; 1/6 for ``gemm_bf16_f32`` on bf16 operands); ``form_passes`` — weight-sized passes of
    forming W', in float32 sizes (torch: M1, M2 written, W, M1, M2 read, W' written); ``grad_passes`` —
    those of the gradients' elementwise work (torch: M1, M2, G⊙M2, G⊙M1 and their reads)."""

    gram: float = 1.0
    form_passes: int = 5
    grad_passes: int = 11


def part_costs(n: int, in_f: int, out_f: int, r1: int, r2: int,
               costs: DenseCosts = DenseCosts()) -> dict[str, dict[str, float]]:
    """``{part: {method: cost}}`` for forward, dx and grads (FLOPs, bytes weighted by BYTE_WEIGHT).

    factored: the Khatri–Rao GEMMs (R = r1·r2 wide). dense: forming M1, M2 (2·out·in·(r1+r2)),
    the elementwise passes over out×in transients (``costs``: the kernels'
    :meth:`~TorchHadamard.dense_costs`), and for grads the n×out×in GEMM G = gyᵀ·x (each FLOP at
    ``costs.gram``) plus the four rank-r products. The frozen GEMMs (x·Wᵀ, gy·W) are the same in
    both forms and left out. The factored dx reuses t = s·gy·Ka of the factored grads.
    """
    R, oi, b = r1 * r2, out_f * in_f, 4 * BYTE_WEIGHT
    products = 2.0 * oi * (r1 + r2)                   # M1 and M2
    form = products + b * oi * costs.form_passes
    return {
        "forward": {"factored": 2.0 * n * R * (in_f + out_f), "dense": form},
        "dx": {"factored": 2.0 * n * R * (in_f + out_f), "dense": form},
        "grads": {"factored": 4.0 * n * R * (in_f + out_f),
                  "dense": 2.0 * n * oi * costs.gram + 4.0 * oi * (r1 + r2) + products
                  + b * oi * costs.grad_passes},
    }


def plan_for(n: int, in_f: int, out_f: int, r1: int, r2: int,
             costs: DenseCosts = DenseCosts()) -> HadamardPlan:
    """The cheaper form of each part by :func:`part_costs`. When the grads are factored, t is
    already there, so the factored dx costs only its last GEMM (2·n·R·in)."""
    c = part_costs(n, in_f, out_f, r1, r2, costs)
    pick = {part: min(METHODS, key=lambda m: c[part][m]) for part in c}
    if pick["grads"] == "factored":
        dx_factored = 2.0 * n * r1 * r2 * in_f
        pick["dx"] = "factored" if dx_factored <= c["dx"]["dense"] else "dense"
    return HadamardPlan(pick["forward"], pick["dx"], pick["grads"])


# --- ΔW, the Khatri–Rao factors, the dense transient ---

def delta_weight(W1a, W1b, W2a, W2b, scaling: float = 1.0) -> torch.Tensor:
    """Materialised ΔW = s·(W1a·W1b) ⊙ (W2a·W2b), (out, in). Reference, tests and merging only."""
    return (W1a @ W1b) * (W2a @ W2b) * scaling


def khatri_rao(W1a, W1b, W2a, W2b, dtype):
    """``Ka`` (out, r1·r2) and ``Kb`` (r1·r2, in) with ΔW/s = Ka·Kb, in ``dtype``."""
    a1, a2, b1, b2 = (t.to(dtype) for t in (W1a, W2a, W1b, W2b))
    Ka = (a1.unsqueeze(2) * a2.unsqueeze(1)).reshape(a1.shape[0], -1)
    Kb = (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(-1, b1.shape[1])
    return Ka, Kb


def _products(params, dtype):
    W1a, W1b, W2a, W2b = (t.to(dtype) for t in params)
    return W1a @ W1b, W2a @ W2b


def _effective_weight(weight, M1, M2, scaling):
    """The transient W' = W + s·M1⊙M2 in M1's dtype (float32 or float64)."""
    return torch.addcmul(weight.to(M1.dtype), M1, M2, value=scaling)


class TorchHadamard:
    """The pure-PyTorch kernels, both forms (see the module docstring)."""

    @staticmethod
    def dense_weight(weight, params, cd, s, dtype):
        """The transient W' = W + s·M1⊙M2 rounded once to ``dtype`` (the GEMM's), summed in ``cd``."""
        M1, M2 = _products(params, cd)
        return _effective_weight(weight, M1, M2, s).to(dtype)

    @staticmethod
    def dense_factor_grads(G, params, needs):
        """(dW1a, dW1b, dW2a, dW2b) from the dense G = s·gyᵀ·x (out, in), a transient it
        consumes: G1 = G⊙M2, G2 = G⊙M1 (in place), dW1a = G1·W1bᵀ, dW1b = W1aᵀ·G1,
        dW2a = G2·W2bᵀ, dW2b = W2aᵀ·G2 (None where not needed)."""
        W1a, W1b, W2a, W2b = (p.to(G.dtype) for p in params)
        M1, M2 = W1a @ W1b, W2a @ W2b
        G1 = G * M2
        del M2
        G2 = G.mul_(M1)
        return (G1 @ W1b.t() if needs[0] else None, W1a.t() @ G1 if needs[1] else None,
                G2 @ W2b.t() if needs[2] else None, W2a.t() @ G2 if needs[3] else None)

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp):
        cd = compute_dtype(x2d, *params)
        if hp.plan.forward == "dense":
            return F.linear(x2d, cls.dense_weight(weight, params, cd, hp.scaling, x2d.dtype), bias), ()
        Ka, Kb = khatri_rao(*params, cd)
        u = x2d.to(cd) @ Kb.t()
        y = F.linear(x2d, weight, bias)
        return addmm_into(y, u, Ka.t(), alpha=hp.scaling), ()

    @staticmethod
    def gram(gy2d, x2d, cd, s):
        """G = s·gyᵀ·x (out, in) in ``cd``: the dense grads' one n-sized GEMM."""
        return (gy2d.to(cd).t() @ x2d.to(cd)).mul_(s)

    @staticmethod
    def dense_costs(dtype: torch.dtype) -> DenseCosts:
        """The dense form's costs (:class:`DenseCosts`) for an x and gy of ``dtype``: these
        kernels' five and eleven float32 passes, G from upcast operands."""
        return DenseCosts()

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        W1a, W1b, W2a, W2b = params
        n_a, n_b = needs_dparams[0] or needs_dparams[2], needs_dparams[1] or needs_dparams[3]
        cd = compute_dtype(x2d, *params)
        s, plan = hp.scaling, hp.plan
        dx = None
        grads = (None,) * 4
        if plan.grads == "factored" and (n_a or n_b):
            grads, t, Kb = _factored_grads(gy2d.to(cd), x2d.to(cd), params, s, n_a, n_b,
                                           want_t=needs_dx and plan.dx == "factored")
            if t is not None:
                dx = addmm_into(gy2d @ weight, t, Kb)
        elif n_a or n_b:
            grads = cls.dense_factor_grads(cls.gram(gy2d, x2d, cd, s), params, needs_dparams)
        if needs_dx and dx is None:
            if plan.dx == "dense":
                dx = gy2d @ cls.dense_weight(weight, params, cd, s, gy2d.dtype)
            else:
                Ka, Kb = khatri_rao(*params, cd)
                dx = addmm_into(gy2d @ weight, gy2d.to(cd) @ Ka, Kb, alpha=s)
        grads = tuple(None if g is None or not need else g.to(p.dtype)
                      for g, need, p in zip(grads, needs_dparams, params))
        return dx, grads


def _factored_grads(gyc, xc, params, s, need_a, need_b, want_t):
    """(dW1a, dW1b, dW2a, dW2b) through dKa = s·gyᵀ·u and dKb = tᵀ·x; also t = s·gy·Ka and Kb
    when ``want_t`` (the factored dx needs them)."""
    W1a, W1b, W2a, W2b = (p.to(gyc.dtype) for p in params)
    out_f, r1 = W1a.shape
    r2, in_f = W2b.shape
    Ka, Kb = khatri_rao(W1a, W1b, W2a, W2b, gyc.dtype)
    dW1a = dW1b = dW2a = dW2b = t = None
    if need_a:
        u = xc @ Kb.t()                                       # (n, R), rebuilt
        dKa = (gyc.t() @ u).mul_(s).view(out_f, r1, r2)
        dW1a = torch.einsum("ipq,iq->ip", dKa, W2a)
        dW2a = torch.einsum("ipq,ip->iq", dKa, W1a)
    if need_b or want_t:
        t = (gyc @ Ka).mul_(s)                                # (n, R)
    if need_b:
        dKb = (t.t() @ xc).view(r1, r2, in_f)
        dW1b = torch.einsum("pqj,qj->pj", dKb, W2b)
        dW2b = torch.einsum("pqj,pj->qj", dKb, W1b)
    return (dW1a, dW1b, dW2a, dW2b), (t if want_t else None), Kb


registry.register_family(FAMILY, delta_weight)
registry.register_kernels(FAMILY, "torch", TorchHadamard)


def _resolve_plan(where, method, n, in_f, out_f, r1, r2, costs) -> HadamardPlan:
    if isinstance(method, HadamardPlan):
        return method
    if method == "auto":
        return plan_for(n, in_f, out_f, r1, r2, costs)
    if method in METHODS:
        return HadamardPlan(method, method, method)
    fail(where, f"method must be 'auto', 'factored', 'dense' or a HadamardPlan, got {method!r}")


def hadamard_linear(x, weight, bias, W1a, W1b, W2a, W2b, scaling=1.0, backend="auto", *,
                    name=None, method="auto"):
    """``y = x·Wᵀ + b + x·(s·(W1a·W1b) ⊙ (W2a·W2b))ᵀ`` (peft LoHa's ``hada_w1_a`` … ``hada_w2_b``).

    x: (..., in); weight: (out, in), frozen; bias: (out,) or None; W1a: (out, r1), W1b: (r1, in),
    W2a: (out, r2), W2b: (r2, in). ``method``: "auto" (the cost model, per shape), "factored"
    (Khatri–Rao, ΔW never built), "dense" (ΔW formed per op as a transient, never saved), or a
    :class:`HadamardPlan` naming the form of each part.
    """
    where = name or "hadamard_linear"
    out_f, in_f = check_base(where, x, weight, bias)
    check_param(where, "W1a", W1a, dim=2)
    check_param(where, "W2a", W2a, dim=2)
    r1, r2 = W1a.shape[1], W2a.shape[1]
    check_param(where, "W1a", W1a, expected_shape=(out_f, r1))
    check_param(where, "W1b", W1b, expected_shape=(r1, in_f))
    check_param(where, "W2a", W2a, expected_shape=(out_f, r2))
    check_param(where, "W2b", W2b, expected_shape=(r2, in_f))
    check_same_device(where, x=x, weight=weight, bias=bias, W1a=W1a, W1b=W1b, W2a=W2a, W2b=W2b)
    scaling = check_scaling(where, scaling)
    n = x.numel() // in_f if in_f else 0
    params = (W1a, W1b, W2a, W2b)
    # The Hadamard kernels serve every call (no ``supports``), so they are chosen before the plan,
    # which reads their dense_costs for the dtype x will have in the Function (autocast's cast).
    kernels = registry.kernels_for(FAMILY, backend, where, x, weight, params, (), None)
    x_dtype = autocast_cast_dtype(x, autocast_dtype(x.device.type))
    plan = _resolve_plan(where, method, n, in_f, out_f, r1, r2, kernels.dense_costs(x_dtype))
    hp = HadamardHP(scaling, plan)
    return delta_linear(kernels, hp, 4, x, weight, bias, W1a, W1b, W2a, W2b)


__all__ = ["hadamard_linear", "delta_weight", "DenseCosts", "HadamardHP", "HadamardPlan", "TorchHadamard",
           "plan_for", "part_costs", "khatri_rao"]
