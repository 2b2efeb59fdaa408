"""``pf.patch(model)``: make the LoRA, LoKr and SHiRA ``Linear`` layers of a peft model compute
through pypeft_fast's ops, in place; ``pf.unpatch(model)`` undoes it.

How (STYLE.md, "Patching Hugging Face models"): per *instance*, never per class, and never a
copied upstream forward. Each served layer gets an instance attribute ``forward`` (shadowing its
class's ``forward``) that, on every call,

1. checks whether pypeft_fast can serve this call (adapter not merged, adapters enabled, exactly
   one active adapter with weights on this layer, no extra forward arguments such as peft's
   mixed-batch ``adapter_names``, no autocast, no hooks on the base layer, the input in the base
   weight's dtype, a supported variant / option), and if so
2. computes ``y = x·Wᵀ + b + x·ΔWᵀ`` with :func:`lowrank_linear` / :func:`kronecker_linear` /
   :func:`sparse_linear` from the layer's *own* Parameters (``base_layer.weight``/``bias``,
   ``lora_A[a].weight``, ``lora_B[a].weight``, ``scaling[a]``, ``lora_dropout[a].p``, LoKr's
   ``lokr_w1``/``lokr_w1_a,b``/``lokr_w2``/``lokr_w2_a,b``, SHiRA's ``shira_weight[a]`` at
   ``shira_indices[a]``), so the optimizer, ``save_pretrained``, ``merge_and_unload``,
   ``disable_adapter()`` and ``set_adapter()`` see the same tensors as before; otherwise
3. calls the layer's original (peft) forward for that call and counts the reason in the
   :class:`PatchReport` (``report.entries[i].fallback_calls``).

Layers pypeft_fast cannot serve at all (conv layers, quantized base layers, other peft methods)
get no new forward; the report lists them with the reason and ``strict=True`` raises instead.
peft and transformers are imported lazily: ``import pypeft_fast`` does not need them.
"""
from __future__ import annotations

import logging
import types
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .families.kronecker import kronecker_linear
from .families.lowrank import lowrank_linear
from .families.sparse import sparse_linear

log = logging.getLogger("pypeft_fast")

_STATE_ATTR = "_pypeft_fast_patch"
PATCHED = "patched"


@dataclass
class LayerEntry:
    """One peft layer of the model as :func:`patch` found it."""

    name: str
    """Dotted module name in the model."""
    peft_type: str
    """peft method the layer belongs to (``lora``, ``lokr``, ``shira``, ``ia3``, ...)."""
    layer_type: str
    """``<method>.<class>``, e.g. ``lora.Linear`` or ``lora.Linear4bit``."""
    adapter: str
    """Active adapter(s) at patch time."""
    status: str
    """``"patched"`` when pypeft_fast serves the layer's forward, else the reason it does not."""
    installed: bool
    """Whether the layer got pypeft_fast's forward (it then re-checks on every call)."""
    served_calls: int = 0
    fallback_calls: Counter = field(default_factory=Counter)
    """Calls that ran peft's own forward, by reason."""

    def count_fallback(self, reason: str) -> None:
        if reason not in self.fallback_calls:
            _warn_once(reason, self.name)
        self.fallback_calls[reason] += 1


_warned: set[str] = set()


