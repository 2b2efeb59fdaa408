"""The sparse family's declaration (SHiRA, SparseAdapter): its pf.inject spec (masks:
``inject/masks.py``), its benchmark case (setup and FLOP/parameter formulas) and its peft
counterpart (``pypeft_fast/declaration.py`` says who reads what)."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import registry
from ..declaration import CaseFamily, FamilyDeclaration
from ..inject.masks import STRATEGIES, mask_nnz, sparse_mask
from ..inject.spec_tools import fail, finite, int_pair, scaling_option
from .sparse import delta_weight, sparse_linear


# ------------------------------------------------------------------------------ pf.inject

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
            fail("DeltaConfig", f"density must be in (0, 1], got {d!r}")
        if cfg.mask not in STRATEGIES:
            fail("DeltaConfig", f"mask {cfg.mask!r}; expected one of {STRATEGIES}")
        bs = cfg.block_size
        if cfg.mask != "block" and bs is not None:
            fail("DeltaConfig", f"block_size={bs!r} applies to mask='block' only, not {cfg.mask!r}")
        if cfg.mask == "block":
            if isinstance(bs, numbers.Integral) and not isinstance(bs, bool):
                bs = (bs, bs)
            if not int_pair(bs):
                fail("DeltaConfig", f"block_size must be (rows, cols) positive integers, got {bs!r}")
            cfg.block_size = tuple(int(v) for v in bs)
        if not isinstance(cfg.seed, numbers.Integral) or isinstance(cfg.seed, bool):
            fail("DeltaConfig", f"seed must be an integer, got {cfg.seed!r}")
        finite(cfg, "scaling")

    scaling = staticmethod(scaling_option)

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


# ------------------------------------------------------------------------------ benchmark case

def sparse_nnz(shape, rank: int) -> int:
    """SHiRA's parameter parity with LoRA rank r: nnz = r·(in + out), at most the whole matrix."""
    return min(rank * (shape.in_features + shape.out_features), shape.in_features * shape.out_features)


def _flops(shape, rank, tokens):
    """nnz = r·(in + out): forward 2·n·nnz (SpMM), backward 4·n·nnz (SpMM + SDDMM)."""
    nnz = sparse_nnz(shape, rank)
    return 2.0 * tokens * nnz, 4.0 * tokens * nnz


def _sparse(w, g, c):
    shape, i, o = w["shape"], w["in"], w["out"]
    nnz = sparse_nnz(shape, w["rank"])
    gen = torch.Generator(w["device"]).manual_seed(w["seed"] + 17)
    flat = torch.randperm(i * o, generator=gen, device=w["device"])[:nnz]
    indices = torch.stack([flat // i, flat % i])
    params = {"values": g(nnz, scale=0.01, adapter=True)}
    fixed = {"indices": indices, "scaling": 1.0}

    def delta(P, f):
        v = P["values"]
        dw = torch.zeros(o, i, dtype=v.dtype, device=v.device)
        return dw.index_put((f["indices"][0], f["indices"][1]), v) * f["scaling"]

    def ours(x, W, P, f, backend):
        return sparse_linear(x, W, None, P["values"], f["indices"], f["scaling"], backend)

    def reference(x, W, P, f):  # peft SHiRA: W + the sparse ΔW made dense, then F.linear
        dw = torch.sparse_coo_tensor(f["indices"], P["values"] * f["scaling"], (o, i), check_invariants=False).to_dense()
        return F.linear(x, W + dw.to(W.dtype))

    return params, fixed, ours, reference, delta, None


DECLARATION = registry.declare(FamilyDeclaration(
    name="sparse", function=sparse_linear, delta_weight=delta_weight, inject=SparseSpec,
    cases=(CaseFamily("sparse", setup=_sparse, flops=_flops, params=sparse_nnz, formula="sparse"),),
    peft_counterpart="shira",
))
