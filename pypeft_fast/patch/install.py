"""``patch`` / ``unpatch``: find the peft layers, give each served one a per-instance forward.

Per *instance*, never per class, and never a copied upstream forward: a served layer gets an
instance attribute ``forward`` (a :class:`ServedForward`, shadowing its class's ``forward``)
that on every call checks whether the call can be served (:mod:`.checks`, then the method's
handler) and either computes through a pypeft_fast op or runs peft's own forward, counting the
reason in the :class:`PatchReport`. ``ServedForward`` is a plain object holding its module, so a
patched model pickles, deep-copies and ``torch.save``/``torch.load``-s, still patched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .checks import common_reason, static_base_reason, static_layer_reason
from .methods import handlers, served_methods
from .report import PATCHED, LayerEntry, PatchReport

log = logging.getLogger("pypeft_fast")

_STATE_ATTR = "_pypeft_fast_patch"


@dataclass
class _LayerState:
    entry: LayerEntry
    server: type
    saved_forward: object  # an instance-level forward that was there before, or None
    backend: str = "auto"
    cache: dict = field(default_factory=dict)


class ServedForward:
    """pypeft_fast's per-instance forward: serve the call or run peft's own forward."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def original(self):
        module = self.module
        state = module.__dict__[_STATE_ATTR]
        if state.saved_forward is not None:
            return state.saved_forward
        return type(module).forward.__get__(module, type(module))

    def __call__(self, x, *args, **kwargs):
        module = self.module
        state = module.__dict__[_STATE_ATTR]
        server = state.server
        reason = common_reason(module, x, args, kwargs)
        if reason is None:
            adapter = module.active_adapters[0]
            reason = server.adapter_reason(module, adapter, module.training)
            call_reason = getattr(server, "call_reason", None)  # optional: per-input conditions
            if reason is None and call_reason is not None:
                reason = call_reason(module, adapter, x)
        if reason is None:
            state.entry.served_calls += 1
            return server.forward(module, adapter, x, state)
        state.entry.count_fallback(reason)
        return self.original()(x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<pypeft_fast served forward of {type(self.module).__name__}>"


def _method_of(cls) -> str:
    parts = cls.__module__.split(".")
    if len(parts) > 2 and parts[0] == "peft" and parts[1] == "tuners":
        return parts[2]
    return cls.__module__


def _unsupported_class_reason(module) -> str:
    cls = type(module)
    method = _method_of(cls)
    if method in served_methods():
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
    from ..registry import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"patch: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    servers = handlers()
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
        reason = static_base_reason(module, at_patch_time=True)
        installed = reason is None
        if reason is None:
            reason = static_layer_reason(module, server)
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
        module.forward = ServedForward(module)
    if report.unsupported:
        log.warning("%s", report.summary())
    return report


def unpatch(model: nn.Module) -> int:
    """Restore the forward of every layer :func:`patch` changed; returns how many were restored."""
    restored = 0
    for name, module in model.named_modules():
        state = module.__dict__.get(_STATE_ATTR)
        if state is None:
            continue
        current = module.__dict__.get("forward")
        if not isinstance(current, ServedForward):
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
