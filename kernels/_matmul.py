"""The skinny / batched-small matmul shared by the families: ``out[p, q] = α·Σ_k L[p, k]·R[k, q]``.

Each of the three index spaces p, q, k may be a flattened pair ``(outer, inner)`` with its own
strides (``idx // I`` and ``idx % I``), which lets one kernel express, without copies:

* LoRA's rank-space products and weight gradients (u = x·Aᵀ, dA = tᵀ·x, dB = gyᵀ·u): plain 2-D,
  one side the rank;
* the Kronecker/PHM per-row products U[n, i, h, l] = Σⱼ A[h, i, j]·X[n, j, l] (q = (n, l)) and
  the factor gradients that reduce over (n, l) pairs.

Optionally one operand is the dropout input x and is masked in-kernel (the Philox mask of
:mod:`pypeft_fast.philox`). K may be split over a grid axis (partials summed by the launcher),
because these reductions have few output tiles (r × in) but a long K (n).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    _cast_out, _keep_mask, _mma, acc_dtype, check_int32_offsets, input_precision, interpreting,
    launch, split_count, upcast_flag,
)


def matmul_blocks():
    """Largest (big tile side, K block): 128 × 64 on a GPU; 128 × 128 under the interpreter,
    where a program has ~30 ms of fixed overhead (fewer, larger programs are faster there).
    Each is shrunk to the next power of two ≥ 16 of the actual size."""
    return (512, 128) if interpreting() else (128, 64)


def matmul_num_warps(block_p: int, block_q: int) -> int:
    """8 warps from 128 × 64 tiles up (4 warps spill 300 B there on sm_80 with fp32 × bf16
    operands; 8: 182 registers, no spill), else 4."""
    return 8 if block_p * block_q >= 128 * 64 else 4


def _fit(size: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(max(size, 1))), cap)


@triton.jit
def _strided_matmul_kernel(
    l_ptr, r_ptr, out_ptr, seed_ptr,
    P, Q, K, K_PER_SPLIT, P_INNER, Q_INNER, K_INNER, row_len,
    s_lpo, s_lpi, s_lko, s_lki, s_rko, s_rki, s_rqo, s_rqi,
    s_os, s_opo, s_opi, s_oqo, s_oqi,
    alpha, threshold,
    DROP: tl.constexpr, GROUPED_RNG: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[split] (P, Q) = α·Σ_{k in split} L'[p, k]·R'[k, q]; grid (P tiles, Q tiles, splits).

    DROP = 1: L is the dropout input x, masked at element (p, k) of an (·, row_len) tensor;
    DROP = 2: R is, at element (k, q); 0: no mask. (Masked operands use plain p/k/q indices.)
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    l_row = (offs_p // P_INNER) * s_lpo + (offs_p % P_INNER) * s_lpi
    r_col = (offs_q // Q_INNER) * s_rqo + (offs_q % Q_INNER) * s_rqi
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if DROP != 0:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        k_outer = kk // K_INNER
        k_inner = kk % K_INNER
        lt = tl.load(l_ptr + l_row[:, None] + (k_outer * s_lko + k_inner * s_lki)[None, :],
                     mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        rt = tl.load(r_ptr + (k_outer * s_rko + k_inner * s_rki)[:, None] + r_col[None, :],
                     mask=k_ok[:, None] & q_ok[None, :], other=0.0)
        if UPCAST:
            lt = lt.to(ACC)
            rt = rt.to(ACC)
        if DROP == 1:
            keep = _keep_mask(seed, offs_p, k0, row_len, threshold, BLOCK_P, BLOCK_K, GROUPED_RNG)
            lt = tl.where(keep, lt, 0.0)
        if DROP == 2:
            keep = _keep_mask(seed, kk, pid_q * BLOCK_Q, row_len, threshold, BLOCK_K, BLOCK_Q,
                              GROUPED_RNG)
            rt = tl.where(keep, rt, 0.0)
        acc = _mma(lt, rt, acc, PREC)
    o_row = (offs_p // P_INNER) * s_opo + (offs_p % P_INNER) * s_opi
    o_col = (offs_q // Q_INNER) * s_oqo + (offs_q % Q_INNER) * s_oqi
    tl.store(out_ptr + pid_s * s_os + o_row[:, None] + o_col[None, :],
             _cast_out(acc * alpha, out_ptr.dtype.element_ty, UPCAST),
             mask=p_ok[:, None] & q_ok[None, :])


def _dim(spec):
    """A dimension spec: ``stride`` (plain) or ``(inner_size, outer_stride, inner_stride)``."""
    if isinstance(spec, tuple):
        return spec
    return (1, spec, 0)


def strided_matmul(L, R, P, Q, K, *, lp, lk, rk, rq, out, op, oq, alpha=1.0, drop=0, seed=None,
                   row_len=1, threshold=0, caller="strided_matmul"):
    """``out[p, q] = α·Σ_k L[p, k]·R[k, q]`` written into ``out`` (fp32/fp64, any layout given by
    ``op``/``oq``). ``lp, lk, rk, rq, op, oq`` are dimension specs (see :func:`_dim`); the inner
    sizes of p (in lp and op), q (rq, oq) and k (lk, rk) must agree; every spec indexes inside
    its tensor (so the tensors' own spans bound the int32 offsets). ``caller`` names the op in
    errors. Returns ``out``."""
    pi, lpo, lpi = _dim(lp)
    ki, lko, lki = _dim(lk)
    ki2, rko, rki = _dim(rk)
    qi, rqo, rqi = _dim(rq)
    pi2, opo, opi = _dim(op)
    qi2, oqo, oqi = _dim(oq)
    assert ki == ki2 and pi == pi2 and qi == qi2, "inner sizes of p, q, k must agree"
    assert out.is_contiguous(), "out must be contiguous (split-K partials share its strides)"
    if P == 0 or Q == 0:
        return out
    big, block_k = matmul_blocks()
    block_p, block_q, block_k = _fit(P, big), _fit(Q, big), _fit(K, block_k)
    if not interpreting() and block_p == block_q == 128:
        block_q = 64  # 128 × 128 spills on fp32 × bf16 operands (ptxas: 2 KB at 4 warps, 36 B at 8)
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    splits = split_count(tiles, K, block_k, out.device)
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), block_k), splits) * block_k
    splits = max(1, triton.cdiv(K, k_per_split))
    check_int32_offsets(f"{caller} (strided matmul)", L=L, R=R, out=out,
                        split_partials=(splits,) + tuple(out.shape) if splits > 1 else None)
    target = out
    if splits > 1:
        target = torch.empty((splits,) + tuple(out.shape), dtype=out.dtype, device=out.device)
    grouped = drop != 0 and row_len % 8 == 0
    grid = (triton.cdiv(P, block_p), triton.cdiv(Q, block_q), splits)
    launch(_strided_matmul_kernel)[grid](
        L, R, target, seed if seed is not None else target,
        P, Q, K, k_per_split, pi, qi, ki, row_len,
        lpo, lpi, lko, lki, rko, rki, rqo, rqi,
        target.stride(0) if splits > 1 else 0, opo, opi, oqo, oqi,
        alpha, threshold,
        DROP=drop, GROUPED_RNG=grouped, ACC=acc_dtype(L, R, out), UPCAST=upcast_flag(L, R),
        PREC=input_precision(L, R), BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_K=block_k,
        num_warps=matmul_num_warps(block_p, block_q),
    )
    if splits > 1:
        torch.sum(target, dim=0, out=out)
    return out
