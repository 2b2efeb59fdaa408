"""Kronecker family (KronA, KAdaptation, peft LoKr): ΔW = s·(A ⊗ B), and the sum-of-Kronecker
apply it shares with the ``phm`` family (:mod:`.phm`, ΔW = s·Σₕ Aₕ ⊗ Bₕ; Kronecker is h = 1).

A: (a_out, a_in), B: (b_out, b_in) with out = a_out·b_out, in = a_in·b_in. Either factor may be a
low-rank pair (L, R) meaning L @ R (LoKr's w1_a/w1_b, w2_a/w2_b).

The apply, for ΔW = s·Σₕ Aₕ ⊗ Bₕ with A: (h, a_out, a_in), B: (h, b_out, b_in):
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
    dB_colsᵀ = Uᵀ @ gY                (h·b_in, b_out)              (U recomputed, not saved)

Saved: x and the factors only. FLOPs per row of x: forward 2·h·a_out·b_in·(a_in + b_out);
backward about twice that.

B as rank-k factors (S, T) has two forms, chosen by ``factored_kernels``: A folded into T, a
rank a_out·h·k LoRA while that rank keeps x @ Rᵀ bound by reading x (``TorchKroneckerFoldedA``,
Compacter's PHM), else the chain X·Tᵀ → A → S (``TorchKroneckerFactoredB``, LoKr's w2_a/w2_b).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import registry
from ..validate import check_base, check_same_device, check_scaling, compute_dtype, fail
from ._accumulate import add_into, addmm_into, rank_nt_mm, rank_t_mm
from .factors import check_factor, compose_factor, factor_shape, factor_tensors
from .lowrank import TorchLowRank


@dataclass(frozen=True)
class KroneckerHP:
    scaling: float


def stacked_factors(A3, B3, dtype, scaling):
    """``A_rows`` (a_out·h, a_in) scaled by s and ``B_cols`` (b_out, h·b_in), in ``dtype``."""
    h, a_out, a_in = A3.shape
    _, b_out, b_in = B3.shape
    A_rows = (A3.to(dtype) * scaling).transpose(0, 1).reshape(a_out * h, a_in)
    B_cols = B3.to(dtype).transpose(0, 1).reshape(b_out, h * b_in)
    return A_rows, B_cols


def _apply_A(A_rows, X3, out=None):
    """U = A_rows @ Xₙ for every row n: (n, a_out·h, b_in). ``bmm`` on an expanded (stride-0)
    A: torch.matmul's 2-D @ 3-D path would first copy A n times."""
    return torch.bmm(A_rows.expand(X3.shape[0], *A_rows.shape), X3, out=out)


def torch_kronecker_acc(y, x2d, A3, B3, scaling):
    """y (n, out) + x·(s·Σₕ Aₕ ⊗ Bₕ)ᵀ with the torch ops above (in place where the dtypes allow;
    returns the result). The torch twin of the native ``kronecker_apply_acc``."""
    h, a_out, a_in = A3.shape
    _, b_out, b_in = B3.shape
    n = x2d.shape[0]
    cd = compute_dtype(x2d, A3, B3)
    A_rows, B_cols = stacked_factors(A3, B3, cd, scaling)
    U = _apply_A(A_rows, x2d.to(cd).reshape(n, a_in, b_in))
    y = addmm_into(y.view(n * a_out, b_out), U.view(n * a_out, h * b_in), B_cols.t())
    return y.view(n, a_out * b_out)


def torch_kronecker_bwd(gy2d, x2d, A3, B3, scaling, dx, need_dA, need_dB):
    """(dx + gy·(s·Σₕ Aₕ ⊗ Bₕ) if dx is given, dA, dB): the torch twin of the native
    ``kronecker_apply_bwd`` (dx updated in place where the dtypes allow). U is recomputed into
    V's memory once V is used: one fresh n-sized temporary fewer (each costs its page faults
    as well as its pass, bench/NOTES.md)."""
    h, a_out, a_in = A3.shape
    _, b_out, b_in = B3.shape
    n = x2d.shape[0]
    cd = compute_dtype(x2d, A3, B3)
    A_rows, B_cols = stacked_factors(A3, B3, cd, 1.0)
    X3 = x2d.to(cd).reshape(n, a_in, b_in)
    gY = gy2d.to(cd).reshape(n * a_out, b_out)
    dA = dB = V = None
    if dx is not None or need_dA:
        V = (gY @ (B_cols * scaling)).view(n, a_out * h, b_in)
    if dx is not None:
        At = A_rows.t().expand(n, a_in, a_out * h)
        if dx.dtype == cd:
            dx.view(n, a_in, b_in).baddbmm_(At, V)
        else:
            dx = add_into(dx, torch.bmm(At, V).view(n, a_in * b_in))
    if need_dA:
        dA_rows = torch.bmm(V, X3.transpose(1, 2)).sum(0)  # Σₙ Vₙ·Xₙᵀ
        dA = dA_rows.view(a_out, h, a_in).transpose(0, 1).to(A3.dtype)
    if need_dB:
        U = _apply_A(A_rows * scaling, X3, out=V)  # V is no longer needed
        dB_rows = U.view(n * a_out, h * b_in).t() @ gY  # (h·b_in, b_out): Uᵀ·gY, the fast side
        dB = dB_rows.view(h, b_in, b_out).transpose(1, 2).to(B3.dtype)
    return dx, dA, dB