def _warn_once(reason: str, layer: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("pypeft_fast.patch: %s runs peft's own forward: %s (reported once per reason; "
                    "see the PatchReport for counts)", layer, reason)


class PatchReport:
    """What :func:`patch` did to every peft layer; prints as a table.

    The per-layer counters (``served_calls``, ``fallback_calls``) stay live after patching, so
    printing the report after training shows which calls ran peft's forward and why.
    """

    def __init__(self, entries: list[LayerEntry], kept: list[str] | None = None):
        self.entries = entries
        self.kept = kept or []
        """Names of peft wrappers that are not delta layers (``modules_to_save`` copies,
        trainable tokens): left untouched, not counted as unsupported."""

    @property
    def patched(self) -> list[LayerEntry]:
        return [e for e in self.entries if e.status == PATCHED]

    @property
    def unsupported(self) -> list[LayerEntry]:
        return [e for e in self.entries if e.status != PATCHED]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def counts(self) -> dict[str, int]:
        return {
            "layers": len(self.entries),
            "patched": len(self.patched),
            "installed_not_served": sum(e.installed and e.status != PATCHED for e in self.entries),
            "not_patchable": sum(not e.installed for e in self.entries),
        }

    def summary(self) -> str:
        c = self.counts()
        reasons = Counter(e.status for e in self.unsupported)
        text = (f"pypeft_fast.patch: {c['layers']} peft layers, {c['patched']} patched, "
                f"{len(self.unsupported)} running peft's forward")
        if reasons:
            text += " (" + "; ".join(f"{n}× {r}" for r, n in reasons.most_common()) + ")"
        if self.kept:
            text += f"; {len(self.kept)} non-delta peft wrappers left as they are"
        return text

    def __str__(self) -> str:
        head = ("layer", "peft", "adapter", "status", "pf calls", "peft calls")
        rows = []
        for e in self.entries:
            fb = sum(e.fallback_calls.values())
            fb_text = str(fb)
            if fb:
                fb_text += " (" + ", ".join(f"{n}× {r}" for r, n in e.fallback_calls.most_common()) + ")"
            rows.append((e.name, e.layer_type, e.adapter, e.status, str(e.served_calls), fb_text))
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        widths[-1] = len(head[-1])  # last column is free text
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    def __repr__(self) -> str:
        c = self.counts()
        return f"PatchReport(layers={c['layers']}, patched={c['patched']}, unsupported={len(self.unsupported)})"


# --------------------------------------------------------------------------------------------
# Call-time checks and the three servers
# --------------------------------------------------------------------------------------------

def _base_linear(base: nn.Module):
    """``(weight (out, in), bias)`` of a plain ``nn.Linear`` or transformers ``Conv1D`` (whose
    weight is stored (in, out)); None for anything else (quantized or custom layers)."""
    if type(base) is nn.Linear:
        return base.weight, base.bias
    if type(base).__name__ == "Conv1D" and type(base).__module__ == "transformers.pytorch_utils":
        return base.weight.t(), base.bias
    return None


def _plain_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, nn.Parameter)


def _static_base_reason(module) -> str | None:
    """Why the base layer can never be served (checked at patch time)."""
    base = module.base_layer
    if _base_linear(base) is None:
        return (f"base layer is {type(base).__module__}.{type(base).__name__} (quantized or custom); "
                "only torch.nn.Linear and transformers Conv1D are served")
    if not _plain_tensor(base.weight):
        return f"base weight is a {type(base.weight).__name__} (quantized tensor subclass)"
    return None


def _common_reason(module, x, args, kwargs) -> str | None:
    """Conditions every family needs on each call; None when the call can be served."""
    if args or kwargs:
        if "adapter_names" in kwargs:
            return "mixed-batch adapter_names"
        return "extra forward arguments " + ", ".join([f"#{i}" for i in range(len(args))] + list(kwargs))
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight"
    active = module.active_adapters
    if len(active) != 1:
        return f"{len(active)} adapters active at once ({', '.join(active)})"
    if not isinstance(x, torch.Tensor):
        return f"input is a {type(x).__name__}, not a tensor"
    base = module.base_layer
    if base._forward_hooks or base._forward_pre_hooks:
        return "hooks on the base layer"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is enabled"
    reason = _static_base_reason(module)
    if reason is not None:
        return reason
    if base.weight.requires_grad:
        return "base weight is trainable (requires_grad)"
    if x.dtype != base.weight.dtype:
        return f"input is {x.dtype} but the base weight is {base.weight.dtype}"
    return None


def _scalar(s) -> float:
    return float(s.item()) if isinstance(s, torch.Tensor) else float(s)


class _LoRA:
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
        weight, bias = _base_linear(module.base_layer)
        lora_B = module.lora_B[adapter]
        scaling = _scalar(module.scaling[adapter])
        if lora_B.bias is not None:  # lora_bias=True: y += s·b_B, folded into the base bias
            extra = lora_B.bias * scaling
            bias = (extra if bias is None else bias + extra).to(weight.dtype)
        drop = module.lora_dropout[adapter]
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        return lowrank_linear(x, weight, bias, module.lora_A[adapter].weight, lora_B.weight,
                              scaling=scaling, dropout=p, backend=state.backend,
                              name=state.entry.name)


