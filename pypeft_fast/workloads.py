"""Benchmark workloads: real projection shapes, the families' declared setups, FLOP/byte formulas.

Shared by the kernel micro-benchmarks (``bench/``), the end-to-end bench and the memory profiler,
so every measurement of a family runs the same tensors and counts work by the same formulas.

API (everything a benchmark or profiler needs; nothing here times anything)::

    SHAPES[key]                   ProjectionShape(model, proj, in_features, out_features)
                                  keys "llama-3-8b/q_proj", "bert-base/intermediate", ...
    CPU_TOKENS, GPU_TOKENS        tokens per call (batch × sequence) on each device kind
    TINY_SHAPES, TINY_TOKENS      ragged tiny shapes for smoke runs (CI)
    CASE_FAMILIES                 bench names: lowrank, lowrank-dropout, dora, kronecker, phm,
                                  hadamard (+ -factored, -dense: its two forms forced), sparse
                                  (name -> declaration.CaseFamily: registry family, public
                                  function, options, setup, formulas; live from the families'
                                  declarations, ``families/<name>_decl.py``)
    unavailable(name)             None, or why this pypeft_fast cannot run that case family
    make_case(name, shape, rank, tokens, dtype, device, adapter_dtype=None, seed=0) -> Workload
        w.ours(backend)()         y of pypeft_fast's public function (x, W, params of the case)
        w.reference()()           y of the reference implementation w.reference_name:
                                  "peft" (peft's forward math in eager torch ops: base +
                                  lora_B(lora_A(dropout(x)))·s; LoKr/LoHa/SHiRA: ΔW materialised,
                                  then F.linear) or "materialise" (PHM: no peft method)
        w.frozen()()              y = F.linear(x, W): the frozen GEMM alone
        w.x, w.weight, w.gy, w.params    (x and params require grad; gy for y.backward(gy))
        w.expected(dtype, impl)   (y, {name: grad}) of the materialising reference at ``dtype``
                                  on the same values (float64 for truth; None: each tensor in
                                  its own dtype, the tolerance rule's baseline), with the mask
                                  ``impl`` uses (ours: Philox from the seed; peft: torch's RNG)
    frozen_flops(shape, tokens, mode) / adapter_flops(name, shape, rank, tokens, mode)
    bytes_moved(name, shape, rank, tokens, mode, elem_bytes, adapter_bytes=4)
    adapter_flop_share(name, shape, rank, tokens)   adapter FLOPs / frozen FLOPs, forward +
                                  backward: the overhead the arithmetic alone predicts

``mode`` is "forward", "backward" or "full" (forward + backward). The frozen layer's backward is
dx = gy·W only (W frozen: no weight gradient).

FLOPs (multiply-add = 2), per call of n tokens, shape in → out, rank r: the frozen layer
2·n·in·out forward and 2·n·in·out backward (dx); each case's delta by the ``flops`` formula its
family declares (``families/<name>_decl.py``, the formula's docstring says how it counts):

| family | forward | backward |
|---|---|---|
| lowrank (any p) | 2·n·r·(in + out) | 4·n·r·(in + out) (t, dx, dA, dB) |
| dora | lowrank + 2·out·in·r + 2·r²·in + 2·out·r² (row norms of W + s·B·A, factored) + 2·n·out | lowrank backward + 2·n·out |
| kronecker, phm | 2·macs_per_row·n (kronecker.macs_per_row: dense or rank-k B, the cheaper) | 2.5 × forward |
| hadamard | min(Khatri–Rao 2·n·r²·(in+out) + 2·r²·(in+out), dense 4·out·in·r + 3·out·in) | min(4·n·r²·(in+out) + 4·r²·(in+out), dense form + 2·n·in·out + 8·out·in·r) |
| sparse, nnz = r·(in + out) | 2·n·nnz | 4·n·nnz (SpMM + SDDMM) |

(this table is a summary of today's declarations, not a source). Factor shapes from ``rank``:
kronecker — LoKr's (``kronecker_decl.factorization``, decompose factor -1): A (a_out, a_in), B
(b_out, b_in) kept as rank-r factors when r < max(B) / 2, as LoKr does; phm — Compacter's n = 4
terms, A (4, 4, 4), B as rank-r factors (4, out/4, r) @ (4, r, in/4); sparse — SHiRA's
parameter parity with LoRA: nnz = r·(in + out), random mask.

Bytes (the least traffic: every operand read once, every result written once): forward
e·(n·in + in·out + n·out) + the adapter's parameters; backward e·(n·out + in·out + 2·n·in) + the
parameters read and their gradients written (+ lowrank's saved u, n·r fp32, written forward and
read backward: a case's declared ``saved_floats``). e = bytes per activation element. Nothing
here counts what a kernel re-reads.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .declaration import CaseFamily, DeclaredTable

MODES = ("forward", "backward", "full")

# Tokens per call. CPU: 4 × 256, the e2e bench's batch (a CPU call at 4096-wide shapes takes
# seconds). GPU: 8 × 2048, enough rows to fill an H100/H200 at the 4096-wide shapes.
CPU_TOKENS = 4 * 256
GPU_TOKENS = 8 * 2048
TINY_TOKENS = 37  # smoke runs: ragged on purpose


@dataclass(frozen=True)
class ProjectionShape:
    model: str
    proj: str
    in_features: int
    out_features: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.proj}"


def _model(model: str, projs: dict[str, tuple[int, int]]) -> dict[str, ProjectionShape]:
    return {f"{model}/{p}": ProjectionShape(model, p, i, o) for p, (i, o) in projs.items()}


def _llama(model: str, hidden: int, kv: int, inter: int) -> dict[str, ProjectionShape]:
    return _model(model, {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
                          "o_proj": (hidden, hidden), "gate_proj": (hidden, inter),
                          "up_proj": (hidden, inter), "down_proj": (inter, hidden)})


# Real projection shapes (in, out) from the models' configs. Llama-3-8B / Mistral-7B: hidden 4096,
# 8 KV heads of 128 (k/v 1024 wide), intermediate 14336; Llama-2-7B: 32 KV heads, intermediate
# 11008; BERT-base: hidden 768, intermediate 3072 (attention query/key/value/output.dense);
# T5-base: d_model 768, 12 heads × d_kv 64, d_ff 3072 (wi, wo); "pf-bench" is the e2e bench's
# default model (Llama architecture, hidden 1024, intermediate 2752: bench/NOTES.md's shapes).
SHAPES: dict[str, ProjectionShape] = {
    **_llama("llama-3-8b", 4096, 1024, 14336),
    **_llama("mistral-7b", 4096, 1024, 14336),
    **_llama("llama-2-7b", 4096, 4096, 11008),
    **_model("bert-base", {"query": (768, 768), "key": (768, 768), "value": (768, 768),
                           "attention.output": (768, 768), "intermediate": (768, 3072),
                           "output": (3072, 768)}),
    **_model("t5-base", {"q": (768, 768), "k": (768, 768), "v": (768, 768), "o": (768, 768),
                         "wi": (768, 3072), "wo": (3072, 768)}),
    **_llama("pf-bench", 1024, 1024, 2752),
}

# Smoke shapes: every dimension a multiple of 4 (PHM's n = 4 terms), nothing a power of two.
TINY_SHAPES: dict[str, ProjectionShape] = _model("tiny", {"wide": (68, 44), "square": (100, 36)})


def shape_of(key: str) -> ProjectionShape:
    if key in SHAPES:
        return SHAPES[key]
    if key in TINY_SHAPES:
        return TINY_SHAPES[key]
    raise ValueError(f"unknown projection shape {key!r}; known: {sorted(SHAPES) + sorted(TINY_SHAPES)}")


# ------------------------------------------------------------------------------ case families

def _cases(decls) -> dict[str, CaseFamily]:
    return {c.name: c for d in decls for c in d.cases}


CASE_FAMILIES = DeclaredTable(_cases)
"""bench name → :class:`CaseFamily`, live from every family's declaration (``registry.declare``,
``families/<name>_decl.py``: setup factory, FLOP and parameter formulas, options)."""
LORA_SCALING = 2.0   # alpha = 2r, peft's common setting
DELTA_SCALING = 0.5


def unavailable(name: str) -> str | None:
    """None when this pypeft_fast can run case family ``name``, else why not (shown as the skip
    reason)."""
    from pypeft_fast import registry

    if name not in CASE_FAMILIES:
        return f"unknown case family {name!r}; known: {sorted(CASE_FAMILIES)}"
    c = CASE_FAMILIES[name]
    if c.family not in registry.FAMILIES:
        return f"family {c.family!r} is not in pypeft_fast.registry.FAMILIES"
    function = registry.DECLARATIONS[c.family].function
    takes = inspect.signature(function).parameters
    missing = [opt for opt in c.options if opt not in takes]
    if missing:
        return f"pypeft_fast.{c.function} takes no {', '.join(o + '=' for o in missing)}"
    return None


_MOVED = {"kron_factors": "kronecker_decl", "sparse_nnz": "sparse_decl", "PHM_TERMS": "phm_decl"}
"""Per-family helpers that used to live here, now in their family's declaration module."""


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".families.{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------ FLOPs and bytes

