"""peft LoHa ``Linear`` layers served by :func:`pypeft_fast.hadamard_linear`.

ΔW = scaling·(hada_w1_a·hada_w1_b) ⊙ (hada_w2_a·hada_w2_b), the layer's own Parameters. Not
served (peft's forward runs, the report says why): the Tucker factors ``hada_t1``/``hada_t2``
(conv layers with ``use_effective_conv2d``; conv layers are not served at all), and
``rank_dropout``/``module_dropout`` > 0 in training (eval calls are served). peft draws
``torch.rand(1)`` for ``module_dropout`` on every training call even when it is 0; the served
forward does not, so torch's global RNG stream differs from peft's after a served training call.
"""
from __future__ import annotations

from ...base_layer import linear_view
from ...families.hadamard import hadamard_linear
from ..checks import lycoris_dropout_reason, scalar

PEFT_CLASS = ("peft.tuners.loha.layer", "Linear")
"""The exact peft class served (subclasses, e.g. quantized ones, are not)."""


class Handler:
    peft_type = "loha"

    @staticmethod
    def adapter_reason(module, adapter: str, training: bool | None) -> str | None:
        if adapter not in module._available_adapters:
            return f"adapter {adapter!r} has no weights on this layer"
        if adapter in module.hada_t1 or adapter in module.hada_t2:
            return "LoHa Tucker factors hada_t1/hada_t2 (use_effective_conv2d)"
        if adapter not in module.hada_w1_a or adapter not in module.hada_w2_b:
            return "LoHa adapter without the four hada_w* factors"
        return lycoris_dropout_reason(module, adapter, training, "LoHa")

    @staticmethod
    def call_reason(module, adapter, x) -> str | None:
        if (not getattr(module, "cast_input_dtype_enabled", True)
                and x.dtype != module.hada_w1_a[adapter].dtype):
            return "input dtype casting is disabled and the adapter dtype differs"
        return None

    @staticmethod
    def forward(module, adapter, x, state):
        weight, bias = linear_view(module.base_layer)
        y = hadamard_linear(x, weight, bias, module.hada_w1_a[adapter], module.hada_w1_b[adapter],
                            module.hada_w2_a[adapter], module.hada_w2_b[adapter],
                            scaling=scalar(module.scaling[adapter]), backend=state.backend,
                            name=state.entry.name)
        return y.to(x.dtype)  # peft's LoHa returns the input's dtype (under autocast too)