class TorchKronecker:
    """Dense factors: params (A (h, a_out, a_in), B (h, b_out, b_in))."""

    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        return torch_kronecker_acc(F.linear(x2d, weight, bias), x2d, *params, hp.scaling), ()

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        dx = gy2d @ weight if needs_dx else None
        dx, dA, dB = torch_kronecker_bwd(gy2d, x2d, *params, hp.scaling, dx, *needs_dparams)
        return dx, (dA, dB)


class TorchKroneckerFactoredB:
    """B given as rank-k factors Bₕ = Sₕ·Tₕ (Compacter's fast weights, LoKr's w2_a/w2_b), kept
    factored: params (A (h, a_out, a_in), S (h, b_out, k), T (h, k, b_in)).

    With T_rows[(h,c), l] = T[h,c,l] (a view of T) and S_cols[m, (h,c)] = s·S[h,m,c]::

        Z  = X (n·a_in, b_in) @ T_rowsᵀ             (n, a_in, h, k)       one GEMM
        M[n,i,h,c] = Σⱼ A[h,i,j] Z[n,j,h,c]         (n, a_out, h, k)      bmm on an expanded A (h = 1)
        Y += M (n·a_out, h·k) @ S_colsᵀ             one GEMM into y

    Backward (G = gY @ S_cols, s folded into the factor, never a pass over an n-sized tensor):
    dS_colsᵀ = Mᵀ·gY, dZ = Σᵢ A[h,i,j] G[n,i,h,c], dA = Σₙ,c G·Z, dX += dZ @ T_rows (one GEMM into
    dx), dT_rows = dZᵀ·X — the reductions over n written as ``Mᵀ·gY``, ``dZᵀ·X`` (the forms
    ``gYᵀ·M``, ``Xᵀ·dZ`` ran up to 8× slower on the AVX2 CPU, bench/NOTES.md). Z and M are
    recomputed. Cost per row: k·h·(in + a_out·a_in + out) multiply-adds instead of
    h·a_out·b_in·(a_in + b_out) with B formed.
    """

    @staticmethod
    def _rows_cols(S3, T3, dtype, scaling):
        """S_cols (b_out, h·k) scaled by s and T_rows (h·k, b_in), in ``dtype``."""
        h, b_out, k = S3.shape
        S_cols = (S3.to(dtype) * scaling).transpose(0, 1).reshape(b_out, h * k)
        return S_cols, T3.to(dtype).reshape(h * k, T3.shape[2])

    @staticmethod
    def _small_A(A3, Z, n, transpose=False):
        """M[n,i,h,c] = Σⱼ A[h,i,j]·Z[n,j,h,c] for Z (n·a_in, h·k) (with Aᵀ: from (n·a_out, h·k));
        returns (n·rows, h·k). h = 1: ``bmm`` on A expanded over n (no copies); else einsum."""
        h = A3.shape[0]
        A3 = A3.transpose(1, 2) if transpose else A3
        _, rows, inner = A3.shape
        hk = Z.shape[1]
        if h == 1:
            return torch.bmm(A3[0].expand(n, rows, inner), Z.view(n, inner, hk)).view(n * rows, hk)
        M = torch.einsum("hij,njhc->nihc", A3, Z.view(n, inner, h, hk // h))
        return M.reshape(n * rows, hk)

    @classmethod
    def _ZM(cls, x2d, A3, T_rows, dtype):
        """Z (n·a_in, h·k) and M (n·a_out, h·k)."""
        n, a_in = x2d.shape[0], A3.shape[2]
        Z = x2d.to(dtype).reshape(n * a_in, -1) @ T_rows.t()
        return Z, cls._small_A(A3.to(dtype), Z, n)

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp):
        A3, S3, T3 = params
        a_out, b_out = A3.shape[1], S3.shape[1]
        n = x2d.shape[0]
        cd = compute_dtype(x2d, *params)
        S_cols, T_rows = cls._rows_cols(S3, T3, cd, 1.0)
        _, M = cls._ZM(x2d, A3, T_rows, cd)
        y = F.linear(x2d, weight, bias)
        y = addmm_into(y.view(n * a_out, b_out), M, S_cols.t(), alpha=hp.scaling)
        return y.view(n, a_out * b_out), ()

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        A3, S3, T3 = params
        h, a_out, a_in = A3.shape
        b_out, k, b_in = S3.shape[1], S3.shape[2], T3.shape[2]
        n = x2d.shape[0]
        need_dA, need_dS, need_dT = needs_dparams
        cd = compute_dtype(x2d, *params)
        S_cols, T_rows = cls._rows_cols(S3, T3, cd, hp.scaling)
        gY = gy2d.to(cd).reshape(n * a_out, b_out)
        Z, M = cls._ZM(x2d, A3, T_rows, cd)
        G = gY @ S_cols  # (n·a_out, h·k), s inside S_cols
        dx = dA = dS = dT = None
        if need_dS:
            dS_rows = (M.t() @ gY).mul_(hp.scaling)  # (h·k, b_out), factor-sized
            dS = dS_rows.view(h, k, b_out).transpose(1, 2).to(S3.dtype)
        if need_dA:
            if h == 1:  # Σₙ Gₙ·Zₙᵀ: one bmm, then a sum over n
                dA = torch.bmm(G.view(n, a_out, k), Z.view(n, a_in, k).transpose(1, 2)).sum(0)
                dA = dA.unsqueeze(0).to(A3.dtype)
            else:
                dA = torch.einsum("nihc,njhc->hij", G.view(n, a_out, h, k).double(),
                                  Z.view(n, a_in, h, k).double()).to(A3.dtype)
        if needs_dx or need_dT:
            dZ = cls._small_A(A3.to(cd), G, n, transpose=True)  # (n·a_in, h·k)
            if needs_dx:
                dx = gy2d @ weight
                dx = addmm_into(dx.view(n * a_in, b_in), dZ, T_rows).view(n, a_in * b_in)
            if need_dT:
                dT_rows = dZ.t() @ x2d.to(cd).reshape(n * a_in, b_in)  # (h·k, b_in)
                dT = dT_rows.view(h, k, b_in).to(T3.dtype)
        return dx, (dA, dS, dT)


class TorchKroneckerFoldedA:
    """B as rank-k factors with A folded into T: ΔW = s·Σₕ Aₕ ⊗ (Sₕ·Tₕ) is the rank-r (r = a_out·h·k)
    product L·R with

        R[(i,h,c), (j,l)] = A[h,i,j]·T[h,c,l]       (r, in): factor-sized, formed per call
        L = I_a_out ⊗ [s·S₁ … s·S_h]                 kept structured (S_cols, b_out × h·k)

    so the apply is a LoRA of rank r whose up-projection is the Kronecker-structured S::

        u  = x @ Rᵀ                                  (n, r) = (n·a_out, h·k)   one GEMM (reads x)
        Y += u (n·a_out, h·k) @ S_colsᵀ              one GEMM into y

    Backward (G = gY @ S_cols, (n·a_out, h·k) = (n, r)): dx += G @ R, dR = Gᵀ·x, dS_colsᵀ = uᵀ·gY
    (u recomputed), and dA, dT from dR by a factor-sized einsum — LoRA's passes (x, gy twice each,
    dx once), no n-batched small products. Chosen over :class:`TorchKroneckerFactoredB` while
    r ≤ ``FOLD_MAX_RANK`` (``folds_A``): there x @ Rᵀ is bound by reading x, like the factored
    path's first GEMM, and the n-batched A product and its copies are gone (Compacter's PHM,
    n = 4, rank 1: r = 16). Cost per row: h·k·a_out·(in + b_out) multiply-adds.

    The skinny products go through ``nt_mm`` (a·bᵀ, b of r rows: x·Rᵀ, gY·S_cols), ``t_mm`` (aᵀ·b
    over tokens: uᵀ·gY, Gᵀ·x) and ``update_into`` (y + u·S_colsᵀ, dx + G·R), with x as ``operand``
    gives it: :class:`~.lowrank.TorchLowRank`'s forms, so that the cpp backend runs them as LoRA's
    (``native.NativeKroneckerFoldedA``: a bf16 x or dx under autocast read and updated in its own
    dtype, no converted n × in copy). gY·S_cols reads S_cols column-major (bᵀ of a row-major (h·k,
    b_out) copy): MKL ran the row-major S_cols 3.4× slower at h·k = 4 (bench/NOTES.md "Session 11").
    """

    nt_mm = staticmethod(rank_nt_mm)
    t_mm = staticmethod(rank_t_mm)
    update_into = staticmethod(addmm_into)
    operand = staticmethod(TorchLowRank.operand)

    @staticmethod
    def _R(A3, T3, dtype):
        h, a_out, a_in = A3.shape
        k, b_in = T3.shape[1], T3.shape[2]
        R = torch.einsum("hij,hcl->ihcjl", A3.to(dtype), T3.to(dtype))
        return R.reshape(a_out * h * k, a_in * b_in)

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp):
        A3, S3, T3 = params
        a_out, b_out = A3.shape[1], S3.shape[1]
        n = x2d.shape[0]
        cd = compute_dtype(x2d, *params)
        S_cols, _ = TorchKroneckerFactoredB._rows_cols(S3, T3, cd, 1.0)
        u = cls.nt_mm(cls.operand(x2d, cd), cls._R(A3, T3, cd))
        y = F.linear(x2d, weight, bias)
        y = cls.update_into(y.view(n * a_out, b_out), u.view(n * a_out, -1), S_cols.t(),
                            alpha=hp.scaling)
        return y.view(n, -1), ()

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        A3, S3, T3 = params
        h, a_out, a_in = A3.shape
        b_out, k = S3.shape[1], S3.shape[2]
        b_in = T3.shape[2]
        n = x2d.shape[0]
        need_dA, need_dS, need_dT = needs_dparams
        cd = compute_dtype(x2d, *params)
        S_cols, _ = TorchKroneckerFactoredB._rows_cols(S3, T3, cd, hp.scaling)
        R = cls._R(A3, T3, cd)
        xc = cls.operand(x2d, cd)
        gY = gy2d.to(cd).reshape(n * a_out, b_out)  # converted: MKL's GEMM takes gY·S_cols (r = h·k)
        G = cls.nt_mm(gY, S_cols.t().contiguous()).view(n, a_out * h * k)  # s inside S_cols
        dx = dA = dS = dT = None
        if need_dS:
            u = cls.nt_mm(xc, R).view(n * a_out, h * k)
            dS_rows = cls.t_mm(u, gY).mul_(hp.scaling)  # (h·k, b_out), factor-sized
            dS = dS_rows.view(h, k, b_out).transpose(1, 2).to(S3.dtype)
        if need_dA or need_dT:
            dR = cls.t_mm(G, xc).view(a_out, h, k, a_in, b_in)
            if need_dA:
                dA = torch.einsum("ihcjl,hcl->hij", dR, T3.to(cd)).to(A3.dtype)
            if need_dT:
                dT = torch.einsum("ihcjl,hij->hcl", dR, A3.to(cd)).to(T3.dtype)
        if needs_dx:
            dx = cls.update_into(gy2d @ weight, G, R)
        return dx, (dA, dS, dT)


