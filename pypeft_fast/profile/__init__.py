"""Memory profiling of one PEFT training step: ``pf.profile_memory(model, batch) -> MemoryReport``
and ``pypeft-fast profile`` (README "Memory profiling").

Modules, one job each:

* :mod:`.causes`      — the classification rules (why a saved tensor is kept);
* :mod:`.attribution` — units (modules; an adapted layer absorbs its children), the running-module
  stack, which unit/op made each storage, which unit saved it;
* :mod:`.runner`      — ``profile_memory``: the step, parameters/gradients/optimizer state per
  module, peak (CUDA allocator / live tensor bytes), PyTorch MemTracker cross-check;
* :mod:`.report`      — ``MemoryReport`` / ``Comparison``: groupings, table, JSON, Markdown;
* :mod:`.projection`  — ``project(report, layers=, batch=, seq=)``;
* :mod:`.plot`        — stacked bars by cause per module kind;
* :mod:`.models`, :mod:`.methods`, :mod:`.cli` — presets and model directories, peft methods and
  injected families, the command line.

The measuring itself (saved bytes by storage, live bytes, environment) is
:mod:`pypeft_fast.measure`, shared with the tests and the benches.
"""
from .report import Comparison, MemoryReport, ModuleMemory
from .runner import profile_memory

__all__ = ["profile_memory", "MemoryReport", "ModuleMemory", "Comparison"]