def frozen_flops(shape: ProjectionShape, tokens: int, mode: str = "full") -> float:
    one = 2.0 * tokens * shape.in_features * shape.out_features
    return {"forward": one, "backward": one, "full": 2 * one}[_mode(mode)]


def _mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def adapter_flops(name: str, shape: ProjectionShape, rank: int, tokens: int, mode: str = "full") -> float:
    """FLOPs the delta adds to the frozen layer (the table in the module docstring; the case's
    declared ``flops`` formula)."""
    mode = _mode(mode)
    fwd, bwd = CASE_FAMILIES[name].flops(shape, rank, tokens)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def adapter_params(name: str, shape: ProjectionShape, rank: int) -> int:
    """Trainable delta elements (the parameters of the case family at this shape and rank)."""
    return CASE_FAMILIES[name].params(shape, rank)


def bytes_moved(name: str | None, shape: ProjectionShape, rank: int, tokens: int, mode: str = "full",
                elem_bytes: int = 4, adapter_bytes: int = 4) -> float:
    """Least DRAM bytes of one call (module docstring); ``name=None``: the frozen layer alone."""
    mode = _mode(mode)
    n, i, o, e = tokens, shape.in_features, shape.out_features, elem_bytes
    fwd = e * (n * i + i * o + n * o)
    bwd = e * (n * o + i * o + 2 * n * i)
    if name is not None:
        p = adapter_params(name, shape, rank) * adapter_bytes
        fwd += p
        bwd += 2 * p
        saved = 4 * n * CASE_FAMILIES[name].saved_floats(rank)  # e.g. lowrank's u, fp32
        fwd += saved
        bwd += saved
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def adapter_flop_share(name: str, shape: ProjectionShape, rank: int, tokens: int) -> float:
    """The delta's FLOPs over the frozen layer's, forward + backward: the overhead over the
    frozen layer that the arithmetic alone predicts (the limit a kernel can approach when it runs
    its extra FLOPs as efficiently as the frozen GEMM). E.g. lowrank r = 16 at 1024 → 1024:
    6·n·r·(in+out) / 4·n·in·out = 4.7 %. For a whole model, sum ``adapter_flops`` and
    ``frozen_flops`` over its projections (and add the step's FLOPs outside them)."""
    return adapter_flops(name, shape, rank, tokens, "full") / frozen_flops(shape, tokens, "full")


