"""The native backends: loads ``pypeft_fast._C`` (``csrc/``) and registers its kernels.

* ``cpp``  — the C++ CPU kernels (at::parallel_for, ISA-cloned vector loops);
* ``cuda`` — the CUDA kernels, when ``_C`` was built with them (``_C.build_info()``).

The ops dispatch on the tensors' device, so one :class:`Kernels` class per family serves both
backends; the frozen GEMMs stay ATen's (MKL / cuBLAS), the structured parts go native.
A missing ``_C`` raises ModuleNotFoundError, a broken or stale one ImportError;
``pypeft_fast.backends`` logs either and the torch path keeps working.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch
import torch.nn.functional as F

from . import _ops, registry
from .families._layer import DeltaKernels
from .families.hadamard import DenseCosts, TorchHadamard
from .families.kronecker import TorchKroneckerFoldedA, folds_A, macs_per_row
from .families._accumulate import addmm_into
from .families.lowrank import TorchLowRank
from .families.sparse import TorchSparse
from .families.lowrank_dora import TorchDoRA
from .philox import keep_rows
from .validate import compute_dtype

CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
_AVX512 = CPU_CAPABILITY.upper().startswith("AVX512")

log = logging.getLogger("pypeft_fast")

try:
    _C = importlib.import_module(__package__ + "._C")
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "pypeft_fast._C is not built (build it with `pip install --no-build-isolation -e .`)",
        name="pypeft_fast._C",
    ) from e
except (ImportError, OSError) as e:  # undefined symbols: built against another torch
    raise ImportError(f"pypeft_fast._C failed to load ({e}); rebuild it against torch "
                      f"{torch.__version__} with `pip install --no-build-isolation -e .`") from e

BUILD_INFO: dict = _C.build_info()
if BUILD_INFO.get("abi") != _ops.ABI_VERSION:
    raise ImportError(f"pypeft_fast._C has ABI {BUILD_INFO.get('abi')}, this Python code expects "
                      f"{_ops.ABI_VERSION}: rebuild with `pip install --no-build-isolation -e .`")
if BUILD_INFO.get("torch_version") != torch.__version__:
    raise ImportError(f"pypeft_fast._C was built against torch {BUILD_INFO.get('torch_version')} "
                      f"but torch {torch.__version__} is running: rebuild with "
                      "`pip install --no-build-isolation -e .`")
_ops.define_ops()  # the schemas and fakes, after _C's kernels (pypeft_fast/_ops.py)
WITH_CUDA: bool = bool(BUILD_INFO.get("with_cuda"))
ops = torch.ops.pypeft_fast


SKINNY_T_MM_MAX_RANK = 32
"""``native_rank_t_mm`` runs the native ``skinny_t_mm`` for an a of at most this many columns;
beyond it MKL's GEMM is as fast or faster (bench/NOTES.md "skinny_t_mm": r = 64 at 0.8–1.0×)."""


def _skinny_native(a: torch.Tensor, b: torch.Tensor, rank: int, ranks: range) -> bool:
    """Whether the native skinny ops take a and b: CPU, one float32/float64 dtype, the rank
    within the op's measured range."""
    return (a.device.type == "cpu" and a.dtype == b.dtype
            and a.dtype in (torch.float32, torch.float64) and rank in ranks)


def native_rank_t_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ·b`` (:func:`~pypeft_fast.families._accumulate.rank_t_mm`) by the native
    ``skinny_t_mm`` on CPU: at r ≤ 16 1.0–1.7× MKL's faster orientation on one thread, 1.3–2.8×
    on two, and up to 30× the slower one (gyᵀ·u at r = 8), which ``gyc.t() @ u`` hit. Other devices, dtypes, strides or a wider a:
    the torch form."""
    if _skinny_native(a, b, a.shape[1], range(SKINNY_T_MM_MAX_RANK + 1)) and b.stride(-1) == 1:
        return ops.skinny_t_mm(a.contiguous(), b)
    return a.t() @ b


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The x86 vendor id ("GenuineIntel", "AuthenticAMD") from ``cpuinfo``; "" without one."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def skinny_nt_mm_ranks(capability: str, vendor: str) -> range:
    """The factor ranks for which ``native_rank_nt_mm`` runs the native ``skinny_mm`` (bench/NOTES.md
    "skinny_mm", 2 threads, 1024 tokens, k = 1024 and 2752): r ≤ 32 on the AVX2 EPYC it was tuned
    on (1.3-3x MKL there); never on an AVX-512 Xeon, where MKL's GEMM ran it 1.2-2x faster at
    r = 8-32 and 5-12x at r = 1-4 ("skinny_mm on an AVX-512 Xeon"); r = 8-64 on an AVX-512 AMD
    CPU, where it ran 1.9-3.4x faster than MKL there and 5-11x slower at r = 1-4 (also at
    4096 tokens, k = 256: "Session 11")."""
    if not capability.upper().startswith("AVX512"):
        return range(1, 33)
    return range(8, 65) if vendor == "AuthenticAMD" else range(0)


SKINNY_NT_MM_RANKS = skinny_nt_mm_ranks(CPU_CAPABILITY, cpu_vendor())
"""This CPU's :func:`skinny_nt_mm_ranks`."""


