"""The float64-able materialising reference: builds ΔW, then plain autograd.

This is what tests check every backend against; it is deliberately the naive formula
(``F.linear(x, W, b) + F.linear(drop(x), ΔW)``) and must never be used in a training step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_linear(x, weight, bias, delta_w, x_for_delta=None):
    """``x·Wᵀ + b + x'·ΔWᵀ`` with ``x' = x_for_delta`` (a dropped x) or x itself.

    The delta branch runs in ΔW's dtype (peft casts the adapter input to the adapter dtype)
    and the sum is returned in x's dtype.
    """
    xd = x if x_for_delta is None else x_for_delta
    base = F.linear(x, weight, bias)
    delta = F.linear(xd.to(delta_w.dtype), delta_w)
    return (base.to(delta.dtype) + delta).to(x.dtype)
