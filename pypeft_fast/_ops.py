"""The native ops (``torch.ops.pypeft_fast.*`` from ``csrc/``): schemas and fake kernels, in one place.

Every native op is defined here and only here: :data:`SCHEMAS` holds the schema strings and
:func:`define_ops` defines them (``Library("pypeft_fast", "DEF")``) together with the fake (meta)
kernels that let ``torch.compile`` trace through the ops. C++ only implements them
(``TORCH_LIBRARY_IMPL(pypeft_fast, CPU, m)`` in ``csrc/ops.cpp``, ``..., CUDA, m)`` in the ``.cu``
files). ``pypeft_fast/native.py`` loads ``_C`` first, checks its ABI, then calls
:func:`define_ops`: the dispatcher holds a kernel registered before its schema and checks the
kernel's C++ signature against the schema when the schema arrives, so a ``_C`` whose kernels do
not match these schemas is refused with an ImportError (defining first would make that mismatch
throw inside the library's static initialisers, which aborts the process). Shapes (S: (R, C) in
CSR, nnz stored entries)::

    sparse_spmm_csr_t(row_ptr (R+1,), col (nnz,), val (nnz,), n_cols=C, x (n, C)) -> (n, R)
        x · Sᵀ in val's dtype (float32/float64); x may be any float dtype.
    sparse_spmm_csr_t_acc(out (n, R)!, row_ptr, col, val, x (n, C)) -> ()
        out += x · Sᵀ in place, summed in val's dtype and rounded once to out's dtype.
    sparse_sddmm_csr(row_ptr (R+1,), col (nnz,), a (n, R), b (n, C)) -> (nnz,)
        out[k] = Σₙ a[n, row_k] · b[n, col_k], float64 if a or b is, else float32.
    philox4x32_10(counter (m, 4) int64, key (2,) int64) -> (m, 4) int64      [CPU]
        Random123 Philox4x32-10 on uint32 words held in int64.
    philox_keep_mask(seed 0-d int64, numel, p, start=0) -> (numel,) bool     [CPU]
        pypeft_fast.philox.keep_mask, from csrc/philox/philox.h.
    philox_dropout(x, seed, p, dtype=None) -> like x
        x ⊙ keep / (1-p) over x's row-major flat index, in dtype (default x's).
    lowrank_dropout_down(x (n, in), A (r, in), seed, p) -> u (n, r)
        u = drop(x) · Aᵀ in A's dtype (float32/float64), drop(x) never stored.
    lowrank_dropout_bwd(t (n, r), x (n, in), A (r, in), seed, p, dx (n, in)!?, need_dA) -> dA
        dx += drop(t · A) in place (if dx given); dA = tᵀ · drop(x) (r, in) if need_dA else (0,).
    dora_scale_epilogue(y (n, out)!, u (n, r), B (out, r), scaling, c (out,), shift (out,)?) -> ()
        y = c ⊙ (y + s·u·Bᵀ) + shift in place, summed in u's dtype, rounded once to y's.
    dora_grad_prologue(gy (n, out), c (out,), y (n, out)?) -> (g, colsum, coldot)
        g = c ⊙ gy (n, out), colsum = Σᵢ gyᵢ, coldot = Σᵢ gyᵢ ⊙ yᵢ ((0,) without y), in c's dtype.
    skinny_t_mm(a (n, r), b (n, k)) -> (r, k)                                [CPU]
        aᵀ · b for a skinny a (a rank's columns), both float32 or both float64, unit-stride rows:
        the token-sum of rank-r outer products (LoRA's dA = tᵀ·x, dB = (uᵀ·gy)ᵀ).
    skinny_mm(a (n, k), b (k, r)) -> (n, r)                                  [CPU]
        a · b for a skinny b (a rank's columns), both float32 or both float64, unit-stride rows:
        each token against a low-rank factor (LoRA's u = x·Aᵀ with b = Aᵀ, t = gy·B with b = B).

    kronecker_apply_acc(y (n, ao·bo)!, x (n, ai·bi), A (h, ao, ai), B (h, bo, bi), scaling) -> ()
        y += x · (s·Σₕ Aₕ ⊗ Bₕ)ᵀ in place, ΔW never formed; summed in A's dtype
        (float32/float64), rounded once to y's; x and y may be any float dtype.
    kronecker_apply_bwd(gy (n, ao·bo), x, A, B, scaling, dx (n, ai·bi)!?, need_dA, need_dB) -> (dA, dB)
        dx += gy · (s·Σₕ Aₕ ⊗ Bₕ) in place (if dx given); dA, dB shaped like A, B (each (0,)
        when not asked for), in A's dtype.

    gemm_bf16_f32(a (m, k), b (k, n), alpha=1.0) -> (m, n) float32          [CPU]
        alpha · a·b for bfloat16 a and b (any strides), products and sums in float32: nothing
        rounded (a bf16 product is exact in float32). One of a, b may be float32: it is split
        exactly into three bf16 parts (bf16x3: 3 × 8 significant bits) for one GEMM three times
        as wide, the parts' products summed: the float32 GEMM's accuracy at the bf16 GEMM's
        speed (a bf16 activation times a float32 factor, ``native.bf16x3_serves``).
        MKL's cblas_gemm_bf16bf16f32; raises when the torch it runs in has none
        (``_C.build_info()["mkl_gemm_bf16_f32"]``).

    hadamard_weight(W (out, in), W1a (out, r1), W1b (r1, in), W2a (out, r2), W2b (r2, in), scaling)
            -> (out, in) in W's dtype                                       [CPU]
        W + s·(W1a·W1b)⊙(W2a·W2b), summed in the factors' dtype (float32/float64), rounded once to
        W's; the products are never stored.
    hadamard_factor_grads(G (out, in), W1a, W1b, W2a, W2b) -> (dW1a, dW1b, dW2a, dW2b)  [CPU]
        dW1a = (G⊙M2)·W1bᵀ, dW1b = W1aᵀ·(G⊙M2), dW2a = (G⊙M1)·W2bᵀ, dW2b = W2aᵀ·(G⊙M1) in one
        read of G (M1 = W1a·W1b, M2 = W2a·W2b), in the factors' dtype.

``seed`` is a 0-d int64 CPU tensor; ``p`` in [0, 1). Index tensors are trusted beyond their
shapes: the sparse family validates a mask once, when it builds its layout.
"""
from __future__ import annotations

