"""Sparse-masked family (SparseAdapter, SHiRA, sparse fine-tuning): ΔW = s·(M ⊙ D).

``values: (nnz,)`` at ``indices: (2, nnz)`` int64 = (row in [0, out), col in [0, in)) — SHiRA's
layout. ΔW is never built:

    forward   y  += s · x @ ΔWᵀ             SpMM over the CSR of ΔW            (2·n·nnz FLOPs)
    backward  dx += s · gy @ ΔW             SpMM over the CSR of ΔWᵀ (the CSC of ΔW)
              dv[e] = s · Σₙ gy[n, row_e] · x[n, col_e]     SDDMM: nnz dot products of length n

The CSR/CSC layout of a mask is built (and the indices validated) once per ``indices`` tensor
and cached; each step only gathers ``values`` into CSR order (nnz elements).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .. import registry
from ..function import delta_linear
from ..validate import (
    check_base, check_same_device, check_scaling, compute_dtype, fail, shape_str,
)
from ._layer import DeltaKernels

FAMILY = "sparse"


@dataclass(frozen=True)
class SparseHP:
    scaling: float
    out_features: int
    in_features: int


@dataclass(frozen=True)
class SparseLayout:
    """CSR of ΔW (rows sorted) and of ΔWᵀ, built once per mask.

    ``csr_perm[k]`` is the position in the user's ``values`` of the k-th CSR entry (likewise
    ``csc_perm``); ``row_ptr (out+1,)``/``csr_col (nnz,)`` and ``col_ptr (in+1,)``/``csc_row``.
    """

    csr_perm: torch.Tensor
    row_ptr: torch.Tensor
    csr_col: torch.Tensor
    csc_perm: torch.Tensor
    col_ptr: torch.Tensor
    csc_row: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.csr_perm, self.row_ptr, self.csr_col, self.csc_perm, self.col_ptr, self.csc_row)

    @property
    def nnz(self) -> int:
        return self.csr_col.numel()


def _compressed(major, minor, n_major, n_minor):
    """Sort entries by (major, minor); returns (perm, ptr (n_major+1,), minor indices sorted)."""
    perm = torch.argsort(major * n_minor + minor)
    # Counts of a static shape (n_major,), not bincount's data-dependent one: torch.compile
    # builds the layout in the graph and would break it there (indices < n_major are validated).
    counts = torch.zeros(n_major, dtype=torch.int64, device=major.device).index_add_(
        0, major, torch.ones_like(major))
    ptr = torch.zeros(n_major + 1, dtype=torch.int64, device=major.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return perm, ptr, minor[perm]


def build_layout(indices: torch.Tensor, out_features: int, in_features: int) -> SparseLayout:
    rows, cols = indices[0], indices[1]
    csr_perm, row_ptr, csr_col = _compressed(rows, cols, out_features, in_features)
    csc_perm, col_ptr, csc_row = _compressed(cols, rows, in_features, out_features)
    return SparseLayout(csr_perm, row_ptr, csr_col, csc_perm, col_ptr, csc_row)


def validate_indices(where: str, indices, out_features: int, in_features: int) -> None:
    if not isinstance(indices, torch.Tensor):
        fail(where, f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        fail(where, f"indices has dtype {indices.dtype}; expected torch.int64")
    if indices.dim() != 2 or indices.shape[0] != 2:
        fail(where, f"indices has shape {shape_str(indices)}; expected (2, nnz) = (rows, cols)")
    if indices.numel() == 0:
        return
    rows, cols = indices[0], indices[1]
    for arg, v, hi in (("rows (indices[0])", rows, out_features), ("cols (indices[1])", cols, in_features)):
        lo_v, hi_v = int(v.min()), int(v.max())
        if lo_v < 0 or hi_v >= hi:
            fail(where, f"{arg} span [{lo_v}, {hi_v}]; expected values in [0, {hi}) for weight "
                        f"({out_features}, {in_features})")
    flat = rows * in_features + cols
    uniq = torch.unique(flat)
    if uniq.numel() != flat.numel():
        fail(where, f"indices hold {flat.numel() - uniq.numel()} duplicated (row, col) entries; "
                    "each position of the mask may appear once")


@dataclass(frozen=True)
class IndicesStamp:
    """What a cache entry built from an indices tensor knows of its contents: the version counter
    (bumped by in-place ops; None for an inference tensor, which has none), the data pointer,
    shape and device — and, for a CPU tensor, a copy of the contents, because writes through
    ``.data`` or ``.numpy()`` bypass the version counter. (On a GPU that comparison would cost a
    device sync per call: there such writes are not detected — README, "Reliability notes".)"""

    key: tuple
    copy: torch.Tensor | None

    @staticmethod
    def of(t: torch.Tensor) -> "IndicesStamp":
        with torch.inference_mode(False):  # a normal tensor even when called in inference mode
            copy = t.clone() if t.device.type == "cpu" else None
        return IndicesStamp(_stamp_key(t), copy)

    def matches(self, t: torch.Tensor) -> bool:
        return self.key == _stamp_key(t) and (self.copy is None or torch.equal(self.copy, t))


def _stamp_key(t: torch.Tensor) -> tuple:
    version = None if t.is_inference() else t._version
    return (version, t.data_ptr(), tuple(t.shape), t.dtype, t.device)


# One validated layout per indices tensor (keyed weakly; rebuilt if the tensor is modified).
_LAYOUTS = WeakIdKeyDictionary()


def layout_for(where: str, indices: torch.Tensor, out_features: int, in_features: int) -> SparseLayout:
    """The cached layout of ``indices`` (validated and rebuilt when they changed). Built outside
    inference mode, so a first call under ``torch.inference_mode()`` caches normal tensors
    that later training steps can use."""
    hit = _LAYOUTS.get(indices)
    if hit is not None and hit[0] == (out_features, in_features) and hit[1].matches(indices):
        return hit[2]
    validate_indices(where, indices, out_features, in_features)
    with torch.inference_mode(False):
        layout = build_layout(indices, out_features, in_features)
    _LAYOUTS[indices] = ((out_features, in_features), IndicesStamp.of(indices), layout)
    return layout


def delta_weight(values, indices, shape, scaling: float = 1.0) -> torch.Tensor:
    """Materialised ΔW (out, in) with ``values`` at ``indices``. Reference, tests, merging only."""
    dw = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return dw.index_put((indices[0], indices[1]), values) * scaling


def _csr(row_ptr, col, val, shape):
    with warnings.catch_warnings():  # torch's one-time "sparse CSR is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(row_ptr, col, val, shape, check_invariants=False)


# --- torch-path primitives, as custom ops so torch.compile sees them through a fake kernel ---

@torch.library.custom_op("pypeft_fast::torch_spmm_csr_t_acc", mutates_args=("out",))
def torch_spmm_csr_t_acc(out: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor,
                         val: torch.Tensor, z: torch.Tensor) -> None:
    """``out += z @ Sᵀ`` in place for S (rows, C) in CSR and dense z (n, C); out: (n, rows).

    Row j of (z·Sᵀ)ᵀ = S·zᵀ is Σₖ val_k · zᵀ[col_k] over row j's entries: an ``embedding_bag``
    (mode "sum", per-sample weights val, one bag per row of S) over the rows of zᵀ, each a
    contiguous length-n vector — gathered whole, where a CSR × dense product over z walks
    z's strided columns (bench/NOTES.md "sparse": ≈ 3× less CPU time at the bench's shapes).
    zᵀ is one transposing copy of z in val's dtype (the accumulation dtype); the sum is rounded
    once to out's dtype."""
    if col.numel() == 0 or z.shape[0] == 0:
        return
    zt = torch.empty((z.shape[1], z.shape[0]), dtype=val.dtype, device=z.device).copy_(z.t())
    st = F.embedding_bag(col, zt, row_ptr, mode="sum", per_sample_weights=val,
                         include_last_offset=True)
    out.add_(st.t().contiguous())  # a tiled transposing copy, then a contiguous add: 2× faster
                                    # than adding the strided view (bench/NOTES.md "sparse")


