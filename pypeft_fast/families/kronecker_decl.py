"""The kronecker family's declaration (LoKr): its pf.inject spec, LoKr's factorization, its
benchmark case (setup and FLOP/parameter formulas) and its peft counterpart
(``pypeft_fast/declaration.py`` says who reads what)."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import registry, workloads
from ..declaration import CaseFamily, FamilyDeclaration
from ..inject.spec_tools import fail, finite, int_pair, kaiming, pair_or, pos_int, scaling_option
from .kronecker import delta_weight, kronecker_linear, macs_per_row


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension, as peft LoKr's ``factorization``: ``factor > 0`` dividing the
    dimension gives (factor, dimension/factor); otherwise the most balanced split with m ≤ n
    (m ≤ factor when factor > 0)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


# ------------------------------------------------------------------------------ pf.inject

class KroneckerSpec:
    """ΔW = s·A ⊗ B; A: (a_out, a_in) zeros (LoKr's w1), B: (b_out, b_in) kaiming-uniform, or the
    pair B_left (b_out, rank) @ B_right (rank, b_in), both kaiming-uniform (LoKr's w2_a, w2_b)."""

    name = "kronecker"
    options = {"factor_shape": None, "decompose_factor": -1, "rank": None, "scaling": 1.0}

    @staticmethod
    def check_options(cfg):
        fs = cfg.factor_shape
        if fs is not None:
            if not int_pair(fs):
                fail("DeltaConfig", f"factor_shape must be (a_out, a_in) positive integers, got {fs!r}")
            cfg.factor_shape = tuple(int(v) for v in fs)
        d = cfg.decompose_factor
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or not (d == -1 or d >= 1):
            fail("DeltaConfig", f"decompose_factor must be -1 or a positive integer, got {d!r}")
        pos_int(cfg, "rank", allow_none=True)
        finite(cfg, "scaling")

    scaling = staticmethod(scaling_option)

    @staticmethod
    def factor_shapes(cfg, out_f, in_f, where):
        if cfg.factor_shape is not None:
            a_out, a_in = cfg.factor_shape
            if out_f % a_out or in_f % a_in:
                fail(where, f"weight ({out_f}, {in_f}) cannot be split by factor_shape "
                            f"({a_out}, {a_in}); expected out % {a_out} == 0 and in % {a_in} == 0")
        else:
            a_out = factorization(out_f, cfg.decompose_factor)[0]
            a_in = factorization(in_f, cfg.decompose_factor)[0]
        return (a_out, a_in), (out_f // a_out, in_f // a_in)

    @classmethod
    def shapes(cls, cfg, out_f, in_f, where):
        a, (b_out, b_in) = cls.factor_shapes(cfg, out_f, in_f, where)
        s = {"A": (a, "param")}
        if cfg.rank is None:
            s["B"] = ((b_out, b_in), "param")
        else:
            s["B_left"] = ((b_out, cfg.rank), "param")
            s["B_right"] = ((cfg.rank, b_in), "param")
        return s

    @staticmethod
    def init_layer(cfg, t, weight, where):
        t["A"].zero_()
        for k in ("B", "B_left", "B_right"):
            if k in t:
                kaiming(t[k])

    @staticmethod
    def call(m, x, weight, bias):
        return kronecker_linear(x, weight, bias, m._parameters["A"], pair_or(m, "B"),
                                scaling=m.scaling,
                                backend=m.config.backend, name=m.layer_name)

    @staticmethod
    def delta_args(m):
        return (m.A, pair_or(m, "B"), m.scaling)


# ------------------------------------------------------------------------------ benchmark case

def kron_factors(shape, rank: int) -> tuple[tuple[int, int], tuple[int, int], int | None]:
    """LoKr's factor shapes: A (a_out, a_in), B (b_out, b_in), and B's rank (None: dense), as
    peft LoKr with decompose_factor -1: w2 factored when r < max(w2) / 2."""
    (ao, bo), (ai, bi) = factorization(shape.out_features), factorization(shape.in_features)
    k = rank if rank < max(bo, bi) / 2 else None
    return (ao, ai), (bo, bi), k


def sum_of_kronecker_flops(A3_shape, b_shape, k, tokens):
    """Σᵢ Aᵢ ⊗ Bᵢ applied to n rows: forward 2·n·macs_per_row (dense or rank-k B, the cheaper);
    backward 2.5 × forward. Shared with phm."""
    dense, factored = macs_per_row(A3_shape, b_shape, k or 1)
    fwd = 2.0 * tokens * (dense if k is None else min(dense, factored))
    return fwd, 2.5 * fwd


def _flops(shape, rank, tokens):
    (ao, ai), b, k = kron_factors(shape, rank)
    return sum_of_kronecker_flops((1, ao, ai), b, k, tokens)


def _params(shape, rank):
    (ao, ai), (bo, bi), k = kron_factors(shape, rank)
    return ao * ai + (bo * bi if k is None else k * (bo + bi))


def _kronecker(w, g, c):
    (ao, ai), (bo, bi), k = kron_factors(w["shape"], w["rank"])
    params = {"A": g(ao, ai, scale=0.1, adapter=True)}
    if k is None:
        params["B"] = g(bo, bi, scale=bi ** -0.5, adapter=True)
    else:
        params["B_left"] = g(bo, k, scale=0.1, adapter=True)
        params["B_right"] = g(k, bi, scale=bi ** -0.5, adapter=True)
    fixed = {"scaling": workloads.DELTA_SCALING}

    def factors(P):
        return P["A"], (P["B"] if "B" in P else (P["B_left"], P["B_right"]))

    def delta(P, f):
        A, B = factors(P)
        B = B[0] @ B[1] if isinstance(B, tuple) else B
        return torch.kron(A, B) * f["scaling"]

    def ours(x, W, P, f, backend):
        return kronecker_linear(x, W, None, *factors(P), f["scaling"], backend)

    def reference(x, W, P, f):  # peft LoKr: base + F.linear(x, kron(w1, w2_a @ w2_b) * scale)
        return (F.linear(x, W) + F.linear(x.to(P["A"].dtype), delta(P, f))).to(x.dtype)

    return params, fixed, ours, reference, delta, None


DECLARATION = registry.declare(FamilyDeclaration(
    name="kronecker", function=kronecker_linear, delta_weight=delta_weight, inject=KroneckerSpec,
    cases=(CaseFamily("kronecker", setup=_kronecker, flops=_flops, params=_params, formula="kronecker"),),
    peft_counterpart="lokr",
))