import torch

from .validate import compute_dtype

ABI_VERSION = 9
"""Matches setup.py's ABI_VERSION, compiled into ``_C.build_info()["abi"]``. Bump both with any
schema change, and whenever the C++ registration changes (5: C++ no longer defines schemas;
6: skinny_t_mm; 7: skinny_mm; 8: gemm_bf16_f32, hadamard_weight, hadamard_factor_grads;
9: gemm_bf16_f32 takes one float32 operand)."""

# The one definition of every native op's schema (C++ only implements them: csrc/README.md).
SCHEMAS = {
    "sparse_spmm_csr_t": "sparse_spmm_csr_t(Tensor row_ptr, Tensor col, Tensor val, int n_cols, Tensor x) -> Tensor",
    "sparse_spmm_csr_t_acc": "sparse_spmm_csr_t_acc(Tensor(a!) out, Tensor row_ptr, Tensor col, Tensor val, Tensor x) -> ()",
    "sparse_sddmm_csr": "sparse_sddmm_csr(Tensor row_ptr, Tensor col, Tensor a, Tensor b) -> Tensor",
    "philox4x32_10": "philox4x32_10(Tensor counter, Tensor key) -> Tensor",
    "philox_keep_mask": "philox_keep_mask(Tensor seed, int numel, float p, int start=0) -> Tensor",
    "philox_dropout": "philox_dropout(Tensor x, Tensor seed, float p, ScalarType? dtype=None) -> Tensor",
    "lowrank_dropout_down": "lowrank_dropout_down(Tensor x, Tensor A, Tensor seed, float p) -> Tensor",
    "lowrank_dropout_bwd": "lowrank_dropout_bwd(Tensor t, Tensor x, Tensor A, Tensor seed, float p, Tensor(a!)? dx, bool need_dA) -> Tensor",
    "dora_scale_epilogue": "dora_scale_epilogue(Tensor(a!) y, Tensor u, Tensor B, float scaling, Tensor c, Tensor? shift) -> ()",
    "dora_grad_prologue": "dora_grad_prologue(Tensor gy, Tensor c, Tensor? y) -> (Tensor, Tensor, Tensor)",
    "skinny_t_mm": "skinny_t_mm(Tensor a, Tensor b) -> Tensor",
    "skinny_mm": "skinny_mm(Tensor a, Tensor b) -> Tensor",
    "kronecker_apply_acc": "kronecker_apply_acc(Tensor(a!) y, Tensor x, Tensor A, Tensor B, float scaling) -> ()",
    "kronecker_apply_bwd": "kronecker_apply_bwd(Tensor gy, Tensor x, Tensor A, Tensor B, float scaling, Tensor(a!)? dx, bool need_dA, bool need_dB) -> (Tensor, Tensor)",
    "gemm_bf16_f32": "gemm_bf16_f32(Tensor a, Tensor b, float alpha=1.) -> Tensor",
    "hadamard_weight": "hadamard_weight(Tensor W, Tensor W1a, Tensor W1b, Tensor W2a, Tensor W2b, float scaling) -> Tensor",
    "hadamard_factor_grads": "hadamard_factor_grads(Tensor G, Tensor W1a, Tensor W1b, Tensor W2a, Tensor W2b) -> (Tensor, Tensor, Tensor, Tensor)",
}