class _LoKr:
    peft_type = "lokr"

    @staticmethod
    def adapter_reason(module, adapter: str, training: bool | None) -> str | None:
        if adapter not in module._available_adapters:
            return f"adapter {adapter!r} has no weights on this layer"
        if adapter in module.lokr_t2:
            return "LoKr Tucker factor lokr_t2 (effective conv)"
        if training is not False:
            rd, md = module.rank_dropout.get(adapter, 0.0), module.module_dropout.get(adapter, 0.0)
            if rd or md:
                where = "" if training else " (eval calls are served)"
                what = " and ".join(f"{k}={v}" for k, v in (("rank_dropout", rd), ("module_dropout", md)) if v)
                return f"LoKr {what} in training{where}"
        return None

    @staticmethod
    def call_reason(module, adapter, x) -> str | None:
        return None

    @staticmethod
    def forward(module, adapter, x, state):
        weight, bias = _base_linear(module.base_layer)

        def factor(full, a, b):
            if adapter in full:
                return full[adapter]
            return (a[adapter], b[adapter])

        w1 = factor(module.lokr_w1, module.lokr_w1_a, module.lokr_w1_b)
        w2 = factor(module.lokr_w2, module.lokr_w2_a, module.lokr_w2_b)
        return kronecker_linear(x, weight, bias, w1, w2, scaling=_scalar(module.scaling[adapter]),
                                backend=state.backend, name=state.entry.name)


class _SHiRA:
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
    def call_reason(module, adapter, x) -> str | None:
        return None

    @staticmethod
    def forward(module, adapter, x, state):
        weight, bias = _base_linear(module.base_layer)
        values = module.shira_weight[adapter]
        src = module.shira_indices[adapter]
        # peft stores the mask as int32 (2, nnz); pypeft_fast wants int64. Convert once per
        # indices tensor (and version) so the sparse layout cache keyed on it keeps hitting.
        hit = state.cache.get(adapter)
        if hit is None or hit[0] is not src or hit[1] != src._version or hit[2].device != values.device:
            idx = src.to(device=values.device, dtype=torch.int64)
            hit = (src, src._version, idx)
            state.cache[adapter] = hit
        return sparse_linear(x, weight, bias, values, hit[2], scaling=_scalar(module.scaling[adapter]),
                             backend=state.backend, name=state.entry.name)


@dataclass
class _LayerState:
    entry: LayerEntry
    server: type
    saved_forward: object  # an instance-level forward that was there before, or None
    backend: str = "auto"
    cache: dict = field(default_factory=dict)


def _original_forward(module, state):
    if state.saved_forward is not None:
        return state.saved_forward
    return type(module).forward.__get__(module, type(module))