# x @ Rᵀ with R (r, in) stays bound by reading x up to about this rank: 2 cores × 2 FMA × 8 lanes
# per cycle against ≈ 10 GB/s is ≈ 30 multiply-adds per float read (bench/NOTES.md, issue 14).
FOLD_MAX_RANK = 32


def folds_A(A3_shape, k) -> bool:
    """Rank-k B runs :class:`TorchKroneckerFoldedA` (A folded into T, a rank a_out·h·k LoRA)
    rather than :class:`TorchKroneckerFactoredB`."""
    h, a_out, _ = A3_shape
    return a_out * h * k <= FOLD_MAX_RANK


def factored_kernels(A3_shape, k):
    """The torch kernels for B as rank-k factors (S, T) at this A shape."""
    return TorchKroneckerFoldedA if folds_A(A3_shape, k) else TorchKroneckerFactoredB


def macs_per_row(A3_shape, b_shape, k) -> tuple[int, int]:
    """Multiply-adds per row of x, forward: (B formed densely, B kept as rank-k factors)."""
    h, a_out, a_in = A3_shape
    b_out, b_in = b_shape
    dense = h * a_out * b_in * (a_in + b_out)
    factored = h * k * (a_in * b_in + a_out * a_in + a_out * b_out)
    return dense, factored


