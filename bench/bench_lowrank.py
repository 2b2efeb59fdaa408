"""Low-rank (LoRA) dropout benchmark: the fused native dropout path against the torch path.

Op level, per layer shape (x: (n, in), A: (r, in), t: (n, r), r = 16, p = 0.05), providers side
by side; "nodrop" is the same GEMMs without dropout (the floor the mask must approach):

    mask   drop(x) = x ⊙ keep/(1-p)              torch: philox.dropout_rows (Philox in torch ops)
                                                 cpp:   pypeft_fast::philox_dropout
    down   u = drop(x)·Aᵀ                        FLOPs 2·n·in·r; bytes ≥ 4·n·in (x read once)
           torch: dropout_rows(x) @ Aᵀ           cpp: pypeft_fast::lowrank_dropout_down
    bwd    dx += drop(t·A), dA = tᵀ·drop(x)      FLOPs 4·n·in·r; bytes ≥ 4·3·n·in (x, dx r+w)
           torch: as TorchLowRank.backward       cpp: pypeft_fast::lowrank_dropout_bwd (one mask)

then the layer level: frozen F.linear vs lowrank_linear(dropout=0.05) per backend.

    python bench/bench_lowrank.py [--shapes ...] [--threads N] [--no-layer]
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import ops_and_layer_cli, available_backends, run_op_table  # noqa: E402

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.philox import dropout_rows  # noqa: E402

RANK, P, SCALING = 16, 0.05, 2.0


def op_calls(s):
    x = torch.randn(s.n, s.in_f)
    A = torch.randn(RANK, s.in_f) / s.in_f**0.5
    t = torch.randn(s.n, RANK)
    dx = torch.zeros(s.n, s.in_f)
    seed = torch.tensor(20261122)
    ops = torch.ops.pypeft_fast

    def torch_bwd():
        z = t @ A
        dx.add_(dropout_rows(z, seed, P, out=z))
        return t.t() @ dropout_rows(x, seed, P)

    def nodrop_bwd():
        dx.addmm_(t, A)
        return t.t() @ x

    calls = {
        "mask": {"torch": lambda: dropout_rows(x, seed, P)},
        "down": {"nodrop": lambda: x @ A.t(), "torch": lambda: dropout_rows(x, seed, P) @ A.t()},
        "bwd": {"nodrop": nodrop_bwd, "torch": torch_bwd},
    }
    if hasattr(ops, "lowrank_dropout_down"):
        calls["mask"]["cpp"] = lambda: ops.philox_dropout(x, seed, P)
        calls["down"]["cpp"] = lambda: ops.lowrank_dropout_down(x, A, seed, P)
        calls["bwd"]["cpp"] = lambda: ops.lowrank_dropout_bwd(t, x, A, seed, P, dx, True)
    return calls


def op_cost(op, s):
    elems = s.n * s.in_f
    if op == "mask":
        return 0.0, 8.0 * elems
    if op == "down":
        return 2.0 * elems * RANK, 4.0 * elems
    return 4.0 * elems * RANK, 12.0 * elems


def run_ops(shapes, reps):
    return run_op_table(f"low-rank dropout ops (r={RANK}, p={P})", shapes, lambda s: ({}, op_calls(s)),
                        op_cost, reps, no_ratio=("nodrop",))


def make_layer(s):
    x = torch.randn(s.n, s.in_f, requires_grad=True)
    W = torch.randn(s.out_f, s.in_f) / s.in_f**0.5
    P_ = (torch.randn(RANK, s.in_f).div_(s.in_f**0.5).requires_grad_(),
          torch.randn(s.out_f, RANK).mul_(0.01).requires_grad_())
    calls = {"frozen": lambda x, P_: F.linear(x, W)}
    for b in available_backends("lowrank"):
        calls[b] = lambda x, P_, b=b: pf.lowrank_linear(x, W, None, *P_, SCALING, P, 123, b)
    return x, W, P_, calls


def layer_flops(s, P_):
    return 2.0 * s.n * RANK * (s.in_f + s.out_f) * 3  # fwd (2 GEMMs) + bwd (4 GEMMs)


if __name__ == "__main__":
    ops_and_layer_cli(__doc__, "lowrank", run_ops, make_layer, layer_flops)
