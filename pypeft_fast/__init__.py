"""pypeft_fast: fused, memory-lean y = x·Wᵀ + x·ΔWᵀ for PEFT training.

Public functional API (x: (..., in); weight: (out, in), frozen; bias: (out,) or None)::

    lowrank_linear(x, weight, bias, A, B, scaling=1.0, dropout=0.0, seed=None, backend="auto")
    kronecker_linear(x, weight, bias, A, B, scaling=1.0, backend="auto")
    phm_linear(x, weight, bias, A, B, scaling=1.0, backend="auto")
    sparse_linear(x, weight, bias, values, indices, scaling=1.0, backend="auto")
    hadamard_linear(x, weight, bias, W1a, W1b, W2a, W2b, scaling=1.0, backend="auto")

Importing never initialises CUDA; optional backends (the native extension, Triton) register
themselves when they load and log why when they cannot.
"""
from __future__ import annotations

import logging

from . import families as _families  # noqa: F401  (registers the four families)
from . import backends as _backends  # noqa: F401  (registers optional native/Triton kernels)
from .families.hadamard import hadamard_linear
from .families.kronecker import kronecker_linear
from .families.lowrank import lowrank_linear
from .families.phm import phm_linear
from .families.sparse import sparse_linear
from .patch import PatchReport, patch, unpatch
from .registry import BACKENDS, FAMILIES
from .profile import MemoryReport, profile_memory
from .inject import (  # noqa: E402  (pf.inject: our families in any model)
    DeltaConfig, inject, load_adapter, merge, save_adapter, trainable_report, unmerge,
)

__version__ = "0.1.0"

logging.getLogger("pypeft_fast").addHandler(logging.NullHandler())

__all__ = [
    "lowrank_linear", "kronecker_linear", "phm_linear", "sparse_linear", "hadamard_linear",
    "patch", "unpatch", "PatchReport",
    "BACKENDS", "FAMILIES", "__version__",
    "DeltaConfig", "inject", "save_adapter", "load_adapter", "merge", "unmerge", "trainable_report",
    "profile_memory", "MemoryReport",
]
