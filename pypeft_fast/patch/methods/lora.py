"""peft LoRA ``Linear`` layers served by :func:`pypeft_fast.lowrank_linear`, DoRA ones
(``use_dora=True``) by the same op with ``magnitude=`` (peft's semantics:
``pypeft_fast/families/lowrank_dora.py``)."""
from __future__ import annotations

from torch import nn


from ...base_layer import linear_view
from ...families.lowrank import lowrank_linear
from ...function import autocast_dtype
from ..checks import SHARDED_MODULE, fsdp_wrapped, scalar

PEFT_CLASS = ("peft.tuners.lora.layer", "Linear")
"""The exact peft class served (subclasses, e.g. quantized ones, are not)."""


class Handler:
    peft_type = "lora"

    @staticmethod
    def adapter_reason(module, adapter: str, training: bool | None) -> str | None:
        if adapter not in module.lora_A:
            return f"adapter {adapter!r} has no weights on this layer"
        variant = module.lora_variant.get(adapter)
        if variant is not None:
            vname = type(variant).__name__.replace("LinearVariant", "")
            if vname != "Dora":
                return f"LoRA variant {vname}"
            reason = _dora_reason(module, adapter)
            if reason is not None:
                return reason
        drop = module.lora_dropout[adapter]
        if type(drop) not in (nn.Dropout, nn.Identity):
            return f"lora_dropout is a {type(drop).__name__}"
        if isinstance(drop, nn.Dropout) and drop.p >= 1.0:
            return f"lora_dropout p={drop.p} (>= 1)"
        lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
        if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
            if fsdp_wrapped(lora_A) or fsdp_wrapped(lora_B):
                return f"lora_A/lora_B {SHARDED_MODULE}"
            return "lora_A/lora_B are not nn.Linear"
        return None

    @staticmethod
    def call_reason(module, adapter, x) -> str | None:
        if (not getattr(module, "cast_input_dtype_enabled", True)
                and autocast_dtype(x.device.type) is None  # autocast casts for F.linear anyway
                and x.dtype != module.lora_A[adapter].weight.dtype):
            return "input dtype casting is disabled and the adapter dtype differs"
        return None

    @staticmethod
    def forward(module, adapter, x, state):
        weight, bias = linear_view(module.base_layer)
        lora_B = module.lora_B[adapter]
        scaling = scalar(module.scaling[adapter])
        if adapter in module.lora_variant:  # DoRA (adapter_reason admits no other variant)
            drop = module.lora_dropout[adapter]
            # peft: dropout and the base(drop(x)) terms only in training with a real Dropout
            p = drop.p if isinstance(drop, nn.Dropout) and module.training else 0.0
            return lowrank_linear(x, weight, bias, module.lora_A[adapter].weight, lora_B.weight,
                                  scaling=scaling, dropout=p, backend=state.backend,
                                  name=state.entry.name,
                                  magnitude=module.lora_magnitude_vector[adapter].weight,
                                  lora_bias=lora_B.bias)
        if lora_B.bias is not None:  # lora_bias=True: y += s·b_B, folded into the base bias
            extra = lora_B.bias * scaling
            bias = (extra if bias is None else bias + extra).to(weight.dtype)
        drop = module.lora_dropout[adapter]
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        return lowrank_linear(x, weight, bias, module.lora_A[adapter].weight, lora_B.weight,
                              scaling=scaling, dropout=p, backend=state.backend,
                              name=state.entry.name)


def _dora_reason(module, adapter) -> str | None:
    """Why a DoRA adapter cannot be served (None: it can)."""
    mags = getattr(module, "lora_magnitude_vector", None)
    if mags is None or adapter not in mags:
        return "DoRA without a magnitude vector"
    mag = mags[adapter]
    if type(mag).__name__ != "DoraLinearLayer":
        return f"DoRA magnitude layer {type(mag).__name__}"
    drop = module.lora_dropout[adapter]
    if isinstance(drop, nn.Dropout) and drop.training != module.training:
        return "DoRA with lora_dropout in a different train/eval mode than its layer"
    return None
