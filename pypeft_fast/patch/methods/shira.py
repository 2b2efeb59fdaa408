"""peft SHiRA ``Linear`` layers served by :func:`pypeft_fast.sparse_linear`."""
from __future__ import annotations

import torch

from ...base_layer import linear_view
from ...families.sparse import IndicesStamp, sparse_linear
from ..checks import scalar

PEFT_CLASS = ("peft.tuners.shira.layer", "Linear")
"""The exact peft class served (subclasses, e.g. quantized ones, are not)."""


class Handler:
    peft_type = "shira"

    @staticmethod
    def adapter_reason(module, adapter: str, training: bool | None) -> str | None:
        if adapter not in module.shira_weight:
            return f"adapter {adapter!r} has no weights on this layer"
        if adapter not in module.shira_indices:
            return f"adapter {adapter!r} has no shira_indices"
        if getattr(module, "quantization_backend", None):
            return "quantized base layer"
        if getattr(module, "fan_in_fan_out", False):
            return "SHiRA with fan_in_fan_out"
        return None

    @staticmethod
    def forward(module, adapter, x, state):
        weight, bias = linear_view(module.base_layer)
        values = module.shira_weight[adapter]
        src = module.shira_indices[adapter]
        if torch.compiler.is_compiling():  # traced: no cache (sparse_linear builds the layout)
            idx = src.to(device=values.device, dtype=torch.int64)
        else:
            idx = _int64_indices(state, adapter, src, values.device)
        return sparse_linear(x, weight, bias, values, idx, scaling=scalar(module.scaling[adapter]),
                             backend=state.backend, name=state.entry.name)


def _int64_indices(state, adapter, src, device):
    """peft stores the mask as int32 (2, nnz); pypeft_fast wants int64. Converted once per
    indices tensor and contents (:class:`IndicesStamp`: version, pointer, CPU contents), so the
    sparse layout cache keyed on the copy keeps hitting. The copy is made outside inference
    mode: a first call under ``torch.inference_mode()`` must not leave an inference tensor that
    later training steps cannot use."""
    hit = state.cache.get(adapter)
    if hit is None or hit[0] is not src or hit[2].device != device or not hit[1].matches(src):
        with torch.inference_mode(False):
            idx = src.to(device=device, dtype=torch.int64, copy=True)
        hit = (src, IndicesStamp.of(src), idx)
        state.cache[adapter] = hit
    return hit[2]
