"""Why a saved tensor is kept: the classification rules of the memory profiler.

Every storage autograd saves in the profiled forward is attributed to a *unit* — the innermost
module running when it was saved, folded into the adapted layer (a peft tuner layer or a
pypeft_fast ``DeltaLinear``) that contains it, so peft's ``lora_A``/``lora_dropout``/``base_layer``
count as their layer — and gets one cause, the first rule that matches:

1. ``weight reference`` — the storage of a model Parameter or buffer (e.g. the frozen W kept for
   dx): autograd holds a reference, it costs no memory; reported apart, never in the totals.
2. ``step input`` — existed before the step and is no Parameter (input_ids kept by the
   embedding's backward, an attention mask).
3. ``ΔW/weight-sized temporary`` — a 2-D tensor of the shape of a frozen 2-D weight (or its
   transpose) created in the step: a materialised ΔW (peft's LoKr/LoHa/DoRA build one), a cast
   or clone of W (autocast's bf16 copy of W, kept for dx).
4. ``dropout copy or mask`` (a mask) — made by a dropout op (``native_dropout``'s mask,
   ``bernoulli_``'s noise).
5. ``input kept for a gradient`` — made by another unit (it came in from outside this unit's
   forward: the layer input a Linear keeps for its weight/adapter gradient, a norm's input, a
   sub-module's output its parent's op keeps).
6. ``dropout copy or mask`` (a copy) — made inside this unit by a dropout module or from a mask:
   peft's ``lora_dropout(x)``, kept by ``lora_A``.
7. ``dtype-cast copy`` — made inside this unit by a dtype cast (``_to_copy``): peft's cast of x
   to the adapter dtype, autocast's cast of x.
8. ``adapter intermediate`` — any other tensor made inside an adapted layer: x·Aᵀ, LoKr's/LoHa's
   products, pypeft_fast's ``u = drop(x)·Aᵀ``.
9. ``attention internals`` / ``norm internals`` / ``activation internals`` — made inside a unit
   whose class name says Attention/Attn, Norm, or an activation module (rotary-embedded q/k,
   softmax outputs, logsumexp, rsqrt, fp32 copies of the normalised input).
10. ``other internals`` — the rest (the loss's log-softmax in the model's own forward, ...).

Each storage is counted once, for the first unit that saved it (q/k/v share their input: it is
q_proj's). Shape coincidences can misfile a tensor under rule 3 (tokens = a weight dimension).
"""
from __future__ import annotations

WEIGHT_REF = "weight reference"
STEP_INPUT = "step input"
WEIGHT_SIZED = "ΔW/weight-sized temporary"
DROPOUT = "dropout copy or mask"
INPUT = "input kept for a gradient"
CAST = "dtype-cast copy"
ADAPTER = "adapter intermediate"
ATTENTION = "attention internals"
NORM = "norm internals"
ACTIVATION = "activation internals"
OTHER = "other internals"

CAUSES = (INPUT, DROPOUT, CAST, ADAPTER, WEIGHT_SIZED, ATTENTION, NORM, ACTIVATION, OTHER, STEP_INPUT)
"""The activation causes, in the order tables and plots show them (weight references apart)."""

MEANING = {
    INPUT: "a tensor made by another module that this module's ops keep (its layer input)",
    DROPOUT: "a dropout mask, or a copy dropout(x) made inside this module (peft's lora_dropout(x))",
    CAST: "a dtype cast made inside this module (x cast to the adapter dtype, autocast's cast)",
    ADAPTER: "an adapter's own intermediate (x·Aᵀ, LoKr/LoHa products, pypeft_fast's u)",
    WEIGHT_SIZED: "a tensor of a frozen weight's shape made in the step (a built ΔW, a cast/clone of W)",
    ATTENTION: "made inside an attention module (rotary q/k, scores, softmax, logsumexp)",
    NORM: "made inside a norm module (rsqrt, fp32 copy of the input)",
    ACTIVATION: "made inside an activation module",
    OTHER: "anything else (e.g. the loss's log-softmax)",
    STEP_INPUT: "a batch tensor that existed before the step (input_ids kept by the embedding)",
}

_ACTIVATION_NAMES = ("Activation", "GELU", "SiLU", "ReLU", "Tanh", "Sigmoid", "Swish", "Mish", "GLU")


def internals_cause(unit_class: str, is_activation: bool) -> str:
    """Rule 9/10 by the unit's class name."""
    if "Attention" in unit_class or "Attn" in unit_class:
        return ATTENTION
    if "Norm" in unit_class:
        return NORM
    if is_activation or any(unit_class.endswith(n) or n in unit_class for n in _ACTIVATION_NAMES):
        return ACTIVATION
    return OTHER


def classify(*, is_param: bool, producer, unit: str, unit_class: str, unit_adapted: bool,
             unit_activation: bool, shape: tuple, weight_shapes: set) -> str:
    """The cause of one saved storage (rules 1-10 above). ``producer`` is None (made before the
    step) or has ``.unit``, ``.dropout`` (None, "mask" or "copy") and ``.cast`` (bool)."""
    if is_param:
        return WEIGHT_REF
    if producer is None:
        return STEP_INPUT
    if len(shape) == 2 and tuple(shape) in weight_shapes:
        return WEIGHT_SIZED
    if producer.dropout == "mask":
        return DROPOUT
    if producer.unit != unit:
        return INPUT
    if producer.dropout == "copy":
        return DROPOUT
    if producer.cast:
        return CAST
    if unit_adapted:
        return ADAPTER
    return internals_cause(unit_class, unit_activation)
