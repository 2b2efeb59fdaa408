"""Kronecker family micro-benchmark: frozen layer vs peft-style materialised ΔW vs our backends.

Factor shapes are peft LoKr's for r = 16 with decompose_factor = -1 (w1 and w2 both dense:
LoKr only factors w2 when r < max(w2 shape) / 2).

    python bench/bench_kronecker.py [--shapes llama-1024/attn ...]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAPES, available_backends, run_family_bench  # noqa: E402

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.families.kronecker import delta_weight  # noqa: E402


def lokr_factorization(dim: int) -> tuple[int, int]:
    """peft's factorization(dim, -1): the divisor pair closest to √dim, smaller first."""
    m = int(dim ** 0.5)
    while dim % m:
        m -= 1
    return m, dim // m


def make(s):
    ao, bo = lokr_factorization(s.out_f)
    ai, bi = lokr_factorization(s.in_f)
    x = torch.randn(s.n, s.in_f, requires_grad=True)
    W = torch.randn(s.out_f, s.in_f) / s.in_f**0.5
    P = (torch.randn(ao, ai, requires_grad=True), torch.randn(bo, bi, requires_grad=True))
    calls = {"frozen": lambda x, P: F.linear(x, W),
             "materialise": lambda x, P: F.linear(x, W) + F.linear(x, delta_weight(*P, 0.5))}
    for b in available_backends("kronecker"):
        calls[b] = lambda x, P, b=b: pf.kronecker_linear(x, W, None, *P, 0.5, b)
    return x, W, P, calls


def flops(s, P):
    (ao, ai), (bo, bi) = P[0].shape, P[1].shape
    fwd = 2 * s.n * ao * bi * (ai + bo)          # U = A·X, Y += U·Bᵀ
    return fwd * 3.5                             # backward: V, dX, dA, U again, dB (5 such halves)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = ap.parse_args()
    run_family_bench("kronecker", make, args.shapes, ["frozen", "materialise", "torch", "cpp", "triton", "cuda"], flops)
