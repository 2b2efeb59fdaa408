"""Attribution during one profiled step: which unit (module) is running, which unit and op made
each storage, and which unit saved it (rules in :mod:`.causes`).

* :class:`Units` — the model's modules folded into units (an adapted layer absorbs its children),
  their display names, types and layer keys.
* :class:`ModuleStack` — global forward pre/post hooks keep the stack of running units (global
  hooks: pf.patch refuses layers whose base layer has its own hooks).
* :class:`Producers` — a ``TorchDispatchMode`` recording, per new storage, the unit and op that
  made it, whether it is a dropout mask / dropout output and whether it is a dtype cast.
* :class:`SavedByUnit` — ``saved_tensors_hooks`` recording every saved storage once, with its
  unit and cause.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ..measure import SavedTensors, storage_tensors
from . import causes

OUTSIDE = "(outside modules)"
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")
_PEFT_PREFIX = "base_model.model."


def display_name(name: str) -> str:
    """A module path without peft's wrapper prefix, so peft, patched and injected models line up."""
    if name in ("base_model", "base_model.model"):
        return "(model)"
    name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    return name or "(model)"


def layer_key(name: str) -> str | None:
    """The repeated block a module belongs to: the path up to its first integer component
    (``model.layers.3.mlp`` → ``model.layers.3``); None outside the blocks."""
    m = _LAYER.match(name)
    return m.group(1) if m else None


def kind_key(name: str) -> str:
    """The module's path with its block index replaced by ``*`` (``model.layers.*.mlp``)."""
    key = layer_key(name)
    if key is None:
        return name
    stack = key.rsplit(".", 1)[0]
    return stack + ".*" + name[len(key):]


def is_adapted(m: nn.Module) -> bool:
    from ..inject.modules import DeltaLinear

    if isinstance(m, DeltaLinear):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, BaseTunerLayer)


def type_name(m: nn.Module) -> str:
    cls = type(m)
    family = getattr(m, "family", None)
    if is_adapted(m) and isinstance(family, str):  # pf.inject's DeltaLinear, as in trainable_report
        return f"DeltaLinear[{family}]"
    if is_adapted(m):
        mod = cls.__module__.split(".")
        owner = mod[2] if mod[0] == "peft" and len(mod) > 2 else "pypeft_fast"
        return f"{owner}.{cls.__name__}"
    return cls.__name__


@dataclass
class Unit:
    name: str          # display name
    type: str
    adapted: bool
    activation: bool
    layer: str | None  # layer key (display), None outside the repeated blocks
    kind: str          # display name with the block index as *


class Units:
    """The model's modules folded into units: ``unit_of[id(module)]`` → display name."""

    def __init__(self, model: nn.Module):
        self.units: dict[str, Unit] = {}
        self.unit_of: dict[int, str] = {}
        adapted_prefix: list[str] = []
        for name, m in model.named_modules(remove_duplicate=False):
            if id(m) in self.unit_of:
                continue
            owner = next((p for p in adapted_prefix if name.startswith(p + ".")), None)
            if owner is not None:
                self.unit_of[id(m)] = display_name(owner)
                continue
            if is_adapted(m):
                adapted_prefix.append(name)
            disp = display_name(name)
            self.unit_of[id(m)] = disp
            self.units[disp] = Unit(disp, type_name(m), is_adapted(m),
                                    isinstance(m, _ACTIVATIONS), layer_key(disp) if disp != "(model)" else None,
                                    kind_key(disp))
        self.units.setdefault(OUTSIDE, Unit(OUTSIDE, "-", False, False, None, OUTSIDE))


_ACTIVATIONS = tuple(getattr(nn.modules.activation, n) for n in nn.modules.activation.__all__
                     if isinstance(getattr(nn.modules.activation, n), type))


