"""Low-rank (LoRA) Triton kernels: ``y = x·Wᵀ + b + s·drop(x)·Aᵀ·Bᵀ`` with ΔW never formed.

Shapes: x (n, in), W (out, in) frozen, A (r, in), B (out, r); u = keep·(m⊙x)·Aᵀ (n, r),
keep = 1/(1-p), m the Philox mask of :mod:`pypeft_fast.philox` regenerated in-kernel.

Kernels (jit → launcher → op)::

    _lowrank_fwd_kernel    one frozen-GEMM tile y = X·Wop + b, its K-loop also accumulating
                           u = X·C for the tile's rows (FUSE_U), epilogue + mask?(s·u·D).
                           Forward:  X = x,  Wop = Wᵀ, C = Aᵀ, D = Bᵀ           → y, u
                           Backward: X = gy, Wop = W,  C = B,  D = A, mask on  → dx = gy·W +
                           drop'(s·gy·B·A), and with GRAD_D/GRAD_C also dA = s·keep·tᵀ·(m⊙x)
                           (epilogue, x tile under the dx tile) and dB = s·gyᵀ·u (K-loop of
                           the pid_n == 0 tiles) by fp32 atomics: the backward is one kernel
    _strided_matmul_kernel (kernels/_matmul.py) α·mask?(L)·mask?(R), split-K partials:
                           u (dropout > 0):  L = x (masked), R = Aᵀ            (n, r)
                           without dx: t = gy·B, dA = s·keep·tᵀ·(m⊙x), dB = s·gyᵀ·u

With dropout the forward projection u is a skinny pass of its own (one Philox call per 8
elements of x, once) instead of being fused into the K-loop, where every one of the out/BLOCK_N
column tiles would regenerate the mask. Nothing of size n×in is stored besides x; u is
(n, r) fp32 (saved for dB), t lives in registers.

Launchers: :func:`lowrank_fwd`, :func:`lowrank_bwd`; ops ``pypeft_fast::lowrank_fwd`` and
``pypeft_fast::lowrank_bwd`` (``torch.library.triton_op`` on a GPU, so torch.compile sees the
kernels; see :func:`._utils.register_op`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._matmul import strided_matmul
from ._utils import (
    _cast_out, _frozen_gemm_mainloop, _keep_mask, _mma, _tile_ids, acc_dtype, check_int32_offsets,
    NARROW_CONFIG, gemm_configs, input_precision, interpreting, launch, prune_gemm_configs,
    rank_block, register_op, torch_acc_dtype, upcast_flag,
)


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, c_ptr, d_ptr, u_ptr, y_ptr, seed_ptr,
    xin_ptr, dd_ptr, v_ptr, dc_ptr, cs_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ck, stride_cr, stride_dr, stride_dn,
    stride_um, stride_ur, stride_ym, stride_yn,
    stride_im, stride_in, stride_ddr, stride_ddn, stride_vm, stride_vr, stride_dck, stride_dcr,
    scaling, keep_scale, threshold, alpha_d, alpha_c,
    HAS_BIAS: tl.constexpr, FUSE_U: tl.constexpr, STORE_U: tl.constexpr, DROPOUT: tl.constexpr,
    GRAD_D: tl.constexpr, GRAD_C: tl.constexpr, COL_SCALE: tl.constexpr,
    GROUPED_RNG: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y (M, N) = X·Wop + bias + mask?(s·U·D).  X (M, K), Wop (K, N), C (K, R), D (R, N), U (M, R).

    FUSE_U: U = X·C accumulated in the main K-loop (and stored by the pid_n == 0 tiles when
    STORE_U); else U is read from u_ptr. DROPOUT: the rank product is masked per output element
    (row m, col n of an (M, N) input) and scaled by keep_scale — the dx pass of dropout-LoRA.
    The dx pass also yields both factor gradients by fp32 atomics, so LoRA's backward is this
    one kernel: GRAD_D: dD (R, N) += α_d·Uᵀ·mask?(Xin) with Xin (M, N) (dA = s·keep·tᵀ·(m⊙x),
    from the x tile under this output tile); GRAD_C: dC (K, R) += α_c·Xᵀ·V with V (M, R)
    (dB = s·gyᵀ·u, in the K-loop of the pid_n == 0 tiles). COL_SCALE: DoRA's epilogue,
    y = c ⊙ (X·Wop + s·U·D) + bias with c (N,) at cs_ptr.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    v = 0.0
    if GRAD_C:
        v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    acc, u = _frozen_gemm_mainloop(x_ptr, w_ptr, c_ptr, offs_m, offs_n, M, N, K, R,
                                   stride_xm, stride_xk, stride_wk, stride_wn, stride_ck,
                                   stride_cr, v, dc_ptr, stride_dck, stride_dcr, alpha_c,
                                   pid_n == 0, ACC, FUSE_U, GRAD_C, UPCAST, PREC,
                                   BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    u_ptrs = u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur
    u_mask = m_ok[:, None] & r_ok[None, :]
    if FUSE_U:
        if STORE_U:
            if pid_n == 0:
                tl.store(u_ptrs, _cast_out(u, u_ptr.dtype.element_ty, UPCAST), mask=u_mask)
    else:
        u = tl.load(u_ptrs, mask=u_mask, other=0.0).to(ACC)
    if DROPOUT:
        keep = _keep_mask(tl.load(seed_ptr), offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_M,
                          BLOCK_N, GROUPED_RNG)
    if GRAD_D:
        xin = tl.load(xin_ptr + offs_m[:, None] * stride_im + offs_n[None, :] * stride_in,
                      mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            xin = xin.to(ACC)
        if DROPOUT:
            if GROUPED_RNG:
                xin = tl.where(keep, xin, 0.0)
            else:  # a multiply: ptxas-friendlier here, and no i1 tile for the MMA's layout change
                xin = xin * keep.to(xin.dtype)
        dd = _mma(tl.trans(u), xin, tl.zeros((BLOCK_R, BLOCK_N), dtype=ACC), PREC)
        tl.atomic_add(dd_ptr + offs_r[:, None] * stride_ddr + offs_n[None, :] * stride_ddn,
                      dd * alpha_d, mask=r_ok[:, None] & n_ok[None, :])
    d = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_n[None, :] * stride_dn,
                mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    if UPCAST:
        d = d.to(ACC)
    delta = _mma(u * scaling, d, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), PREC)
    if DROPOUT:
        delta = tl.where(keep, delta * keep_scale, 0.0)
    acc += delta
    if COL_SCALE:
        acc = acc * tl.load(cs_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             _cast_out(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


def lowrank_configs(configs, capability: tuple[int, int] | None, *, fused_bwd: bool,
                    per_element_rng: bool):
    """The spill-free configs of a variant (ptxas numbers in bench/NOTES.md): the fused
    backward spills at BLOCK_M 128 on sm_80 (756–2108 bytes); the per-element Philox epilogue
    (in % 8 != 0) spills at 64 × 64 on sm_90 (96 bytes) and gets the 64 × 32 tile."""
    if per_element_rng:
        return [c for c in configs if c is NARROW_CONFIG]
    configs = [c for c in configs if c is not NARROW_CONFIG]
    if fused_bwd and capability is not None and capability < (9, 0):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] == 64]
    return configs


def _prune(configs, named_args, **kwargs):
    """Autotune-time: the variant's spill-free tiles (the fp64 tile for fp64 operands)."""
    if interpreting():
        return configs
    x = named_args.get("x_ptr")
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        return prune_gemm_configs(configs, named_args, **kwargs)
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    kept = lowrank_configs(configs, capability,
                           fused_bwd=bool(kwargs.get("GRAD_D") or kwargs.get("GRAD_C")),
                           per_element_rng=bool(kwargs.get("DROPOUT"))
                           and not kwargs.get("GROUPED_RNG"))
    return kept or prune_gemm_configs(configs, named_args, **kwargs)


