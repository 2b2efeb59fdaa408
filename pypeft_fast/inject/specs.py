"""The per-family adapter table: adding a family to ``pf.inject`` touches this file only.

A spec says, for one family of :mod:`pypeft_fast.families`:

* ``options``: the :class:`DeltaConfig` fields it takes, with defaults (a callable default sees
  the config), and ``check_options(cfg)`` (``ValueError`` on a bad value);
* ``shapes(cfg, out, in, where)``: every per-layer tensor of a layer with weight (out, in) —
  ``{name: (shape, dtype kind)}``, kind ``"param"`` (trainable, adapter dtype) or ``"index"``
  (int64 buffer) — and ``shared_shapes(cfg)`` for Parameters shared by all injected layers;
* ``init_layer(cfg, tensors, weight, where)`` fills the new tensors so ΔW = 0 at step 0 while the
  gradient of the zero factor is not; ``init_shared`` likewise;
* ``call(m, x, weight, bias)``: the pf op for wrapper ``m`` (x: (..., in), weight: (out, in));
* ``delta_args(m)``: the arguments of the registry's ``FAMILIES[name].delta_weight`` (merge).

Wrapper attributes are the names in ``shapes``/``shared_shapes``; a pair factor (L, R) is stored
as ``<name>_left`` / ``<name>_right``.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..families.hadamard import hadamard_linear
from ..families.kronecker import kronecker_linear
from ..families.lowrank import lowrank_linear
from ..families.lowrank_adapter import ACTIVATIONS
from ..families.lowrank_dora import weight_row_stats
from ..families.phm import phm_linear
from ..families.sparse import sparse_linear
from .masks import STRATEGIES, mask_nnz, sparse_mask


def _fail(where, msg):
    raise ValueError(f"{where}: {msg}")


def _pos_int(cfg, opt, allow_none=False):
    v = getattr(cfg, opt)
    if v is None and allow_none:
        return
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
        _fail("DeltaConfig", f"{opt} must be a positive integer{' or None' if allow_none else ''}, "
                             f"got {v!r}")


def _finite(cfg, opt):
    v = getattr(cfg, opt)
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        _fail("DeltaConfig", f"{opt} must be a finite number, got {v!r}")


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    """peft's LoRA-A init (kaiming-uniform, a=√5) on each trailing 2-D slice."""
    for s in t.view(-1, *t.shape[-2:]):
        nn.init.kaiming_uniform_(s, a=math.sqrt(5))
    return t


def _pair_or(m, name):
    """``m.<name>`` or the pair ``(m.<name>_left, m.<name>_right)`` (read from ``_parameters``
    directly: no ``nn.Module.__getattr__`` on the per-call path)."""
    p = m._parameters
    if name in p:
        return p[name]
    return (p[name + "_left"], p[name + "_right"])


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
        _pos_int(cfg, "r")
        _finite(cfg, "alpha")
        if not isinstance(cfg.dropout, numbers.Real) or not 0.0 <= cfg.dropout < 1.0:
            _fail("DeltaConfig", f"dropout must be in [0, 1), got {cfg.dropout!r}")
        for opt in ("magnitude", "gate"):
            if not isinstance(getattr(cfg, opt), bool):
                _fail("DeltaConfig", f"{opt} must be True or False, got {getattr(cfg, opt)!r}")
        if cfg.activation is not None and cfg.activation not in ACTIVATIONS:
            _fail("DeltaConfig", f"activation must be None or one of {sorted(ACTIVATIONS)}, "
                                 f"got {cfg.activation!r}")
        if cfg.magnitude and (cfg.activation is not None or cfg.gate):
            _fail("DeltaConfig", "magnitude=True (DoRA) cannot be combined with activation= or gate=")

    @staticmethod
    def scaling(cfg):
        return cfg.alpha / cfg.r

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
        _kaiming(t["A"])
        t["B"].zero_()
        if cfg.magnitude:  # ‖W + s·B·A‖ with B = 0, one pass over W (no W-sized copy)
            sq, _ = weight_row_stats(weight.detach(), torch.float32)
            t["magnitude"].copy_(sq.sqrt())
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