def native_rank_nt_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·bᵀ`` (:func:`~pypeft_fast.families._accumulate.rank_nt_mm`) by the native
    ``skinny_mm`` on CPU, which takes bᵀ (k, r) with unit-stride rows: B for t = gy·B as it is,
    A for u = x·Aᵀ transposed into a copy (r × k values). Other devices, dtypes, a
    column-strided a or a b of more rows: the torch form."""
    if _skinny_native(a, b, b.shape[0], SKINNY_NT_MM_RANKS) and a.stride(-1) == 1:
        return ops.skinny_mm(a, b.t().contiguous())
    return a @ b.t()


def gemm_bf16_f32_fast(has_mkl: bool, amx: bool) -> bool:
    """Whether ``gemm_bf16_f32`` (MKL's bf16 × bf16 → float32 GEMM) beats the float32 GEMM of the
    upcast operands on a CPU: with AMX, 2 threads, session 12's Xeon (bench/NOTES.md "Session
    12"): 1024³ 1.3 against 7.4 ms, gyᵀ·x of 1024 tokens × 2752 × 1024 3.0 against 18.5 ms with
    the casts. Without AMX it ran at the float32 rate (the AVX512-BF16 EPYC of session 11: 14.2
    against 13.0 ms); CPUs with neither were not measured."""
    return has_mkl and amx


def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


GEMM_BF16_F32_FAST = gemm_bf16_f32_fast(bool(BUILD_INFO.get("mkl_gemm_bf16_f32")), _has_amx())
"""This CPU's :func:`gemm_bf16_f32_fast`."""

GEMM_BF16_F32_SPEEDUP = 6.0
"""How many times faster ``gemm_bf16_f32`` ran than the float32 GEMM with its casts where it is
fast (:func:`gemm_bf16_f32_fast`: 5.7-6.2× at 1024-2752 wide, 1024 tokens): the cost models'
price of one of its FLOPs is 1/this of a float32 one."""


def bf16_gemm_serves(a: torch.Tensor, b: torch.Tensor, cd: torch.dtype) -> bool:
    """Whether ``gemm_bf16_f32`` computes a·b for float32 ``cd``: two bf16 CPU operands on a CPU
    where it is fast."""
    return (GEMM_BF16_F32_FAST and cd == torch.float32 and a.device.type == "cpu"
            and a.dtype == b.dtype == torch.bfloat16)


class NativeHadamard(TorchHadamard):
    """Hadamard family on CPU: the dense form's weight-sized passes in one native pass each
    (``hadamard_weight``: W' = W + s·M1⊙M2 in the GEMM's dtype; ``hadamard_factor_grads``: the
    four factor gradients from one read of G), M1, M2, G⊙M2 and G⊙M1 never stored; and
    G = s·gyᵀ·x for a bf16 x and gy (bf16 autocast, a bf16 base) by ``gemm_bf16_f32`` —
    products and sums in float32, nothing rounded — where this CPU runs it at bf16 speed
    (:func:`gemm_bf16_f32_fast`); the plan is priced for these passes (:meth:`dense_costs`).
    The factored form is the torch kernels'. (The cpp backend serves CPU tensors only.)"""

    @staticmethod
    def dense_weight(weight, params, cd, s, dtype):
        if weight.dtype != dtype:  # the op returns W's dtype; the GEMM needs x's
            return TorchHadamard.dense_weight(weight, params, cd, s, dtype)
        return ops.hadamard_weight(weight, *(p.to(cd) for p in params), s)

    @staticmethod
    def dense_factor_grads(G, params, needs):
        grads = ops.hadamard_factor_grads(G, *(p.to(G.dtype) for p in params))
        return tuple(g if need else None for g, need in zip(grads, needs))

    @staticmethod
    def gram(gy2d, x2d, cd, s):
        if bf16_gemm_serves(gy2d, x2d, cd):
            return ops.gemm_bf16_f32(gy2d.t(), x2d, s)
        return TorchHadamard.gram(gy2d, x2d, cd, s)

    @staticmethod
    def dense_costs(dtype: torch.dtype) -> DenseCosts:
        """For a bf16/fp16 x: one float32-sized pass to form W' (W read and W' written, both in
        x's 2-byte dtype) and three for the gradients (G written and read, the dW1b/dW2b block
        partials), G at 1/GEMM_BF16_F32_SPEEDUP for bf16 where ``gemm_bf16_f32`` is fast. For a
        float32/float64 x the torch kernels' prices, whose plans were the fastest measured there.
        Measured, one decoder layer's projections, 1024 tokens, AMX Xeon (bench/NOTES.md
        "Session 12"): bf16 autocast r = 8 (dense, dense, factored) 53 ms over the frozen layers
        against 91 ms for all factored, r = 16 all dense; fp32 r = 8 all factored 61 ms against
        66-77 ms with a dense forward, r = 16 (dense, dense or factored, factored)."""
        if dtype not in (torch.bfloat16, torch.float16):
            return DenseCosts()
        gram = 1.0 / GEMM_BF16_F32_SPEEDUP if GEMM_BF16_F32_FAST and dtype == torch.bfloat16 else 1.0
        return DenseCosts(gram=gram, form_passes=1, grad_passes=3)


class NativeSparse(TorchSparse):
    """Sparse family: y += x·(sΔW)ᵀ and dx += gy·(sΔW) by the native SpMM (accumulating into the
    frozen GEMM's output, no n×out temporary), dv by the native SDDMM; the rest is
    :class:`TorchSparse`'s."""

    @staticmethod
    def operand(t, cd):
        return t  # the native ops read x and gy in their own dtype

    @staticmethod
    def spmm_t_acc(out, ptr, idx, v, n_cols, z):
        ops.sparse_spmm_csr_t_acc(out, ptr, idx, v, z)
        return out

    @staticmethod
    def sddmm(row_ptr, col, gy, x2d, cd):
        a, b = (gy, x2d) if x2d.dtype == cd or cd != torch.float64 else (gy.to(cd), x2d.to(cd))
        return ops.sparse_sddmm_csr(row_ptr, col, a, b)


class NativeDoRA(TorchDoRA):
    """DoRA (``families/lowrank_dora.py``) with the native ops: the column scale folded into y in
    one pass (``dora_scale_epilogue``), gy read once for c ⊙ gy and the magnitude gradient's
    column sums (``dora_grad_prologue``), and the native Philox mask (peft's base(drop(x)) needs
    drop(x) itself, a transient). CPU kernels; on CUDA tensors the torch versions run."""

    @staticmethod
    def scaled_epilogue(xw, u, B, s, c, shift):
        if xw.device.type != "cpu":
            return TorchDoRA.scaled_epilogue(xw, u, B, s, c, shift)
        ops.dora_scale_epilogue(xw, u, B, s, c, shift)
        return xw

    @staticmethod
    def grad_prologue(gy2d, c, y):
        if gy2d.device.type != "cpu":
            return TorchDoRA.grad_prologue(gy2d, c, y)
        g, colsum, coldot = ops.dora_grad_prologue(gy2d, c, y)
        return g, colsum, None if y is None else coldot

    # Dropout > 0 on CPU: peft's x̃·Wᵀ (x̃ = drop(x)) without a second frozen GEMM. With the
    # dropped entries x_d = x ⊙ (1 − mask) (density p, a CSR built from the seed's mask),
    # x̃·Wᵀ = (x·Wᵀ − x_d·Wᵀ) / (1 − p): one frozen GEMM plus a native SpMM of p·n·in nonzeros;
    # u = x̃·Aᵀ from the same CSR, (x·Aᵀ − x_d·Aᵀ) / (1 − p) (the forward makes the mask once).
    # Backward likewise: dx = gy·W + drop'(((c−1)⊙gy)·W + t·A)
    #                       = (c₁ ⊙ gy)·W + drop(t·A) − SDDMM_dropped((c−1)⊙gy, W) / (1 − p),
    # c₁ = (c − p)/(1 − p); and dm from the saved output y = (c − p) ⊙ x̃·Wᵀ + x_d·Wᵀ + b + L
    # (L = c ⊙ s·(u·Bᵀ + b_B)), x_d·Wᵀ recomputed by the SpMM: x̃·Wᵀ = (y − …)/(c − p), which
    # amplifies y's rounding by 1/(c − p). A call with any c − p < SPARSE_MIN_GAP (never near
    # peft's init c = 1 at p ≤ 0.3) takes the torch kernels' path (one more frozen GEMM).
    SPARSE_MIN_GAP = 0.5

    # u = x·Aᵀ and t = s·(c ⊙ gy)·B stay MKL's (not native_rank_nt_mm): with skinny_mm's
    # running sum over k (at k = 32, below its 64-step blocks, twice MKL's rounding) one-step
    # gradients of a fp32 DoRA model were 1.17× peft's error (median over tensors; 5× the
    # worst) against 0.88× with MKL's, and a 4-step AdamW Trainer run ended one weight beyond
    # the rule. A bf16 x or gy (autocast) is read as it is by bf16x3 where that serves
    # (MKL's bf16 GEMM, float32 sums: bf16x3_serves), not converted to a float32 n-sized copy.
    @staticmethod
    def operand(t, cd):
        return t if bf16x3_serves(t, cd) else t.to(cd)

    @staticmethod
    def nt_mm(a, b):
        return mixed_rank_nt_mm(a, b) if bf16x3_serves(a, b.dtype) else a @ b.t()

    @staticmethod
    def t_mm(a, b):
        return mixed_rank_t_mm(a, b) if bf16x3_serves(b, a.dtype) else native_rank_t_mm(a, b)

    @classmethod
    def _sparse_ok(cls, x2d, weight, p, c) -> bool:
        """The dropped-set path: the default at p > 0 on CPU (``PYPEFT_FAST_DORA_DM`` unset or
        ``sparse``; ``saved``/``recompute`` run the torch kernels' sources), for a frozen W in the
        accumulation dtype (a bf16 W — a bf16 base, or autocast's cast — would need a weight-sized
        converted copy for the SpMM; those calls run the "saved" source, whose frozen GEMMs run in
        W's dtype as peft's do). Under bf16 autocast the path was tried with the float32 W (the
        norm's, in aux) for its sparse products: 1.19× and 1.18× slower than the saved source's two
        bf16 GEMMs at 1024 → 1024 and 1024 → 2752, 0.97× at 2752 → 1024 (1024 tokens, AVX512-BF16
        CPU, bench/NOTES.md "Session 11"): not taken. Not under torch.compile: the path is
        data-dependent (the c − p check, the CSR of the dropped entries from ``nonzero``), so a
        compiled graph runs the "saved" source too — the same numbers to rounding, peft's second
        frozen GEMM (README "torch.compile")."""
        return (x2d.device.type == "cpu" and p > 0.0 and not torch.compiler.is_compiling()
                and weight.dtype == c.dtype
                and os.environ.get("PYPEFT_FAST_DORA_DM", "sparse") in ("", "sparse")
                and bool(((c - p).abs() >= cls.SPARSE_MIN_GAP).all()))

    @staticmethod
    def _dropped_times_wt(x2d, weight, dropped, cd):
        """x_d·Wᵀ (n, out), contiguous, in ``cd`` (W's dtype: ``_sparse_ok``): the native SpMM
        over the dropped entries' CSR, accumulated into zeros through its transposed view (the
        kernel then adds rows of tokens, no transposing store)."""
        rows, cols, row_ptr = dropped
        q = torch.zeros(x2d.shape[0], weight.shape[0], dtype=cd, device=x2d.device)
        ops.sparse_spmm_csr_t_acc(q.t(), row_ptr, cols, x2d[rows, cols].to(cd), weight)
        return q

    @staticmethod
    def _dropped_csr(x2d, seed, p):
        n, k = x2d.shape
        dropped = ops.philox_keep_mask(seed, n * k, p).view(n, k).logical_not_()
        rows, cols = dropped.nonzero(as_tuple=True)
        row_ptr = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(dropped.sum(1), 0, out=row_ptr[1:])
        return rows, cols, row_ptr

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp):
        scaled = cls.scale(x2d, weight, params, aux, hp)
        cd, Ac, Bc, bBc, norm, c = scaled
        s, p = hp.scaling, hp.dropout
        if not cls._sparse_ok(x2d, weight, p, c):   # the torch kernels' sources, the same norm
            return super().forward(x2d, weight, bias, params, aux, hp, scaled)
        seed = aux[0]
        dropped = cls._dropped_csr(x2d, seed, p)   # the mask, once for both products below
        q = cls._dropped_times_wt(x2d, weight, dropped, cd)
        u = (x2d.to(cd) @ Ac.t()).sub_(cls._dropped_times_wt(x2d, Ac, dropped, cd)).div_(1 - p)
        c1 = (c - p) / (1 - p)
        # y = c₁ ⊙ (x·Wᵀ − ((c−1)/(c−p)) ⊙ x_d·Wᵀ + s·u·(B ⊙ c/c₁)ᵀ) + b + c ⊙ s·b_B
        acc = F.linear(x2d, weight).to(cd)
        acc.addcmul_(q, -(c - 1) / (c - p))
        shift = None if bias is None else bias.to(cd)
        if bBc is not None:
            shift = c * (s * bBc) if shift is None else shift + c * (s * bBc)
        y = cls.scaled_epilogue(acc, u, Bc * (c / c1).unsqueeze(1), s, c1, shift).to(x2d.dtype)
        return y, (u, norm, weight, y, None if bias is None else bias.to(cd), None)

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        u, norm, *kept = extras
        if len(kept) != 4:  # not the dropped-set forward
            return super().backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx,
                                    needs_dparams)
        A, B, m = params[:3]
        b_B = params[3] if len(params) > 3 else None
        # W as forward kept it: the ``weight`` argument is a shape-only stand-in when x needs
        # no gradient (function.py), and dm reads W's data through x_d·Wᵀ
        w_kept, y, b, _ = kept
        cd = u.dtype
        s, p, seed = hp.scaling, hp.dropout, aux[0]
        Ac, Bc, mc = A.to(cd), B.to(cd), m.to(cd)
        c = mc / norm
        need_dA, need_dB, need_dm = needs_dparams[:3]
        g, colsum, coldot = cls.grad_prologue(gy2d, c, y)
        gyc = gy2d.to(cd)
        dropped = cls._dropped_csr(x2d, seed, p)
        rows, cols, row_ptr = dropped
        dx = dA = dB = dm = dbB = None
        if needs_dx or need_dA:
            t = (g @ Bc).mul_(s)                                      # (n, r)
            if needs_dx:
                dx = (gyc * ((c - p) / (1 - p))).to(gy2d.dtype) @ weight   # (c₁ ⊙ gy)·W
                g2w = ops.sparse_sddmm_csr(row_ptr, cols, (gyc * (c - 1)).to(weight.dtype).t(), weight)
                dx.index_put_((rows, cols), (g2w / -(1 - p)).to(dx.dtype), accumulate=True)
            dA = ops.lowrank_dropout_bwd(t, x2d, Ac, seed, p, dx, bool(need_dA))
            dA = dA.to(A.dtype) if need_dA else None
        P = cls.t_mm(u, gyc).t() if (need_dB or need_dm) else None   # (out, r)
        if need_dB:
            dB = (P * (c * s).unsqueeze(1)).contiguous().to(B.dtype)
        if b_B is not None and needs_dparams[3]:
            dbB = (colsum * c * s).to(b_B.dtype)
        if need_dm:
            q = cls._dropped_times_wt(x2d, w_kept, dropped, cd)
            lora = s * (P * Bc).sum(1)                                # Σᵢ gy ⊙ s·u·Bᵀ
            if b_B is not None:
                lora = lora + s * b_B.to(cd) * colsum
            acc = coldot - (q * gyc).sum(0) - c * lora               # Σ gy ⊙ (y − x_d·Wᵀ − L)
            if b is not None:
                acc = acc - b * colsum
            dm = ((acc / (c - p) + lora) / norm).to(m.dtype)         # Σ gy ⊙ (x̃·Wᵀ + s·(u·Bᵀ + b_B))
        return dx, (dA, dB, dm) + ((dbB,) if b_B is not None else ())

    @staticmethod
    def dropped(x2d, seed, p):
        return ops.philox_dropout(x2d, seed, p)

    @classmethod
    def masked(cls, h, seed, p):
        if h.device.type != "cpu":
            return TorchDoRA.masked(h, seed, p)
        return ops.philox_dropout(h, seed, p)

    @classmethod
    def dropped_t_x(cls, t, x2d, A, seed, p):
        if x2d.device.type != "cpu":
            return TorchDoRA.dropped_t_x(t, x2d, A, seed, p)
        return torch.ops.pypeft_fast.lowrank_dropout_dA(t, x2d, A, seed, p)

    @staticmethod
    def keep(seed, n, k, p, device):
        if device.type != "cpu":
            return keep_rows(seed, n, k, p, device=device)
        return ops.philox_keep_mask(seed, n * k, p).view(n, k)