def _patched_forward(self, x, *args, **kwargs):
    """pypeft_fast's per-instance forward: serve the call or run peft's own forward."""
    state = self.__dict__[_STATE_ATTR]
    server = state.server
    reason = _common_reason(self, x, args, kwargs)
    if reason is None:
        adapter = self.active_adapters[0]
        reason = server.adapter_reason(self, adapter, self.training)
        if reason is None:
            reason = server.call_reason(self, adapter, x)
    if reason is None:
        state.entry.served_calls += 1
        return server.forward(self, adapter, x, state)
    state.entry.count_fallback(reason)
    return _original_forward(self, state)(x, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------

def _servers():
    """Exact peft classes pypeft_fast serves (subclasses, e.g. quantized ones, are not)."""
    from peft.tuners.lokr.layer import Linear as LoKrLinear
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.shira.layer import Linear as ShiraLinear

    return {LoraLinear: _LoRA, LoKrLinear: _LoKr, ShiraLinear: _SHiRA}


def _method_of(cls) -> str:
    parts = cls.__module__.split(".")
    if len(parts) > 2 and parts[0] == "peft" and parts[1] == "tuners":
        return parts[2]
    return cls.__module__


def _unsupported_class_reason(module) -> str:
    cls = type(module)
    method = _method_of(cls)
    if method in ("lora", "lokr", "shira"):
        if "conv" in cls.__name__.lower():
            return f"conv layer ({method}.{cls.__name__})"
        if cls.__module__.rsplit(".", 1)[-1] != "layer":
            return f"quantized or backend-specific base layer ({method}.{cls.__name__})"
        return f"{method}.{cls.__name__} is not served (only Linear layers are)"
    return f"peft method {method} is not served by pypeft_fast"


def _active_text(module) -> str:
    try:
        return ",".join(module.active_adapters)
    except Exception:  # noqa: BLE001  (a foreign tuner layer without active_adapters)
        return "?"


def patch(model: nn.Module, strict: bool = False, backend: str = "auto") -> PatchReport:
    """Serve the peft LoRA / LoKr / SHiRA ``Linear`` layers of ``model`` with pypeft_fast's ops.

    ``model``: a ``peft.PeftModel`` or any module tree that contains peft layers. Patching is in
    place and idempotent; the Parameters are the layers' own. Returns a :class:`PatchReport`
    listing every peft layer with ``"patched"`` or why peft's own forward runs for it. With
    ``strict=True`` a ``ValueError`` listing the layers that cannot be served is raised and
    nothing is patched. ``backend`` (``"auto"``, ``"torch"``, ``"cpp"``, ...) is passed to the ops
    (an explicit backend that cannot run raises at the first call, naming the layer).
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pypeft_fast.patch needs peft (pip install 'pypeft_fast[hf]')") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module (a peft model), got {type(model).__name__}")
    from .registry import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"patch: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    servers = _servers()
    plan: list[tuple[nn.Module, LayerEntry, type | None]] = []
    kept: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            kept.append(name)
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        cls = type(module)
        method = _method_of(cls)
        layer_type = f"{method}.{cls.__name__}"
        adapter = _active_text(module)
        server = servers.get(cls)
        if server is None:
            plan.append((module, LayerEntry(name, method, layer_type, adapter,
                                            _unsupported_class_reason(module), False), None))
            continue
        reason = _static_base_reason(module)
        installed = reason is None
        if reason is None:
            reason = _static_layer_reason(module, server)
        entry = LayerEntry(name, method, layer_type, adapter, reason or PATCHED, installed)
        plan.append((module, entry, server if installed else None))

    # Already patched layers keep their entry (and its live counters), refreshed: every report
    # returned for this model then shows the same numbers.
    for i, (module, entry, server) in enumerate(plan):
        old = module.__dict__.get(_STATE_ATTR)
        if old is not None and server is not None:
            old.entry.adapter, old.entry.status = entry.adapter, entry.status
            old.backend = backend
            plan[i] = (module, old.entry, server)
    entries = [e for _, e, _ in plan]
    report = PatchReport(entries, kept)
    if strict and report.unsupported:
        listing = "\n".join(f"  {e.name} ({e.layer_type}, adapter {e.adapter}): {e.status}"
                            for e in report.unsupported)
        raise ValueError(f"pypeft_fast.patch(strict=True): {len(report.unsupported)} of {len(entries)} "
                         f"peft layers cannot be served by pypeft_fast:\n{listing}")
    for module, entry, server in plan:
        if server is None:
            continue
        if _STATE_ATTR in module.__dict__:  # already patched: keep the original forward
            continue
        saved = module.__dict__.get("forward")
        state = _LayerState(entry, server, saved, backend)
        module.__dict__[_STATE_ATTR] = state
        module.forward = types.MethodType(_patched_forward, module)
    if report.unsupported:
        log.warning("%s", report.summary())
    return report


def _static_layer_reason(module, server) -> str | None:
    """Status at patch time: the per-call conditions that do not depend on the input."""
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight"
    active = module.active_adapters
    if len(active) != 1:
        return f"{len(active)} adapters active at once ({', '.join(active)})"
    return server.adapter_reason(module, active[0], None)


def unpatch(model: nn.Module) -> int:
    """Restore the forward of every layer :func:`patch` changed; returns how many were restored."""
    restored = 0
    for name, module in model.named_modules():
        state = module.__dict__.get(_STATE_ATTR)
        if state is None:
            continue
        current = module.__dict__.get("forward")
        if not (isinstance(current, types.MethodType) and current.__func__ is _patched_forward):
            raise RuntimeError(
                f"pypeft_fast.unpatch: {name}.forward was replaced after patching (it is {current!r}); "
                "remove that wrapper first, then unpatch")
        del module.__dict__["forward"]
        if state.saved_forward is not None:
            module.__dict__["forward"] = state.saved_forward
        del module.__dict__[_STATE_ATTR]
        restored += 1
    return restored


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` currently carries pypeft_fast's forward."""
    return _STATE_ATTR in module.__dict__
