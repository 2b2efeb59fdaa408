"""Sparse family benchmark: the native (cpp / cuda) SpMM and SDDMM against the torch path.

Two tables, providers side by side in one run:

1. op level — what each backend runs for one layer (S: out×in with nnz = 16·(in+out) entries,
   SHiRA-like random mask; x: (n, in), gy: (n, out)):

       spmm_fwd   y  += x · Sᵀ                    FLOPs 2·n·nnz
       spmm_bwd   dx += gy · S   (CSR of Sᵀ)      FLOPs 2·n·nnz
       sddmm      dv[k] = Σₙ gy[n,row_k]·x[n,col_k]   FLOPs 2·n·nnz

   Bytes (the least each must move, fp32): spmm reads x (n·in) and reads+writes y (2·n·out),
   plus the CSR (12·nnz); sddmm reads gy (n·out) and x (n·in), plus the CSR, and writes nnz.
   torch = pypeft_fast::torch_spmm_csr_t / torch_sddmm_csr (torch.sparse CSR, MKL);
   cpp   = pypeft_fast::sparse_spmm_csr_t_acc / sparse_sddmm_csr (csrc/sparse/).

2. layer level — frozen F.linear vs sparse_linear with each backend, forward / backward / full.

    python bench/bench_sparse.py [--shapes llama-1024/attn ...] [--threads N] [--no-layer]
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import ops_and_layer_cli, available_backends, run_op_table  # noqa: E402

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.families.sparse import build_layout  # noqa: E402


def nnz_of(s) -> int:
    """The benchmark default: nnz = 16·(in + out) per layer (SHiRA/LoRA r=16 parameter parity)."""
    return 16 * (s.in_f + s.out_f)


def make_mask(s, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(s.out_f * s.in_f, generator=g)[: nnz_of(s)]
    return torch.stack([flat // s.in_f, flat % s.in_f])


def op_setup(s, dtype=torch.float32):
    """One setup per shape shared by every provider: (layout, values in CSR/CSC order, x, gy)."""
    idx = make_mask(s)
    L = build_layout(idx, s.out_f, s.in_f)
    v = torch.randn(L.nnz)
    x = torch.randn(s.n, s.in_f, dtype=dtype)
    gy = torch.randn(s.n, s.out_f, dtype=dtype)
    return L, v[L.csr_perm].contiguous(), v[L.csc_perm].contiguous(), x, gy


def op_calls(s):
    L, v_csr, v_csc, x, gy = op_setup(s)
    t = torch.ops.pypeft_fast
    y = torch.empty(s.n, s.out_f)
    dx = torch.empty(s.n, s.in_f)
    calls = {
        "spmm_fwd": {"torch": lambda: y.add_(t.torch_spmm_csr_t(L.row_ptr, L.csr_col, v_csr, s.in_f, x))},
        "spmm_bwd": {"torch": lambda: dx.add_(t.torch_spmm_csr_t(L.col_ptr, L.csc_row, v_csc, s.out_f, gy))},
        "sddmm": {"torch": lambda: t.torch_sddmm_csr(L.row_ptr, L.csr_col, gy, x)},
    }
    if hasattr(t, "sparse_spmm_csr_t_acc"):
        calls["spmm_fwd"]["cpp"] = lambda: t.sparse_spmm_csr_t_acc(y, L.row_ptr, L.csr_col, v_csr, x)
        calls["spmm_bwd"]["cpp"] = lambda: t.sparse_spmm_csr_t_acc(dx, L.col_ptr, L.csc_row, v_csc, gy)
        calls["sddmm"]["cpp"] = lambda: t.sparse_sddmm_csr(L.row_ptr, L.csr_col, gy, x)
    return calls, L.nnz


def op_cost(op, s, nnz, elt=4):
    flops = 2.0 * s.n * nnz
    csr = 12.0 * nnz
    if op == "spmm_fwd":
        byts = elt * (s.n * s.in_f + 2 * s.n * s.out_f) + csr
    elif op == "spmm_bwd":
        byts = elt * (s.n * s.out_f + 2 * s.n * s.in_f) + csr
    else:
        byts = elt * (s.n * s.out_f + s.n * s.in_f + nnz) + csr
    return flops, byts


def run_ops(shapes, reps):
    def calls_of(s):
        calls, nnz = op_calls(s)
        return {"nnz": nnz}, calls
    return run_op_table("sparse ops", shapes, calls_of, op_cost, reps, extra_columns=("nnz",))


def make_layer(s):
    idx = make_mask(s)
    x = torch.randn(s.n, s.in_f, requires_grad=True)
    W = torch.randn(s.out_f, s.in_f) / s.in_f**0.5
    P = (torch.zeros(idx.shape[1]).normal_().requires_grad_(),)
    calls = {"frozen": lambda x, P: F.linear(x, W)}
    for b in available_backends("sparse"):
        calls[b] = lambda x, P, b=b: pf.sparse_linear(x, W, None, P[0], idx, 1.0, b)
    return x, W, P, calls


def layer_flops(s, P):
    return 3 * 2.0 * s.n * P[0].numel()  # spmm fwd + spmm bwd + sddmm


if __name__ == "__main__":
    ops_and_layer_cli(__doc__, "sparse", run_ops, make_layer, layer_flops)
