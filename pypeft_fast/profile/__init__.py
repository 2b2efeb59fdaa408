"""Memory profiling: ``pf.profile_memory(model, batch) -> MemoryReport`` and ``pypeft-fast profile``."""
from .report import Comparison, MemoryReport, ModuleMemory
from .runner import profile_memory

__all__ = ["profile_memory", "MemoryReport", "ModuleMemory", "Comparison"]
