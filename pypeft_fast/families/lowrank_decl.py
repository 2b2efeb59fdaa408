"""The lowrank family's declaration (LoRA, DoRA, parallel adapters): its pf.inject spec, its
benchmark cases (setups and FLOP/parameter formulas) and its peft counterpart
(``pypeft_fast/declaration.py`` says who reads what)."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .. import registry, workloads
from ..declaration import CaseFamily, FamilyDeclaration
from ..inject.spec_tools import fail, finite, kaiming, pos_int, scaling_alpha_over_r
from .lowrank import delta_weight, lowrank_linear
from .lowrank_adapter import ACTIVATIONS
from .lowrank_dora import weight_row_norms


# ------------------------------------------------------------------------------ pf.inject

class LowRankSpec:
    """ΔW = (alpha/r)·B·A; A: (r, in) kaiming-uniform, B: (out, r) zeros (LoRA).

    ``magnitude=True``: DoRA (peft's math, ``families/lowrank_dora.py``), ``magnitude`` (out,)
    initialised to ‖Wᵢ‖ so that c = 1 at step 0. ``activation`` (None, "relu", "gelu", "silu")
    between A and B and ``gate=True`` (``gate_weight`` (in,) nn.Linear-uniform, ``gate_bias``
    (1,) zero: UniPELT's σ(x·w_g + b_g) per token): the parallel adapter
    (``families/lowrank_adapter.py``); these cannot be merged into W."""

    name = "lowrank"
    options = {"r": 8, "alpha": lambda cfg: cfg.r, "dropout": 0.0, "magnitude": False,
               "activation": None, "gate": False}

    @staticmethod
    def check_options(cfg):
        pos_int(cfg, "r")
        finite(cfg, "alpha")
        if not isinstance(cfg.dropout, numbers.Real) or not 0.0 <= cfg.dropout < 1.0:
            fail("DeltaConfig", f"dropout must be in [0, 1), got {cfg.dropout!r}")
        for opt in ("magnitude", "gate"):
            if not isinstance(getattr(cfg, opt), bool):
                fail("DeltaConfig", f"{opt} must be True or False, got {getattr(cfg, opt)!r}")
        if cfg.activation is not None and cfg.activation not in ACTIVATIONS:
            fail("DeltaConfig", f"activation must be None or one of {sorted(ACTIVATIONS)}, "
                                f"got {cfg.activation!r}")
        if cfg.magnitude and (cfg.activation is not None or cfg.gate):
            fail("DeltaConfig", "magnitude=True (DoRA) cannot be combined with activation= or gate=")

    scaling = staticmethod(scaling_alpha_over_r)

    @staticmethod
    def shapes(cfg, out_f, in_f, where):
        s = {"A": ((cfg.r, in_f), "param"), "B": ((out_f, cfg.r), "param")}
        if cfg.magnitude:
            s["magnitude"] = ((out_f,), "param")
        if cfg.gate:
            s["gate_weight"] = ((in_f,), "param")
            s["gate_bias"] = ((1,), "param")
        return s

    @staticmethod
    def init_layer(cfg, t, weight, where):
        kaiming(t["A"])
        t["B"].zero_()
        if cfg.magnitude:  # ‖W + s·B·A‖ with B = 0, one pass over W (no W-sized copy)
            t["magnitude"].copy_(weight_row_norms(weight.detach(), torch.float32))
        if cfg.gate:
            bound = 1.0 / math.sqrt(t["gate_weight"].shape[0])
            t["gate_weight"].uniform_(-bound, bound)
            t["gate_bias"].zero_()

    @staticmethod
    def call(m, x, weight, bias):
        p = m._parameters
        cfg = m.config
        return lowrank_linear(x, weight, bias, p["A"], p["B"], scaling=m.scaling,
                              dropout=cfg.dropout if m.training else 0.0,
                              backend=cfg.backend, name=m.layer_name,
                              magnitude=p["magnitude"] if cfg.magnitude else None,
                              activation=cfg.activation,
                              gate=(p["gate_weight"], p["gate_bias"]) if cfg.gate else None)

    @staticmethod
    def delta_args(m):
        cfg = m.config
        if cfg.magnitude or cfg.activation is not None or cfg.gate:
            what = "magnitude=True (DoRA)" if cfg.magnitude else "a parallel adapter (activation/gate)"
            raise ValueError(f"{m.layer_name}: lowrank with {what} has no additive ΔW to merge "
                             "or materialise; run it unmerged")
        return (m.A, m.B, m.scaling)


# ------------------------------------------------------------------------------ benchmark cases

def _lowrank(w, g, c):
    i, o, r = w["in"], w["out"], w["rank"]
    p = c.options.get("dropout", 0.0)
    params = {"A": g(r, i, scale=i ** -0.5, adapter=True), "B": g(o, r, scale=0.1, adapter=True)}
    fixed = {"dropout": p, "seed": torch.tensor(20261201, dtype=torch.int64), "scaling": workloads.LORA_SCALING}

    def ours(x, W, P, f, backend):
        return lowrank_linear(x, W, None, P["A"], P["B"], f["scaling"], f["dropout"], f["seed"], backend)

    def reference(x, W, P, f):  # peft LoraLayer: base + lora_B(lora_A(dropout(x))) * scaling
        xa = x.to(P["A"].dtype)
        xd = F.dropout(xa, f["dropout"], training=True) if f["dropout"] else xa
        return (F.linear(x, W) + F.linear(F.linear(xd, P["A"]), P["B"]) * f["scaling"]).to(x.dtype)

    def mask(impl, x):
        from ..philox import keep_mask
        if impl == "peft":
            return workloads.torch_rng_mask(x, p)
        return keep_mask(fixed["seed"], x.numel(), p).view(x.shape).to(x.device)

    return params, fixed, ours, reference, lambda P, f: (P["B"] @ P["A"]) * f["scaling"], mask if p else None


def _dora(w, g, c):
    i, o, r = w["in"], w["out"], w["rank"]
    params = {"A": g(r, i, scale=i ** -0.5, adapter=True), "B": g(o, r, scale=r ** -0.5, adapter=True),
              "m": g(o, adapter=True)}
    with torch.no_grad():  # magnitudes in [0.5, 1.5): nonzero, about the row norms of W + s·B·A
        params["m"].abs_().clamp_(max=1.0).add_(0.5)
    fixed = {"scaling": workloads.LORA_SCALING}

    def delta(P, f):  # the effective ΔW = diag(m / ‖W + s·B·A‖, detached)·(W + s·B·A) − W
        W = f["weight"].to(P["A"].dtype)
        merged = W + f["scaling"] * (P["B"] @ P["A"])
        c = P["m"] / torch.linalg.vector_norm(merged, dim=1).detach()
        return c[:, None] * merged - W

    def ours(x, W, P, f, backend):
        return lowrank_linear(x, W, None, P["A"], P["B"], f["scaling"], 0.0, None, backend, magnitude=P["m"])

    def reference(x, W, P, f):  # peft DoraLinearLayer (dropout 0): the norm of W + s·B·A formed
        base = F.linear(x, W)
        xa, Wa = x.to(P["A"].dtype), W.to(P["A"].dtype)
        norm = torch.linalg.vector_norm(Wa + f["scaling"] * (P["B"] @ P["A"]), dim=1).detach()
        c = (P["m"] / norm).view(1, -1)
        lora = F.linear(F.linear(xa, P["A"]), P["B"])
        return (base + (c - 1) * base + c * lora * f["scaling"]).to(x.dtype)

    return params, fixed, ours, reference, delta, None


def lowrank_flops(shape, rank, tokens):
    """Any dropout p: forward 2·n·r·(in + out), backward 4·n·r·(in + out) (t, dx, dA, dB)."""
    n, i, o, r = tokens, shape.in_features, shape.out_features, rank
    return 2.0 * n * r * (i + o), 4.0 * n * r * (i + o)


def dora_flops(shape, rank, tokens):
    """lowrank + the row norms of W + s·B·A, factored (2·out·in·r + 2·r²·in + 2·out·r²) + the
    magnitude scaling 2·n·out forward; backward lowrank's + 2·n·out."""
    n, i, o, r = tokens, shape.in_features, shape.out_features, rank
    fwd, bwd = lowrank_flops(shape, rank, tokens)
    norm = 2.0 * o * i * r + 2.0 * r * r * i + 2.0 * o * r * r
    return fwd + norm + 2.0 * n * o, bwd + 2.0 * n * o


def lowrank_params(shape, rank):
    return rank * (shape.in_features + shape.out_features)


def _saved_u(rank):  # u = x·Aᵀ (n, r) in fp32, written forward and read backward
    return rank


_LOWRANK = dict(setup=_lowrank, flops=lowrank_flops, params=lowrank_params, formula="lowrank",
                saved_floats=_saved_u)

DECLARATION = registry.declare(FamilyDeclaration(
    name="lowrank", function=lowrank_linear, delta_weight=delta_weight, inject=LowRankSpec,
    cases=(
        CaseFamily("lowrank", **_LOWRANK, options={"dropout": 0.0}),
        CaseFamily("lowrank-dropout", **_LOWRANK, options={"dropout": 0.05}),
        CaseFamily("dora", setup=_dora, flops=dora_flops, formula="dora", options={"magnitude": True},
                   params=lambda shape, rank: lowrank_params(shape, rank) + shape.out_features,
                   saved_floats=_saved_u),
    ),
    peft_counterpart="lora",
))