# ------------------------------------------------------------------------------ setups

@dataclass
class Workload:
    """One case: the tensors and the three callables (ours, reference, frozen) on them."""

    name: str
    shape: ProjectionShape
    rank: int
    tokens: int
    x: torch.Tensor                       # (tokens, in), requires grad
    weight: torch.Tensor                  # (out, in), frozen
    gy: torch.Tensor                      # (tokens, out)
    params: dict[str, torch.Tensor]       # trainable delta tensors (require grad)
    fixed: dict                           # non-trainable: seed, indices, ...
    reference_name: str
    _ours: Callable                       # (x, W, params, fixed, backend) -> y
    _reference: Callable                  # (x, W, params, fixed) -> y   (peft's eager math)
    _delta: Callable                      # (params, fixed) -> ΔW        (materialised)
    _mask: Callable | None = None         # (impl, x) -> keep mask of x, or None (no dropout)

    def ours(self, backend: str) -> Callable[[], torch.Tensor]:
        return lambda: self._ours(self.x, self.weight, self.params, self.fixed, backend)

    def reference(self) -> Callable[[], torch.Tensor]:
        return lambda: self._reference(self.x, self.weight, self.params, self.fixed)

    def frozen(self) -> Callable[[], torch.Tensor]:
        return lambda: F.linear(self.x, self.weight)

    def leaves(self) -> list[torch.Tensor]:
        return [self.x, *self.params.values()]

    def zero_grad(self) -> None:
        for t in self.leaves():
            t.grad = None

    def expected(self, dtype: torch.dtype | None, impl: str):
        """(y, {"x": dx, <param>: grad}) of the materialising reference
        (``pypeft_fast.reference.reference_linear``: ΔW formed, then F.linear) on this case's
        values, every tensor cast to ``dtype`` (float64: the truth) or, for None, each in its
        own dtype (plain PyTorch at the case's precision: the tolerance rule's baseline); with
        the dropout mask that ``impl`` draws ("ours": Philox from the seed; "peft": torch's
        generator seeded with REFERENCE_RNG_SEED right before the call)."""
        from .reference import reference_linear

        def leaf(t):
            return t.detach().to(dtype or t.dtype).requires_grad_(True)

        x = leaf(self.x)
        params = {k: leaf(v) for k, v in self.params.items()}
        weight = self.weight.to(dtype or self.weight.dtype)
        dw = self._delta(params, self.fixed)
        xd = None
        if self._mask is not None:
            xd = x * self._mask(impl, self.x).to(x.dtype) / (1 - self.fixed["dropout"])
        y = reference_linear(x, weight, None, dw, xd)
        y.backward(self.gy.to(y.dtype))
        return y.detach(), {"x": x.grad, **{k: v.grad for k, v in params.items()}}


