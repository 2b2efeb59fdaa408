"""``save_adapter`` / ``load_adapter``: the delta tensors as safetensors plus a JSON config.

A saved adapter is a directory holding

* ``pypeft_adapter_config.json``: ``{"format", "config": DeltaConfig.to_dict(), "layers": {name:
  {"base": "Linear" | "Conv1D", "shape": [out, in]}}}``;
* ``pypeft_adapter.safetensors``: ``<layer>.<tensor>`` for each layer's delta tensors (a sparse
  mask is saved as its int64 ``indices`` (2, nnz)), ``__shared__.<tensor>`` for Parameters shared
  across layers, saved once, ``__trainable__.<module>.<param>`` for ``trainable_modules``. Never
  pickle.

``load_adapter`` checks every layer, key, shape and dtype against the model before it assigns
anything, and raises one ``ValueError`` listing every problem; on error the model is unchanged.

An adapter file is untrusted input: the JSON is checked field by field; the name patterns it
records (``target_modules`` etc., possibly regular expressions) are never run — the saved layer
list (``layers``, and ``trainable`` for ``trainable_modules``) names the modules exactly; and
full base-model weights (``trainable_modules``) are loaded only when the caller passes
``load_trainable_modules=True``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch
from torch import nn

from ..base_layer import oriented
from ..families.sparse import validate_indices
from .config import FORMAT, DeltaConfig
from .modules import delta_modules, find_targets, find_trainable, inject, planned_shapes
from .specs import SPECS

CONFIG_NAME = "pypeft_adapter_config.json"
WEIGHTS_NAME = "pypeft_adapter.safetensors"
SHARED = "__shared__"
TRAINABLE = "__trainable__"


def _trainable_modules(model, config) -> list[tuple[str, nn.Module]]:
    layers = [(n, m, None) for n, m in delta_modules(model)]
    return find_trainable(model, config, layers)


def _trainable_params(model, config) -> dict[str, torch.nn.Parameter]:
    """``{"__trainable__.<module>.<param>": Parameter}`` for ``config.trainable_modules``."""
    return {f"{TRAINABLE}.{name}.{pname}": p
            for name, mod in _trainable_modules(model, config)
            for pname, p in mod.named_parameters()}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the injected adapter of ``model`` to the directory ``path`` (created if needed)."""
    from safetensors.torch import save_file
    mods = delta_modules(model)
    if not mods:
        raise ValueError(f"save_adapter: {type(model).__name__} holds no injected layers; call pf.inject first")
    cfg = mods[0][1].config
    tensors, layers = {}, {}
    for name, m in mods:
        layers[name] = {"base": m.base_kind, "shape": [m.out_features, m.in_features]}
        for k in (*m.delta_names, *m.index_names):
            tensors[f"{name}.{k}"] = getattr(m, k).detach().cpu().contiguous()
    first = mods[0][1]
    for k in first.shared_names:
        tensors[f"{SHARED}.{k}"] = getattr(first, k).detach().cpu().contiguous()
    for key, p in _trainable_params(model, cfg).items():
        tensors[key] = p.detach().cpu().clone()  # a clone: tied Parameters must not share storage
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "config": cfg.to_dict(), "layers": layers}
    if cfg.trainable_modules is not None:  # exact names: a loader never runs the patterns
        meta["trainable"] = [name for name, _ in _trainable_modules(model, cfg)]
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def _shape(s) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def _raise_problems(where: str, problems: list[str]) -> None:
    if problems:
        listing = "\n  - ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise ValueError(f"{where}: {len(problems)} problem(s); nothing was loaded:\n  - {listing}{more}")


def _is_names(v) -> bool:
    return isinstance(v, list) and all(isinstance(n, str) and n for n in v)


