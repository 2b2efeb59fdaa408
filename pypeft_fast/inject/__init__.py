"""Inject pypeft_fast's delta families into any transformers (or plain torch) model.

* :mod:`.config`  — ``DeltaConfig``: targets and per-family options.
* :mod:`.specs`   — the per-family table (shapes, init, which op to call); adding a family = one spec.
* :mod:`.masks`   — sparse mask strategies (random, largest |W|, block).
* :mod:`.modules` — the ``DeltaLinear`` wrapper and ``inject``.
"""
from .config import DeltaConfig
from .modules import DeltaLinear, delta_modules, inject

__all__ = ["DeltaConfig", "DeltaLinear", "delta_modules", "inject"]
