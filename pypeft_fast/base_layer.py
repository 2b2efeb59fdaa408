"""The one view of a frozen base layer as ``(weight (out, in), bias)``, shared by ``patch``,
``inject`` and ``merge``.

Served base layers: ``torch.nn.Linear`` (and subclasses that keep its forward) and transformers'
GPT-2-style ``Conv1D``, which stores its weight transposed as (in, out); its view is ``W.t()``
(no copy). Anything else (quantized or custom layers) has no view.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional; without it only nn.Linear exists
        return None
    return Conv1D


def base_kind(module: nn.Module, *, subclasses: bool = True) -> str | None:
    """``"Linear"`` or ``"Conv1D"`` for a layer pypeft_fast can compute through, else None.

    ``subclasses``: whether an ``nn.Linear`` subclass that keeps Linear's forward counts
    (``inject`` takes it; ``patch`` serves only the exact class, since peft's quantized and
    custom base layers subclass Linear)."""
    if type(module) is nn.Linear or (subclasses and isinstance(module, nn.Linear)
                                     and type(module).forward is nn.Linear.forward):
        return "Linear"
    conv1d = _conv1d_class()
    if conv1d is not None and type(module) is conv1d:
        return "Conv1D"
    return None


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear or Conv1D at all (also subclasses with their own forward)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def oriented(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A stored weight as (out, in): itself for Linear, the transposed view for Conv1D."""
    return weight.t() if kind == "Conv1D" else weight


def linear_view(module: nn.Module, *, subclasses: bool = True):
    """``(weight (out, in), bias)`` of a served base layer, else None."""
    kind = base_kind(module, subclasses=subclasses)
    if kind is None:
        return None
    return oriented(module.weight, kind), module.bias
