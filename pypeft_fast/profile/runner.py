"""``profile_memory``: one training step (forward, loss, backward, optimizer step) under the
recorders of :mod:`.attribution` and :mod:`pypeft_fast.measure`, turned into a
:class:`~.report.MemoryReport`."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..measure import LiveBytes, environment, storage_parts, storage_tensors
from . import causes
from .attribution import OUTSIDE, ModuleStack, Producers, SavedByUnit, Units
from .report import CrossCheck, MemoryReport, ModuleMemory


def _memtracker():
    """PyTorch's MemTracker, tracking a sparse tensor by its indices and values (torch 2.13's
    raises on sparse outputs: SHiRA's patched layers make CSR tensors)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class SparseAwareMemTracker(MemTracker):
        def _track(self, reftype, t):
            for part in storage_tensors(t):
                super()._track(reftype, part)

    return SparseAwareMemTracker


class _NoHook:
    @staticmethod
    def remove():
        pass


def default_loss(output, batch) -> torch.Tensor:
    """``output.loss`` when the model computes one (HF models given labels), else the mean
    square of the first tensor output (any model; gives every output a gradient)."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    first = next(t for t in (output.values() if isinstance(output, dict) else
                             output if isinstance(output, (tuple, list)) else (output,))
                 if isinstance(t, torch.Tensor))
    return first.float().square().mean()


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_shape(batch) -> tuple[int, int]:
    """(batch size, sequence length) from the first tensor of rank ≥ 2 (input_ids), else (n, 1)."""
    tensors = [t for t in (batch.values() if isinstance(batch, dict) else
                           batch if isinstance(batch, (tuple, list)) else (batch,)) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.dim() >= 2:
            return int(t.shape[0]), int(t.shape[1])
    return (int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1), 1


def tree_tensors(batch) -> list[torch.Tensor]:
    """The strided tensors of a batch (dicts, tuples, nested)."""
    return [p for t in tree_leaves(batch) for p in storage_tensors(t)]


def _nbytes(tensors) -> int:
    seen = {}
    for t in tensors:
        for p, n in storage_parts(t):
            seen[p] = n
    return sum(seen.values())


def _param_owners(model: nn.Module, units: Units) -> dict[int, tuple[str, nn.Parameter]]:
    """``{storage data_ptr: (unit, Parameter)}``, each storage once (tied weights: first owner)."""
    out = {}
    for _, m in model.named_modules():
        for p in m._parameters.values():
            if p is None:
                continue
            for ptr, _ in storage_parts(p):
                out.setdefault(ptr, (units.unit_of[id(m)], p))
    return out


def profile_memory(model: nn.Module, batch, *, loss_fn: Callable | None = None,
                   optimizer: torch.optim.Optimizer | None = None, autocast: torch.dtype | None = None,
                   label: str = "model", crosscheck: bool = True, snapshot: str | None = None,
                   on_phase: Callable[[str], None] | None = None) -> MemoryReport:
    """Profile one training step of ``model`` on ``batch`` and return a :class:`MemoryReport`.

    ``batch``: keyword arguments of the model (a dict), positional arguments (a tuple) or one
    tensor. ``loss_fn(output, batch)``: default :func:`default_loss`. ``optimizer``: default
    ``AdamW(lr=1e-4)`` on the trainable Parameters (the profiled step creates its state).
    ``autocast``: a dtype to run forward and loss under ``torch.autocast``. ``crosscheck``: run
    PyTorch's ``MemTracker`` on the same step and compare its activation bytes after the forward
    with the saved activations made in the forward. ``snapshot``: on CUDA, a file for
    ``torch.cuda.memory._dump_snapshot`` (open it at https://pytorch.org/memory_viz).
    ``on_phase(name)`` is called at "forward", "backward", "optimizer" (progress bars).

    The model is left in training mode with gradients cleared; its Parameters change by one
    optimizer step.
    """
    loss_fn = loss_fn or default_loss
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{label}: no Parameter requires grad; nothing to train")
    opt = optimizer or torch.optim.AdamW(trainable, lr=1e-4)
    opt.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    units = Units(model)
    owners = _param_owners(model, units)
    param_ptrs = set(owners) | {p for b in model.buffers() for p, _ in storage_parts(b)}
    weight_shapes = {s for _, p in owners.values() if p.dim() == 2 and not p.requires_grad
                     for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    batch_tensors = tree_tensors(batch)
    opt_state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    baseline = [*model.parameters(), *model.buffers(), *batch_tensors, *opt_state]

    stack = ModuleStack(units)
    producers = Producers(stack)
    saved = SavedByUnit(units, stack, producers, param_ptrs, weight_shapes)
    cuda = device.type == "cuda"
    tracker = None
    if crosscheck:
        tracker = _memtracker()()
        # MemTracker (torch 2.13) registers a gradient hook on every Parameter, which raises for
        # frozen ones (every PEFT model has them): mark those as already hooked.
        for p in model.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (_NoHook, _NoHook)
        tracker.track_external(model, opt)
    phase = on_phase or (lambda name: None)
    cast = (torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext())
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
    live = LiveBytes(baseline)
    static = torch.cuda.memory_allocated(device) if cuda else live.baseline
    act_after_forward = None
    with contextlib.ExitStack() as es:
        if tracker is not None:
            es.enter_context(tracker)
        es.enter_context(live)
        es.enter_context(producers)
        es.enter_context(stack)
        live.label = "forward"
        phase("forward")
        with saved, cast:
            out = _call(model, batch)
            loss = loss_fn(out, batch)
        del out
        if tracker is not None:
            snap = tracker.get_tracker_snapshot("current").get(device, {})
            act_after_forward = next((v for k, v in snap.items() if str(getattr(k, "value", k)) == "Activation"), 0)
        live.label = "backward"
        phase("backward")
        loss.backward()
        loss_value = float(loss.detach())
        del loss
        grads = {ptr: _nbytes([p.grad]) for ptr, (_, p) in owners.items() if p.grad is not None}
        live.label = "optimizer"
        phase("optimizer")
        opt.step()
        state = {}
        for ptr, (_, p) in owners.items():
            st = opt.state.get(p)
            if st:
                state[ptr] = _nbytes([t for t in st.values() if isinstance(t, torch.Tensor)])
        opt.zero_grad(set_to_none=True)
    peak_alloc = None
    if cuda:
        torch.cuda.synchronize(device)
        peak_alloc = torch.cuda.max_memory_allocated(device)
        if snapshot:
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)

    modules = {name: ModuleMemory(u.name, u.type, u.layer, u.kind, u.adapted) for name, u in units.units.items()}
    for ptr, (unit, p) in owners.items():
        m = modules[unit]
        nb = _nbytes([p])
        m.params += nb
        if p.requires_grad:
            m.trainable += nb
        m.grads += grads.get(ptr, 0)
        m.optimizer += state.get(ptr, 0)
    weight_refs = 0
    for st in saved.seen.values():
        if st.cause == causes.WEIGHT_REF:
            weight_refs += st.nbytes
            modules[st.unit].weight_refs += st.nbytes
        else:
            modules[st.unit].saved[st.cause] = modules[st.unit].saved.get(st.cause, 0) + st.nbytes
    modules = {k: m for k, m in modules.items() if m.params or m.saved or m.weight_refs or k == OUTSIDE}

    check = None
    if tracker is not None:
        made_in_forward = sum(st.nbytes for st in saved.seen.values()
                              if st.cause not in (causes.WEIGHT_REF, causes.STEP_INPUT))
        check = CrossCheck(saved_made_in_forward=made_in_forward, memtracker_activations=int(act_after_forward or 0))
    b, s = _batch_shape(batch)
    return MemoryReport(
        label=label, modules=modules, storages=list(saved.seen.values()), batch=b, seq=s,
        device=str(device), param_dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        autocast=str(autocast).replace("torch.", "") if autocast is not None else None,
        peak_bytes=peak_alloc if cuda else live.peak, peak_source="CUDA allocator (max_memory_allocated)" if cuda
        else "live tensor bytes (TorchDispatchMode, weakref on storages)",
        peak_live_bytes=live.peak, peak_phase=live.peak_label, weight_ref_bytes=weight_refs,
        batch_bytes=_nbytes(batch_tensors), crosscheck=check, snapshot=snapshot if cuda else None,
        loss=loss_value, environment=environment(device), static_bytes=static,
        param_dims=sorted({d for _, p in owners.values() for d in p.shape}))