def factored_is_cheaper(A3_shape, b_shape, k) -> bool:
    """Factored B costs fewer multiply-adds than B formed densely (see the classes above)."""
    dense, factored = macs_per_row(A3_shape, b_shape, k)
    return factored < dense


class TorchKroneckerKernels:
    """The torch path for both parameter layouts: 2 params (A, B) or 3 (A, S, T)."""

    # Kernels that accept B as (S, T) say when they want it kept factored; without this hook
    # B = S @ T is formed (factor-sized) and the dense kernels run.
    prefers_factored = staticmethod(factored_is_cheaper)

    @staticmethod
    def _impl(params):
        if len(params) == 3:
            return factored_kernels(params[0].shape, params[1].shape[2])
        return TorchKronecker

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp):
        return cls._impl(params).forward(x2d, weight, bias, params, aux, hp)

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        return cls._impl(params).backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx,
                                          needs_dparams)


def apply_kronecker(family, where, x, weight, bias, A3, B, scaling, backend):
    """Runs ``family``'s kernels on A3 (h, a_out, a_in) and B — a tensor (h, b_out, b_in) or a
    pair (S (h, b_out, k), T (h, k, b_in)), kept factored when the first candidate backend's
    kernels prefer it (``prefers_factored``), else formed (factor-sized, never ΔW-sized); then
    the registry's routing picks the kernels that serve those params."""
    from .. import registry
    from ..function import delta_linear
    from .factors import factor_product

    options = registry.candidates(family, backend, x.device)
    hp = KroneckerHP(scaling)
    params = (A3, B)
    if isinstance(B, tuple):
        S, T = B
        prefers = getattr(options[0][1], "prefers_factored", None)
        if prefers is not None and prefers(A3.shape, (S.shape[1], T.shape[2]), S.shape[2]):
            params = (A3, S, T)
        else:
            params = (A3, factor_product(S, T))
    kernels = registry.choose(family, options, where, x, weight, params, (), hp,
                              registry.is_explicit(backend))
    return delta_linear(kernels, hp, len(params), x, weight, bias, *params)