@torch.library.custom_op("pypeft_fast::lowrank_dropout_dA", mutates_args=())
def lowrank_dropout_dA(t: torch.Tensor, x: torch.Tensor, A: torch.Tensor, seed: torch.Tensor,
                       p: float) -> torch.Tensor:
    """``dA = tᵀ·drop(x)`` (r, in) when no dx is needed: ``lowrank_dropout_bwd`` with ``dx=None``
    behind an op without a mutable argument. Inductor cannot lower that op's optional in-place
    ``dx`` when it is None (torch 2.13: ``InductorError: AssertionError: <built-in function
    getitem> is not an OpOverload``, the first adapted layer of a model, whose input needs no
    gradient); this op is opaque to it."""
    return ops.lowrank_dropout_bwd(t, x, A, seed, p, None, True)


@lowrank_dropout_dA.register_fake
def _(t, x, A, seed, p):
    return A.new_empty(A.shape)


_NO_MASK_SEED = torch.zeros((), dtype=torch.int64)
"""The seed argument of the fused dropout ops at p = 0, where no mask is made (unused)."""


def _reads_mixed(act: torch.Tensor, factor_dtype: torch.dtype) -> bool:
    """Whether the p = 0 fused ops take an activation ``act`` (bf16/fp16, as autocast hands it)
    with factors in ``factor_dtype`` (float32/float64): CPU, a dtype pair the ops convert a row
    block at a time."""
    return (act.device.type == "cpu" and act.dtype != factor_dtype and act.is_floating_point()
            and act.dtype != torch.float64 and factor_dtype in (torch.float32, torch.float64))


