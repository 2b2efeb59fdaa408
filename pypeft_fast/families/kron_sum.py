"""Sum-of-Kronecker-products apply, shared by the ``kronecker`` (h = 1) and ``phm`` families.

ΔW = s·Σₕ Aₕ ⊗ Bₕ with A: (h, a_out, a_in), B: (h, b_out, b_in); out = a_out·b_out, in = a_in·b_in.
ΔW is never built: with x viewed as X: (n, a_in, b_in) and y as Y: (n, a_out, b_out)

    (Aₕ ⊗ Bₕ)·vec(Xₙ) = vec(Aₕ·Xₙ·Bₕᵀ)      so   Yₙ = s·Σₕ Aₕ·Xₙ·Bₕᵀ

Layout trick: stack the factors as A_rows[(i,h), j] = s·A[h,i,j] — (a_out·h, a_in) — and
B_cols[k, (h,l)] = B[h,k,l] — (b_out, h·b_in). Then

    U   = A_rows @ Xₙ                 (n, a_out·h, b_in)  ==  (n·a_out, h·b_in) contiguous
    Y  += U @ B_colsᵀ                 one GEMM, accumulated straight into y viewed (n·a_out, b_out)

Backward (gY = gy viewed (n·a_out, b_out)):

    V   = gY @ (s·B_cols)             (n·a_out, h·b_in)
    dX  = A_rowsᵀ @ Vₙ                (n, a_in, b_in)              (A_rows here without s)
    dA_rows = Σₙ Vₙ @ Xₙᵀ             (a_out·h, a_in)
    dB_cols = gYᵀ @ U                 (b_out, h·b_in)              (U recomputed, not saved)

Saved: x and the factors only. FLOPs per row of x: forward 2·h·a_out·b_in·(a_in + b_out);
backward about twice that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..validate import compute_dtype
from ._accumulate import add_into, addmm_into


@dataclass(frozen=True)
class KronSumHP:
    scaling: float


def stacked_factors(A3, B3, dtype, scaling):
    """``A_rows`` (a_out·h, a_in) scaled by s and ``B_cols`` (b_out, h·b_in), in ``dtype``."""
    h, a_out, a_in = A3.shape
    _, b_out, b_in = B3.shape
    A_rows = (A3.to(dtype) * scaling).transpose(0, 1).reshape(a_out * h, a_in)
    B_cols = B3.to(dtype).transpose(0, 1).reshape(b_out, h * b_in)
    return A_rows, B_cols


def _apply_A(A_rows, x2d, a_in, b_in, dtype):
    """U = A_rows @ Xₙ for every row n: (n, a_out·h, b_in)."""
    X3 = x2d.to(dtype).reshape(x2d.shape[0], a_in, b_in)
    return torch.matmul(A_rows, X3)


class TorchKronSum:
    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        A3, B3 = params
        h, a_out, a_in = A3.shape
        _, b_out, b_in = B3.shape
        n = x2d.shape[0]
        cd = compute_dtype(x2d, A3, B3)
        A_rows, B_cols = stacked_factors(A3, B3, cd, hp.scaling)
        U = _apply_A(A_rows, x2d, a_in, b_in, cd)
        y = F.linear(x2d, weight, bias)
        y = addmm_into(y.view(n * a_out, b_out), U.view(n * a_out, h * b_in), B_cols.t())
        return y.view(n, a_out * b_out), ()

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        A3, B3 = params
        h, a_out, a_in = A3.shape
        _, b_out, b_in = B3.shape
        n = x2d.shape[0]
        need_dA, need_dB = needs_dparams
        cd = compute_dtype(x2d, A3, B3)
        A_rows, B_cols = stacked_factors(A3, B3, cd, 1.0)
        gY = gy2d.to(cd).reshape(n * a_out, b_out)
        dx = dA = dB = None
        if needs_dx or need_dA:
            V = (gY @ B_cols).mul_(hp.scaling).view(n, a_out * h, b_in)
        if needs_dx:
            dX = torch.matmul(A_rows.t(), V)  # (n, a_in, b_in)
            dx = add_into(gy2d @ weight, dX.view(n, a_in * b_in))
        if need_dA:
            X3 = x2d.to(cd).reshape(n, a_in, b_in)
            dA_rows = torch.einsum("nrl,njl->rj", V, X3)
            dA = dA_rows.view(a_out, h, a_in).transpose(0, 1).to(A3.dtype)
        if need_dB:
            U = _apply_A(A_rows * hp.scaling, x2d, a_in, b_in, cd)
            dB_cols = gY.t() @ U.view(n * a_out, h * b_in)
            dB = dB_cols.view(b_out, h, b_in).transpose(0, 1).to(B3.dtype)
        return dx, (dA, dB)
