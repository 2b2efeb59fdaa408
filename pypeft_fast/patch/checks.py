"""Why a peft layer or one call of it cannot be served: conditions shared by every method.

``static_base_reason`` is checked once at patch time; ``common_reason`` on every call, before the
method handler's own ``adapter_reason`` / ``call_reason``. Each returns None (servable) or the
reason, which the report counts and logs once.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base_layer import linear_view
from ..function import autocast_cast_dtype, autocast_dtype
from ..validate import is_dtensor

SHARDED_MODULE = ("wrapped by FSDP2's fully_shard itself: its parameters stay sharded until that "
                  "module is called, and pypeft_fast reads them without calling it (peft's forward "
                  "calls it, which unshards); apply fully_shard to the decoder layer instead")


def plain_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, nn.Parameter)


def fsdp_wrapped(module) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``module`` itself."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def static_base_reason(module, at_patch_time: bool = False) -> str | None:
    """Why the base layer can never be served (checked at patch time, and on every call).

    A DTensor base weight at patch time is FSDP2's sharded storage of a model sharded per
    decoder layer: FSDP2 unshards it around that layer's forward, and each call re-checks."""
    base = module.base_layer
    if linear_view(base, subclasses=False) is None:
        if fsdp_wrapped(base):
            return f"base layer is {SHARDED_MODULE}"
        return (f"base layer is {type(base).__module__}.{type(base).__name__} (quantized or custom); "
                "only torch.nn.Linear and transformers Conv1D are served")
    if not plain_tensor(base.weight):
        if is_dtensor(base.weight):
            if at_patch_time:
                return None
            return ("base weight is a DTensor (still sharded) at call time: FSDP2 unshards parameters "
                    "only around the forward of the module fully_shard was applied to")
        return f"base weight is a {type(base.weight).__name__} (quantized tensor subclass)"
    return None


def common_reason(module, x, args, kwargs) -> str | None:
    """Conditions every family needs on each call; None when the call can be served."""
    if args or kwargs:
        if "adapter_names" in kwargs:
            return "mixed-batch adapter_names"
        return "extra forward arguments " + ", ".join([f"#{i}" for i in range(len(args))] + list(kwargs))
    reason = adapter_state_reason(module)
    if reason is not None:
        return reason
    if not isinstance(x, torch.Tensor):
        return f"input is a {type(x).__name__}, not a tensor"
    base = module.base_layer
    if base._forward_hooks or base._forward_pre_hooks:
        return "hooks on the base layer"
    reason = static_base_reason(module)
    if reason is not None:
        return reason
    if base.weight.requires_grad:
        return "base weight is trainable (requires_grad)"
    # Under autocast the ops cast x and the weights to the autocast dtype, as peft's F.linear
    # calls are cast (pypeft_fast/function.py, delta_linear): only what autocast leaves alone
    # (float64) must already agree.
    cast = autocast_dtype(x.device.type)
    if autocast_cast_dtype(x, cast) != autocast_cast_dtype(base.weight, cast):
        return f"input is {x.dtype} but the base weight is {base.weight.dtype}"
    return None


def adapter_state_reason(module) -> str | None:
    """The layer's adapter state: enabled, not merged, exactly one active adapter."""
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight"
    active = module.active_adapters
    if len(active) != 1:
        return f"{len(active)} adapters active at once ({', '.join(active)})"
    return None


def static_layer_reason(module, handler) -> str | None:
    """Status at patch time: the per-call conditions that do not depend on the input."""
    reason = adapter_state_reason(module)
    if reason is not None:
        return reason
    return handler.adapter_reason(module, module.active_adapters[0], None)


def lycoris_dropout_reason(module, adapter: str, training: bool | None, method: str) -> str | None:
    """LyCORIS layers (LoKr, LoHa): ``rank_dropout``/``module_dropout`` > 0 cannot be served in
    training; ``training=None`` (patch time) says so with "(eval calls are served)"."""
    if training is False:
        return None
    rd, md = module.rank_dropout.get(adapter, 0.0), module.module_dropout.get(adapter, 0.0)
    if not (rd or md):
        return None
    where = "" if training else " (eval calls are served)"
    what = " and ".join(f"{k}={v}" for k, v in (("rank_dropout", rd), ("module_dropout", md)) if v)
    return f"{method} {what} in training{where}"


def scalar(s) -> float:
    """peft's per-adapter scaling as a Python float (peft may keep a 0-d tensor)."""
    return float(s.item()) if isinstance(s, torch.Tensor) else float(s)
