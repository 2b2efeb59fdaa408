"""``DeltaLinear`` (the wrapper) and ``inject`` (find the target layers, wrap them, freeze the rest).

The wrapper keeps the original layer as ``base_layer`` — its Parameters are the model's, never
copied — and adds the family's delta tensors (see :mod:`.specs`). Its forward is one pf op::

    y = x·Wᵀ + b + x·ΔWᵀ        x: (..., in), W: (out, in), ΔW never built

A GPT-2 ``Conv1D`` stores W transposed, as (in, out); the op gets the view ``W.t()`` (no copy).
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..base_layer import base_kind, is_linear_like, oriented
from ..registry import FAMILIES
from .config import DeltaConfig
from .specs import SPECS


class DeltaLinear(nn.Module):
    """A Linear/Conv1D layer plus a trainable structured ΔW of one family.

    Attributes: ``base_layer`` (the original module, frozen), ``family``, ``config`` (the
    :class:`DeltaConfig`), ``layer_name`` (dotted name at injection, used in error messages),
    ``scaling``, ``merged``; the delta tensors under the names of ``SPECS[family].shapes``
    (``delta_names``: per-layer Parameters, ``shared_names``: Parameters shared across layers,
    ``index_names``: int64 buffers).
    """

    def __init__(self, base_layer: nn.Module, kind: str, config: DeltaConfig, layer_name: str,
                 params: dict, buffers: dict, shared: dict):
        super().__init__()
        self.base_layer = base_layer
        self.base_kind = kind
        self.family = config.family
        self.config = config
        self.layer_name = layer_name
        self.scaling = SPECS[config.family].scaling(config)
        self.merged = False
        self._merge_state = None
        for k, p in shared.items():
            setattr(self, k, p)  # the same Parameter object in every layer
        for k, t in params.items():
            setattr(self, k, nn.Parameter(t))
        for k, t in buffers.items():
            self.register_buffer(k, t)
        self.delta_names = tuple(params)
        self.shared_names = tuple(shared)
        self.index_names = tuple(buffers)

    # the original layer's attributes, for model code that reads them (T5 reads wo.weight.dtype)
    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """W as (out, in): the Parameter itself, or a transposed view of a Conv1D's (in, out)."""
        return oriented(self.base_layer.weight, self.base_kind)

    @property
    def out_features(self) -> int:
        return self.base_weight().shape[0]

    @property
    def in_features(self) -> int:
        return self.base_weight().shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._modules["base_layer"]
        if self.merged:  # ΔW is folded into W
            return base(x)
        w = oriented(base._parameters["weight"], self.base_kind)  # (out, in), a view
        return SPECS[self.family].call(self, x, w, base._parameters.get("bias"))

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW (out, in) materialised through the registry (merge and tests; never in training).
        ``dtype`` casts the floating delta tensors first; gradients flow to them."""
        def cast(a):
            if isinstance(a, (tuple, list)):
                return tuple(cast(t) for t in a)
            if isinstance(a, torch.Tensor) and a.is_floating_point() and dtype is not None:
                return a.to(dtype)
            return a
        args = tuple(cast(a) for a in SPECS[self.family].delta_args(self))
        return FAMILIES[self.family].delta_weight(*args)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k}={tuple(getattr(self, k).shape)}"
                           for k in (*self.shared_names, *self.delta_names, *self.index_names))
        return (f"family={self.family}, base={self.base_kind}({self.in_features}→{self.out_features}), "
                f"{shapes}, scaling={self.scaling:g}, merged={self.merged}")


def delta_modules(model: nn.Module) -> list[tuple[str, DeltaLinear]]:
    """``[(dotted name relative to model, wrapper)]`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLinear)]


def _name_matches(spec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == k or name.endswith("." + k) for k in spec)


def find_targets(model: nn.Module, config: DeltaConfig) -> list[tuple[str, nn.Module, str]]:
    """``[(name, layer, "Linear" | "Conv1D")]`` that ``config`` selects; ValueError if a selected
    layer cannot be wrapped or nothing is selected. Modifies nothing."""
    out_emb = None
    if config.target_modules == "all-linear" and hasattr(model, "get_output_embeddings"):
        try:
            out_emb = model.get_output_embeddings()
        except Exception:
            out_emb = None
    targets, skipped_inside = [], set()
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in skipped_inside):
            continue
        if isinstance(mod, DeltaLinear):
            skipped_inside.add(name)
            continue
        if config.target_modules == "all-linear":
            hit = is_linear_like(mod) and mod is not out_emb
        else:
            hit = _name_matches(config.target_modules, name)
        if not hit or (config.exclude_modules and _name_matches(config.exclude_modules, name)):
            continue
        kind = base_kind(mod)
        if kind is None:
            raise ValueError(
                f"{name}: target_modules={config.target_modules!r} selects this "
                f"{type(mod).__name__}, but inject wraps only nn.Linear (with nn.Linear's forward) "
                f"and transformers' Conv1D; narrow target_modules or add it to exclude_modules")
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"{name}: the out_proj of nn.MultiheadAttention ({parent_name}) is never called — "
                f"the attention reads its weight directly — so a wrapper would be ignored; "
                f"add it to exclude_modules")
        w = mod.weight
        if not w.is_floating_point():
            raise ValueError(f"{name}: weight has dtype {w.dtype} (a quantized base layer?); "
                             f"expected a floating-point weight")
        targets.append((name, mod, kind))
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_linear_like(m)})
        raise ValueError(f"inject: target_modules={config.target_modules!r} matched no layer of "
                         f"{type(model).__name__}; its linear layers are named {linear[:20]}")
    return targets


def find_trainable(model: nn.Module, config: DeltaConfig, targets) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` selected by ``trainable_modules`` (outermost matches only);
    ValueError if an entry matches nothing or a selected module is, holds or sits in a target."""
    spec = config.trainable_modules
    if spec is None:
        return []
    found = []
    for name, mod in model.named_modules():
        if name and _name_matches(spec, name) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, mod))
    if not found:
        raise ValueError(f"inject: trainable_modules={spec!r} matched no module of "
                         f"{type(model).__name__}")
    for name, _ in found:
        for t, _, _ in targets:
            if t == name or t.startswith(name + ".") or name.startswith(t + "."):
                raise ValueError(f"{name}: selected by trainable_modules={spec!r} and {t} by "
                                 f"target_modules; a layer is either trained fully or given a "
                                 f"delta — add it to exclude_modules or narrow trainable_modules")
    return found


def adapter_dtype(config: DeltaConfig, base_dtype: torch.dtype) -> torch.dtype:
    if config.adapter_dtype is not None:
        return getattr(torch, config.adapter_dtype)
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def planned_shapes(config: DeltaConfig, targets) -> dict[str, dict]:
    """``{layer: {tensor name: (shape, kind)}}`` for the targets (ValueError naming a layer whose
    shape the family cannot take), plus ``"__shared__"`` for the shared Parameters."""
    spec = SPECS[config.family]
    plan = {}
    for name, mod, kind in targets:
        w = mod.weight
        out_f, in_f = tuple(oriented(w, kind).shape)
        plan[name] = spec.shapes(config, out_f, in_f, name)
    shared = getattr(spec, "shared_shapes", lambda cfg: {})(config)
    plan["__shared__"] = {k: (s, "param") for k, s in shared.items()}
    return plan


def inject(model: nn.Module, config: DeltaConfig) -> nn.Module:
    """Wrap the layers ``config`` selects in :class:`DeltaLinear`, freeze every other Parameter
    but those of ``trainable_modules``, and return ``model`` (modified in place).

    Everything is checked before anything changes: a ValueError (naming the layer, its shape and
    what was expected) leaves the model as it was. One adapter per model: injecting into a model
    that already holds DeltaLinear layers is an error.
    """
    if not isinstance(config, DeltaConfig):
        raise ValueError(f"inject: config must be a pypeft_fast.DeltaConfig, got {type(config).__name__}")
    existing = delta_modules(model)
    if existing:
        raise ValueError(f"inject: {type(model).__name__} already holds injected layers "
                         f"({existing[0][0]}, ... {len(existing)} in all); one adapter per model")
    config = dataclasses.replace(config)  # the layers' own copy: later edits to the caller's don't leak in
    spec = SPECS[config.family]
    targets = find_targets(model, config)
    trainable = find_trainable(model, config, targets)
    plan = planned_shapes(config, targets)
    shared_plan = plan.pop("__shared__")
    first_w = targets[0][1].weight
    if shared_plan:
        for name, mod, _ in targets:
            if mod.weight.device != first_w.device or adapter_dtype(config, mod.weight.dtype) != \
                    adapter_dtype(config, first_w.dtype):
                raise ValueError(
                    f"{name}: weight is {mod.weight.dtype} on {mod.weight.device} but "
                    f"{targets[0][0]} is {first_w.dtype} on {first_w.device}; a Parameter shared "
                    f"across layers ({', '.join(shared_plan)}) needs one device and adapter dtype")

    aliases = _aliases(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, mod in trainable:
        for p in mod.parameters():
            p.requires_grad_(True)
    shared = {}
    if shared_plan:
        dt = adapter_dtype(config, first_w.dtype)
        t = {k: torch.empty(s, dtype=dt, device=first_w.device) for k, (s, _) in shared_plan.items()}
        with torch.no_grad():
            spec.init_shared(config, t)
        shared = {k: nn.Parameter(v) for k, v in t.items()}
    for name, mod, kind in targets:
        w = mod.weight
        dt = adapter_dtype(config, w.dtype)
        t = {k: torch.empty(s, dtype=dt if knd == "param" else torch.int64, device=w.device)
             for k, (s, knd) in plan[name].items()}
        w_oi = oriented(w, kind)
        with torch.no_grad():
            spec.init_layer(config, t, w_oi, name)
        params = {k: v for k, v in t.items() if plan[name][k][1] == "param"}
        buffers = {k: v for k, v in t.items() if plan[name][k][1] == "index"}
        wrapper = DeltaLinear(mod, kind, config, name, params, buffers, shared)
        wrapper.train(mod.training)  # an eval-mode model stays in eval mode (no adapter dropout)
        for path in aliases[id(mod)]:  # a layer reachable under several names is wrapped once
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, wrapper)
    return model


def _aliases(model: nn.Module, targets) -> dict[int, list[str]]:
    """Every dotted path of each target layer (a layer object may sit under several parents)."""
    paths = {id(mod): [] for _, mod, _ in targets}
    for name, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in paths and name:
            paths[id(mod)].append(name)
    return paths
