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


def adapter_step_flops(variant: str, a) -> float | None:
    """Forward + backward FLOPs the adapter adds to one step of the whole model (None: no formula
    for this variant at these options)."""
    name = WORKLOAD_OF.get(variant)
    if name is None or (variant == "phm" and a.phm_n != workloads.PHM_TERMS):
        return None
    rank = a.phm_rank if variant == "phm" else a.rank
    tokens = a.batch * a.seq
    per_layer = 0.0
    for shape in projection_shapes(a):
        per_layer += workloads.adapter_flops(name, shape, rank, tokens, "full")
        if variant == "dora-dropout" and a.lora_dropout > 0:
            per_layer += workloads.frozen_flops(shape, tokens, "full")
    return per_layer * a.layers


def step_flops(model: torch.nn.Module, batch: dict, context) -> float:
    """FLOPs of one forward + causal-LM loss + backward of ``model`` (counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with context, counter:
        loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