def bf16x3_serves(act: torch.Tensor, factor_dtype: torch.dtype) -> bool:
    """Whether a rank product of a bf16 activation ``act`` with float32 operands runs as
    ``gemm_bf16_f32`` with the float32 operand split exactly into three bf16 parts (bf16x3): on a
    CPU where the bf16 GEMM is fast (:data:`GEMM_BF16_F32_FAST`: AMX). Session 15's Xeon, 2
    threads, 1024 tokens, r = 16: u = x·Aᵀ 0.13 against 0.22 ms for ``lowrank_dropout_down``
    at k = 1024 (0.38 against 0.56 at 2752), dA = tᵀ·x 0.19 against 0.20 (0.44 against 0.59)
    (bench/NOTES.md "Session 15"). float32 sums of exact products, like the native kernels;
    float64 factors keep the native kernels (three bf16 parts hold 24 bits, not 53)."""
    return (GEMM_BF16_F32_FAST and act.device.type == "cpu" and act.dtype == torch.bfloat16
            and factor_dtype == torch.float32)


def mixed_rank_nt_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·bᵀ`` (n, r) in b's dtype for an activation a (n, k) in a narrower dtype and a factor b
    (r, k): bf16x3 where it serves (:func:`bf16x3_serves`), else ``lowrank_dropout_down`` at
    p = 0 (a converted in cache, no n × k copy)."""
    if bf16x3_serves(a, b.dtype):
        return ops.gemm_bf16_f32(a, b.t())
    return ops.lowrank_dropout_down(a, b, _NO_MASK_SEED, 0.0)


def mixed_rank_t_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ·b`` (r, k) in a's dtype for a skinny a (n, r) and an activation b (n, k) in a narrower
    dtype: bf16x3 where it serves, else ``lowrank_dropout_dA`` at p = 0 (its A argument only
    gives the shape and dtype)."""
    if bf16x3_serves(b, a.dtype):
        return ops.gemm_bf16_f32(a.t(), b)
    return torch.ops.pypeft_fast.lowrank_dropout_dA(a, b, a.new_empty((a.shape[1], b.shape[1])),
                                                    _NO_MASK_SEED, 0.0)


