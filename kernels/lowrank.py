"""Low-rank (LoRA) Triton kernels: ``y = x·Wᵀ + b + s·drop(x)·Aᵀ·Bᵀ`` with ΔW never formed.

Shapes: x (n, in), W (out, in) frozen, A (r, in), B (out, r); u = keep·(m⊙x)·Aᵀ (n, r),
keep = 1/(1-p), m the Philox mask of :mod:`pypeft_fast.philox` regenerated in-kernel.

Kernels (jit → launcher → op)::

    _lowrank_fwd_kernel    one frozen-GEMM tile y = X·Wop + b, its K-loop also accumulating
                           u = X·C for the tile's rows (FUSE_U), epilogue + mask?(s·u·D).
                           Forward:  X = x,  Wop = Wᵀ, C = Aᵀ, D = Bᵀ          → y, u
                           dx:       X = gy, Wop = W,  C = B,  D = A, mask on → dx = gy·W + drop'(s·gy·B·A), t = gy·B
    _strided_matmul_kernel (kernels/_matmul.py) α·mask?(L)·mask?(R), split-K partials:
                           u (dropout > 0):  L = x (masked), R = Aᵀ           (n, r)
                           dA = s·keep·tᵀ·(m⊙x)                             (r, in)
                           dB = s·gyᵀ·u                                      (out, r)

With dropout the forward projection u is a skinny pass of its own (one Philox call per 8
elements of x, once) instead of being fused into the K-loop, where every one of the out/BLOCK_N
column tiles would regenerate the mask. Nothing of size n×in is stored besides x; u and t are
(n, r) fp32.

Launchers: :func:`lowrank_fwd`, :func:`lowrank_bwd`; ops ``pypeft_fast::lowrank_fwd`` and
``pypeft_fast::lowrank_bwd`` (``torch.library.triton_op`` on a GPU, so torch.compile sees the
kernels; see :func:`._utils.register_op`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._matmul import strided_matmul
from ._utils import (
    _cast_out, _frozen_gemm_mainloop, _keep_mask, _mma, _tile_ids, acc_dtype, check_int32_indexing,
    gemm_configs, input_precision, prune_gemm_configs, rank_block, register_op, torch_acc_dtype,
    upcast_flag,
)


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, c_ptr, d_ptr, u_ptr, y_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ck, stride_cr, stride_dr, stride_dn,
    stride_um, stride_ur, stride_ym, stride_yn,
    scaling, keep_scale, threshold,
    HAS_BIAS: tl.constexpr, FUSE_U: tl.constexpr, STORE_U: tl.constexpr, DROPOUT: tl.constexpr,
    GROUPED_RNG: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y (M, N) = X·Wop + bias + mask?(s·U·D).  X (M, K), Wop (K, N), C (K, R), D (R, N), U (M, R).

    FUSE_U: U = X·C accumulated in the main K-loop (and stored by the pid_n == 0 tiles when
    STORE_U); else U is read from u_ptr. DROPOUT: the rank product is masked per output element
    (row m, col n of an (M, N) input) and scaled by keep_scale — the dx pass of dropout-LoRA.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    acc, u = _frozen_gemm_mainloop(x_ptr, w_ptr, c_ptr, offs_m, offs_n, M, N, K, R,
                                   stride_xm, stride_xk, stride_wk, stride_wn, stride_ck,
                                   stride_cr, ACC, FUSE_U, UPCAST, PREC,
                                   BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    u_ptrs = u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur
    u_mask = m_ok[:, None] & r_ok[None, :]
    if FUSE_U:
        if STORE_U:
            if pid_n == 0:
                tl.store(u_ptrs, _cast_out(u, u_ptr.dtype.element_ty, UPCAST), mask=u_mask)
    else:
        u = tl.load(u_ptrs, mask=u_mask, other=0.0).to(ACC)
    d = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_n[None, :] * stride_dn,
                mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    if UPCAST:
        d = d.to(ACC)
    delta = _mma(u * scaling, d, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), PREC)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        keep = _keep_mask(seed, offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_M, BLOCK_N,
                          GROUPED_RNG)
        delta = tl.where(keep, delta * keep_scale, 0.0)
    acc += delta
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             _cast_out(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


_lowrank_fwd_autotuned = triton.autotune(
    configs=gemm_configs(), key=["M", "N", "K", "R"],
    prune_configs_by={"early_config_prune": prune_gemm_configs})(_lowrank_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _dropout_args(dropout: float):
    """(threshold, keep_scale) of :mod:`pypeft_fast.philox` for p = dropout."""
    from pypeft_fast.philox import keep_threshold
    return keep_threshold(dropout), 1.0 / (1.0 - dropout)


def _skinny(L, R, P, Q, K, strides_l, strides_r, alpha, *, drop=0, seed=None, row_len=1,
            threshold=0, out_dtype):
    """α·L'·R' (P, Q) in out_dtype (fp32/fp64), plain strides ((p, k) of L, (k, q) of R)."""
    out = torch.empty((P, Q), dtype=out_dtype, device=L.device)
    return strided_matmul(L, R, P, Q, K, lp=strides_l[0], lk=strides_l[1], rk=strides_r[0],
                          rq=strides_r[1], out=out, op=out.stride(0), oq=out.stride(1),
                          alpha=alpha, drop=drop, seed=seed, row_len=row_len, threshold=threshold)


def _gemm(X, w_strides, bias, C, c_strides, D, d_strides, u, y, seed, M, N, K, R, scaling,
          *, fuse_u, store_u, dropout, keep_scale, threshold):
    grouped = dropout and N % 8 == 0
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(_lowrank_fwd_autotuned)[grid](
        X, w_strides[0], bias if bias is not None else y, C, D, u, y,
        seed if seed is not None else u,
        M, N, K, R,
        X.stride(0), X.stride(1), w_strides[1], w_strides[2], *c_strides, *d_strides,
        u.stride(0), u.stride(1), y.stride(0), y.stride(1),
        scaling, keep_scale, threshold,
        HAS_BIAS=bias is not None, FUSE_U=fuse_u, STORE_U=store_u, DROPOUT=dropout,
        GROUPED_RNG=grouped, ACC=acc_dtype(X, w_strides[0], C, D), UPCAST=upcast_flag(X, C, D),
        PREC=input_precision(X, C, D), BLOCK_R=rank_block(R),
    )


def _lowrank_fwd_fake(x, weight, bias, A, B, seed, scaling, dropout):
    torch._check(x.shape[1] == weight.shape[1] == A.shape[1] and B.shape == (weight.shape[0], A.shape[0]),
                 lambda: f"lowrank_fwd: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)} do not chain")
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], A.shape[0]), dtype=torch_acc_dtype(x, A, B)))


@register_op("pypeft_fast::lowrank_fwd", _lowrank_fwd_fake)
def lowrank_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                A: torch.Tensor, B: torch.Tensor, seed: Optional[torch.Tensor],
                scaling: float, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, in), weight (out, in), bias (out,) or None, A (r, in), B (out, r), seed: 0-d int64
    on x's device (dropout > 0). Returns y (n, out) in x's dtype and u = drop(x)·Aᵀ (n, r) fp32
    (fp64 for fp64 inputs), saved for dB."""
    n, k = x.shape
    out_f, r = weight.shape[0], A.shape[0]
    check_int32_indexing(x, weight)
    y = torch.empty((n, out_f), dtype=x.dtype, device=x.device)
    drop = dropout > 0.0
    threshold, keep_scale = _dropout_args(dropout) if drop else (0, 1.0)
    # With dropout, u is a pass of its own (the mask generated once, not once per column tile).
    separate_u = drop or out_f == 0
    if separate_u:
        u = _skinny(x, A, n, r, k, (x.stride(0), x.stride(1)), (A.stride(1), A.stride(0)),
                    keep_scale, drop=1 if drop else 0, seed=seed, row_len=k,
                    threshold=threshold, out_dtype=torch_acc_dtype(x, A, B))
    else:
        u = torch.empty((n, r), dtype=torch_acc_dtype(x, A, B), device=x.device)
    if n > 0 and out_f > 0:
        _gemm(x, (weight, weight.stride(1), weight.stride(0)), bias, A,
              (A.stride(1), A.stride(0)), B, (B.stride(1), B.stride(0)), u, y, None,
              n, out_f, k, r, scaling, fuse_u=not separate_u, store_u=not separate_u,
              dropout=False, keep_scale=1.0, threshold=0)
    return y, u


