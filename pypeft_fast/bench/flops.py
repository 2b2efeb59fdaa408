"""The limit beside the measurement: the adapter's share of a training step's FLOPs.

``adapter FLOPs`` come from the written-down per-projection formulas of
:func:`pypeft_fast.workloads.adapter_flops` (forward + backward, the module docstring's table),
summed over the seven adapted projections of every decoder layer at the bench's token count;
for DoRA with dropout > 0 peft's semantics add ``base(drop(x))`` — one more frozen GEMM forward
and its dx backward per layer (:func:`~pypeft_fast.workloads.frozen_flops`). The step's FLOPs
are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + loss +
backward of the floor (the frozen model: its backward computes dx only, as the adapted models'
frozen layers do). ``share = adapter FLOPs / floor step FLOPs`` is the overhead over the floor
that the arithmetic alone predicts: a variant whose extra FLOPs ran as efficiently as the frozen
GEMMs would be that far over the floor.

Under autocast the frozen GEMMs run in bf16/fp16 while pypeft_fast's delta accumulates in float32
from the float32 parameters (``pypeft_fast/function.py``: the parameter gradients are float32 sums,
never rounded to bf16), so its FLOPs cost a float32 GEMM's time each. The share at fp32 rate, (delta
FLOPs × ρ + extra frozen FLOPs) / floor step FLOPs, with ρ = a float32 GEMM's time over the autocast
dtype's at the bench's MLP shape, timed side by side in the same run (:func:`fp32_rate_ratio`), is
the limit for that contract: the overhead a delta would show whose FLOPs ran as efficiently as a
float32 GEMM.
"""
from __future__ import annotations

import torch

from .. import workloads
from .model import TARGET_MODULES

WORKLOAD_OF = {
    # bench variant -> workloads case family whose formula it runs
    "lowrank": "lowrank-dropout", "dora": "dora", "dora-dropout": "dora", "kronecker": "kronecker",
    "loha": "hadamard", "sparse": "sparse", "phm": "phm",
}


def projection_shapes(a) -> list[workloads.ProjectionShape]:
    """The adapted projections of one decoder layer of the bench's model, (in, out)."""
    h, i = a.hidden, a.intermediate
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return [workloads.ProjectionShape("bench", p, *dims[p]) for p in TARGET_MODULES]


def adapter_step_flops(variant: str, a, part: str = "all") -> float | None:
    """Forward + backward FLOPs the adapter adds to one step of the whole model (None: no formula
    for this variant at these options). ``part``: "all"; "delta", the delta's own products;
    "frozen", the extra frozen GEMMs of DoRA with dropout (peft's ``base(drop(x))``), which run in
    the frozen GEMMs' dtype."""
    name = WORKLOAD_OF.get(variant)
    if name is None or (variant == "phm" and a.phm_n != workloads.PHM_TERMS):
        return None
    rank = a.phm_rank if variant == "phm" else a.rank
    tokens = a.batch * a.seq
    per_layer = 0.0
    for shape in projection_shapes(a):
        if part in ("all", "delta"):
            per_layer += workloads.adapter_flops(name, shape, rank, tokens, "full")
        if part in ("all", "frozen") and variant == "dora-dropout" and a.lora_dropout > 0:
            per_layer += workloads.frozen_flops(shape, tokens, "full")
    return per_layer * a.layers


def fp32_rate_ratio(a, device, dtype: torch.dtype, reps: int = 5) -> float:
    """ρ: the median time of a float32 GEMM over that of a ``dtype`` GEMM (bf16/fp16), (tokens ×
    hidden) · (hidden × intermediate) — the bench's largest frozen GEMM — on ``device`` at the
    current thread count, the two interleaved so that machine load hits both alike."""
    from ..measure import interleaved_times

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(a.batch * a.seq, a.hidden, generator=g).to(device)
    w = torch.randn(a.hidden, a.intermediate, generator=g).to(device)
    x16, w16 = x.to(dtype), w.to(dtype)
    times = interleaved_times({"fp32": lambda: x @ w, "low": lambda: x16 @ w16},
                              warmup=1, reps=reps, device=device)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return med["fp32"] / med["low"]


def step_flops(model: torch.nn.Module, batch: dict, context) -> float:
    """FLOPs of one forward + causal-LM loss + backward of ``model`` (counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with context, counter:
        loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
