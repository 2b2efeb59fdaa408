"""What the families' inject specs share (``families/<name>_decl.py``): option checks that raise
``ValueError`` naming ``DeltaConfig`` and the option, peft's LoRA-A init, and the reader of a
factor that may be stored as a (left, right) pair."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn


def fail(where, msg):
    raise ValueError(f"{where}: {msg}")


def pos_int(cfg, opt, allow_none=False):
    v = getattr(cfg, opt)
    if v is None and allow_none:
        return
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
        fail("DeltaConfig", f"{opt} must be a positive integer{' or None' if allow_none else ''}, "
                            f"got {v!r}")


def finite(cfg, opt):
    v = getattr(cfg, opt)
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        fail("DeltaConfig", f"{opt} must be a finite number, got {v!r}")


def int_pair(v) -> bool:
    """Whether ``v`` is a tuple/list of two positive integers."""
    return (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(e, numbers.Integral) and not isinstance(e, bool) and e >= 1 for e in v))


def kaiming(t: torch.Tensor) -> torch.Tensor:
    """peft's LoRA-A init (kaiming-uniform, a=√5) on each trailing 2-D slice."""
    for s in t.view(-1, *t.shape[-2:]):
        nn.init.kaiming_uniform_(s, a=math.sqrt(5))
    return t


def pair_or(m, name):
    """``m.<name>`` or the pair ``(m.<name>_left, m.<name>_right)`` (read from ``_parameters``
    directly: no ``nn.Module.__getattr__`` on the per-call path)."""
    p = m._parameters
    if name in p:
        return p[name]
    return (p[name + "_left"], p[name + "_right"])


def scaling_option(cfg) -> float:
    """A spec's ``scaling(cfg)`` for the families configured by ``scaling`` itself."""
    return float(cfg.scaling)


def scaling_alpha_over_r(cfg) -> float:
    """A spec's ``scaling(cfg)`` for the families configured peft-style by ``alpha`` and ``r``."""
    return cfg.alpha / cfg.r