def _read_meta(where: str, path) -> tuple[DeltaConfig, dict, list[str] | None]:
    """``(config, layers, trainable module names or None)`` from the adapter's JSON, every field
    checked (one ValueError listing the problems)."""
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{where}: {CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{where}: {CONFIG_NAME} has format {got!r}; expected {FORMAT!r}")
    problems, cfg = [], None
    if "config" not in meta:
        problems.append("'config' is missing (the DeltaConfig, an object)")
    elif not isinstance(meta["config"], dict):
        problems.append(f"'config' must be an object (the DeltaConfig), got {type(meta['config']).__name__}")
    else:
        try:
            cfg = DeltaConfig.from_dict(meta["config"])
        except (ValueError, TypeError) as e:
            problems.append(f"config: {e}")
    layers = meta.get("layers")
    if "layers" not in meta:
        problems.append("'layers' is missing ({name: {'base': 'Linear' | 'Conv1D', 'shape': [out, in]}})")
    elif not isinstance(layers, dict) or not layers:
        problems.append("'layers' must be an object {name: {'base': 'Linear' | 'Conv1D', 'shape': "
                        f"[out, in]}}}} with at least one layer, got {type(layers).__name__}")
    else:
        for name, entry in layers.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not (isinstance(shape, list) and len(shape) == 2
                    and all(type(d) is int and d > 0 for d in shape)):
                problems.append(f"{name}: 'shape' must be [out, in] (two positive integers), got {shape!r}")
            if not isinstance(entry, dict) or entry.get("base") not in ("Linear", "Conv1D"):
                got = entry.get("base") if isinstance(entry, dict) else entry
                problems.append(f"{name}: 'base' must be 'Linear' or 'Conv1D', got {got!r}")
    trainable = meta.get("trainable")
    if trainable is not None and not _is_names(trainable):
        problems.append(f"'trainable' must be a list of module names, got {trainable!r}")
    if trainable is None and cfg is not None and cfg.trainable_modules is not None:
        if _is_names(cfg.trainable_modules):
            trainable = list(cfg.trainable_modules)  # names (suffix matches), no pattern to run
        else:
            problems.append(f"config: trainable_modules={cfg.trainable_modules!r} is a regular "
                            "expression and the file lists no module names ('trainable'); "
                            "patterns from an adapter file are never run: save it again")
    _raise_problems(f"{where}: {CONFIG_NAME}", problems)
    return cfg, layers, trainable


def _exact_names(names) -> str:
    """A regular expression matching exactly ``names`` (escaped literals: linear time)."""
    return "|".join(re.escape(n) for n in sorted(names))


def load_adapter(model: nn.Module, path: str | os.PathLike, *,
                 load_trainable_modules: bool = False) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return it.

    A model without injected layers is first injected with the saved config (after every check
    passed) on exactly the saved layers; an injected model must hold the same family, scaling,
    layers and shapes. Tensors are copied into the existing Parameters (the optimizer's
    references stay valid) in their dtype.

    ``load_trainable_modules``: an adapter saved with ``trainable_modules`` carries full weights of
    base-model modules (a new head, an embedding); loading them makes those modules trainable
    and overwrites their weights, so it needs this opt-in (else a ValueError naming them).
    """
    from safetensors.torch import load_file

    where = f"load_adapter({os.fspath(path)!r})"
    cfg, file_layers, file_trainable = _read_meta(where, path)
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    base_keys = sorted(k for k in tensors if k.startswith(TRAINABLE + "."))
    if (file_trainable or base_keys) and not load_trainable_modules:
        raise ValueError(
            f"{where}: the file holds full weights of base-model modules {file_trainable or []} "
            f"(trainable_modules; {len(base_keys)} tensors, e.g. {base_keys[:3]}): loading them "
            "would make those modules trainable and overwrite their weights. Pass "
            "load_trainable_modules=True if you trust this file; nothing was loaded")
    # The file's name patterns are never run: its saved names select the modules exactly.
    cfg = dataclasses.replace(cfg, target_modules=_exact_names(file_layers), exclude_modules=None,
                              trainable_modules=file_trainable or None)

    problems: list[str] = []
    mods = dict(delta_modules(model))
    if mods:
        if any(m.merged for m in mods.values()):
            raise ValueError(f"{where}: the model's injected layers are merged; call pf.unmerge first")
        mcfg = next(iter(mods.values())).config
        if mcfg.family != cfg.family:
            raise ValueError(f"{where}: the model holds a {mcfg.family!r} adapter, the file a "
                             f"{cfg.family!r} one; expected the same family")
        s_model, s_file = SPECS[mcfg.family].scaling(mcfg), SPECS[cfg.family].scaling(cfg)
        if s_model != s_file:
            problems.append(f"scaling is {s_model:g} in the model, {s_file:g} in the file "
                            f"(options {mcfg.options()} vs {cfg.options()})")
        bases = {n: (m.out_features, m.in_features) for n, m in mods.items()}
        plan = {n: {k: (tuple(getattr(m, k).shape), "index" if k in m.index_names else "param")
                    for k in (*m.delta_names, *m.index_names)} for n, m in mods.items()}
        first = next(iter(mods.values()))
        plan[SHARED] = {k: (tuple(getattr(first, k).shape), "param") for k in first.shared_names}
        train_cfg = mcfg
    else:
        try:
            targets = find_targets(model, cfg)
        except ValueError as e:
            raise ValueError(f"{where}: the saved config does not fit this model: {e}") from None
        bases = {n: tuple(oriented(mod.weight, kind).shape) for n, mod, kind in targets}
        plan = planned_shapes(cfg, [])  # the shared Parameters
        for target in targets:  # a layer the family cannot take is listed with the rest
            try:
                plan.update(planned_shapes(cfg, [target]))
            except ValueError as e:
                problems.append(str(e))
        train_cfg = cfg
    try:
        train_keys = {k: (tuple(p.shape), "param") for k, p in _trainable_params(model, train_cfg).items()}
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    plan[TRAINABLE] = {k[len(TRAINABLE) + 1:]: v for k, v in train_keys.items()}

    for n in sorted(set(file_layers) - set(bases)):
        problems.append(f"{n}: the file holds an adapter for this layer, but the model has no such "
                        f"target layer (expected one of {len(bases)} layers, e.g. {next(iter(bases), None)})")
    for n in sorted(set(bases) - set(file_layers)):
        problems.append(f"{n}: the model targets this layer, but the file has no tensors for it")
    for n in sorted(set(bases) & set(file_layers)):
        if tuple(file_layers[n]["shape"]) != tuple(bases[n]):
            problems.append(f"{n}: base weight (out, in) is {_shape(bases[n])} in the model; the adapter "
                            f"was saved for {_shape(file_layers[n]['shape'])}")

    expected = set()
    for layer, entries in plan.items():
        if layer not in (SHARED, TRAINABLE) and layer not in file_layers:
            continue
        for k, (shape, kind) in entries.items():
            key = f"{layer}.{k}"
            expected.add(key)
            if key not in tensors:
                problems.append(f"{layer}: tensor {k!r} {_shape(shape)} is missing from the file (key {key!r})")
                continue
            t = tensors[key]
            if tuple(t.shape) != tuple(shape):
                problems.append(f"{layer}: tensor {k!r} has shape {_shape(t.shape)} in the file; "
                                f"expected {_shape(shape)}")
            elif kind == "index":
                if t.dtype != torch.int64:
                    problems.append(f"{layer}: tensor {k!r} has dtype {t.dtype}; expected torch.int64")
                else:
                    try:
                        validate_indices(layer, t, *bases[layer])
                    except ValueError as e:
                        problems.append(str(e))
            elif not t.is_floating_point():
                problems.append(f"{layer}: tensor {k!r} has dtype {t.dtype}; expected a floating dtype")
    for key in sorted(set(tensors) - expected):
        layer = key.rsplit(".", 1)[0]
        if layer in file_layers and layer not in plan:
            continue  # already reported: a layer the model lacks or cannot take
        problems.append(f"{layer}: unexpected tensor {key!r} {_shape(tensors[key].shape)} in the file")

    _raise_problems(where, problems)

    if not mods:
        inject(model, cfg)
        mods = dict(delta_modules(model))
    with torch.no_grad():
        for n, m in mods.items():
            for k in (*m.delta_names, *m.index_names):
                dst = getattr(m, k)
                dst.copy_(tensors[f"{n}.{k}"].to(device=dst.device, dtype=dst.dtype))
        first = next(iter(mods.values()))
        for k in first.shared_names:
            dst = getattr(first, k)
            dst.copy_(tensors[f"{SHARED}.{k}"].to(device=dst.device, dtype=dst.dtype))
        for key, dst in _trainable_params(model, train_cfg).items():
            dst.copy_(tensors[key].to(device=dst.device, dtype=dst.dtype))
    return model
