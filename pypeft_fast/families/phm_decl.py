"""The phm family's declaration (Compacter): its pf.inject spec and its benchmark case (setup
and FLOP/parameter formulas; no peft counterpart). ``pypeft_fast/declaration.py`` says who
reads what."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry, workloads
from ..declaration import CaseFamily, FamilyDeclaration
from ..inject.spec_tools import fail, finite, kaiming, pair_or, pos_int, scaling_option
from .kronecker_decl import sum_of_kronecker_flops
from .phm import delta_weight, phm_linear

PHM_TERMS = 4
"""The benchmark case's n: Compacter's n = 4 terms, A (4, 4, 4), B rank-r (4, out/4, r) @ (4, r, in/4)."""


# ------------------------------------------------------------------------------ pf.inject

class PHMSpec:
    """ΔW = s·Σᵢ Aᵢ ⊗ Bᵢ (Compacter); A: (n, n, n) kaiming-uniform per Aᵢ, shared by every injected
    layer when ``shared_A``; B: (n, out/n, in/n) zeros, or the pair B_left (n, out/n, rank) zeros
    @ B_right (n, rank, in/n) kaiming-uniform."""

    name = "phm"
    options = {"n": 4, "shared_A": True, "rank": None, "scaling": 1.0}

    @staticmethod
    def check_options(cfg):
        pos_int(cfg, "n")
        if not isinstance(cfg.shared_A, bool):
            fail("DeltaConfig", f"shared_A must be True or False, got {cfg.shared_A!r}")
        pos_int(cfg, "rank", allow_none=True)
        finite(cfg, "scaling")

    scaling = staticmethod(scaling_option)

    @staticmethod
    def shapes(cfg, out_f, in_f, where):
        n = cfg.n
        if out_f % n or in_f % n:
            fail(where, f"phm with n={n} needs both dimensions of weight ({out_f}, {in_f}) "
                        f"divisible by {n}")
        s = {} if cfg.shared_A else {"A": ((n, n, n), "param")}
        b_out, b_in = out_f // n, in_f // n
        if cfg.rank is None:
            s["B"] = ((n, b_out, b_in), "param")
        else:
            s["B_left"] = ((n, b_out, cfg.rank), "param")
            s["B_right"] = ((n, cfg.rank, b_in), "param")
        return s

    @staticmethod
    def shared_shapes(cfg):
        return {"A": (cfg.n, cfg.n, cfg.n)} if cfg.shared_A else {}

    @staticmethod
    def init_shared(cfg, t):
        kaiming(t["A"])

    @staticmethod
    def init_layer(cfg, t, weight, where):
        if "A" in t:
            kaiming(t["A"])
        if "B" in t:
            t["B"].zero_()
        else:
            t["B_left"].zero_()
            kaiming(t["B_right"])

    @staticmethod
    def call(m, x, weight, bias):
        return phm_linear(x, weight, bias, m._parameters["A"], pair_or(m, "B"), scaling=m.scaling,
                          backend=m.config.backend, name=m.layer_name)

    @staticmethod
    def delta_args(m):
        return (m.A, pair_or(m, "B"), m.scaling)


# ------------------------------------------------------------------------------ benchmark case

def _flops(shape, rank, tokens):
    h = PHM_TERMS
    return sum_of_kronecker_flops((h, h, h), (shape.out_features // h, shape.in_features // h), rank, tokens)


def _params(shape, rank):
    h = PHM_TERMS
    return h ** 3 + h * rank * (shape.out_features // h + shape.in_features // h)


def _phm(w, g, c):
    h, i, o, r = PHM_TERMS, w["in"], w["out"], w["rank"]
    params = {"A": g(h, h, h, scale=0.5, adapter=True),
              "S": g(h, o // h, r, scale=0.1, adapter=True),
              "T": g(h, r, i // h, scale=(i // h) ** -0.5, adapter=True)}
    fixed = {"scaling": workloads.DELTA_SCALING}

    def delta(P, f):
        B = P["S"] @ P["T"]
        return sum(torch.kron(P["A"][j], B[j]) for j in range(h)) * f["scaling"]

    def ours(x, W, P, f, backend):
        return phm_linear(x, W, None, P["A"], (P["S"], P["T"]), f["scaling"], backend)

    def reference(x, W, P, f):  # materialise Σ kron(Aᵢ, Sᵢ·Tᵢ), then F.linear
        return (F.linear(x, W) + F.linear(x.to(P["A"].dtype), delta(P, f))).to(x.dtype)

    return params, fixed, ours, reference, delta, None


DECLARATION = registry.declare(FamilyDeclaration(
    name="phm", function=phm_linear, delta_weight=delta_weight, inject=PHMSpec,
    cases=(CaseFamily("phm", setup=_phm, flops=_flops, params=_params, formula="phm",
                      reference_name="materialise"),),
))