FAMILY = "kronecker"


def delta_weight(A, B, scaling: float = 1.0) -> torch.Tensor:
    """Materialised ΔW = s·kron(A, B) (pairs composed). Reference, tests and merging only."""
    A = A[0] @ A[1] if isinstance(A, (tuple, list)) else A
    B = B[0] @ B[1] if isinstance(B, (tuple, list)) else B
    return torch.kron(A, B) * scaling


registry.register_family(FAMILY, delta_weight)
registry.register_kernels(FAMILY, "torch", TorchKroneckerKernels)


def kronecker_linear(x, weight, bias, A, B, scaling=1.0, backend="auto", *, name=None):
    """``y = x·Wᵀ + b + x·(s·A⊗B)ᵀ``; x: (..., in), weight: (out, in) frozen; A, B or pairs."""
    where = name or "kronecker_linear"
    out_f, in_f = check_base(where, x, weight, bias)
    check_same_device(where, x=x, weight=weight, bias=bias,
                      **{f"A[{i}]": t for i, t in enumerate(factor_tensors(A))},
                      **{f"B[{i}]": t for i, t in enumerate(factor_tensors(B))})
    A = compose_factor(where, "A", A)  # A is the small factor: form it
    B = check_factor(where, "B", B)    # B may stay factored (see kronecker.apply_kronecker)
    (a_out, a_in), (b_out, b_in) = A.shape, factor_shape(B)
    if a_out * b_out != out_f or a_in * b_in != in_f:
        fail(where, f"A {tuple(A.shape)} ⊗ B {(b_out, b_in)} gives ({a_out * b_out}, {a_in * b_in}); "
                    f"expected weight's shape ({out_f}, {in_f})")
    scaling = check_scaling(where, scaling)
    B3 = (B[0].unsqueeze(0), B[1].unsqueeze(0)) if isinstance(B, tuple) else B.unsqueeze(0)
    return apply_kronecker(FAMILY, where, x, weight, bias, A.unsqueeze(0), B3, scaling, backend)
