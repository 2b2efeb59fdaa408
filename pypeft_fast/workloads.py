"""Benchmark workloads: real projection shapes, one setup factory per family, FLOP/byte formulas.

Shared by the kernel micro-benchmarks (``bench/``), the end-to-end bench and the memory profiler,
so every measurement of a family runs the same tensors and counts work by the same formulas.

API (everything a benchmark or profiler needs; nothing here times anything)::

    SHAPES[key]                   ProjectionShape(model, proj, in_features, out_features)
                                  keys "llama-3-8b/q_proj", "bert-base/intermediate", ...
    CPU_TOKENS, GPU_TOKENS        tokens per call (batch × sequence) on each device kind
    TINY_SHAPES, TINY_TOKENS      ragged tiny shapes for smoke runs (CI)
    CASE_FAMILIES                 bench names: lowrank, lowrank-dropout, dora, kronecker, phm,
                                  hadamard (+ -factored, -dense: its two forms forced), sparse
                                  (name -> registry family, public function, options)
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

FLOPs (multiply-add = 2), per call of n tokens, shape in → out, rank r:

| family | forward | backward |
|---|---|---|
| frozen | 2·n·in·out | 2·n·in·out (dx) |
| lowrank (any p) | 2·n·r·(in + out) | 4·n·r·(in + out) (t, dx, dA, dB) |
| dora | lowrank + 2·out·in·r + 2·r²·in + 2·out·r² (row norms of W + s·B·A, factored) + 2·n·out | lowrank backward + 2·n·out |
| kronecker, phm | 2·macs_per_row·n (kronecker.macs_per_row: dense or rank-k B, the cheaper) | 2.5 × forward |
| hadamard | min(Khatri–Rao 2·n·r²·(in+out) + 2·r²·(in+out), dense 4·out·in·r + 3·out·in) | min(4·n·r²·(in+out) + 4·r²·(in+out), dense form + 2·n·in·out + 8·out·in·r) |
| sparse, nnz = r·(in + out) | 2·n·nnz | 4·n·nnz (SpMM + SDDMM) |

Factor shapes from ``rank``: kronecker — LoKr's (``inject.specs.factorization``, decompose
factor -1): A (a_out, a_in), B (b_out, b_in) kept as rank-r factors when r < max(B) / 2, as
LoKr does; phm — Compacter's n = 4 terms, A (4, 4, 4), B as rank-r factors (4, out/4, r) @
(4, r, in/4); sparse — SHiRA's parameter parity with LoRA: nnz = r·(in + out), random mask.

Bytes (the least traffic: every operand read once, every result written once): forward
e·(n·in + in·out + n·out) + the adapter's parameters; backward e·(n·out + in·out + 2·n·in) + the
parameters read and their gradients written (+ lowrank's saved u, n·r fp32, written forward and
read backward). e = bytes per activation element. Nothing here counts what a kernel re-reads.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

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

@dataclass(frozen=True)
class CaseFamily:
    name: str           # bench name
    family: str         # registry family
    function: str       # pypeft_fast's public function
    reference_name: str
    formula: str        # the row of the FLOP table (module docstring)
    options: dict = field(default_factory=dict)


CASE_FAMILIES: dict[str, CaseFamily] = {c.name: c for c in (
    CaseFamily("lowrank", "lowrank", "lowrank_linear", "peft", "lowrank", {"dropout": 0.0}),
    CaseFamily("lowrank-dropout", "lowrank", "lowrank_linear", "peft", "lowrank", {"dropout": 0.05}),
    CaseFamily("dora", "lowrank", "lowrank_linear", "peft", "dora", {"magnitude": True}),
    CaseFamily("kronecker", "kronecker", "kronecker_linear", "peft", "kronecker"),
    CaseFamily("phm", "phm", "phm_linear", "materialise", "phm"),
    CaseFamily("hadamard", "hadamard", "hadamard_linear", "peft", "hadamard"),
    # LoHa's two forms forced (the plain "hadamard" case runs the cost model's per-shape plan)
    CaseFamily("hadamard-factored", "hadamard", "hadamard_linear", "peft", "hadamard", {"method": "factored"}),
    CaseFamily("hadamard-dense", "hadamard", "hadamard_linear", "peft", "hadamard", {"method": "dense"}),
    CaseFamily("sparse", "sparse", "sparse_linear", "peft", "sparse"),
)}
PHM_TERMS = 4
LORA_SCALING = 2.0   # alpha = 2r, peft's common setting
DELTA_SCALING = 0.5


def unavailable(name: str) -> str | None:
    """None when this pypeft_fast can run case family ``name``, else why not (shown as the skip
    reason: families land in the registry one at a time)."""
    import pypeft_fast as pf
    from pypeft_fast import registry

    if name not in CASE_FAMILIES:
        return f"unknown case family {name!r}; known: {sorted(CASE_FAMILIES)}"
    c = CASE_FAMILIES[name]
    if c.family not in registry.FAMILIES:
        return f"family {c.family!r} is not in pypeft_fast.registry.FAMILIES yet"
    if not hasattr(pf, c.function):
        return f"pypeft_fast.{c.function} does not exist yet"
    if "method" in c.options and "method" not in inspect.signature(getattr(pf, c.function)).parameters:
        return f"pypeft_fast.{c.function} takes no method= yet"
    if c.options.get("magnitude") and "magnitude" not in inspect.signature(getattr(pf, c.function)).parameters:
        return f"pypeft_fast.{c.function} takes no magnitude= (DoRA) yet"
    if name not in _FACTORIES:
        return f"no setup factory for {name!r} in pypeft_fast/workloads.py yet"
    return None


def kron_factors(shape: ProjectionShape, rank: int) -> tuple[tuple[int, int], tuple[int, int], int | None]:
    """LoKr's factor shapes: A (a_out, a_in), B (b_out, b_in), and B's rank (None: dense), as
    peft LoKr with decompose_factor -1: w2 factored when r < max(w2) / 2."""
    from .inject.specs import factorization

    (ao, bo), (ai, bi) = factorization(shape.out_features), factorization(shape.in_features)
    k = rank if rank < max(bo, bi) / 2 else None
    return (ao, ai), (bo, bi), k


def sparse_nnz(shape: ProjectionShape, rank: int) -> int:
    """SHiRA's parameter parity with LoRA rank r: nnz = r·(in + out), at most the whole matrix."""
    return min(rank * (shape.in_features + shape.out_features), shape.in_features * shape.out_features)


