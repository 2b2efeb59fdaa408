"""The one measurement module: what the tests, the e2e bench, the micro-benchmarks and the memory
profiler measure, written once.

API
---
Saved tensors (what autograd keeps for backward), each storage counted once::

    with SavedTensors(exclude=(W, b)) as saved:      # torch.autograd.graph.saved_tensors_hooks
        y = f(x)
    saved.total_bytes, saved.storages                # {storage data_ptr: nbytes}, saved.tensors (optional)
    saved_bytes(fn, exclude=()) -> (total, set of data_ptrs, fn's result)
    saved_activation_bytes(model, batch) -> (all, without the model's Parameter/buffer storages)
    storage_tensors(t) -> [strided tensors]          # t, or a sparse tensor's indices and values
    storage_parts(t) -> [(data_ptr, nbytes)]         # their storages
    model_storages(model) -> {data_ptr}              # Parameters and buffers

Allocations seen at the aten level (``TorchDispatchMode``; every op, forward, backward, optimizer)::

    OpOutputs(on_output)      # on_output(func, tensor, fresh) for every tensor an op returns;
                              # fresh: its storage is none of the op's inputs' (a new allocation)
    LargestAllocation()       # .largest (elements), .op, .shape of the largest non-view op output
    LiveBytes(baseline=())    # .current / .peak live tensor bytes (weakref callbacks on storages),
                              # the storages of ``baseline`` tensors counted from the start;
                              # .peak_label = .label (set it: "forward", ...) when the peak was reached

Step timing::

    synchronize(device); timed(fn, device) -> seconds
    median_time(fn, warmup=2, reps=7) -> seconds
    interleaved_times({name: fn}, warmup=2, reps=9) -> {name: [seconds]}  (side by side; min, median)
    median_times_interleaved({name: fn}, warmup=2, reps=9) -> {name: median seconds}

Environment record (put into every result row)::

    versions() -> {"python", "torch", "pypeft_fast", "transformers", "peft", "triton"}
    device_text(device) -> "cuda: NVIDIA H100 ..." | "cpu: x86_64, 2 cores, 2 torch threads"
    environment(device=None) -> {"device", **versions(), "threads", "date"}
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

_COMPRESSED = (torch.sparse_csr, torch.sparse_bsr)
_SPARSE_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


# ------------------------------------------------------------------------------- saved tensors

def storage_tensors(t) -> list[torch.Tensor]:
    """The strided tensors holding ``t``'s data: ``t`` itself, or a sparse tensor's indices and
    values; nothing for meta tensors and non-tensors."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return []
    if t.layout == torch.sparse_coo:
        return storage_tensors(t._indices()) + storage_tensors(t._values())
    if t.layout in _SPARSE_COMPRESSED:
        compressed = t.crow_indices() if t.layout in _COMPRESSED else t.ccol_indices()
        plain = t.col_indices() if t.layout in _COMPRESSED else t.row_indices()
        return [p for part in (compressed, plain, t.values()) for p in storage_tensors(part)]
    return [t] if t.layout == torch.strided else []


def storage_parts(t) -> list[tuple[int, int]]:
    """``[(data_ptr, nbytes)]`` of the storages holding ``t`` (:func:`storage_tensors`); empty
    storages (data_ptr 0) give nothing."""
    parts = [p.untyped_storage() for p in storage_tensors(t)]
    return [(s.data_ptr(), s.nbytes()) for s in parts if s.data_ptr() != 0]


def model_storages(model: torch.nn.Module) -> set[int]:
    """The data_ptrs of a module's Parameter and buffer storages."""
    return {p for t in (*model.parameters(), *model.buffers()) for p, _ in storage_parts(t)}