class NativeLowRank(TorchLowRank):
    """Low-rank family: the token sums dA = tᵀ·drop(x) and dB = (uᵀ·gy)ᵀ by the native
    ``skinny_t_mm``, u = x·Aᵀ and t = gy·B by ``skinny_mm``; with dropout the mask is generated
    inside the kernels that read x (forward ``u = drop(x)·Aᵀ``; backward one mask for both
    ``dx += drop(t·A)`` and ``dA = tᵀ·drop(x)``).
    The rest of the delta and the frozen layer are :class:`TorchLowRank`'s. DoRA runs
    :class:`NativeDoRA`. Declined (``supports``): parallel adapters (activation, gate)."""

    VARIANTS = {"dora": NativeDoRA}

    @staticmethod
    def operand(t, cd):
        """x and gy as they are where the rank products read them in their own dtype (CPU,
        bf16/fp16 beside float32 factors: autocast, a bf16 base), else converted."""
        return t if _reads_mixed(t, cd) else t.to(cd)

    @staticmethod
    def nt_mm(a, b):
        return mixed_rank_nt_mm(a, b) if _reads_mixed(a, b.dtype) else native_rank_nt_mm(a, b)

    @staticmethod
    def t_mm(a, b):
        return mixed_rank_t_mm(a, b) if _reads_mixed(b, a.dtype) else native_rank_t_mm(a, b)

    @staticmethod
    def update_into(out, a, b, alpha=1.0):
        """``out + α·a@b`` (y + s·u·Bᵀ, dx + t·A); a bf16/fp16 ``out`` updated in place by
        ``lowrank_dropout_bwd`` at p = 0 (summed in float32, rounded once, no float32 copy of it)."""
        if not _reads_mixed(out, a.dtype) or alpha == 0 or out.stride(-1) != 1:
            return addmm_into(out, a, b, alpha=alpha)
        ops.lowrank_dropout_bwd(a if alpha == 1.0 else a * alpha, out, b, _NO_MASK_SEED, 0.0,
                                out, False)
        return out

    @staticmethod
    def supports(x, weight, params, aux, hp) -> str | None:
        """Declines parallel adapters (activation/gate)."""
        if hp.variant == "adapter":
            return "adapter (activation/gate): the native low-rank kernels have no parallel-adapter path"
        if hp.variant == "dora":
            return NativeDoRA.supports(x, weight, params, aux, hp)
        return None

    @classmethod
    def down(cls, x2d, Ac, aux, hp):
        if hp.dropout == 0.0:
            return super().down(x2d, Ac, aux, hp)
        return ops.lowrank_dropout_down(x2d, Ac, aux[0], hp.dropout)

    @classmethod
    def dropout_grads(cls, dx, t, x2d, Ac, aux, hp, need_dA):
        if hp.dropout == 0.0:
            if (dx is not None and need_dA and _reads_mixed(x2d, Ac.dtype)
                    and not bf16x3_serves(x2d, Ac.dtype)):  # one op for both
                return dx, ops.lowrank_dropout_bwd(t, x2d, Ac, _NO_MASK_SEED, 0.0, dx, True)
            return super().dropout_grads(dx, t, x2d, Ac, aux, hp, need_dA)
        if dx is None:  # dA alone (see lowrank_dropout_dA)
            return None, torch.ops.pypeft_fast.lowrank_dropout_dA(t, x2d, Ac, aux[0], hp.dropout)
        dA = ops.lowrank_dropout_bwd(t, x2d, Ac, aux[0], hp.dropout, dx, need_dA)
        return dx, dA if need_dA else None