class KroneckerSpec:
    """ΔW = s·A ⊗ B; A: (a_out, a_in) zeros (LoKr's w1), B: (b_out, b_in) kaiming-uniform, or the
    pair B_left (b_out, rank) @ B_right (rank, b_in), both kaiming-uniform (LoKr's w2_a, w2_b)."""

    name = "kronecker"
    options = {"factor_shape": None, "decompose_factor": -1, "rank": None, "scaling": 1.0}

    @staticmethod
    def check_options(cfg):
        fs = cfg.factor_shape
        if fs is not None:
            if (not isinstance(fs, (tuple, list)) or len(fs) != 2
                    or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                               for v in fs)):
                _fail("DeltaConfig", f"factor_shape must be (a_out, a_in) positive integers, got {fs!r}")
            cfg.factor_shape = tuple(int(v) for v in fs)
        d = cfg.decompose_factor
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or not (d == -1 or d >= 1):
            _fail("DeltaConfig", f"decompose_factor must be -1 or a positive integer, got {d!r}")
        _pos_int(cfg, "rank", allow_none=True)
        _finite(cfg, "scaling")

    @staticmethod
    def scaling(cfg):
        return float(cfg.scaling)

    @staticmethod
    def factor_shapes(cfg, out_f, in_f, where):
        if cfg.factor_shape is not None:
            a_out, a_in = cfg.factor_shape
            if out_f % a_out or in_f % a_in:
                _fail(where, f"weight ({out_f}, {in_f}) cannot be split by factor_shape "
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
                _kaiming(t[k])

    @staticmethod
    def call(m, x, weight, bias):
        return kronecker_linear(x, weight, bias, m._parameters["A"], _pair_or(m, "B"),
                                scaling=m.scaling,
                                backend=m.config.backend, name=m.layer_name)

    @staticmethod
    def delta_args(m):
        return (m.A, _pair_or(m, "B"), m.scaling)


class PHMSpec:
    """ΔW = s·Σᵢ Aᵢ ⊗ Bᵢ (Compacter); A: (n, n, n) kaiming-uniform per Aᵢ, shared by every injected
    layer when ``shared_A``; B: (n, out/n, in/n) zeros, or the pair B_left (n, out/n, rank) zeros
    @ B_right (n, rank, in/n) kaiming-uniform."""

    name = "phm"
    options = {"n": 4, "shared_A": True, "rank": None, "scaling": 1.0}

    @staticmethod
    def check_options(cfg):
        _pos_int(cfg, "n")
        if not isinstance(cfg.shared_A, bool):
            _fail("DeltaConfig", f"shared_A must be True or False, got {cfg.shared_A!r}")
        _pos_int(cfg, "rank", allow_none=True)
        _finite(cfg, "scaling")

    @staticmethod
    def scaling(cfg):
        return float(cfg.scaling)

    @staticmethod
    def shapes(cfg, out_f, in_f, where):
        n = cfg.n
        if out_f % n or in_f % n:
            _fail(where, f"phm with n={n} needs both dimensions of weight ({out_f}, {in_f}) "
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
        _kaiming(t["A"])

    @staticmethod
    def init_layer(cfg, t, weight, where):
        if "A" in t:
            _kaiming(t["A"])
        if "B" in t:
            t["B"].zero_()
        else:
            t["B_left"].zero_()
            _kaiming(t["B_right"])

    @staticmethod
    def call(m, x, weight, bias):
        return phm_linear(x, weight, bias, m._parameters["A"], _pair_or(m, "B"), scaling=m.scaling,
                          backend=m.config.backend, name=m.layer_name)

    @staticmethod
    def delta_args(m):
        return (m.A, _pair_or(m, "B"), m.scaling)


class SparseSpec:
    """ΔW = s·(values at indices); values: (nnz,) zeros; indices: (2, nnz) int64 from the mask."""

    name = "sparse"
    options = {"density": 0.01, "mask": "random",
               "block_size": lambda cfg: (8, 8) if cfg.mask == "block" else None,
               "seed": 0, "scaling": 1.0}

    @staticmethod
    def check_options(cfg):
        d = cfg.density
        if not isinstance(d, numbers.Real) or isinstance(d, bool) or not 0.0 < d <= 1.0:
            _fail("DeltaConfig", f"density must be in (0, 1], got {d!r}")
        if cfg.mask not in STRATEGIES:
            _fail("DeltaConfig", f"mask {cfg.mask!r}; expected one of {STRATEGIES}")
        bs = cfg.block_size
        if cfg.mask != "block" and bs is not None:
            _fail("DeltaConfig", f"block_size={bs!r} applies to mask='block' only, not {cfg.mask!r}")
        if cfg.mask == "block":
            if isinstance(bs, numbers.Integral) and not isinstance(bs, bool):
                bs = (bs, bs)
            if (not isinstance(bs, (tuple, list)) or len(bs) != 2
                    or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                               for v in bs)):
                _fail("DeltaConfig", f"block_size must be (rows, cols) positive integers, got {bs!r}")
            cfg.block_size = tuple(int(v) for v in bs)
        if not isinstance(cfg.seed, numbers.Integral) or isinstance(cfg.seed, bool):
            _fail("DeltaConfig", f"seed must be an integer, got {cfg.seed!r}")
        _finite(cfg, "scaling")

    @staticmethod
    def scaling(cfg):
        return float(cfg.scaling)

    @staticmethod
    def shapes(cfg, out_f, in_f, where):
        nnz = mask_nnz(where, cfg.density, out_f, in_f, cfg.mask, cfg.block_size)
        return {"values": ((nnz,), "param"), "indices": ((2, nnz), "index")}

    @staticmethod
    def init_layer(cfg, t, weight, where):
        t["values"].zero_()
        t["indices"].copy_(sparse_mask(where, weight, cfg.density, cfg.mask, cfg.seed, cfg.block_size))

    @staticmethod
    def call(m, x, weight, bias):
        return sparse_linear(x, weight, bias, m._parameters["values"], m._buffers["indices"],
                             scaling=m.scaling,
                             backend=m.config.backend, name=m.layer_name)

    @staticmethod
    def delta_args(m):
        return (m.values, m.indices, (m.out_features, m.in_features), m.scaling)


class HadamardSpec:
    """ΔW = (alpha/r)·(W1a·W1b) ⊙ (W2a·W2b) (peft LoHa): W1a, W2a (out, r), W1b, W2b (r, in);
    W1a, W1b, W2a kaiming-uniform, W2b zeros (peft's ``init_weights=True``)."""

    name = "hadamard"
    options = {"r": 8, "alpha": lambda cfg: cfg.r}

    @staticmethod
    def check_options(cfg):
        _pos_int(cfg, "r")
        _finite(cfg, "alpha")

    @staticmethod
    def scaling(cfg):
        return cfg.alpha / cfg.r

    @staticmethod
    def shapes(cfg, out_f, in_f, where):
        r = cfg.r
        return {"W1a": ((out_f, r), "param"), "W1b": ((r, in_f), "param"),
                "W2a": ((out_f, r), "param"), "W2b": ((r, in_f), "param")}

    @staticmethod
    def init_layer(cfg, t, weight, where):
        for k in ("W1a", "W1b", "W2a"):
            _kaiming(t[k])
        t["W2b"].zero_()

    @staticmethod
    def call(m, x, weight, bias):
        p = m._parameters
        return hadamard_linear(x, weight, bias, p["W1a"], p["W1b"], p["W2a"], p["W2b"],
                               scaling=m.scaling, backend=m.config.backend, name=m.layer_name)

    @staticmethod
    def delta_args(m):
        return (m.W1a, m.W1b, m.W2a, m.W2b, m.scaling)


SPECS = {s.name: s for s in (LowRankSpec, KroneckerSpec, PHMSpec, SparseSpec, HadamardSpec)}
"""family name → spec. Families without a spec here cannot be injected (patching peft still works)."""

FAMILY_OPTIONS: dict[str, list[str]] = {}
for _s in SPECS.values():
    for _opt in _s.options:
        FAMILY_OPTIONS.setdefault(_opt, []).append(_s.name)
