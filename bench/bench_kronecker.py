"""Kronecker family benchmark: the structured apply, torch path vs native, then the layer.

Factor shapes are peft LoKr's for r = 16 with decompose_factor = -1 (w1 and w2 both dense:
LoKr only factors w2 when r < max(w2 shape) / 2): A (ao, ai), B (bo, bi), per token
X (ai × bi) → Y (ao × bo). Op level (the delta alone, accumulated into y / dx):
    fwd   y += s·A·X·Bᵀ per token          FLOPs 2·n·ao·bi·(ai + bo); bytes ≥ 4·n·(in + 2·out)
          torch: torch_kron_sum_acc         cpp: pypeft_fast::kron_sum_apply_acc
    bwd   dx += s·Aᵀ·G·B, dA, dB            FLOPs 5 × half the forward; bytes ≥ 4·n·(out + 3·in)
          torch: torch_kron_sum_bwd         cpp: pypeft_fast::kron_sum_apply_bwd (one pass)
then the layer level: frozen F.linear vs peft-style materialised ΔW vs kronecker_linear per backend.

    python bench/bench_kronecker.py [--shapes llama-1024/attn ...] [--threads N] [--no-layer]
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import ops_and_layer_cli, available_backends, run_op_table  # noqa: E402

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.families.kron_sum import torch_kron_sum_acc, torch_kron_sum_bwd  # noqa: E402
from pypeft_fast.families.kronecker import delta_weight  # noqa: E402
from pypeft_fast.inject.specs import factorization  # noqa: E402

SCALING = 0.5


def factor_shapes(s):
    (ao, bo), (ai, bi) = factorization(s.out_f), factorization(s.in_f)  # peft LoKr's, -1
    return (ao, ai), (bo, bi)


def op_calls(s):
    (ao, ai), (bo, bi) = factor_shapes(s)
    x, gy = torch.randn(s.n, s.in_f), torch.randn(s.n, s.out_f)
    A, B = torch.randn(1, ao, ai), torch.randn(1, bo, bi)
    y, dx = torch.zeros(s.n, s.out_f), torch.zeros(s.n, s.in_f)
    calls = {"fwd": {"torch": lambda: torch_kron_sum_acc(y, x, A, B, SCALING)},
             "bwd": {"torch": lambda: torch_kron_sum_bwd(gy, x, A, B, SCALING, dx, True, True)}}
    ops = torch.ops.pypeft_fast
    if hasattr(ops, "kron_sum_apply_acc"):
        calls["fwd"]["cpp"] = lambda: ops.kron_sum_apply_acc(y, x, A, B, SCALING)
        calls["bwd"]["cpp"] = lambda: ops.kron_sum_apply_bwd(gy, x, A, B, SCALING, dx, True, True)
    return {"A": f"{ao}x{ai}", "B": f"{bo}x{bi}"}, calls


def op_cost(op, s, A, B):
    (ao, ai), (bo, bi) = factor_shapes(s)
    fwd = 2.0 * s.n * ao * bi * (ai + bo)
    if op == "fwd":
        return fwd, 4.0 * s.n * (s.in_f + 2 * s.out_f)
    return 2.5 * fwd, 4.0 * s.n * (s.out_f + 3 * s.in_f)


def run_ops(shapes, reps):
    return run_op_table("Kronecker structured apply (delta only)", shapes, op_calls, op_cost, reps,
                        extra_columns=("A", "B"))


def make(s):
    (ao, ai), (bo, bi) = factor_shapes(s)
    x = torch.randn(s.n, s.in_f, requires_grad=True)
    W = torch.randn(s.out_f, s.in_f) / s.in_f**0.5
    P = (torch.randn(ao, ai, requires_grad=True), torch.randn(bo, bi, requires_grad=True))
    calls = {"frozen": lambda x, P: F.linear(x, W),
             "materialise": lambda x, P: F.linear(x, W) + F.linear(x, delta_weight(*P, SCALING))}
    for b in available_backends("kronecker"):
        calls[b] = lambda x, P, b=b: pf.kronecker_linear(x, W, None, *P, SCALING, b)
    return x, W, P, calls


def flops(s, P):
    (ao, ai), (bo, bi) = P[0].shape, P[1].shape
    fwd = 2 * s.n * ao * bi * (ai + bo)          # U = A·X, Y += U·Bᵀ
    return fwd * 3.5                             # backward: V, dX, dA, U again, dB (5 such halves)


if __name__ == "__main__":
    ops_and_layer_cli(__doc__, "kronecker", run_ops, make, flops,
                      layer_providers=["frozen", "materialise", "torch", "cpp", "triton", "cuda"])
