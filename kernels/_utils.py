"""Pieces shared by the family kernels: the frozen-GEMM main loop, mixed-precision MMA, the
in-kernel Philox keep-mask, and the launch-time choices (interpreter or GPU, block sizes).

Every load and store is masked: the shapes the tests use (n = 74, in = 129, out = 67, r = 3) are
multiples of no block size, and the Triton interpreter turns an unmasked out-of-bounds access
into silent memory corruption instead of a fault.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..validate import compute_dtype


def interpreting() -> bool:
    """True when kernels run under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(kernel):
    """``kernel`` ready for ``[grid](...)``: through ``torch.library.wrap_triton`` on a GPU (so
    torch.compile traces into it); the bare kernel under the interpreter, which is what
    ``wrap_triton`` itself returns there from torch 2.13 on (torch 2.11 raises on an interpreted
    kernel instead)."""
    if interpreting():
        return kernel
    from torch.library import wrap_triton
    return wrap_triton(kernel)


def upcast_flag(*tensors: torch.Tensor) -> bool:
    """The interpreter holds bf16 as raw integers and gets bf16 arithmetic wrong (loads, stores
    and ``.to(tl.float32)`` are right): kernels then upcast bf16 operands to fp32 first. Off on
    a GPU."""
    return interpreting() and any(t.dtype == torch.bfloat16 for t in tensors)