_lowrank_fwd_autotuned = triton.autotune(
    configs=gemm_configs(), key=["M", "N", "K", "R"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["dd_ptr", "dc_ptr"],  # atomically accumulated: re-zeroed between trials
)(_lowrank_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _dropout_args(dropout: float):
    """(threshold, keep_scale) of :mod:`pypeft_fast.philox` for p = dropout."""
    from pypeft_fast.philox import keep_threshold
    return keep_threshold(dropout), 1.0 / (1.0 - dropout)


def _skinny(L, R, P, Q, K, strides_l, strides_r, alpha, *, drop=0, seed=None, row_len=1,
            threshold=0, out_dtype, caller):
    """α·L'·R' (P, Q) in out_dtype (fp32/fp64), plain strides ((p, k) of L, (k, q) of R)."""
    out = torch.empty((P, Q), dtype=out_dtype, device=L.device)
    return strided_matmul(L, R, P, Q, K, lp=strides_l[0], lk=strides_l[1], rk=strides_r[0],
                          rq=strides_r[1], out=out, op=out.stride(0), oq=out.stride(1),
                          alpha=alpha, drop=drop, seed=seed, row_len=row_len, threshold=threshold,
                          caller=caller)


def _gemm(X, w_strides, bias, C, c_strides, D, d_strides, u, y, seed, M, N, K, R, scaling,
          *, fuse_u, store_u, dropout, keep_scale, threshold, grad_d=None, grad_c=None,
          col_scale=None):
    """Launch ``_lowrank_fwd_kernel``. grad_d = (Xin, dD fp32, α_d), grad_c = (V, dC fp32, α_c),
    col_scale: DoRA's c (N,) applied in the epilogue."""
    grouped = dropout and N % 8 == 0
    xin, dd, alpha_d = grad_d if grad_d is not None else (y, y, 0.0)
    v, dc, alpha_c = grad_c if grad_c is not None else (u, y, 0.0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(_lowrank_fwd_autotuned)[grid](
        X, w_strides[0], bias if bias is not None else y, C, D, u, y,
        seed if seed is not None else u, xin, dd, v, dc,
        col_scale if col_scale is not None else y,
        M, N, K, R,
        X.stride(0), X.stride(1), w_strides[1], w_strides[2], *c_strides, *d_strides,
        u.stride(0), u.stride(1), y.stride(0), y.stride(1),
        xin.stride(0), xin.stride(1), dd.stride(0), dd.stride(1), v.stride(0), v.stride(1),
        dc.stride(0), dc.stride(1),
        scaling, keep_scale, threshold, alpha_d, alpha_c,
        HAS_BIAS=bias is not None, FUSE_U=fuse_u, STORE_U=store_u, DROPOUT=dropout,
        GRAD_D=grad_d is not None, GRAD_C=grad_c is not None, COL_SCALE=col_scale is not None,
        GROUPED_RNG=grouped, ACC=acc_dtype(X, w_strides[0], C, D), UPCAST=upcast_flag(X, C, D),
        PREC=input_precision(X, C, D), BLOCK_R=rank_block(R),
    )


def _lowrank_fwd_fake(x, weight, bias, A, B, seed, scaling, dropout, col_scale=None):
    torch._check(x.shape[1] == weight.shape[1] == A.shape[1] and B.shape == (weight.shape[0], A.shape[0]),
                 lambda: f"lowrank_fwd: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)} do not chain")
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], A.shape[0]), dtype=torch_acc_dtype(x, A, B)))


