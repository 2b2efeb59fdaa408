"""The hadamard family's declaration (LoHa): its pf.inject spec, its benchmark cases (the
cost model's plan and the two forms forced; setups and FLOP/parameter formulas) and its peft
counterpart (``pypeft_fast/declaration.py`` says who reads what)."""
from __future__ import annotations

import torch.nn.functional as F

from .. import registry, workloads
from ..declaration import CaseFamily, FamilyDeclaration
from ..inject.spec_tools import finite, kaiming, pos_int, scaling_alpha_over_r
from .hadamard import delta_weight, hadamard_linear


# ------------------------------------------------------------------------------ pf.inject

class HadamardSpec:
    """ΔW = (alpha/r)·(W1a·W1b) ⊙ (W2a·W2b) (peft LoHa): W1a, W2a (out, r), W1b, W2b (r, in);
    W1a, W1b, W2a kaiming-uniform, W2b zeros (peft's ``init_weights=True``)."""

    name = "hadamard"
    options = {"r": 8, "alpha": lambda cfg: cfg.r}

    @staticmethod
    def check_options(cfg):
        pos_int(cfg, "r")
        finite(cfg, "alpha")

    scaling = staticmethod(scaling_alpha_over_r)

    @staticmethod
    def shapes(cfg, out_f, in_f, where):
        r = cfg.r
        return {"W1a": ((out_f, r), "param"), "W1b": ((r, in_f), "param"),
                "W2a": ((out_f, r), "param"), "W2b": ((r, in_f), "param")}

    @staticmethod
    def init_layer(cfg, t, weight, where):
        for k in ("W1a", "W1b", "W2a"):
            kaiming(t[k])
        t["W2b"].zero_()

    @staticmethod
    def call(m, x, weight, bias):
        p = m._parameters
        return hadamard_linear(x, weight, bias, p["W1a"], p["W1b"], p["W2a"], p["W2b"],
                               scaling=m.scaling, backend=m.config.backend, name=m.layer_name)

    @staticmethod
    def delta_args(m):
        return (m.W1a, m.W1b, m.W2a, m.W2b, m.scaling)


# ------------------------------------------------------------------------------ benchmark cases

def _flops(shape, rank, tokens):
    """The cheaper form per direction. Khatri–Rao: ΔW = (W1a ⊙ᵣ W2a)(W1b ⊙ᵣ W2b) has rank r²
    (forming the factors: r²·(in + out) products); forward 2·n·r²·(in+out), backward t, dx,
    both factor gradients 4·n·r²·(in+out) + the chain rule to the four factors 4·r²·(in+out).
    Dense (ΔW formed as a transient per op): forming M1, M2 2·out·in·2r and W' = W + s·M1⊙M2
    3·out·in, the frozen GEMM then runs on W'; backward forms it again, G = gyᵀ·x (2·n·in·out)
    and the four rank-r products (4·out·in·2r)."""
    n, i, o, r = tokens, shape.in_features, shape.out_features, rank
    r2 = r * r
    kr_f, kr_b = 2.0 * n * r2 * (i + o) + 2.0 * r2 * (i + o), 4.0 * n * r2 * (i + o) + 4.0 * r2 * (i + o)
    form = 4.0 * o * i * r + 3.0 * o * i
    return min(kr_f, form), min(kr_b, form + 2.0 * n * i * o + 8.0 * o * i * r)


def _params(shape, rank):
    return 2 * rank * (shape.in_features + shape.out_features)


def _hadamard(w, g, c):
    i, o, r = w["in"], w["out"], w["rank"]
    params = {"W1a": g(o, r, scale=r ** -0.5, adapter=True), "W1b": g(r, i, scale=i ** -0.5, adapter=True),
              "W2a": g(o, r, scale=r ** -0.5, adapter=True), "W2b": g(r, i, scale=1.0, adapter=True)}
    fixed = {"scaling": workloads.LORA_SCALING}

    def delta(P, f):
        return (P["W1a"] @ P["W1b"]) * (P["W2a"] @ P["W2b"]) * f["scaling"]

    method = c.options.get("method", "auto")

    def ours(x, W, P, f, backend):
        return hadamard_linear(x, W, None, P["W1a"], P["W1b"], P["W2a"], P["W2b"], f["scaling"], backend,
                               method=method)

    def reference(x, W, P, f):  # peft LoHa: base + F.linear(x, (w1a·w1b) ⊙ (w2a·w2b) · scale)
        return (F.linear(x, W) + F.linear(x.to(P["W1a"].dtype), delta(P, f))).to(x.dtype)

    return params, fixed, ours, reference, delta, None


_CASE = dict(setup=_hadamard, flops=_flops, params=_params, formula="hadamard")

DECLARATION = registry.declare(FamilyDeclaration(
    name="hadamard", function=hadamard_linear, delta_weight=delta_weight, inject=HadamardSpec,
    cases=(
        CaseFamily("hadamard", **_CASE),  # the cost model's per-shape plan
        CaseFamily("hadamard-factored", **_CASE, options={"method": "factored"}, forced_form=True),
        CaseFamily("hadamard-dense", **_CASE, options={"method": "dense"}, forced_form=True),
    ),
    peft_counterpart="loha",
))