# ------------------------------------------------------------------------------ FLOPs and bytes

def frozen_flops(shape: ProjectionShape, tokens: int, mode: str = "full") -> float:
    one = 2.0 * tokens * shape.in_features * shape.out_features
    return {"forward": one, "backward": one, "full": 2 * one}[_mode(mode)]


def _mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _kron_macs(name: str, shape: ProjectionShape, rank: int) -> int:
    from .families.kronecker import macs_per_row

    if name == "kronecker":
        (ao, ai), (bo, bi), k = kron_factors(shape, rank)
        h = 1
    else:
        h, ao, ai = PHM_TERMS, PHM_TERMS, PHM_TERMS
        bo, bi, k = shape.out_features // h, shape.in_features // h, rank
    dense, factored = macs_per_row((h, ao, ai), (bo, bi), k or 1)
    return dense if k is None else min(dense, factored)


def adapter_flops(name: str, shape: ProjectionShape, rank: int, tokens: int, mode: str = "full") -> float:
    """FLOPs the delta adds to the frozen layer (the table in the module docstring)."""
    mode = _mode(mode)
    n, i, o, r = tokens, shape.in_features, shape.out_features, rank
    fam = CASE_FAMILIES[name].formula
    if fam == "lowrank":
        fwd, bwd = 2.0 * n * r * (i + o), 4.0 * n * r * (i + o)
    elif fam == "dora":
        norm = 2.0 * o * i * r + 2.0 * r * r * i + 2.0 * o * r * r
        fwd, bwd = 2.0 * n * r * (i + o) + norm + 2.0 * n * o, 4.0 * n * r * (i + o) + 2.0 * n * o
    elif fam in ("kronecker", "phm"):
        fwd = 2.0 * n * _kron_macs(name, shape, rank)
        bwd = 2.5 * fwd
    elif fam == "hadamard":
        # The cheaper form per direction. Khatri–Rao: ΔW = (W1a ⊙ᵣ W2a)(W1b ⊙ᵣ W2b) has rank r²
        # (forming the factors: r²·(in + out) products); forward 2·n·r²·(in+out), backward t, dx,
        # both factor gradients 4·n·r²·(in+out) + the chain rule to the four factors
        # 4·r²·(in+out). Dense (ΔW formed as a transient per op): forming M1, M2 2·out·in·2r and
        # W' = W + s·M1⊙M2 3·out·in, the frozen GEMM then runs on W'; backward forms it again,
        # G = gyᵀ·x (2·n·in·out) and the four rank-r products (4·out·in·2r).
        r2 = r * r
        kr_f, kr_b = 2.0 * n * r2 * (i + o) + 2.0 * r2 * (i + o), 4.0 * n * r2 * (i + o) + 4.0 * r2 * (i + o)
        form = 4.0 * o * i * r + 3.0 * o * i
        fwd, bwd = min(kr_f, form), min(kr_b, form + 2.0 * n * i * o + 8.0 * o * i * r)
    elif fam == "sparse":
        nnz = sparse_nnz(shape, rank)
        fwd, bwd = 2.0 * n * nnz, 4.0 * n * nnz
    else:
        raise ValueError(f"no FLOP formula for {name!r}")
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def adapter_params(name: str, shape: ProjectionShape, rank: int) -> int:
    """Trainable delta elements (the parameters of the case family at this shape and rank)."""
    i, o, r = shape.in_features, shape.out_features, rank
    fam = CASE_FAMILIES[name].formula
    if fam == "lowrank":
        return r * (i + o)
    if fam == "dora":
        return r * (i + o) + o
    if fam == "kronecker":
        (ao, ai), (bo, bi), k = kron_factors(shape, rank)
        return ao * ai + (bo * bi if k is None else k * (bo + bi))
    if fam == "phm":
        h = PHM_TERMS
        return h ** 3 + h * rank * (o // h + i // h)
    if fam == "hadamard":
        return 2 * r * (i + o)
    if fam == "sparse":
        return sparse_nnz(shape, rank)
    raise ValueError(f"no parameter count for {name!r}")


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
        if CASE_FAMILIES[name].formula in ("lowrank", "dora"):
            fwd += 4 * n * rank
            bwd += 4 * n * rank
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


def _torch_rng_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    torch.manual_seed(REFERENCE_RNG_SEED)
    return F.dropout(torch.ones_like(x), p, training=True) != 0


def _lowrank(w, g, c):
    i, o, r = w["in"], w["out"], w["rank"]
    p = c.options.get("dropout", 0.0)
    params = {"A": g(r, i, scale=i ** -0.5, adapter=True), "B": g(o, r, scale=0.1, adapter=True)}
    fixed = {"dropout": p, "seed": torch.tensor(20261201, dtype=torch.int64), "scaling": LORA_SCALING}

    def ours(x, W, P, f, backend):
        import pypeft_fast as pf
        return pf.lowrank_linear(x, W, None, P["A"], P["B"], f["scaling"], f["dropout"], f["seed"], backend)

    def reference(x, W, P, f):  # peft LoraLayer: base + lora_B(lora_A(dropout(x))) * scaling
        xa = x.to(P["A"].dtype)
        xd = F.dropout(xa, f["dropout"], training=True) if f["dropout"] else xa
        return (F.linear(x, W) + F.linear(F.linear(xd, P["A"]), P["B"]) * f["scaling"]).to(x.dtype)

    def mask(impl, x):
        from .philox import keep_mask
        if impl == "peft":
            return _torch_rng_mask(x, p)
        return keep_mask(fixed["seed"], x.numel(), p).view(x.shape).to(x.device)

    return params, fixed, ours, reference, lambda P, f: (P["B"] @ P["A"]) * f["scaling"], mask if p else None


def _dora(w, g, c):
    i, o, r = w["in"], w["out"], w["rank"]
    params = {"A": g(r, i, scale=i ** -0.5, adapter=True), "B": g(o, r, scale=r ** -0.5, adapter=True),
              "m": g(o, adapter=True)}
    with torch.no_grad():  # magnitudes in [0.5, 1.5): nonzero, about the row norms of W + s·B·A
        params["m"].abs_().clamp_(max=1.0).add_(0.5)
    fixed = {"scaling": LORA_SCALING}

    def delta(P, f):  # the effective ΔW = diag(m / ‖W + s·B·A‖, detached)·(W + s·B·A) − W
        W = f["weight"].to(P["A"].dtype)
        merged = W + f["scaling"] * (P["B"] @ P["A"])
        c = P["m"] / torch.linalg.vector_norm(merged, dim=1).detach()
        return c[:, None] * merged - W

    def ours(x, W, P, f, backend):
        import pypeft_fast as pf
        return pf.lowrank_linear(x, W, None, P["A"], P["B"], f["scaling"], 0.0, None, backend,
                                 magnitude=P["m"])

    def reference(x, W, P, f):  # peft DoraLinearLayer (dropout 0): the norm of W + s·B·A formed
        base = F.linear(x, W)
        xa, Wa = x.to(P["A"].dtype), W.to(P["A"].dtype)
        norm = torch.linalg.vector_norm(Wa + f["scaling"] * (P["B"] @ P["A"]), dim=1).detach()
        c = (P["m"] / norm).view(1, -1)
        lora = F.linear(F.linear(xa, P["A"]), P["B"])
        return (base + (c - 1) * base + c * lora * f["scaling"]).to(x.dtype)

    return params, fixed, ours, reference, delta, None


def _kronecker(w, g, c):
    shape = w["shape"]
    (ao, ai), (bo, bi), k = kron_factors(shape, w["rank"])
    params = {"A": g(ao, ai, scale=0.1, adapter=True)}
    if k is None:
        params["B"] = g(bo, bi, scale=bi ** -0.5, adapter=True)
    else:
        params["B_left"] = g(bo, k, scale=0.1, adapter=True)
        params["B_right"] = g(k, bi, scale=bi ** -0.5, adapter=True)
    fixed = {"scaling": DELTA_SCALING}

    def factors(P):
        return P["A"], (P["B"] if "B" in P else (P["B_left"], P["B_right"]))

    def delta(P, f):
        A, B = factors(P)
        B = B[0] @ B[1] if isinstance(B, tuple) else B
        return torch.kron(A, B) * f["scaling"]

    def ours(x, W, P, f, backend):
        import pypeft_fast as pf
        return pf.kronecker_linear(x, W, None, *factors(P), f["scaling"], backend)

    def reference(x, W, P, f):  # peft LoKr: base + F.linear(x, kron(w1, w2_a @ w2_b) * scale)
        return (F.linear(x, W) + F.linear(x.to(P["A"].dtype), delta(P, f))).to(x.dtype)

    return params, fixed, ours, reference, delta, None


def _phm(w, g, c):
    h, i, o, r = PHM_TERMS, w["in"], w["out"], w["rank"]
    params = {"A": g(h, h, h, scale=0.5, adapter=True),
              "S": g(h, o // h, r, scale=0.1, adapter=True),
              "T": g(h, r, i // h, scale=(i // h) ** -0.5, adapter=True)}
    fixed = {"scaling": DELTA_SCALING}

    def delta(P, f):
        B = P["S"] @ P["T"]
        return sum(torch.kron(P["A"][j], B[j]) for j in range(h)) * f["scaling"]

    def ours(x, W, P, f, backend):
        import pypeft_fast as pf
        return pf.phm_linear(x, W, None, P["A"], (P["S"], P["T"]), f["scaling"], backend)

    def reference(x, W, P, f):  # materialise Σ kron(Aᵢ, Sᵢ·Tᵢ), then F.linear
        return (F.linear(x, W) + F.linear(x.to(P["A"].dtype), delta(P, f))).to(x.dtype)

    return params, fixed, ours, reference, delta, None


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
        import pypeft_fast as pf
        return pf.sparse_linear(x, W, None, P["values"], f["indices"], f["scaling"], backend)

    def reference(x, W, P, f):  # peft SHiRA: W + the sparse ΔW made dense, then F.linear
        dw = torch.sparse_coo_tensor(f["indices"], P["values"] * f["scaling"], (o, i), check_invariants=False).to_dense()
        return F.linear(x, W + dw.to(W.dtype))

    return params, fixed, ours, reference, delta, None


def _hadamard(w, g, c):
    i, o, r = w["in"], w["out"], w["rank"]
    params = {"W1a": g(o, r, scale=r ** -0.5, adapter=True), "W1b": g(r, i, scale=i ** -0.5, adapter=True),
              "W2a": g(o, r, scale=r ** -0.5, adapter=True), "W2b": g(r, i, scale=1.0, adapter=True)}
    fixed = {"scaling": LORA_SCALING}

    def delta(P, f):
        return (P["W1a"] @ P["W1b"]) * (P["W2a"] @ P["W2b"]) * f["scaling"]

    method = c.options.get("method", "auto")

    def ours(x, W, P, f, backend):
        import pypeft_fast as pf
        return pf.hadamard_linear(x, W, None, P["W1a"], P["W1b"], P["W2a"], P["W2b"], f["scaling"], backend,
                                  method=method)

    def reference(x, W, P, f):  # peft LoHa: base + F.linear(x, (w1a·w1b) ⊙ (w2a·w2b) · scale)
        return (F.linear(x, W) + F.linear(x.to(P["W1a"].dtype), delta(P, f))).to(x.dtype)

    return params, fixed, ours, reference, delta, None


# name -> factory(workload facts, generator, CaseFamily) -> (params, fixed, ours, reference,
# delta, mask).
_FACTORIES: dict[str, Callable] = {
    "lowrank": _lowrank, "lowrank-dropout": _lowrank, "dora": _dora, "kronecker": _kronecker, "phm": _phm,
    "hadamard": _hadamard, "hadamard-factored": _hadamard, "hadamard-dense": _hadamard, "sparse": _sparse,
}


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
    params, fixed, ours, reference, delta, mask = _FACTORIES[name](facts, g, c)
    fixed["weight"] = weight
    return Workload(name, shape, rank, tokens, x, weight, gy, params, fixed, c.reference_name,
                    ours, reference, delta, mask)


def elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = [
    "MODES", "CPU_TOKENS", "GPU_TOKENS", "TINY_TOKENS", "ProjectionShape", "SHAPES", "TINY_SHAPES",
    "shape_of", "CaseFamily", "CASE_FAMILIES", "unavailable", "kron_factors", "sparse_nnz",
    "frozen_flops", "adapter_flops", "adapter_params", "bytes_moved", "adapter_flop_share",
    "Workload", "make_case", "elem_bytes", "REFERENCE_RNG_SEED",
]