@torch_spmm_csr_t_acc.register_fake
def _(out, row_ptr, col, val, z):
    return None


@torch.library.custom_op("pypeft_fast::torch_sddmm_csr", mutates_args=())
def torch_sddmm_csr(row_ptr: torch.Tensor, col: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor) -> torch.Tensor:
    """``out[k] = Σₙ a[n, row_k] · b[n, col_k]`` for the CSR entries k: (nnz,)."""
    nnz = col.numel()
    if nnz == 0:
        return a.new_zeros((0,))
    pattern = _csr(row_ptr, col, a.new_zeros(nnz), (a.shape[1], b.shape[1]))
    return torch.sparse.sampled_addmm(pattern, a.t(), b, beta=0.0).values()


@torch_sddmm_csr.register_fake
def _(row_ptr, col, a, b):
    return a.new_empty((col.shape[0],))


class TorchSparse(DeltaKernels):
    """SpMM forward, SpMM + SDDMM backward, through torch's sparse CSR kernels, accumulated into
    the frozen layer's results (:class:`DeltaKernels`). A backend with its own SpMM / SDDMM
    overrides :meth:`operand`, :meth:`spmm_t_acc` and :meth:`sddmm` only."""

    @staticmethod
    def operand(t, cd):
        """x or gy as the SpMM and SDDMM read it (cast once): torch's kernels take one dtype."""
        return t.to(cd)

    @staticmethod
    def spmm_t_acc(out, ptr, idx, v, n_cols, z):
        """``out + z·Sᵀ`` for S (rows, n_cols) in CSR (ptr, idx, v) and z (n, n_cols)."""
        torch.ops.pypeft_fast.torch_spmm_csr_t_acc(out, ptr, idx, v, z)
        return out

    @staticmethod
    def sddmm(row_ptr, col, gy, x2d, cd):
        """``Σₙ gy[n, row_k]·x[n, col_k]`` for the CSR entries k (gy as :meth:`operand` gave it)."""
        return torch.ops.pypeft_fast.torch_sddmm_csr(row_ptr, col, gy, x2d.to(cd))

    @classmethod
    def delta_forward(cls, y, pre, x2d, params, aux, hp):
        (values,) = params
        csr_perm, row_ptr, csr_col, *_ = aux
        cd = compute_dtype(x2d, values)
        # index_select + mul_ (and scatter_ below, not index_copy_): a third of the time of
        # v[perm] * s at 60 K values, the same values (bench/NOTES.md "Session 13")
        v = values.to(cd).index_select(0, csr_perm).mul_(hp.scaling)
        return cls.spmm_t_acc(y, row_ptr, csr_col, v, hp.in_features, cls.operand(x2d, cd)), ()

    @classmethod
    def delta_backward(cls, dx, gy2d, x2d, params, aux, extras, hp, needs_dparams):
        (values,) = params
        csr_perm, row_ptr, csr_col, csc_perm, col_ptr, csc_row = aux
        cd = compute_dtype(x2d, values)
        gy = cls.operand(gy2d, cd)
        dv = None
        if dx is not None:
            v = values.to(cd).index_select(0, csc_perm).mul_(hp.scaling)
            dx = cls.spmm_t_acc(dx, col_ptr, csc_row, v, hp.out_features, gy)
        if needs_dparams[0]:
            g_csr = cls.sddmm(row_ptr, csr_col, gy, x2d, cd)
            dv = torch.empty_like(g_csr).scatter_(0, csr_perm, g_csr).mul_(hp.scaling)
            dv = dv.to(values.dtype)
        return dx, (dv,)