_REBUILD = "rebuild with `pip install --no-build-isolation -e .`"

_LIB: torch.library.Library | None = None
"""The library that owns the definitions (they live as long as it does)."""


def define_ops() -> None:
    """Define every op of :data:`SCHEMAS` with its fake kernel, once; ``_C`` must be loaded.

    Raises ImportError when the loaded ``_C`` does not implement exactly these ops with these
    signatures (a stale build, or a C++ kernel added without its schema here)."""
    global _LIB
    if _LIB is not None:
        return
    try:
        lib = torch.library.Library("pypeft_fast", "DEF")
    except RuntimeError as e:  # something else (an old _C's TORCH_LIBRARY) defines the namespace
        raise ImportError(f"pypeft_fast: the op namespace is already defined ({e}); {_REBUILD}") from e
    try:
        for schema in SCHEMAS.values():
            lib.define(schema)
    except RuntimeError as e:
        lib._destroy()
        raise ImportError(f"pypeft_fast._C does not match pypeft_fast/_ops.py ({e}); stale build? "
                          f"{_REBUILD}") from e
    problems = [f"{name}: no CPU kernel" for name in SCHEMAS
                if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pypeft_fast::{name}", "CPU")]
    problems += [f"{d.splitlines()[0].removeprefix('name: ')}: a kernel without a schema in _ops.py"
                 for d in torch._C._dispatch_find_dangling_impls()
                 if d.startswith("name: pypeft_fast::")]
    if problems:
        lib._destroy()
        raise ImportError("pypeft_fast._C does not match pypeft_fast/_ops.py (stale build?): "
                          + "; ".join(problems) + f"; {_REBUILD}")
    _register_fakes(lib)
    _LIB = lib


def _register_fakes(library: torch.library.Library) -> None:
    """Fake (meta) kernels: output shapes/dtypes, with the C++ checks' shape conditions."""
    lib = "pypeft_fast::"

    def register_fake(qualname):
        return torch.library.register_fake(qualname, lib=library)

    @register_fake(lib + "sparse_spmm_csr_t")
    def _(row_ptr, col, val, n_cols, x):
        torch._check(x.dim() == 2 and x.shape[1] == n_cols,
                     lambda: f"sparse_spmm_csr_t: x has shape {tuple(x.shape)}; expected (n, {n_cols})")
        torch._check(val.shape == col.shape, lambda: "sparse_spmm_csr_t: val and col differ in shape")
        return x.new_empty((x.shape[0], row_ptr.shape[0] - 1), dtype=val.dtype)

    @register_fake(lib + "sparse_spmm_csr_t_acc")
    def _(out, row_ptr, col, val, x):
        torch._check(out.dim() == 2 and out.shape[0] == x.shape[0]
                     and out.shape[1] == row_ptr.shape[0] - 1,
                     lambda: f"sparse_spmm_csr_t_acc: out has shape {tuple(out.shape)}; expected "
                             f"({x.shape[0]}, {row_ptr.shape[0] - 1})")
        return None

    @register_fake(lib + "sparse_sddmm_csr")
    def _(row_ptr, col, a, b):
        torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[0],
                     lambda: f"sparse_sddmm_csr: a {tuple(a.shape)} and b {tuple(b.shape)} "
                             "must be 2-D with the same number of rows")
        torch._check(a.shape[1] == row_ptr.shape[0] - 1,
                     lambda: f"sparse_sddmm_csr: a has shape {tuple(a.shape)}; expected "
                             f"(n, {row_ptr.shape[0] - 1})")
        return a.new_empty((col.shape[0],), dtype=compute_dtype(a, b))

    @register_fake(lib + "philox4x32_10")
    def _(counter, key):
        return torch.empty_like(counter)

    @register_fake(lib + "philox_keep_mask")
    def _(seed, numel, p, start=0):
        return torch.empty((numel,), dtype=torch.bool, device=seed.device)

    @register_fake(lib + "philox_dropout")
    def _(x, seed, p, dtype=None):
        return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)

    @register_fake(lib + "lowrank_dropout_down")
    def _(x, A, seed, p):
        torch._check(x.dim() == 2 and A.dim() == 2 and A.shape[1] == x.shape[1],
                     lambda: f"lowrank_dropout_down: A has shape {tuple(A.shape)} but x has shape "
                             f"{tuple(x.shape)}; expected A: (r, {x.shape[-1]})")
        return x.new_empty((x.shape[0], A.shape[0]), dtype=A.dtype)

    @register_fake(lib + "lowrank_dropout_bwd")
    def _(t, x, A, seed, p, dx, need_dA):
        torch._check(t.shape[0] == x.shape[0] and t.shape[1] == A.shape[0],
                     lambda: f"lowrank_dropout_bwd: t has shape {tuple(t.shape)}; expected "
                             f"({x.shape[0]}, {A.shape[0]})")
        return A.new_empty(A.shape) if need_dA else A.new_empty((0,))

    @register_fake(lib + "dora_scale_epilogue")
    def _(y, u, B, scaling, c, shift):
        torch._check(y.dim() == 2 and u.dim() == 2 and u.shape[0] == y.shape[0]
                     and B.shape[0] == y.shape[1] and B.shape[1] == u.shape[1],
                     lambda: f"dora_scale_epilogue: y {tuple(y.shape)}, u {tuple(u.shape)}, B "
                             f"{tuple(B.shape)}; expected (n, out), (n, r), (out, r)")
        return None

    @register_fake(lib + "dora_grad_prologue")
    def _(gy, c, y):
        torch._check(gy.dim() == 2 and c.shape == (gy.shape[1],),
                     lambda: f"dora_grad_prologue: c has shape {tuple(c.shape)}; expected "
                             f"({gy.shape[-1]},)")
        out = gy.shape[1]
        return (gy.new_empty(gy.shape, dtype=c.dtype), c.new_empty((out,)),
                c.new_empty((out,) if y is not None else (0,)))

    @register_fake(lib + "skinny_t_mm")
    def _(a, b):
        torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[0],
                     lambda: f"skinny_t_mm: a {tuple(a.shape)} and b {tuple(b.shape)} must be 2-D "
                             "with the same number of rows")
        return a.new_empty((a.shape[1], b.shape[1]))

    @register_fake(lib + "skinny_mm")
    def _(a, b):
        torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0],
                     lambda: f"skinny_mm: a {tuple(a.shape)} and b {tuple(b.shape)} must be 2-D "
                             "with a's columns equal to b's rows")
        return a.new_empty((a.shape[0], b.shape[1]))

    @register_fake(lib + "gemm_bf16_f32")
    def _(a, b, alpha=1.0):
        torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0],
                     lambda: f"gemm_bf16_f32: a {tuple(a.shape)} and b {tuple(b.shape)} must be "
                             "2-D with a's columns equal to b's rows")
        return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)

    def _hadamard_check(op, big, W1a, W1b, W2a, W2b):
        o, i = big.shape
        r1, r2 = W1a.shape[1], W2a.shape[1]
        torch._check(tuple(W1a.shape) == (o, r1) and tuple(W1b.shape) == (r1, i)
                     and tuple(W2a.shape) == (o, r2) and tuple(W2b.shape) == (r2, i),
                     lambda: f"{op}: W1a {tuple(W1a.shape)}, W1b {tuple(W1b.shape)}, W2a "
                             f"{tuple(W2a.shape)}, W2b {tuple(W2b.shape)} do not match {tuple(big.shape)}")

    @register_fake(lib + "hadamard_weight")
    def _(W, W1a, W1b, W2a, W2b, scaling):
        _hadamard_check("hadamard_weight", W, W1a, W1b, W2a, W2b)
        return W.new_empty(W.shape)

    @register_fake(lib + "hadamard_factor_grads")
    def _(G, W1a, W1b, W2a, W2b):
        _hadamard_check("hadamard_factor_grads", G, W1a, W1b, W2a, W2b)
        return W1a.new_empty(W1a.shape), W1b.new_empty(W1b.shape), W2a.new_empty(W2a.shape), W2b.new_empty(W2b.shape)

    def _kron_check(op, x, A, B, **acts):
        torch._check(A.dim() == 3 and B.dim() == 3 and A.shape[0] == B.shape[0],
                     lambda: f"{op}: A {tuple(A.shape)} and B {tuple(B.shape)} must be "
                             "(h, ao, ai) and (h, bo, bi)")
        torch._check(x.dim() == 2 and x.shape[1] == A.shape[2] * B.shape[2],
                     lambda: f"{op}: x has shape {tuple(x.shape)}; expected "
                             f"(n, {A.shape[2] * B.shape[2]})")
        for name, (t, cols) in acts.items():
            if t is not None:
                torch._check(t.dim() == 2 and t.shape[0] == x.shape[0] and t.shape[1] == cols,
                             lambda: f"{op}: {name} has shape {tuple(t.shape)}; expected "
                                     f"({x.shape[0]}, {cols})")

    @register_fake(lib + "kronecker_apply_acc")
    def _(y, x, A, B, scaling):
        _kron_check("kronecker_apply_acc", x, A, B, y=(y, A.shape[1] * B.shape[1]))
        return None

    @register_fake(lib + "kronecker_apply_bwd")
    def _(gy, x, A, B, scaling, dx, need_dA, need_dB):
        _kron_check("kronecker_apply_bwd", x, A, B, gy=(gy, A.shape[1] * B.shape[1]),
                    dx=(dx, x.shape[1]))
        return (A.new_empty(A.shape) if need_dA else A.new_empty((0,)),
                B.new_empty(B.shape) if need_dB else B.new_empty((0,)))