def input_precision(*tensors: torch.Tensor) -> str:
    """fp32 ``tl.dot`` precision: IEEE unless torch itself allows TF32 for matmuls, so that the
    fp32 error stays that of ``torch.matmul``."""
    if any(t.dtype == torch.float32 for t in tensors) and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def torch_acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of the operands: the core's rule, ``validate.compute_dtype``
    (fp32, or fp64 when any operand is fp64)."""
    return compute_dtype(*tensors)


def acc_dtype(*tensors: torch.Tensor):
    """:func:`torch_acc_dtype` as a Triton dtype (a kernel's ``ACC`` constexpr)."""
    return tl.float64 if compute_dtype(*tensors) == torch.float64 else tl.float32


INT32_OFFSET_LIMIT = 2**31 - 2**16
"""Largest element span a kernel operand may have. Offsets inside the kernels are int32 (the
Philox element index is int64): ``offs * stride`` for a tensor reaching past 2³¹ would wrap and
write out of bounds. The margin below 2³¹ covers the masked lanes of the last tile
(``pid·BLOCK + arange(BLOCK)`` must not wrap either; blocks are ≤ 512)."""


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def element_span(shape, strides) -> int:
    """How many elements an int32 index into a (shape, strides) tensor must reach: the larger of
    its element count (sizes bound the tile offsets, also along stride-0 dims) and 1 + its
    largest element offset Σ (size − 1)·|stride|; 0 for an empty tensor."""
    if any(size == 0 for size in shape):
        return 0
    numel, reach = 1, 1
    for size, stride in zip(shape, strides):
        numel *= size
        reach += (size - 1) * abs(stride)
    return max(numel, reach)


def check_int32_offsets(op: str, **operands) -> None:
    """Raise a ValueError naming ``op``, the operand and its shape when an operand a kernel
    indexes spans more than :data:`INT32_OFFSET_LIMIT` elements. Values: a tensor, a shape tuple
    (a contiguous tensor about to be allocated: checked before the allocation) or None (absent).
    Every launcher calls it on every tensor it hands a kernel, inputs, outputs and temporaries."""
    limit = INT32_OFFSET_LIMIT
    for name, t in operands.items():
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            shape, strides = tuple(t.shape), tuple(t.stride())
        else:
            shape = tuple(t)
            strides = _contiguous_strides(shape)
        span = element_span(shape, strides)
        if span > limit:
            raise ValueError(
                f"{op}: {name} of shape {shape} (strides {strides}) spans {span} elements, more "
                f"than the {limit} the Triton kernels address with int32 offsets; split the call "
                "(fewer tokens per call) or use backend='torch'")


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """How many K-slices a skinny reduction is split into, so that about two programs run per SM
    (H100: 132 SMs); under the interpreter 2 (so the partial-sum path is exercised) when K allows."""
    steps = triton.cdiv(max(k, 1), block_k)
    if interpreting():
        return max(1, min(2, steps))
    want = triton.cdiv(2 * num_sms(device), max(tiles, 1))
    return max(1, min(want, steps, 64))


def rank_block(r: int) -> int:
    """The whole rank in one block: ``tl.dot`` needs every dimension ≥ 16."""
    return max(16, triton.next_power_of_2(max(r, 1)))


def gemm_configs():
    """Frozen-GEMM tile configs. One under the interpreter (autotuning several needs a GPU
    driver). GPU: H100/H200 bf16 tiles, plus one small tile for fp64 operands (the bf16 tiles
    need 272 KiB of shared memory in fp64); :func:`prune_gemm_configs` picks by dtype. Every
    config is compile-checked for spills (kernels/compile_check.py, bench/NOTES.md)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8},
                      num_warps=4, num_stages=3),
        FP64_CONFIG,
        NARROW_CONFIG,
    ]


FP64_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                            num_warps=4, num_stages=2)
"""fp64 operands: the bf16 tiles would need 272 KiB of shared memory."""
NARROW_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8},
                              num_warps=4, num_stages=3)
"""Register-heavy epilogues (LoRA's per-element Philox when in % 8 != 0): 64 × 64 spills."""


def prune_gemm_configs(configs, named_args, **kwargs):
    """Autotune-time choice by operand dtype: the fp64 tile for fp64 inputs, the general tiles
    else (the narrow tile only where a kernel asks for it)."""
    if interpreting():
        return configs
    x = named_args.get("x_ptr")
    fp64 = isinstance(x, torch.Tensor) and x.dtype == torch.float64
    kept = [c for c in configs if (c is FP64_CONFIG) == fp64 and c is not NARROW_CONFIG]
    return kept or configs


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` with fp32/fp64 accumulation for any mix of operand dtypes.

    Same dtypes: one ``tl.dot``. A wide operand (fp32 factor or fp32 intermediate) against a
    16-bit one is split ``hi + lo`` into two 16-bit operands, so both dots run on tensor cores
    and the product keeps ~16 mantissa bits of the wide operand (products of 16-bit values are
    exact in fp32) — as accurate as upcasting, without fp32 FMA-pipe matmuls.

    ``out_dtype`` is acc's own: Triton before 3.8 defaults it to float32 and rejects an fp64
    ``acc`` (found compiling for sm_90 with triton 3.6, the GPU machine's version).
    """
    if a.dtype == b.dtype:
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)
    elif a.dtype.primitive_bitwidth > b.dtype.primitive_bitwidth:
        a_hi = a.to(b.dtype)
        a_lo = (a - a_hi.to(a.dtype)).to(b.dtype)
        acc = tl.dot(a_hi, b, acc, out_dtype=acc.dtype)
        acc = tl.dot(a_lo, b, acc, out_dtype=acc.dtype)
    else:
        b_hi = b.to(a.dtype)
        b_lo = (b - b_hi.to(b.dtype)).to(a.dtype)
        acc = tl.dot(a, b_hi, acc, out_dtype=acc.dtype)
        acc = tl.dot(a, b_lo, acc, out_dtype=acc.dtype)
    return acc


@triton.jit
def _keep_mask(seed, rows, col0, row_len, threshold,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUPED: tl.constexpr):
    """Keep-mask (BLOCK_R, BLOCK_C) of elements (rows[i], col0 + j) of an (·, row_len) input,
    bit-identical to ``pypeft_fast.philox.keep_mask`` (element e = row·row_len + col draws the
    16-bit lane ``e & 7`` of Philox4x32-10 at counter ``e >> 3``).

    GROUPED (row_len and col0 multiples of 8): one Philox call per 8 elements, its 8 lanes
    interleaved back into element order with ``tl.join`` — 8× fewer integer ops. Otherwise one
    call per element (rows then do not start on a counter boundary).
    """
    rows64 = rows.to(tl.int64)
    if GROUPED:
        c = (rows64[:, None] * row_len + col0) // 8 + tl.arange(0, BLOCK_C // 8)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, c)
        lo = 0xFFFF
        # T[.., k, m, q] holds lane 4k + 2m + q: flattening the joins gives element order.
        p = tl.join(tl.join(r0 & lo, r2 & lo), tl.join(r1 & lo, r3 & lo))
        q = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
        u16 = tl.reshape(tl.join(p, q), (BLOCK_R, BLOCK_C))
    else:
        e = rows64[:, None] * row_len + (col0 + tl.arange(0, BLOCK_C))[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, e >> 3)
        w = (e >> 1) & 3
        word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
        u16 = (word >> (16 * (e & 1)).to(tl.uint32)) & 0xFFFF
    return u16 >= threshold


@triton.jit
def _frozen_gemm_mainloop(x_ptr, w_ptr, c_ptr, offs_m, offs_n, M, N, K, R,
                          stride_xm, stride_xk, stride_wk, stride_wn, stride_ck, stride_cr,
                          v, dc_ptr, stride_dck, stride_dcr, alpha_c, grad_c_here,
                          ACC: tl.constexpr, FUSE_U: tl.constexpr, GRAD_C: tl.constexpr,
                          UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """K-loop of the frozen GEMM tile ``acc = X[offs_m, :] @ Wop[:, offs_n]`` (X: (M, K), Wop:
    (K, N) given by strides). With FUSE_U also ``u = X[offs_m, :] @ C`` (C: (K, R)) from the
    same X tile — the adapter's rank-space projection without extra x traffic. With GRAD_C (and
    ``grad_c_here``, true for one column tile per row tile) also ``dC[k, :] += α·X[offs_m, k]ᵀ·v``
    (v: (BLOCK_M, BLOCK_R) rows of a rank-space tensor) by fp32 atomics — LoRA's dB from the dx
    pass, which streams every gy tile anyway."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=m_ok & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok, other=0.0)
        if UPCAST:
            x = x.to(ACC)
            w = w.to(ACC)
        acc = _mma(x, w, acc, PREC)
        if FUSE_U:
            c = tl.load(c_ptr + kk[:, None] * stride_ck + offs_r[None, :] * stride_cr,
                        mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            if UPCAST:
                c = c.to(ACC)
            u = _mma(x, c, u, PREC)
        if GRAD_C:
            if grad_c_here:
                dc = _mma(tl.trans(x), v, tl.zeros((BLOCK_K, BLOCK_R), dtype=ACC), PREC)
                tl.atomic_add(dc_ptr + kk[:, None] * stride_dck + offs_r[None, :] * stride_dcr,
                              dc * alpha_c, mask=k_ok[:, None] & (offs_r[None, :] < R))
    return acc, u


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-grouped") tile order: GROUP_M row tiles share each W column tile in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _cast_out(v, out_dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``v.to(out_dtype)`` for a store. Under the interpreter (UPCAST) fp32→bf16 truncates
    instead of rounding to nearest-even, so the rounding is done here on the bits first; on a
    GPU this is the plain conversion."""
    if UPCAST and out_dtype == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(out_dtype)


def register_op(name: str, fake):
    """Register a launcher as the op ``name``.

    On a GPU: ``torch.library.triton_op`` — torch.compile sees through it to the kernels (their
    ``wrap_triton`` calls), and the launcher itself serves as the fake kernel. Under the
    interpreter ``wrap_triton`` hands back the bare interpreted kernel, which would run on fake
    tensors, so there the launcher is an opaque ``custom_op`` with the shape-only ``fake``.
    """
    from torch.library import custom_op, triton_op

    def dec(fn):
        if interpreting():
            op = custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return triton_op(name, mutates_args={})(fn)

    return dec