@register_op("pypeft_fast::lowrank_fwd", _lowrank_fwd_fake)
def lowrank_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                A: torch.Tensor, B: torch.Tensor, seed: Optional[torch.Tensor],
                scaling: float, dropout: float,
                col_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, in), weight (out, in), bias (out,) or None, A (r, in), B (out, r), seed: 0-d int64
    on x's device (dropout > 0). Returns y (n, out) in x's dtype and u = drop(x)·Aᵀ (n, r) fp32
    (fp64 for fp64 inputs), saved for dB. ``col_scale`` c (out,) (DoRA, dropout 0):
    y = c ⊙ (x·Wᵀ + s·u·Bᵀ) + bias, c applied in the GEMM's epilogue."""
    n, k = x.shape
    out_f, r = weight.shape[0], A.shape[0]
    check_int32_offsets("lowrank_fwd", x=x, weight=weight, bias=bias, A=A, B=B, y=(n, out_f),
                        u=(n, r), col_scale=col_scale)
    y = torch.empty((n, out_f), dtype=x.dtype, device=x.device)
    drop = dropout > 0.0
    threshold, keep_scale = _dropout_args(dropout) if drop else (0, 1.0)
    # With dropout, u is a pass of its own (the mask generated once, not once per column tile).
    separate_u = drop or out_f == 0
    if separate_u:
        u = _skinny(x, A, n, r, k, (x.stride(0), x.stride(1)), (A.stride(1), A.stride(0)),
                    keep_scale, drop=1 if drop else 0, seed=seed, row_len=k,
                    threshold=threshold, out_dtype=torch_acc_dtype(x, A, B), caller="lowrank_fwd")
    else:
        u = torch.empty((n, r), dtype=torch_acc_dtype(x, A, B), device=x.device)
    if n > 0 and out_f > 0:
        _gemm(x, (weight, weight.stride(1), weight.stride(0)), bias, A,
              (A.stride(1), A.stride(0)), B, (B.stride(1), B.stride(0)), u, y, None,
              n, out_f, k, r, scaling, fuse_u=not separate_u, store_u=not separate_u,
              dropout=False, keep_scale=1.0, threshold=0, col_scale=col_scale)
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

    When dx is wanted, everything is one GEMM kernel: dx = gy·W + drop'(s·(gy·B)·A) with
    t = gy·B (n, r) from its K-loop, dA = s·keep·tᵀ·(m⊙x) from its epilogue (the x tile under
    each dx tile) and dB = s·gyᵀ·u from the K-loop of one column tile per row tile, both by fp32
    atomics. Without dx, dA and dB are skinny split-K reductions over n — also under
    ``torch.use_deterministic_algorithms(True)``: atomics sum in a run-dependent order, the
    split-K partials in a fixed one (bit-reproducible).
    """
    n, out_f = gy.shape
    k, r = weight.shape[1], A.shape[0]
    check_int32_offsets("lowrank_bwd", gy=gy, x=x, weight=weight, A=A, B=B, u=u,
                        dx=(n, k) if needs_dx else None, t=(n, r), dA=(r, k), dB=(out_f, r))
    drop = dropout > 0.0
    threshold, keep_scale = _dropout_args(dropout) if drop else (0, 1.0)
    cd = torch_acc_dtype(x, A, B)
    # a fresh empty tensor per unneeded gradient: op outputs may not alias each other
    dx, dA, dB = (gy.new_empty((0,)) for _ in range(3))
    t = None
    if needs_dx:
        dx = torch.empty((n, k), dtype=x.dtype, device=x.device)
    if needs_dx and n > 0 and k > 0:
        # one kernel: dx, with t = gy·B from its K-loop, dA from its epilogue, dB from its K-loop
        # (by atomics: not when deterministic algorithms are asked for)
        fused = not torch.are_deterministic_algorithms_enabled()
        fuse_dA, fuse_dB = need_dA and fused, need_dB and fused
        dA32 = torch.zeros((r, k), dtype=cd, device=x.device) if fuse_dA else None
        dB32 = torch.zeros((out_f, r), dtype=cd, device=x.device) if fuse_dB else None
        _gemm(gy, (weight, weight.stride(0), weight.stride(1)), None, B,
              (B.stride(0), B.stride(1)), A, (A.stride(0), A.stride(1)), u, dx, seed,
              n, k, out_f, r, scaling, fuse_u=True, store_u=False, dropout=drop,
              keep_scale=keep_scale, threshold=threshold,
              grad_d=(x, dA32, scaling * keep_scale) if fuse_dA else None,
              grad_c=(u, dB32, scaling) if fuse_dB else None)
        if fuse_dA:
            dA = dA32.to(A.dtype)
        if fuse_dB:
            dB = dB32.to(B.dtype)
        if fused:
            return dx, dA, dB
    # no dx GEMM to ride on (or deterministic algorithms): skinny split-K passes
    if need_dA:
        t = _skinny(gy, B, n, r, out_f, (gy.stride(0), gy.stride(1)), (B.stride(0), B.stride(1)),
                    1.0, out_dtype=cd, caller="lowrank_bwd")
        dA = _skinny(t, x, r, k, n, (t.stride(1), t.stride(0)), (x.stride(0), x.stride(1)),
                     scaling * keep_scale, drop=2 if drop else 0, seed=seed, row_len=k,
                     threshold=threshold, out_dtype=cd, caller="lowrank_bwd").to(A.dtype)
    if need_dB:
        dB = _skinny(gy, u, out_f, r, n, (gy.stride(1), gy.stride(0)), (u.stride(0), u.stride(1)),
                     scaling, out_dtype=cd, caller="lowrank_bwd").to(B.dtype)
    return dx, dA, dB