def _lowrank_bwd_fake(gy, x, weight, A, B, u, seed, scaling, dropout, needs_dx, need_dA, need_dB):
    return (x.new_empty(x.shape if needs_dx else (0,)),
            A.new_empty(A.shape if need_dA else (0,)), B.new_empty(B.shape if need_dB else (0,)))


@register_op("pypeft_fast::lowrank_bwd", _lowrank_bwd_fake)
def lowrank_bwd(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                B: torch.Tensor, u: torch.Tensor, seed: Optional[torch.Tensor], scaling: float,
                dropout: float, needs_dx: bool, need_dA: bool,
                need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gy (n, out); u from :func:`lowrank_fwd`. Returns (dx (n, in), dA (r, in), dB (out, r));
    a gradient not asked for comes back as an empty (0,) tensor.

    dx = gy·W + drop'(s·(gy·B)·A) in one GEMM whose K-loop also yields t = gy·B (n, r);
    dA = s·keep·tᵀ·(m⊙x) and dB = s·gyᵀ·u are skinny split-K reductions over n.
    """
    n, out_f = gy.shape
    k, r = weight.shape[1], A.shape[0]
    check_int32_indexing(x, weight, gy)
    drop = dropout > 0.0
    threshold, keep_scale = _dropout_args(dropout) if drop else (0, 1.0)
    cd = torch_acc_dtype(x, A, B)
    # a fresh empty tensor per unneeded gradient: op outputs may not alias each other
    dx, dA, dB = (gy.new_empty((0,)) for _ in range(3))
    t = None
    if needs_dx:
        dx = torch.empty((n, k), dtype=x.dtype, device=x.device)
    if needs_dx and n > 0 and k > 0:
        t = torch.empty((n, r), dtype=cd, device=x.device)
        _gemm(gy, (weight, weight.stride(0), weight.stride(1)), None, B,
              (B.stride(0), B.stride(1)), A, (A.stride(0), A.stride(1)), t, dx, seed,
              n, k, out_f, r, scaling, fuse_u=True, store_u=need_dA, dropout=drop,
              keep_scale=keep_scale, threshold=threshold)
    elif need_dA:
        t = _skinny(gy, B, n, r, out_f, (gy.stride(0), gy.stride(1)), (B.stride(0), B.stride(1)),
                    1.0, out_dtype=cd)
    if need_dA:
        dA = _skinny(t, x, r, k, n, (t.stride(1), t.stride(0)), (x.stride(0), x.stride(1)),
                     scaling * keep_scale, drop=2 if drop else 0, seed=seed, row_len=k,
                     threshold=threshold, out_dtype=cd).to(A.dtype)
    if need_dB:
        dB = _skinny(gy, u, out_f, r, n, (gy.stride(1), gy.stride(0)), (u.stride(0), u.stride(1)),
                     scaling, out_dtype=cd).to(B.dtype)
    return dx, dA, dB