class NativeKroneckerFoldedA(TorchKroneckerFoldedA):
    """B as rank-k factors with A folded (``families/kronecker.py``: Compacter's PHM at rank 1),
    a rank a_out·h·k LoRA whose products are :class:`NativeLowRank`'s: the native
    ``skinny_mm``/``skinny_t_mm`` where they are measured faster (MKL otherwise), a bf16/fp16 x
    and dx read and updated in their own dtype by the fused ops (autocast)."""

    nt_mm = staticmethod(NativeLowRank.nt_mm)
    t_mm = staticmethod(NativeLowRank.t_mm)
    update_into = staticmethod(NativeLowRank.update_into)
    operand = staticmethod(NativeLowRank.operand)


class NativeKronecker(DeltaKernels):
    """Kronecker and PHM families: y += s·Σₕ (Aₕ ⊗ Bₕ)·x a token at a time by the native
    structured apply (each token's small products in cache, ΔW never formed), accumulated into
    the frozen GEMM's output; one native pass for dx, dA and dB.

    B as rank-k factors with A folded (``folds_A``) runs :class:`NativeKroneckerFoldedA`.

    Declined (``supports``; auto then runs the torch path's kernels, both exact): a dense B stack
    larger than ``MAX_B_ELEMENTS`` — there the per-token products stream B from memory for every
    token and the torch path's one GEMM over all tokens wins — and B given as rank-k factors (S, T)
    that do not fold, which ``apply_kronecker`` keeps factored when ``prefers_factored``: the dense
    B would not be served natively, or its multiply-adds exceed ``DENSE_OVER_FACTORED`` × the
    factored ones. Both limits were measured per CPU (bench/NOTES.md "Kronecker on AVX2"): on an
    AVX-512 Xeon the native dense products ran 2.5× as many multiply-adds per second as the factored
    path's skinny GEMMs and beat the torch path up to 32 K B values; on an AVX2 EPYC (32-byte
    vectors) about as many, and the crossover is ≈ 16 K. On CUDA also a token's U = A·X tile
    (ao·h·bi values) must fit the kernel's shared memory."""

    MAX_B_ELEMENTS = 32768 if _AVX512 else 16384  # h·bo·bi; the measured crossover
    DENSE_OVER_FACTORED = 2.0 if _AVX512 else 1.0
    CUDA_SHARED_BYTES = 48 * 1024  # kMaxSharedBytes in csrc/kronecker/kronecker_cuda.cu (checked there too)

    @classmethod
    def prefers_factored(cls, A3_shape, b_shape, k) -> bool:
        dense, factored = macs_per_row(A3_shape, b_shape, k)
        fits = A3_shape[0] * b_shape[0] * b_shape[1] <= cls.MAX_B_ELEMENTS
        return not fits or dense > cls.DENSE_OVER_FACTORED * factored

    @classmethod
    def supports(cls, x, weight, params, aux, hp) -> str | None:
        """Declines B as rank-k factors that do not fold, a B stack over MAX_B_ELEMENTS, on CUDA
        a U tile over the shared memory."""
        A3 = params[0]
        h, ao = A3.shape[0], A3.shape[1]
        if len(params) == 3:
            S, T = params[1:]
            k, b_shape = S.shape[2], (S.shape[1], T.shape[2])
            if folds_A(A3.shape, k):
                return None
            dense, factored = macs_per_row(A3.shape, b_shape, k)
            n_b = h * b_shape[0] * b_shape[1]
            why = (f"the dense B stack would have {n_b} elements > MAX_B_ELEMENTS = {cls.MAX_B_ELEMENTS}"
                   if n_b > cls.MAX_B_ELEMENTS else
                   f"forming B costs {dense} multiply-adds per row > {cls.DENSE_OVER_FACTORED:g}× "
                   f"the factored {factored}")
            return f"B as rank-{k} factors (S, T), kept factored ({why}): the native kernels take a dense B"
        B3 = params[1]
        if B3.numel() > cls.MAX_B_ELEMENTS:
            return (f"a B stack of {B3.numel()} elements > MAX_B_ELEMENTS = {cls.MAX_B_ELEMENTS} "
                    "(per-token products streaming B lose to the torch path's one GEMM)")
        tile = h * ao * B3.shape[2] * 8
        if x.device.type == "cuda" and tile > cls.CUDA_SHARED_BYTES:
            return (f"a U = A·X tile of {tile} bytes > the CUDA kernel's {cls.CUDA_SHARED_BYTES} "
                    "bytes of shared memory")
        return None

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp):
        if len(params) == 3:  # B as rank-k factors, A folded (supports)
            return NativeKroneckerFoldedA.forward(x2d, weight, bias, params, aux, hp)
        return super().forward(x2d, weight, bias, params, aux, hp)

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        if len(params) == 3:
            return NativeKroneckerFoldedA.backward(gy2d, x2d, weight, params, aux, extras, hp,
                                                   needs_dx, needs_dparams)
        return super().backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams)

    @staticmethod
    def delta_forward(y, pre, x2d, params, aux, hp):
        A3, B3 = params
        cd = compute_dtype(x2d, A3, B3)
        ops.kronecker_apply_acc(y, x2d, A3.to(cd), B3.to(cd), hp.scaling)
        return y, ()

    @staticmethod
    def delta_backward(dx, gy2d, x2d, params, aux, extras, hp, needs_dparams):
        A3, B3 = params
        need_dA, need_dB = needs_dparams
        cd = compute_dtype(x2d, A3, B3)
        dA, dB = ops.kronecker_apply_bwd(gy2d, x2d, A3.to(cd), B3.to(cd), hp.scaling, dx,
                                        bool(need_dA), bool(need_dB))
        return dx, (dA.to(A3.dtype) if need_dA else None, dB.to(B3.dtype) if need_dB else None)


