"""Sum-of-Kronecker Triton kernels, for ``kronecker`` (h = 1) and ``phm`` (h terms):
ΔW = s·Σₕ Aₕ ⊗ Bₕ, A (h, a_out, a_in), B (h, b_out, b_in); out = a_out·b_out, in = a_in·b_in.

ΔW is never built. With x viewed X (n, a_in, b_in) and y viewed Y (n, a_out, b_out) the reshape
identity ``(Aₕ ⊗ Bₕ)·vec(Xₙ) = vec(Aₕ·Xₙ·Bₕᵀ)`` gives, in two passes::

    U[n, i, h, l] = s·Σⱼ A[h, i, j]·X[n, j, l]                 strided matmul (kernels/_matmul.py)
    Y[n, i, k]   += Σ_{h,l} U[n, i, h, l]·B[h, k, l]            epilogue of the frozen GEMM tile

The frozen GEMM tile covers output columns o = i·b_out + k; its epilogue contracts U's rows for
each block-row i present in the tile with the matching B columns — one 16-bit MMA per i (a
BLOCK_N tile inside one block-row when b_out is a multiple of BLOCK_N: one extra MMA of depth
h·b_in per tile). Backward is the same two passes with the roles of the factors swapped::

    G[n, j, h, k] = s·Σᵢ A[h, i, j]·gY[n, i, k]                 dX[n, j, l] += Σ_{h,k} G·B[h, k, l]
                                                               (epilogue of the dx = gy·W GEMM)
    V[n, i, h, l] = s·Σₖ gY[n, i, k]·B[h, k, l]                 dA[h, i, j] = Σ_{n,l} V·X[n, j, l]
    U (recomputed)                                             dB[h, k, l] = Σ_{n,i} gY·U

U, G, V are n × (a·h·b) fp32 temporaries of one pass (never saved for backward); x and the
factors are all that is saved. Launchers :func:`kronecker_fwd`, :func:`kronecker_bwd`; ops
``pypeft_fast::kronecker_fwd`` / ``pypeft_fast::kronecker_bwd``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._matmul import strided_matmul
from ._utils import (
    _cast_out, _frozen_gemm_mainloop, _mma, _tile_ids, acc_dtype, check_int32_offsets, gemm_configs,
    input_precision, interpreting, launch, prune_gemm_configs, register_op, torch_acc_dtype,
    upcast_flag,
)


@triton.jit
def _kronecker_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr,
    M, N, K, QD, C, HC,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_un, stride_up, stride_uh, stride_uc, stride_bh, stride_bc, stride_bq,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y (M, N) = X·Wop + bias + E, E[m, p·QD + q] = Σ_{c < HC} U[m, p, c]·Bm[c, q] with the
    contraction index c = (h, c') split as c // C, c % C. Forward: U (n, a_out, h, b_in),
    Bm[h, l, k] = B[h, k, l], QD = b_out; dx: U = G (n, a_in, h, b_out), Bm = B, QD = b_in."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc, _ = _frozen_gemm_mainloop(x_ptr, w_ptr, w_ptr, offs_m, offs_n, M, N, K, 0,
                                   stride_xm, stride_xk, stride_wk, stride_wn, 0, 0,
                                   0.0, y_ptr, 0, 0, 0.0, False,
                                   ACC, False, False, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K, 16)
    p_of = offs_n // QD
    q_of = offs_n % QD
    p_first = (pid_n * BLOCK_N) // QD
    p_last = (tl.minimum(pid_n * BLOCK_N + BLOCK_N, N) - 1) // QD
    for p in range(p_first, p_last + 1):
        sel = n_ok & (p_of == p)
        for c0 in range(0, HC, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < HC
            c_h = cc // C  # contraction index c = (h, c')
            c_c = cc % C
            ut = tl.load(u_ptr + offs_m[:, None] * stride_un + p * stride_up
                         + (c_h * stride_uh + c_c * stride_uc)[None, :],
                         mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            bt = tl.load(b_ptr + (c_h * stride_bh + c_c * stride_bc)[:, None]
                         + q_of[None, :] * stride_bq,
                         mask=c_ok[:, None] & sel[None, :], other=0.0)
            if UPCAST:
                ut = ut.to(ACC)
                bt = bt.to(ACC)
            acc = _mma(ut, bt, acc, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             _cast_out(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


_kronecker_fwd_autotuned = triton.autotune(
    configs=gemm_configs(), key=["M", "N", "K", "QD", "HC"],
    prune_configs_by={"early_config_prune": prune_gemm_configs})(_kronecker_fwd_kernel)


def block_c(hc: int, interpret: bool | None = None) -> int:
    """Epilogue chunk of the h·c contraction. GPU: at most 32 — 128 (PHM h = 4) spilled
    1.7–3.3 KB and needed 229–262 KiB of shared memory (over sm_90's 227 KiB)."""
    interpret = interpreting() if interpret is None else interpret
    return min(max(16, triton.next_power_of_2(max(hc, 1))), 64 if interpret else 32)


def _gemm(X, w, w_strides, bias, U, u_strides, Bm, b_strides, y, M, N, K, QD, C, HC):
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(_kronecker_fwd_autotuned)[grid](
        X, w, bias if bias is not None else y, U, Bm, y,
        M, N, K, QD, C, HC,
        X.stride(0), X.stride(1), *w_strides, *u_strides, *b_strides, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, ACC=acc_dtype(X, w, U, Bm), UPCAST=upcast_flag(X, w, Bm),
        PREC=input_precision(X, w), BLOCK_C=block_c(HC),
    )


def _apply_A(A, x, scaling, cd, caller):
    """U[n, i, h, l] = s·Σⱼ A[h, i, j]·X[n, j, l]: (n, a_out, h, b_in) in cd."""
    h, a_out, a_in = A.shape
    n = x.shape[0]
    b_in = x.shape[1] // a_in
    U = torch.empty((n, a_out, h, b_in), dtype=cd, device=x.device)
    return strided_matmul(A, x, h * a_out, n * b_in, a_in,
                          lp=(a_out, A.stride(0), A.stride(1)), lk=A.stride(2),
                          rk=b_in * x.stride(1), rq=(b_in, x.stride(0), x.stride(1)),
                          out=U, op=(a_out, U.stride(2), U.stride(1)),
                          oq=(b_in, U.stride(0), U.stride(3)), alpha=scaling, caller=caller)


def _kronecker_fwd_fake(x, weight, bias, A, B, scaling):
    torch._check(A.shape[1] * B.shape[1] == weight.shape[0] and A.shape[2] * B.shape[2] == x.shape[1],
                 lambda: f"kronecker_fwd: A {tuple(A.shape)} ⊗ B {tuple(B.shape)} does not match "
                         f"weight {tuple(weight.shape)}")
    return x.new_empty((x.shape[0], weight.shape[0]))


@register_op("pypeft_fast::kronecker_fwd", _kronecker_fwd_fake)
def kronecker_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x (n, in), weight (out, in), A (h, a_out, a_in), B (h, b_out, b_in) → y (n, out)."""
    h, a_out, a_in = A.shape
    _, b_out, b_in = B.shape
    n = x.shape[0]
    out_f = weight.shape[0]
    check_int32_offsets("kronecker_fwd", x=x, weight=weight, bias=bias, A=A, B=B, y=(n, out_f),
                        U=(n, a_out, h, b_in))
    y = torch.empty((n, out_f), dtype=x.dtype, device=x.device)
    if n == 0 or out_f == 0:
        return y
    U = _apply_A(A, x, scaling, torch_acc_dtype(x, A, B), "kronecker_fwd")
    _gemm(x, weight, (weight.stride(1), weight.stride(0)), bias,
          U, (U.stride(0), U.stride(1), U.stride(2), U.stride(3)),
          B, (B.stride(0), B.stride(2), B.stride(1)), y, n, out_f, x.shape[1], b_out, b_in,
          h * b_in)
    return y


def _kronecker_bwd_fake(gy, x, weight, A, B, scaling, needs_dx, need_dA, need_dB):
    return (x.new_empty(x.shape if needs_dx else (0,)),
            A.new_empty(A.shape if need_dA else (0,)), B.new_empty(B.shape if need_dB else (0,)))


@register_op("pypeft_fast::kronecker_bwd", _kronecker_bwd_fake)
def kronecker_bwd(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                 B: torch.Tensor, scaling: float, needs_dx: bool, need_dA: bool,
                 need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (n, in), dA (h, a_out, a_in), dB (h, b_out, b_in)); empty (0,) when not asked for."""
    h, a_out, a_in = A.shape
    _, b_out, b_in = B.shape
    n, out_f = gy.shape
    in_f = weight.shape[1]
    check_int32_offsets("kronecker_bwd", gy=gy, x=x, weight=weight, A=A, B=B,
                        dx=(n, in_f) if needs_dx else None,
                        G=(n, a_in, h, b_out) if needs_dx else None,
                        V=(n, a_out, h, b_in) if need_dA else None,
                        U=(n, a_out, h, b_in) if need_dB else None)
    cd = torch_acc_dtype(x, A, B)
    dx, dA, dB = (gy.new_empty((0,)) for _ in range(3))  # outputs may not alias
    if needs_dx:
        dx = torch.empty((n, in_f), dtype=x.dtype, device=x.device)
        if n > 0 and in_f > 0:
            # G[n, j, h, k] = s·Σᵢ A[h, i, j]·gY[n, i, k]
            G = torch.empty((n, a_in, h, b_out), dtype=cd, device=x.device)
            strided_matmul(A, gy, h * a_in, n * b_out, a_out,
                           lp=(a_in, A.stride(0), A.stride(2)), lk=A.stride(1),
                           rk=b_out * gy.stride(1), rq=(b_out, gy.stride(0), gy.stride(1)),
                           out=G, op=(a_in, G.stride(2), G.stride(1)),
                           oq=(b_out, G.stride(0), G.stride(3)), alpha=scaling,
                           caller="kronecker_bwd")
            _gemm(gy, weight, (weight.stride(0), weight.stride(1)), None,
                  G, (G.stride(0), G.stride(1), G.stride(2), G.stride(3)),
                  B, (B.stride(0), B.stride(1), B.stride(2)), dx, n, in_f, out_f, b_in, b_out,
                  h * b_out)
    if need_dA:
        # V[n, i, h, l] = s·Σₖ gY[n, i, k]·B[h, k, l];  dA[h, i, j] = Σ_{n,l} V[n, i, h, l]·X[n, j, l]
        V = torch.empty((n, a_out, h, b_in), dtype=cd, device=x.device)
        strided_matmul(gy, B, n * a_out, h * b_in, b_out,
                       lp=(a_out, gy.stride(0), b_out * gy.stride(1)), lk=gy.stride(1),
                       rk=B.stride(1), rq=(b_in, B.stride(0), B.stride(2)),
                       out=V, op=(a_out, V.stride(0), V.stride(1)),
                       oq=(b_in, V.stride(2), V.stride(3)), alpha=scaling, caller="kronecker_bwd")
        dA32 = torch.empty((h, a_out, a_in), dtype=cd, device=x.device)
        strided_matmul(V, x, h * a_out, a_in, n * b_in,
                       lp=(a_out, V.stride(2), V.stride(1)), lk=(b_in, V.stride(0), V.stride(3)),
                       rk=(b_in, x.stride(0), x.stride(1)), rq=b_in * x.stride(1),
                       out=dA32, op=(a_out, dA32.stride(0), dA32.stride(1)), oq=dA32.stride(2),
                       caller="kronecker_bwd")
        dA = dA32.to(A.dtype)
    if need_dB:
        # dB[h, k, l] = Σ_{n,i} gY[n, i, k]·U[n, i, h, l]   (U recomputed, with s)
        U = _apply_A(A, x, scaling, cd, "kronecker_bwd")
        dB32 = torch.empty((h, b_out, b_in), dtype=cd, device=x.device)
        strided_matmul(gy, U, b_out, h * b_in, n * a_out,
                       lp=gy.stride(1), lk=(a_out, gy.stride(0), b_out * gy.stride(1)),
                       rk=(a_out, U.stride(0), U.stride(1)), rq=(b_in, U.stride(2), U.stride(3)),
                       out=dB32, op=dB32.stride(1), oq=(b_in, dB32.stride(0), dB32.stride(2)),
                       caller="kronecker_bwd")
        dB = dB32.to(B.dtype)
    return dx, dA, dB
