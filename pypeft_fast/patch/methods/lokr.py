"""peft LoKr ``Linear`` layers served by :func:`pypeft_fast.kronecker_linear`."""
from __future__ import annotations


from ...base_layer import linear_view
from ...families.kronecker import kronecker_linear
from ..checks import lycoris_dropout_reason, scalar

PEFT_CLASS = ("peft.tuners.lokr.layer", "Linear")
"""The exact peft class served (subclasses, e.g. quantized ones, are not)."""


class Handler:
    peft_type = "lokr"

    @staticmethod
    def adapter_reason(module, adapter: str, training: bool | None) -> str | None:
        if adapter not in module._available_adapters:
            return f"adapter {adapter!r} has no weights on this layer"
        if adapter in module.lokr_t2:
            return "LoKr Tucker factor lokr_t2 (effective conv)"
        return lycoris_dropout_reason(module, adapter, training, "LoKr")

    @staticmethod
    def forward(module, adapter, x, state):
        weight, bias = linear_view(module.base_layer)

        def factor(full, a, b):
            if adapter in full:
                return full[adapter]
            return (a[adapter], b[adapter])

        w1 = factor(module.lokr_w1, module.lokr_w1_a, module.lokr_w1_b)
        w2 = factor(module.lokr_w2, module.lokr_w2_a, module.lokr_w2_b)
        y = kronecker_linear(x, weight, bias, w1, w2, scaling=scalar(module.scaling[adapter]),
                             backend=state.backend, name=state.entry.name)
        return y.to(x.dtype)  # peft's LoKr returns the input's dtype (under autocast too)
