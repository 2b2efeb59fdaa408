"""PHM (Compacter) micro-benchmark: frozen layer vs materialised Σ kron vs our backends.

Compacter's configuration: n = 4 terms, A (4, 4, 4) shared "slow" rule matrices, B as rank-k
"fast" weights S (4, out/4, k) @ T (4, k, in/4) (`--rank 0` forms B densely instead).

    python bench/bench_phm.py [--rank 1] [--shapes llama-1024/attn ...]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAPES, available_backends, run_family_bench  # noqa: E402

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.families.phm import delta_weight  # noqa: E402

N_TERMS = 4


def make_for(rank):
    def make(s):
        h = N_TERMS
        bo, bi = s.out_f // h, s.in_f // h
        x = torch.randn(s.n, s.in_f, requires_grad=True)
        W = torch.randn(s.out_f, s.in_f) / s.in_f**0.5
        A = torch.randn(h, h, h, requires_grad=True)
        if rank:
            B = (torch.randn(h, bo, rank, requires_grad=True), torch.randn(h, rank, bi, requires_grad=True))
        else:
            B = torch.randn(h, bo, bi, requires_grad=True)
        P = (A, B)
        calls = {"frozen": lambda x, P: F.linear(x, W),
                 "materialise": lambda x, P: F.linear(x, W) + F.linear(x, delta_weight(*P, 0.5))}
        for b in available_backends("phm"):
            calls[b] = lambda x, P, b=b: pf.phm_linear(x, W, None, *P, 0.5, b)
        return x, W, P, calls
    return make


def flops_for(rank):
    def flops(s, P):
        h = N_TERMS
        if rank:  # k·h·(in + a_out·a_in + out) multiply-adds per row, forward; backward ≈ 2.5×
            return 2 * s.n * rank * h * (s.in_f + h * h + s.out_f) * 3.5
        return 2 * s.n * h * h * (s.in_f // h) * (h + s.out_f // h) * 3.5
    return flops


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--rank", type=int, default=1)
    args = ap.parse_args()
    run_family_bench("phm", make_for(args.rank), args.shapes,
                     ["frozen", "materialise", "torch", "cpp", "triton", "cuda"], flops_for(args.rank))