REFERENCE_RNG_SEED = 1234
"""torch.manual_seed the caller sets right before a reference call it checks (peft's dropout
draws its mask from torch's generator; ``Workload.expected`` replays it from this seed)."""


def torch_rng_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask peft's dropout draws on ``x`` from torch's generator seeded with
    REFERENCE_RNG_SEED (a setup's ``mask("peft", x)``)."""
    torch.manual_seed(REFERENCE_RNG_SEED)
    return F.dropout(torch.ones_like(x), p, training=True) != 0


def make_case(name: str, shape: ProjectionShape | str, rank: int, tokens: int,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              adapter_dtype: torch.dtype | None = None, seed: int = 0) -> Workload:
    """The tensors of one case: x (tokens, in) and gy (tokens, out) ~ N(0, 1), W ~ N(0, 1/in),
    the family's delta parameters (every factor nonzero, in ``adapter_dtype``, default
    ``dtype``; peft's default on a bf16 base is float32), all from a generator on ``device``
    seeded by ``seed`` (the same values on every machine of a device type; drawn where they
    live, since a GPU case is ~10⁸ values). Raises ValueError when ``unavailable(name)``."""
    why = unavailable(name)
    if why is not None:
        raise ValueError(f"case family {name!r} cannot run: {why}")
    shape = shape_of(shape) if isinstance(shape, str) else shape
    c = CASE_FAMILIES[name]
    adapter_dtype = adapter_dtype or dtype
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)

    def g(*size, scale=1.0, adapter=False):
        t = torch.randn(*size, generator=gen, dtype=torch.float32, device=device).mul_(scale)
        return t.to(adapter_dtype if adapter else dtype).requires_grad_(adapter)

    facts = {"shape": shape, "in": shape.in_features, "out": shape.out_features, "rank": rank,
             "device": device, "seed": seed}
    x = g(tokens, shape.in_features).requires_grad_(True)
    weight = g(shape.out_features, shape.in_features, scale=shape.in_features ** -0.5)
    gy = g(tokens, shape.out_features)
    params, fixed, ours, reference, delta, mask = c.setup(facts, g, c)
    fixed["weight"] = weight
    return Workload(name, shape, rank, tokens, x, weight, gy, params, fixed, c.reference_name,
                    ours, reference, delta, mask)


def elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = [
    "MODES", "CPU_TOKENS", "GPU_TOKENS", "TINY_TOKENS", "ProjectionShape", "SHAPES", "TINY_SHAPES",
    "shape_of", "CaseFamily", "CASE_FAMILIES", "unavailable", "kron_factors", "sparse_nnz",
    "frozen_flops", "adapter_flops", "adapter_params", "bytes_moved", "adapter_flop_share",
    "Workload", "make_case", "elem_bytes", "REFERENCE_RNG_SEED", "torch_rng_mask", "PHM_TERMS",
    "LORA_SCALING", "DELTA_SCALING",
]