registry.register_family(FAMILY, delta_weight)
registry.register_kernels(FAMILY, "torch", TorchSparse)


def sparse_linear(x, weight, bias, values, indices, scaling=1.0, backend="auto", *, name=None):
    """``y = x·Wᵀ + b + x·(s·M⊙D)ᵀ`` with ``values (nnz,)`` at ``indices (2, nnz)`` int64."""
    where = name or "sparse_linear"
    out_f, in_f = check_base(where, x, weight, bias)
    check_same_device(where, x=x, weight=weight, bias=bias, values=values, indices=indices)
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        fail(where, f"values must be a 1-D tensor (nnz,), got "
                    f"{shape_str(values) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        fail(where, f"values has dtype {values.dtype}; expected a floating dtype")
    if torch.compiler.is_compiling():
        layout = build_layout(indices, out_f, in_f)  # validated and cached in eager mode only
    else:
        layout = layout_for(where, indices, out_f, in_f)
    if values.shape[0] != layout.nnz:
        fail(where, f"values has shape {shape_str(values)}; expected ({layout.nnz},) to match "
                    f"indices {shape_str(indices)}")
    scaling = check_scaling(where, scaling)
    hp = SparseHP(scaling, out_f, in_f)
    aux = layout.tensors()
    kernels = registry.kernels_for(FAMILY, backend, where, x, weight, (values,), aux, hp)
    return delta_linear(kernels, hp, 1, x, weight, bias, values, *aux)
