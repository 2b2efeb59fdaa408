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


def gemm_into(acc: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``acc + a @ w`` in ``acc``'s dtype, for a frozen-size GEMM ``a @ w`` added to a delta
    already in ``acc``: one GEMM accumulating into ``acc`` (beta = 1: inside a compute-bound GEMM
    the read of ``acc`` is nearly free, where adding the delta afterwards is another pass over the
    result) when the dtypes agree; else ``a @ w`` in ``w``'s dtype — the frozen GEMM's precision
    — then added to ``acc``."""
    if acc.dtype == a.dtype == w.dtype:
        return acc.addmm_(a, w)
    return acc.add_(a.to(w.dtype) @ w)


def rank_t_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ·b`` (r, k) for a skinny a (n, r) and b (n, k): the sum over tokens of a rank-r
    gradient's outer products (LoRA's dA = tᵀ·x and dB = (uᵀ·gy)ᵀ). The torch kernels' form;
    the cpp kernels run the native ``skinny_t_mm`` (``native.native_rank_t_mm``)."""
    return a.t() @ b


def rank_nt_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·bᵀ`` (n, r) for a (n, k) and a factor b (r, k) of r rows: each token against a low-rank
    factor (LoRA's u = x·Aᵀ with b = A, t = gy·B with b = Bᵀ). The torch kernels' form; the cpp
    kernels run the native ``skinny_mm`` (``native.native_rank_nt_mm``)."""
    return a @ b.t()
