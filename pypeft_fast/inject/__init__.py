"""Inject pypeft_fast's delta families into any transformers (or plain torch) model.

* :mod:`.config`  — ``DeltaConfig``: targets and per-family options.
* :mod:`.specs`   — the live table of the families' specs (shapes, init, which op to call), each
  declared in its family's slice (``families/<name>_decl.py``); helpers: :mod:`.spec_tools`.
* :mod:`.masks`   — sparse mask strategies (random, largest |W|, block).
* :mod:`.modules` — the ``DeltaLinear`` wrapper and ``inject``.
* :mod:`.merge`   — ``merge`` / ``unmerge`` (ΔW folded into the frozen weights and back).
* :mod:`.io`      — ``save_adapter`` / ``load_adapter`` (safetensors + JSON).
* :mod:`.report`  — ``trainable_report`` (parameters per module type).
"""
from .config import DeltaConfig
from .io import load_adapter, save_adapter
from .merge import merge, unmerge
from .modules import DeltaLinear, delta_modules, inject
from .report import TrainableReport, trainable_report

__all__ = ["DeltaConfig", "DeltaLinear", "delta_modules", "inject", "save_adapter", "load_adapter",
           "merge", "unmerge", "trainable_report", "TrainableReport"]
