"""peft LoRA ``Linear`` layers served by :func:`pypeft_fast.lowrank_linear`."""
from __future__ import annotations

from torch import nn


from ...base_layer import linear_view
from ...families.lowrank import lowrank_linear
from ..checks import scalar

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
            return "DoRA" if vname == "Dora" else f"LoRA variant {vname}"
        drop = module.lora_dropout[adapter]
        if type(drop) not in (nn.Dropout, nn.Identity):
            return f"lora_dropout is a {type(drop).__name__}"
        if isinstance(drop, nn.Dropout) and drop.p >= 1.0:
            return f"lora_dropout p={drop.p} (>= 1)"
        if type(module.lora_A[adapter]) is not nn.Linear or type(module.lora_B[adapter]) is not nn.Linear:
            return "lora_A/lora_B are not nn.Linear"
        return None

    @staticmethod
    def call_reason(module, adapter, x) -> str | None:
        if (not getattr(module, "cast_input_dtype_enabled", True)
                and x.dtype != module.lora_A[adapter].weight.dtype):
            return "input dtype casting is disabled and the adapter dtype differs"
        return None

    @staticmethod
    def forward(module, adapter, x, state):
        weight, bias = linear_view(module.base_layer)
        lora_B = module.lora_B[adapter]
        scaling = scalar(module.scaling[adapter])
        if lora_B.bias is not None:  # lora_bias=True: y += s·b_B, folded into the base bias
            extra = lora_B.bias * scaling
            bias = (extra if bias is None else bias + extra).to(weight.dtype)
        drop = module.lora_dropout[adapter]
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        return lowrank_linear(x, weight, bias, module.lora_A[adapter].weight, lora_B.weight,
                              scaling=scaling, dropout=p, backend=state.backend,
                              name=state.entry.name)