class SavedTensors:
    """Context manager recording the tensors autograd saves for backward inside it
    (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once (the largest size
    seen for it). Storages of ``exclude`` (tensors, e.g. the frozen weight) are left out.

    ``on_save(t)`` (optional) is called for every saved tensor, before deduplication; with
    ``keep=True`` the first tensor seen per storage is kept in ``.tensors`` (for inspection).
    Nested ``saved_tensors_hooks`` inside (non-reentrant checkpointing) take precedence: what they
    keep is what is kept, and this records only what reaches it.

    ``release`` (default): the graph keeps a detached alias of each saved tensor (same storage, no
    grad_fn). Packing the tensor itself ties a saved *output* to its own grad_fn — a cycle in C++
    that Python's gc cannot free — so every measured forward kept its whole graph alive (the e2e
    bench measures 30 runs' forwards: out of memory at 24 GiB). ``release=False`` packs the
    tensors themselves (the profiler's cross-check with torch's MemTracker counts them so)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), on_save: Callable | None = None,
                 keep: bool = False, release: bool = True):
        self.skip = {p for t in exclude for p, _ in storage_parts(t)}
        self._release = release
        self.storages: dict[int, int] = {}
        self.tensors: dict[int, torch.Tensor] = {}
        self._on_save, self._keep = on_save, keep
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if isinstance(t, torch.Tensor):
            if self._on_save is not None:
                self._on_save(t)
            for ptr, nbytes in storage_parts(t):
                if ptr not in self.skip:
                    self.storages[ptr] = max(self.storages.get(ptr, 0), nbytes)
                    if self._keep:
                        self.tensors.setdefault(ptr, t)
            if self._release:
                return t.detach()
        return t

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())

    def bytes_without(self, storages: set[int]) -> int:
        return sum(n for p, n in self.storages.items() if p not in storages)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def saved_bytes(fn, exclude=()):
    """Bytes saved for backward during ``fn()``, deduplicated by storage, minus ``exclude``:
    ``(total, set of storage data_ptrs, fn's result)``."""
    with SavedTensors(exclude) as saved:
        out = fn()
    return saved.total_bytes, set(saved.storages), out


def saved_activation_bytes(model, batch) -> tuple[int, int]:
    """Bytes saved for backward during one forward ``model(**batch).loss``, each storage counted
    once: ``(all, without the model's Parameter/buffer storages)``. The first is MEASURED.md's
    convention; the second leaves out the frozen weights autograd merely keeps a reference to."""
    params = model_storages(model)
    with SavedTensors() as saved:
        loss = model(**batch).loss
    del loss
    return saved.total_bytes, saved.bytes_without(params)


# ------------------------------------------------------------------------- aten-level allocations

class OpOutputs(TorchDispatchMode):
    """Calls ``on_output(func, tensor, fresh)`` for every tensor every aten op returns inside it
    (forward, backward and optimizer ops alike); ``fresh`` is True when the tensor's storage is
    none of the op's inputs' (a new allocation, not a view or an in-place result)."""

    def __init__(self, on_output: Callable[[object, torch.Tensor, bool], None]):
        super().__init__()
        self.on_output = on_output

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {p for t in tree_leaves((args, kwargs)) for p, _ in storage_parts(t)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                parts = storage_parts(t)
                self.on_output(func, t, bool(parts) and all(p not in inputs for p, _ in parts))
        return out


class LargestAllocation(OpOutputs):
    """Records the largest tensor (in elements) that any non-view aten op produces:
    ``.largest``, ``.op`` (its name), ``.shape``."""

    def __init__(self):
        super().__init__(self._record)
        self.largest, self.op, self.shape = 0, None, None

    def _record(self, func, t, fresh):
        if not func.is_view and t.numel() > self.largest:
            self.largest, self.op, self.shape = t.numel(), str(func), tuple(t.shape)


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes while active, and their peak: every storage an aten op returns is counted
    from its first appearance until Python frees it (a weakref callback on the storage); the
    storages of ``baseline`` (Parameters, gradients, optimizer state, the batch: what lives before
    the region) count from the start. ``.current``, ``.peak`` (bytes, summed over devices);
    ``.peak_by_device``; ``.baseline`` (the bytes of ``baseline``); ``.peak_label``: what
    ``.label`` said when the peak was reached. Allocations an op makes and frees internally
    (workspaces) are invisible: on CUDA prefer the allocator's ``torch.cuda.max_memory_allocated``."""

    def __init__(self, baseline: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> (nbytes, finalizer)
        self.current, self.peak = 0, 0
        self.label, self.peak_label = None, None
        self._by_device: dict[str, int] = {}
        self.peak_by_device: dict[str, int] = {}
        for t in baseline:
            self._track(t)
        self.baseline = self.current

    def _freed(self, nbytes, device):
        self.current -= nbytes
        self._by_device[device] -= nbytes

    def _track(self, t):
        for part in storage_tensors(t):
            self._track_storage(part)

    def _track_storage(self, t):
        s = t.untyped_storage()
        nbytes, dev = s.nbytes(), str(t.device)
        old = self._sizes.get(s)
        if old is not None:
            if old[0] == nbytes:
                return
            old[1].detach()  # resized in place (resize_, out= ops): count its new size
            self._freed(old[0], dev)
        self._sizes[s] = (nbytes, weakref.finalize(s, self._freed, nbytes, dev))
        self.current += nbytes
        self._by_device[dev] = self._by_device.get(dev, 0) + nbytes
        if self.current > self.peak:
            self.peak, self.peak_label = self.current, self.label
        self.peak_by_device[dev] = max(self.peak_by_device.get(dev, 0), self._by_device[dev])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out


# ------------------------------------------------------------------------------------- timing

def synchronize(device=None) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    device = torch.device(device) if device is not None else None
    if (device is None and torch.cuda.is_available() and torch.cuda.is_initialized()) or \
            (device is not None and device.type == "cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device=None) -> float:
    """Wall seconds of one ``fn()``, synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median_time(fn, *, warmup: int = 2, reps: int = 7, device=None) -> float:
    """Median wall time of ``fn()`` in seconds (CPU: synchronous; CUDA: synchronised)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(reps))


def interleaved_times(fns: dict, *, warmup: int = 2, reps: int = 9, device=None) -> dict[str, list[float]]:
    """Every wall time (s) of each ``fns[name]()``, the providers run in turn within every
    repetition, so that a change in machine load hits all of them alike (side by side)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def median_times_interleaved(fns: dict, *, warmup: int = 2, reps: int = 9, device=None) -> dict:
    """Median of :func:`interleaved_times` per provider."""
    return {name: statistics.median(ts) for name, ts in
            interleaved_times(fns, warmup=warmup, reps=reps, device=device).items()}


# -------------------------------------------------------------------------------- environment

def versions() -> dict[str, str | None]:
    """Python, torch, pypeft_fast and (None where not installed) transformers, peft, triton."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("pypeft_fast", "transformers", "peft", "triton"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def device_text(device=None) -> str:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads"


def environment(device=None) -> dict:
    """The record every result row carries: device, versions, torch threads, UTC date."""
    return {"device": device_text(device), **versions(), "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
