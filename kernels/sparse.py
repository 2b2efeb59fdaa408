"""Sparse-masked (SHiRA / SparseAdapter) Triton kernels: ``y = x·(W + s·ΔW)ᵀ + b`` with ΔW given
by ``values (nnz,)`` on the mask's CSR (and ΔWᵀ's CSR = the mask's CSC), never densified.

Kernels (jit → launcher → op)::

    _sparse_fwd_kernel    frozen-GEMM tile y = X·Wop + b where every W tile is loaded and the
                          mask entries falling into it are added (s·v) before the MMA: the CSR
                          row of each of the tile's BLOCK_N output rows is walked in step with
                          the K-loop (columns are sorted), so each entry is touched once per
                          row tile and the MMA count is that of the frozen GEMM alone.
                          Forward: X = x,  Wop = Wᵀ, rows = CSR of ΔW   → y
                          dx:      X = gy, Wop = W,  rows = CSR of ΔWᵀ  → dx = gy·(W + s·ΔW)
    _sparse_sddmm_kernel  dv[e] = s·Σₙ gy[n, row_e]·x[n, col_e] over the nnz only, blocked: one
                          program per (BLOCK_O × BLOCK_I) block of ΔW that holds entries forms
                          the dense block gyᵀ·x by MMA and gathers its entries (``tl.gather``);
                          empty blocks cost nothing — at most one frozen GEMM for a random mask,
                          ∝ block density for block masks (the block-sparse case).

Precision: W + s·ΔW is formed in fp32 and rounded once to the activation dtype for the MMA
(one extra rounding only where the mask has entries). Launchers :func:`sparse_fwd`,
:func:`sparse_bwd`; ops ``pypeft_fast::sparse_fwd`` / ``pypeft_fast::sparse_bwd``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary
import triton.language as tl

from ._utils import (
    _cast_out, _mma, _tile_ids, acc_dtype, check_int32_offsets, input_precision, interpreting,
    launch, NARROW_CONFIG, gemm_configs, prune_gemm_configs, register_op, split_count,
    torch_acc_dtype, upcast_flag,
)


def sparse_gemm_configs(capability: tuple[int, int] | None = None):
    """Frozen-GEMM tiles for the CSR-walking kernel. The walk's per-column state and the fp32
    W-tile update cost registers: on sm_80 the 128-wide tiles spill (ptxas: 255 registers,
    44–152 spill bytes), so below sm_90 only the 64 × 64 tile is kept (bench/NOTES.md)."""
    if interpreting():
        return gemm_configs()
    # gemm_configs()'s tiles without the 64 × 128 one and the narrow-epilogue tile
    configs = [c for c in gemm_configs() if c is not NARROW_CONFIG
               and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (64, 128)]
    if capability is not None and capability < (9, 0):
        configs = [c for c in configs if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64]
    return configs


def _prune_for_device(configs, named_args, **kwargs):
    """Autotune-time (the device is initialised by then) pruning to this GPU's spill-free tiles
    for the operand dtype."""
    configs = prune_gemm_configs(configs, named_args, **kwargs)
    if interpreting() or not torch.cuda.is_available():
        return configs
    keep = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in sparse_gemm_configs(torch.cuda.get_device_capability())}
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]


def sddmm_blocks():
    """(BLOCK_O, BLOCK_I, BLOCK_M, BLOCK_E) of the block SDDMM."""
    return (64, 64, 64, 64) if interpreting() else (128, 64, 64, 128)


@triton.jit
def _sparse_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, ptr_ptr, idx_ptr, perm_ptr, val_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y (M, N) = X·(Wop + s·S) + bias. X (M, K), Wop (K, N) by strides; S (K, N) sparse, given
    per output column n as a compressed list: entries ptr[n] .. ptr[n+1] with K-index idx[e]
    (sorted) and value val[perm[e]]."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    cur = tl.load(ptr_ptr + offs_n, mask=n_ok, other=0).to(tl.int32)
    end = tl.load(ptr_ptr + offs_n + 1, mask=n_ok, other=0).to(tl.int32)
    col = tl.load(idx_ptr + cur, mask=cur < end, other=0).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(ACC)
            w = w.to(ACC)
        active = (cur < end) & (col < k0 + BLOCK_K)
        if tl.max(active.to(tl.int32), axis=0) > 0:
            while tl.max(active.to(tl.int32), axis=0) > 0:
                # each (k, n) is hit at most once: W + s·v formed in fp32, rounded once
                v = tl.load(val_ptr + tl.load(perm_ptr + cur, mask=active, other=0),
                            mask=active, other=0.0).to(ACC)
                hit = (kk[:, None] == col[None, :]) & active[None, :]
                w = tl.where(hit, (w.to(ACC) + v[None, :] * scaling).to(w.dtype), w)
                cur += active.to(tl.int32)
                col = tl.load(idx_ptr + cur, mask=cur < end, other=0).to(tl.int32)
                active = (cur < end) & (col < k0 + BLOCK_K)
        acc = _mma(x, w, acc, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             _cast_out(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


_sparse_fwd_autotuned = triton.autotune(
    configs=sparse_gemm_configs(), key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_for_device})(_sparse_fwd_kernel)


@triton.jit
def _sparse_sddmm_kernel(
    gy_ptr, x_ptr, tile_ptr, local_ptr, dst_ptr, out_ptr,
    M, N_OUT, N_IN, TILES_I, M_PER_SPLIT,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_os,
    scaling,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[split, dst[e]] = s·Σ_{m in split} gy[m, row_e]·x[m, col_e] for the entries e of one
    (BLOCK_O × BLOCK_I) block of ΔW: the dense block C = gyᵀ·x by MMA (tensor cores), then its
    entries picked with ``tl.gather`` (local[e] = (row_e % BLOCK_O)·BLOCK_I + col_e % BLOCK_I).
    Blocks without entries return at once. Grid (blocks of ΔW, splits of n)."""
    t = tl.program_id(0)
    pid_s = tl.program_id(1)
    e_lo = tl.load(tile_ptr + t).to(tl.int32)
    e_hi = tl.load(tile_ptr + t + 1).to(tl.int32)
    if e_hi > e_lo:
        offs_o = (t // TILES_I) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = (t % TILES_I) * BLOCK_I + tl.arange(0, BLOCK_I)
        o_ok = offs_o < N_OUT
        i_ok = offs_i < N_IN
        m_lo = pid_s * M_PER_SPLIT
        m_hi = tl.minimum(m_lo + M_PER_SPLIT, M)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < m_hi
            g = tl.load(gy_ptr + offs_m[None, :] * stride_gm + offs_o[:, None] * stride_gn,
                        mask=o_ok[:, None] & m_ok[None, :], other=0.0)  # gyᵀ block (O, M)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_i[None, :] * stride_xk,
                         mask=m_ok[:, None] & i_ok[None, :], other=0.0)
            if UPCAST:
                g = g.to(ACC)
                xv = xv.to(ACC)
            acc = _mma(g, xv, acc, PREC)
        flat = tl.reshape(acc, (BLOCK_O * BLOCK_I,))
        for e0 in range(e_lo, e_hi, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            ok = e < e_hi
            local = tl.load(local_ptr + e, mask=ok, other=0)
            dst = tl.load(dst_ptr + e, mask=ok, other=0)
            tl.store(out_ptr + pid_s * stride_os + dst, tl.gather(flat, local, 0) * scaling,
                     mask=ok)


# Block layout of a mask for the SDDMM, per (csr_col tensor, block shape); eager mode only.
_BLOCK_LAYOUTS = WeakIdKeyDictionary()


def _block_layout(row_ptr, csr_col, csr_perm, out_f, in_f, block_o, block_i):
    """Entries regrouped by (BLOCK_O × BLOCK_I) block of ΔW, every block listed (static shapes,
    so torch.compile can trace it): tile_ptr (blocks+1,), local (nnz,) int32, dst (nnz,)."""
    key = (block_o, block_i, csr_col._version, row_ptr._version)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        hit = _BLOCK_LAYOUTS.get(csr_col)
        if hit is not None and hit[0] == key:
            return hit[1]
    nnz = csr_col.shape[0]
    tiles_o, tiles_i = triton.cdiv(out_f, block_o), triton.cdiv(in_f, block_i)
    rows = torch.repeat_interleave(torch.arange(out_f, device=csr_col.device), row_ptr.diff(),
                                   output_size=nnz)
    tid = (rows // block_o) * tiles_i + csr_col // block_i
    order = torch.argsort(tid, stable=True)
    counts = torch.bincount(tid, minlength=tiles_o * tiles_i)
    tile_ptr = torch.zeros(tiles_o * tiles_i + 1, dtype=torch.int64, device=csr_col.device)
    tile_ptr[1:] = torch.cumsum(counts, 0)
    local = ((rows[order] % block_o) * block_i + csr_col[order] % block_i).to(torch.int32)
    layout = (tile_ptr, local, csr_perm[order])
    if not compiling:
        _BLOCK_LAYOUTS[csr_col] = (key, layout)
    return layout


def _gemm(X, w, w_strides, bias, ptr, idx, perm, values, y, M, N, K, scaling):
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(_sparse_fwd_autotuned)[grid](
        X, w, bias if bias is not None else y, ptr, idx, perm, values, y,
        M, N, K, X.stride(0), X.stride(1), w_strides[0], w_strides[1], y.stride(0), y.stride(1),
        scaling,
        HAS_BIAS=bias is not None, ACC=acc_dtype(X, w, values), UPCAST=upcast_flag(X, w, values),
        PREC=input_precision(X, w),
    )


def _sparse_fwd_fake(x, weight, bias, values, csr_perm, row_ptr, csr_col, scaling):
    torch._check(row_ptr.shape[0] == weight.shape[0] + 1,
                 lambda: f"sparse_fwd: row_ptr {tuple(row_ptr.shape)} for weight {tuple(weight.shape)}")
    return x.new_empty((x.shape[0], weight.shape[0]))


@register_op("pypeft_fast::sparse_fwd", _sparse_fwd_fake)
def sparse_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               values: torch.Tensor, csr_perm: torch.Tensor, row_ptr: torch.Tensor,
               csr_col: torch.Tensor, scaling: float) -> torch.Tensor:
    """x (n, in), weight (out, in), values (nnz,) in the user's order; CSR of ΔW: row_ptr
    (out+1,), csr_col (nnz,), csr_perm (nnz,) (CSR position → index in values). → y (n, out)."""
    n, k = x.shape
    out_f = weight.shape[0]
    check_int32_offsets("sparse_fwd", x=x, weight=weight, bias=bias, values=values,
                        csr_perm=csr_perm, row_ptr=row_ptr, csr_col=csr_col, y=(n, out_f))
    y = torch.empty((n, out_f), dtype=x.dtype, device=x.device)
    if n > 0 and out_f > 0:
        _gemm(x, weight, (weight.stride(1), weight.stride(0)), bias, row_ptr, csr_col, csr_perm,
              values, y, n, out_f, k, scaling)
    return y


def _sparse_bwd_fake(gy, x, weight, values, csr_perm, row_ptr, csr_col, csc_perm, col_ptr,
                     csc_row, scaling, needs_dx, needs_dv):
    return (x.new_empty(x.shape if needs_dx else (0,)),
            values.new_empty(values.shape if needs_dv else (0,)))


@register_op("pypeft_fast::sparse_bwd", _sparse_bwd_fake)
def sparse_bwd(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, values: torch.Tensor,
               csr_perm: torch.Tensor, row_ptr: torch.Tensor, csr_col: torch.Tensor,
               csc_perm: torch.Tensor, col_ptr: torch.Tensor, csc_row: torch.Tensor,
               scaling: float, needs_dx: bool,
               needs_dv: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (n, in) = gy·(W + s·ΔW), dv (nnz,) = s·SDDMM(gy, x) in values' order); a gradient
    not asked for comes back as an empty (0,) tensor."""
    n, out_f = gy.shape
    k = weight.shape[1]
    check_int32_offsets("sparse_bwd", gy=gy, x=x, weight=weight, values=values,
                        csr_perm=csr_perm, row_ptr=row_ptr, csr_col=csr_col, csc_perm=csc_perm,
                        col_ptr=col_ptr, csc_row=csc_row, dx=(n, k) if needs_dx else None)
    dx, dv = gy.new_empty((0,)), gy.new_empty((0,))  # outputs may not alias
    if needs_dx:
        dx = torch.empty((n, k), dtype=x.dtype, device=x.device)
        if n > 0 and k > 0:
            _gemm(gy, weight, (weight.stride(0), weight.stride(1)), None, col_ptr, csc_row,
                  csc_perm, values, dx, n, k, out_f, scaling)
    if needs_dv:
        nnz = csr_col.numel()
        cd = torch_acc_dtype(x, values)
        block_o, block_i, block_m, block_e = sddmm_blocks()
        tile_ptr, local, dst = _block_layout(row_ptr, csr_col, csr_perm, out_f, k, block_o,
                                             block_i)
        tiles = tile_ptr.numel() - 1
        splits = split_count(tiles, n, block_m, gy.device)
        m_per_split = triton.cdiv(triton.cdiv(max(n, 1), block_m), splits) * block_m
        splits = max(1, triton.cdiv(n, m_per_split))
        check_int32_offsets("sparse_bwd", tile_ptr=tile_ptr, local=local, dst=dst,
                            split_partials=(splits, nnz))
        ws = torch.zeros((splits, nnz), dtype=cd, device=gy.device)
        if nnz > 0:
            launch(_sparse_sddmm_kernel)[(tiles, splits)](
                gy, x, tile_ptr, local, dst, ws,
                n, out_f, k, triton.cdiv(k, block_i), m_per_split,
                gy.stride(0), gy.stride(1), x.stride(0), x.stride(1), ws.stride(0),
                scaling, ACC=acc_dtype(x, values), UPCAST=upcast_flag(gy, x),
                PREC=input_precision(gy, x), BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_M=block_m,
                BLOCK_E=block_e,
            )
        dv = (ws[0] if splits == 1 else ws.sum(0)).to(values.dtype)
    return dx, dv