class ModuleStack:
    """Context manager: ``.current`` is the unit of the innermost running module of the model."""

    def __init__(self, units: Units):
        self.units = units
        self.stack: list[str] = []
        self.dropout_depth = 0  # > 0 while an nn.Dropout module runs
        self._handles = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else OUTSIDE

    def _pre(self, module, args):
        unit = self.units.unit_of.get(id(module))
        if unit is not None:
            self.stack.append(unit)
            self.dropout_depth += isinstance(module, _DropoutNd)

    def _post(self, module, args, output):
        if id(module) in self.units.unit_of and self.stack:
            self.stack.pop()
            self.dropout_depth -= isinstance(module, _DropoutNd)

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self.stack.clear()
        return False


@dataclass
class Producer:
    unit: str
    op: str
    dropout: str | None = None  # "mask", "copy" or None
    cast: bool = False


_DROPOUT_MASK_OPS = ("aten.bernoulli", "aten.native_dropout")
_CASTS = ("aten._to_copy", "aten.to.", "aten._to_dtype")


class Producers(TorchDispatchMode):
    """Per storage made inside (a weak dictionary keyed by the storage object): the
    :class:`Producer` — unit, op, dropout role, cast."""

    def __init__(self, stack: ModuleStack):
        super().__init__()
        self.stack = stack
        self.info: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, t: torch.Tensor) -> Producer | None:
        return self.info.get(t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = str(func)
        ins = [p for t in tree_leaves((args, kwargs)) for p in storage_tensors(t)]
        in_storages = {p.untyped_storage().data_ptr() for p in ins}
        from_mask = any((i := self.info.get(p.untyped_storage())) is not None and i.dropout == "mask" for p in ins)
        in_dtype = ins[0].dtype if ins else None
        outs = [p for t in tree_leaves(out) for p in storage_tensors(t)]
        for k, t in enumerate(outs):
            s = t.untyped_storage()
            if s.data_ptr() in in_storages:  # a view or an in-place result
                if op.startswith(_DROPOUT_MASK_OPS) and (i := self.info.get(s)) is not None:
                    i.dropout = "mask"
                continue
            rec = Producer(self.stack.current, op)
            if op.startswith("aten.native_dropout"):
                rec.dropout = "copy" if k == 0 else "mask"
            elif op.startswith("aten.bernoulli"):
                rec.dropout = "mask"
            elif from_mask or self.stack.dropout_depth:
                rec.dropout = "copy"
            rec.cast = op.startswith(_CASTS) and in_dtype is not None and t.dtype != in_dtype
            self.info[s] = rec
        return out


@dataclass
class SavedStorage:
    unit: str
    cause: str
    nbytes: int
    shape: tuple
    dtype: str
    op: str | None


class SavedByUnit(SavedTensors):
    """``saved_tensors_hooks`` (:class:`pypeft_fast.measure.SavedTensors`): every saved storage
    once, with the unit that saved it and its cause (:func:`.causes.classify`) in ``.seen``."""

    def __init__(self, units: Units, stack: ModuleStack, producers: Producers,
                 param_storages: set[int], weight_shapes: set):
        super().__init__(on_save=self._record, release=False)  # MemTracker counts the tensors themselves
        self.units, self.stack, self.producers = units, stack, producers
        self.params, self.weight_shapes = param_storages, weight_shapes
        self.seen: dict[int, SavedStorage] = {}

    def _record(self, t):
        for part in storage_tensors(t):
            s = part.untyped_storage()
            ptr = s.data_ptr()
            if ptr == 0 or ptr in self.seen:
                continue
            unit = self.stack.current
            u = self.units.units[unit]
            prod = self.producers.get(part)
            cause = causes.classify(is_param=ptr in self.params, producer=prod, unit=unit,
                                    unit_class=u.type, unit_adapted=u.adapted,
                                    unit_activation=u.activation, shape=tuple(part.shape),
                                    weight_shapes=self.weight_shapes)
            self.seen[ptr] = SavedStorage(unit, cause, s.nbytes(), tuple(part.shape),
                                          str(part.dtype).replace("torch.", ""), prod.op if prod else None)
