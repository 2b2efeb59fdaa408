"""Triton path vs peft-style eager composition vs the frozen GEMM alone, on a CUDA GPU.

    python bench/bench_triton_gpu.py                 # time every family at every layer shape
    python bench/bench_triton_gpu.py --roofline      # FLOP/byte counts and H100/H200 predictions

Mode ``full`` = forward + backward of one adapted layer, W frozen (dx and the delta gradients;
no weight gradient). Providers:

* ``frozen``: ``F.linear`` forward + ``gy·W`` backward only — the floor, zero adapter cost;
* ``peft``: peft's eager composition (LoRA: base + B(A(dropout(x)))·s; LoKr/PHM: base +
  F.linear(x, ΔW) with ΔW = s·Σ kron(Aᵢ, Bᵢ) materialised; SHiRA: ΔW scattered dense);
* ``triton``: ``pypeft_fast.<family>_linear(..., backend="triton")``.

Timing: CUDA events, median of ``--reps`` runs after warm-up, inputs rotated over
``--rotate`` sets (so x, gy are not L2-resident from the previous run). Goal: triton / frozen
≤ 1.10. Without a CUDA GPU it says so and exits 0 (``--roofline`` still works). Rows record
device, versions and date.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, environment, print_table  # noqa: E402

# Peak numbers (dense, no sparsity): H100 SXM 989 TFLOP/s bf16 tensor, 67 TFLOP/s fp32 FMA,
# 3.35 TB/s HBM3; H200 the same compute and 4.8 TB/s HBM3e.
GPUS = {"H100": dict(tc=989e12, fma=67e12, bw=3.35e12), "H200": dict(tc=989e12, fma=67e12, bw=4.8e12)}
R, DROPOUT, DENSITY, BN = 16, 0.05, 0.01, 128
KRON = {  # (a_out, a_in), (b_out, b_in) per layer shape: LoKr's factorisation
    "llama-1024/attn": ((32, 32), (32, 32)),
    "llama-1024/up": ((43, 32), (64, 32)),
    "llama-1024/down": ((32, 43), (32, 64)),
}
PHM_H = 4


# ------------------------------------------------------------------------------- roofline

def kernel_costs(family: str, shape_key: str) -> list[tuple[str, float, float, str]]:
    """(kernel, FLOPs issued, DRAM bytes, unit) per launch of one fwd+bwd, bf16 operands.
    unit: "tc" (tensor-core MMA) or "fma" (CUDA-core fp32)."""
    s = SHAPES[shape_key]
    n, k, o = s.n, s.in_f, s.out_f
    e = 2  # bytes per bf16 element
    rows = []
    if family == "lowrank":
        r = R
        rows += [
            ("u = drop(x)·Aᵀ (skinny, Philox 1/8 el.)", 2 * n * k * r, e * n * k + 4 * n * r, "tc"),
            ("y = x·Wᵀ + s·u·Bᵀ (GEMM, loaded u)", 2 * n * k * o + 2 * n * r * o,
             e * (n * k + o * k + n * o) + 4 * n * r, "tc"),
            ("bwd, one kernel: dx = gy·W + drop'(s·gy·B·A), t in K-loop, dA (epilogue), "
             "dB (K-loop), atomics",
             2 * n * o * k + 2 * n * o * r * -(-k // BN) + 4 * n * r * k + 2 * n * o * r,
             e * (n * o + o * k + 2 * n * k) + 4 * (2 * n * r + k * r + o * r), "tc"),
        ]
    elif family in ("kronecker", "phm"):
        (ao, ai), (bo, bi) = KRON[shape_key]
        h = 1 if family == "kronecker" else PHM_H
        per_tile = max(1, -(-BN // bo))  # block-rows i per output tile: epilogue MMAs issued
        per_tile_dx = max(1, -(-BN // bi))
        U = 4 * n * ao * h * bi
        rows += [
            ("U = s·A·Xₙ (strided matmul)", 2 * n * h * ao * ai * bi, e * n * k + U, "tc"),
            ("y = x·Wᵀ + Σ U·B (GEMM epilogue)", 2 * n * k * o + 2 * n * o * h * bi * per_tile,
             e * (n * k + o * k + n * o) + U, "tc"),
            ("G = s·Aᵀ·gYₙ", 2 * n * h * ai * ao * bo, e * n * o + 4 * n * ai * h * bo, "tc"),
            ("dx = gy·W + Σ G·B (GEMM epilogue)", 2 * n * o * k + 2 * n * k * h * bo * per_tile_dx,
             e * (n * o + o * k + n * k) + 4 * n * ai * h * bo, "tc"),
            ("V = s·gY·B", 2 * n * ao * bo * h * bi, e * n * o + U, "tc"),
            ("dA = Σ V·Xᵀ", 2 * n * h * ao * bi * ai, U + e * n * k, "tc"),
            ("U again; dB = Σ gYᵀ·U", 2 * n * h * ao * ai * bi + 2 * n * ao * bo * h * bi,
             e * n * k + 2 * U + e * n * o, "tc"),
        ]
    elif family == "sparse":
        nnz = int(DENSITY * k * o)
        walk = -(-n // 128) * nnz * (8 + 8 + e)  # CSR col/perm/value per M tile
        rows += [
            ("y = x·(W + s·ΔW)ᵀ (W tiles + CSR walk)", 2 * n * k * o,
             e * (n * k + o * k + n * o) + walk, "tc"),
            ("dx = gy·(W + s·ΔW) (W tiles + CSC walk)", 2 * n * o * k,
             e * (n * o + o * k + n * k) + walk, "tc"),
            # blocked SDDMM: one dense gyᵀ·x block (128 × 64) per block of ΔW holding entries
            # (a 1 % random mask leaves none empty), then a gather of the block's entries
            ("dv = block SDDMM (gyᵀ·x blocks + gather)",
             2 * n * o * k * _nonempty_fraction(nnz, o, k), e * (n * k + n * o) + nnz * 24, "tc"),
        ]
    return rows


def _nonempty_fraction(nnz: int, o: int, k: int, bo: int = 128, bi: int = 64) -> float:
    """Expected fraction of ΔW's bo × bi blocks holding an entry of a uniform random mask."""
    blocks = -(-o // bo) * -(-k // bi)
    return 1.0 - (1.0 - 1.0 / blocks) ** nnz


def frozen_costs(shape_key: str) -> tuple[float, float]:
    s = SHAPES[shape_key]
    n, k, o = s.n, s.in_f, s.out_f
    return 4 * n * k * o, 2 * 2 * (n * k + o * k + n * o)


def predict(flops: float, nbytes: float, unit: str, gpu: str) -> float:
    g = GPUS[gpu]
    return max(flops / g[unit], nbytes / g["bw"])


def roofline_markdown() -> str:
    out = []
    for fam in ("lowrank", "kronecker", "phm", "sparse"):
        out.append(f"\n#### {fam}\n")
        out.append("| shape | kernel | GFLOP | MB | H100 µs | H200 µs |")
        out.append("|---|---|---|---|---|---|")
        for key in SHAPES:
            tot = {"H100": 0.0, "H200": 0.0}
            for name, fl, by, unit in kernel_costs(fam, key):
                t = {g: predict(fl, by, unit, g) for g in GPUS}
                for g in GPUS:
                    tot[g] += t[g]
                out.append(f"| {key.split('/')[1]} | {name} | {fl / 1e9:.3f} | {by / 1e6:.1f} | "
                           f"{t['H100'] * 1e6:.1f} | {t['H200'] * 1e6:.1f} |")
            ff, fb = frozen_costs(key)
            fz = {g: 2 * predict(ff / 2, fb / 2, "tc", g) for g in GPUS}
            out.append(f"| {key.split('/')[1]} | **total** (frozen fwd+bwd: {fz['H100'] * 1e6:.1f} / "
                       f"{fz['H200'] * 1e6:.1f} µs) | | | **{tot['H100'] * 1e6:.1f}** "
                       f"({tot['H100'] / fz['H100']:.2f}×) | **{tot['H200'] * 1e6:.1f}** "
                       f"({tot['H200'] / fz['H200']:.2f}×) |")
    return "\n".join(out)


# ------------------------------------------------------------------------------- timing

def setup(family: str, shape_key: str, dtype, device, rotate: int):
    """One setup factory per family: (inputs list, {provider: fn(inp) -> y}, params)."""
    import pypeft_fast as pf
    s = SHAPES[shape_key]
    n, k, o = s.n, s.in_f, s.out_f
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *sh, scale=1.0: (torch.randn(*sh, generator=g) * scale).to(device, dtype)  # noqa: E731
    W = rnd(o, k, scale=k ** -0.5)
    inputs = [(rnd(n, k).requires_grad_(True), rnd(n, o)) for _ in range(rotate)]
    if family == "lowrank":
        A = rnd(R, k, scale=k ** -0.5).requires_grad_(True)
        B = rnd(o, R, scale=0.1).requires_grad_(True)
        drop = torch.nn.Dropout(DROPOUT)
        params = (A, B)
        fns = {
            "peft": lambda x: F.linear(x, W) + F.linear(F.linear(drop(x), A), B) * 2.0,
            "triton": lambda x: pf.lowrank_linear(x, W, None, A, B, 2.0, DROPOUT, None, "triton"),
        }
    elif family in ("kronecker", "phm"):
        (ao, ai), (bo, bi) = KRON[shape_key]
        h = 1 if family == "kronecker" else PHM_H
        A = rnd(h, ao, ai, scale=0.1).requires_grad_(True)
        B = rnd(h, bo, bi, scale=0.1).requires_grad_(True)
        params = (A, B)
        dw = lambda: sum(torch.kron(A[i], B[i]) for i in range(h))  # noqa: E731
        if family == "kronecker":
            tri = lambda x: pf.kronecker_linear(x, W, None, A[0], B[0], 1.0, "triton")  # noqa: E731
        else:
            tri = lambda x: pf.phm_linear(x, W, None, A, B, 1.0, "triton")  # noqa: E731
        fns = {"peft": lambda x: F.linear(x, W) + F.linear(x, dw()), "triton": tri}
    elif family == "sparse":
        nnz = int(DENSITY * k * o)
        flat = torch.randperm(o * k, generator=g)[:nnz]
        idx = torch.stack([flat // k, flat % k]).to(device)
        v = rnd(nnz, scale=0.01).requires_grad_(True)
        params = (v,)

        def shira(x):  # peft SHiRA: a sparse COO ΔW made dense, then F.linear
            dw = torch.sparse_coo_tensor(idx, v, (o, k)).to_dense()
            return F.linear(x, W + dw)
        fns = {"peft": shira,
               "triton": lambda x: pf.sparse_linear(x, W, None, v, idx, 1.0, "triton")}
    else:
        raise ValueError(family)
    fns["frozen"] = lambda x: F.linear(x, W)
    return inputs, fns, params


def time_full(fn, inputs, params, reps: int, warmup: int = 5) -> float:
    """Median ms of forward+backward, inputs rotated."""
    def step(i):
        x, gy = inputs[i % len(inputs)]
        x.grad = None
        for p in params:
            p.grad = None
        fn(x).backward(gy)
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(i)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="lowrank,kronecker,phm,sparse")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--rotate", type=int, default=8, help="input sets cycled through")
    p.add_argument("--roofline", action="store_true", help="print predictions (no GPU needed)")
    a = p.parse_args(argv)
    if a.roofline:
        print(roofline_markdown())
        return 0
    if not torch.cuda.is_available():
        print("bench_triton_gpu: no CUDA GPU here: nothing to time "
              "(`--roofline` prints the predicted times).")
        return 0
    dtype = getattr(torch, a.dtype)
    env = environment()
    rows = []
    for fam in a.families.split(","):
        for key in a.shapes.split(","):
            inputs, fns, params = setup(fam, key, dtype, torch.device("cuda"), a.rotate)
            t = {prov: time_full(fn, inputs, params if prov != "frozen" else (), a.reps)
                 for prov, fn in fns.items()}
            ff, _ = frozen_costs(key)
            rows.append({"family": fam, "shape": key, "mode": "full", "frozen ms": t["frozen"],
                         "peft ms": t["peft"], "triton ms": t["triton"],
                         "triton/frozen": t["triton"] / t["frozen"],
                         "peft/frozen": t["peft"] / t["frozen"],
                         "frozen TFLOP/s": ff / (t["frozen"] * 1e-3) / 1e12,
                         "goal ≤1.10": "yes" if t["triton"] <= 1.10 * t["frozen"] else "no",
                         **env})
    print_table(rows, ["family", "shape", "frozen ms", "peft ms", "triton ms", "triton/frozen",
                       "peft/frozen", "frozen TFLOP/s", "goal ≤1.10"])
    print(f"\n{env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
