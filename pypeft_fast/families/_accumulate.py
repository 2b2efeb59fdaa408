"""Adding a delta computed in the accumulation dtype into a result held in the activation dtype."""
from __future__ import annotations

import torch


def addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out + alpha·a@b``: in place (one fused GEMM) when dtypes agree, else summed in a's dtype
    (float32) and rounded once to ``out``'s dtype. alpha = 0 still forms a@b: BLAS skips the
    product then, which would drop its NaN/Inf (``F.linear`` with a zero-scaled ΔW keeps them)."""
    if alpha == 0:
        return add_into(out, (a @ b).mul_(0.0))
    if out.dtype == a.dtype:
        return out.addmm_(a, b, alpha=alpha)
    return torch.addmm(out.to(a.dtype), a, b, alpha=alpha).to(out.dtype)


def add_into(out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``out + delta``, in place when dtypes agree, else summed in delta's dtype then rounded."""
    if out.dtype == delta.dtype:
        return out.add_(delta)
    return delta.add_(out).to(out.dtype)
