"""The micro-benchmark matrix: which (family, implementation, mode, shape, rank, tokens) cases
``pytest bench/`` runs under each ``--bench-selection``. The tensors of a case come from
:func:`pypeft_fast.workloads.make_case` (the setup each family declares, shared with the e2e
bench and the profiler); the case families are the declared ones
(``workloads.CASE_FAMILIES``); nothing here builds tensors or names a family.

Selections (``--bench-selection``):

* ``default`` — what finishes in minutes: at the device's first main shape (CPU: BERT-base's
  query 768→768 at CPU_TOKENS = 4 × 256; GPU: Llama-3-8B's q_proj at GPU_TOKENS = 8 × 2048)
  every case family × every implementation usable on the device kind × forward / backward /
  full, rank 16; at the other main shapes (CPU: BERT-base's intermediate 768→3072; GPU:
  Llama-3-8B's k, up and down projections) mode full; plus the scaling view at the first
  shape: mode full, pypeft_fast's ``auto`` choice and the reference, ranks 8 / 16 / 64 at
  sequence 256 and sequence 1024 at rank 16 (batch 4 on CPU, 16 on GPU). A case declared
  ``forced_form`` (LoHa's ``hadamard-factored``, ``hadamard-dense``) runs mode full at the first
  shape only.
* ``full`` — every shape of ``workloads.SHAPES`` × ranks 8 / 16 / 64 × every mode and
  implementation (opt-in: hours on a CPU).
* ``tiny`` — the CI smoke: ragged tiny shapes (``workloads.TINY_SHAPES``, 37 tokens, rank 4),
  every family, implementation (Triton under its interpreter where TRITON_INTERPRET=1) and
  mode, each result checked against the float64 reference.

Implementations: pypeft_fast's backends by name (``torch``, ``cpp`` on CPU; ``torch``,
``triton``, ``cuda`` on a GPU), ``auto`` (the scaling view only) and ``reference``, which is the
case family's reference (``peft``'s forward math, or ``materialise`` for PHM); a case whose
implementation cannot run here is skipped with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from pypeft_fast import workloads

RANKS = (8, 16, 64)
DEFAULT_RANK = 16
SCALING_SEQS = (256, 1024)
BATCH = {"cpu": 4, "cuda": 16}
MAIN_SHAPES = {
    "cpu": ("bert-base/query", "bert-base/intermediate"),
    "cuda": ("llama-3-8b/q_proj", "llama-3-8b/k_proj", "llama-3-8b/up_proj", "llama-3-8b/down_proj"),
}
TOKENS = {"cpu": workloads.CPU_TOKENS, "cuda": workloads.GPU_TOKENS}
IMPLS = {"cpu": ("reference", "torch", "cpp"), "cuda": ("reference", "torch", "triton", "cuda")}
TINY_RANK = 4


@dataclass(frozen=True)
class BenchCase:
    family: str
    impl: str
    mode: str
    shape: str
    rank: int
    tokens: int

    @property
    def id(self) -> str:
        return f"{self.family}-{self.impl}-{self.mode}-{self.shape}-r{self.rank}-n{self.tokens}"

    @property
    def group(self) -> str:
        return f"{self.family} {self.shape} r{self.rank} n{self.tokens} {self.mode}"


def cases(selection: str, device_kind: str, tokens: int | None = None,
          interpreter_triton: bool = False) -> list[BenchCase]:
    fams = list(workloads.CASE_FAMILIES)  # every family's declared cases (families/<name>_decl.py)
    # Cases that force one form of a family (LoHa's factored / dense: declared forced_form): in
    # the default selection only mode full at the first main shape (the plain one runs the plan).
    forced = {f for f in fams if workloads.CASE_FAMILIES[f].forced_form}
    modes = workloads.MODES
    impls = IMPLS[device_kind]
    out: list[BenchCase] = []
    if selection == "tiny":
        impls = impls + (("triton",) if interpreter_triton and device_kind == "cpu" else ())
        n = tokens or workloads.TINY_TOKENS
        out = [BenchCase(f, i, m, s, TINY_RANK, n)
               for s in workloads.TINY_SHAPES for f in fams for i in impls for m in modes]
    elif selection == "full":
        n = tokens or TOKENS[device_kind]
        out = [BenchCase(f, i, m, s, r, n)
               for s in workloads.SHAPES for r in RANKS for f in fams for i in impls for m in modes]
    elif selection == "default":
        n = tokens or TOKENS[device_kind]
        first, *others = MAIN_SHAPES[device_kind]
        out = [BenchCase(f, i, m, first, DEFAULT_RANK, n) for f in fams for i in impls
               for m in (modes if f not in forced else ("full",))]
        fams = [f for f in fams if f not in forced]
        out += [BenchCase(f, i, "full", s, DEFAULT_RANK, n) for s in others for f in fams for i in impls]
        # scaling: ranks 8 / 64 at sequence 256, sequence 1024 at rank 16 (rank 16 at 256 is above)
        seq_short, seq_long = SCALING_SEQS
        n_short, n_long = BATCH[device_kind] * seq_short, BATCH[device_kind] * seq_long
        grid = [(r, n_short) for r in RANKS if r != DEFAULT_RANK or n_short != n] + [(DEFAULT_RANK, n_long)]
        out += [BenchCase(f, i, "full", first, r, t) for r, t in grid for f in fams for i in ("auto", "reference")]
        out = list(dict.fromkeys(out))
    else:
        raise ValueError(f"--bench-selection must be default, full or tiny; got {selection!r}")
    return out