def _cpp_probe(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpp kernels run on CPU tensors (use backend='cuda' or 'auto' on {device.type})"
    return None


def _cuda_probe(device: torch.device) -> str | None:
    if not WITH_CUDA:
        return "pypeft_fast._C was built without CUDA kernels (CPU-only torch, no nvcc, or PYPEFT_FAST_SKIP_CUDA=1)"
    if device.type != "cuda":
        return "the cuda kernels run on CUDA tensors"
    return None


registry.register_availability("cpp", _cpp_probe)
registry.register_availability("cuda", _cuda_probe)


def cpp_auto_families(capability: str) -> frozenset[str]:
    """Families for which ``auto`` picks the cpp kernels on a CPU whose torch capability
    (``torch.backends.cpu.get_cpu_capability()``) is ``capability``: where bench/NOTES.md
    measured them faster than the torch path.

    AVX-512 (a Xeon) and AVX2 (an AMD EPYC): all five, since the sparse and Kronecker loops run
    32-byte vectors on AVX2 (csrc/common/cpu_width.h; with the 64-byte vectors they had before,
    sparse ran at 0.5× and Kronecker at 1/20–1/80 of the torch path there; hadamard's 32-byte
    loops were measured on the AVX-512 Xeon with PYPEFT_FAST_CPU_VECTOR_BYTES=32). Per call the
    Kronecker kernels still decline what they would lose (``NativeKronecker.supports``: the
    limits are per CPU). Elsewhere (baseline x86-64, other architectures: not measured) lowrank
    only; there ``auto`` keeps the others on torch and says so once, and ``backend="cpp"``
    still runs them."""
    cap = capability.upper()
    if cap.startswith("AVX512") or cap.startswith("AVX2"):
        return frozenset({"lowrank", "sparse", "kronecker", "phm", "hadamard"})
    return frozenset({"lowrank"})


_CPP_AUTO = cpp_auto_families(CPU_CAPABILITY)
for _family in ("sparse", "kronecker", "phm", "hadamard"):
    if _family not in _CPP_AUTO:
        log.info("pypeft_fast %s: auto keeps the torch path on this %s CPU (the cpp kernels were "
                 "not measured faster here; backend='cpp' still runs them)", _family, CPU_CAPABILITY)

# auto=True only where bench/ measured the cpp kernels faster than the torch path on CPU
# (bench/NOTES.md "csrc (C++/CUDA)"; 2-core Xeon AVX-512, fp32, n = 1024, llama-1024 shapes):
# bench/bench_sparse.py, 1 thread: SpMM fwd 2.5-5.2x, SpMM bwd 4.1-5.2x, SDDMM 3.1-4.0x faster
# than torch.sparse (2 threads, attn: SDDMM 13.4 -> 3.25 ms, 4.1x); sparse_linear fwd+bwd over
# the frozen layer: attn +44 % vs +121 %, up +5 % vs +57 %.
registry.register_kernels("sparse", "cpp", NativeSparse, auto="sparse" in _CPP_AUTO)
# bench/bench_lowrank.py, r = 16, p = 0.05, attn: mask 9x, u = drop(x)·Aᵀ 15.3 -> 1.49 ms,
# backward 32.9 -> 2.63 ms (1 thread); lowrank_linear fwd+bwd over the frozen layer (2 threads)
# +20 % vs +124 % for the torch path (+3 % without dropout). Dropout 0: the native token sums
# (skinny_t_mm, bench/NOTES.md).
registry.register_kernels("lowrank", "cpp", NativeLowRank, auto=True)
# bench/bench_kronecker.py, bench/bench_phm.py: see the registration of kronecker below.
registry.register_kernels("kronecker", "cpp", NativeKronecker, auto="kronecker" in _CPP_AUTO)
registry.register_kernels("phm", "cpp", NativeKronecker, auto="phm" in _CPP_AUTO)
# bench/NOTES.md "Session 12": the dense form's passes 3-10x faster than the torch path's.
registry.register_kernels("hadamard", "cpp", NativeHadamard, auto="hadamard" in _CPP_AUTO)
if WITH_CUDA:
    # Not measured on a GPU yet: the Triton kernels stay auto's choice on CUDA.
    registry.register_kernels("sparse", "cuda", NativeSparse, auto=False)
    registry.register_kernels("lowrank", "cuda", NativeLowRank, auto=False)
    registry.register_kernels("kronecker", "cuda", NativeKronecker, auto=False)
    registry.register_kernels("phm", "cuda", NativeKronecker, auto=False)
