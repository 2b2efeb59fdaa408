"""Roofline predictions for the Triton kernels on an H100 / H200 (no GPU needed).

    python bench/roofline.py [--shapes llama-3-8b/q_proj ...] [--tokens N] [--rank 16]

Per launch of one forward + backward: the FLOPs issued and the DRAM bytes moved (bf16 operands,
fp32 factors and accumulators), each launch predicted at max(FLOPs / peak, bytes / bandwidth),
summed per layer and compared with the frozen layer's own prediction. The kernels' designs are
README's "Triton kernels" table; factor shapes and nnz are the micro-benchmarks'
(pypeft_fast/workloads.py: LoKr's factorization, PHM n = 4, SHiRA nnz = r·(in + out); B formed
densely, as the Triton path takes it). ``predicted_seconds`` puts these beside the measured
numbers in bench/report.py when a run's device is one of ``GPUS``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pypeft_fast import workloads  # noqa: E402

# Peak numbers (dense, no sparsity): H100 SXM 989 TFLOP/s bf16 tensor, 67 TFLOP/s fp32 FMA,
# 3.35 TB/s HBM3; H200 the same compute and 4.8 TB/s HBM3e.
GPUS = {"H100": dict(tc=989e12, fma=67e12, bw=3.35e12), "H200": dict(tc=989e12, fma=67e12, bw=4.8e12)}
BN = 128  # the GEMM tiles' N (and M) extent
FAMILIES = ("lowrank", "lowrank-dropout", "kronecker", "phm", "sparse")


def kernel_costs(name: str, shape, tokens: int, rank: int) -> list[tuple[str, float, float, str]]:
    """(kernel, FLOPs issued, DRAM bytes, unit) per launch of one fwd+bwd; unit "tc" (tensor-core
    MMA) or "fma" (CUDA-core fp32)."""
    n, k, o = tokens, shape.in_features, shape.out_features
    e = 2
    fam = workloads.CASE_FAMILIES[name].formula
    if fam == "lowrank":
        r = rank
        return [
            ("u = drop(x)·Aᵀ (skinny, Philox 1/8 el.)", 2 * n * k * r, e * n * k + 4 * n * r, "tc"),
            ("y = x·Wᵀ + s·u·Bᵀ (GEMM, loaded u)", 2 * n * k * o + 2 * n * r * o,
             e * (n * k + o * k + n * o) + 4 * n * r, "tc"),
            ("bwd, one kernel: dx = gy·W + drop'(s·gy·B·A), t in K-loop, dA (epilogue), dB (K-loop)",
             2 * n * o * k + 2 * n * o * r * -(-k // BN) + 4 * n * r * k + 2 * n * o * r,
             e * (n * o + o * k + 2 * n * k) + 4 * (2 * n * r + k * r + o * r), "tc"),
        ]
    if fam in ("kronecker", "phm"):
        if fam == "kronecker":
            (ao, ai), (bo, bi), _ = workloads.kron_factors(shape, rank)
            h = 1
        else:
            h = ao = ai = workloads.PHM_TERMS
            bo, bi = o // h, k // h
        per_tile, per_tile_dx = max(1, -(-BN // bo)), max(1, -(-BN // bi))
        U = 4 * n * ao * h * bi
        return [
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
    if fam == "sparse":
        nnz = workloads.sparse_nnz(shape, rank)
        walk = -(-n // 128) * nnz * (8 + 8 + e)  # CSR col/perm/value per M tile
        return [
            ("y = x·(W + s·ΔW)ᵀ (W tiles + CSR walk)", 2 * n * k * o, e * (n * k + o * k + n * o) + walk, "tc"),
            ("dx = gy·(W + s·ΔW) (W tiles + CSC walk)", 2 * n * o * k, e * (n * o + o * k + n * k) + walk, "tc"),
            # blocked SDDMM: one dense gyᵀ·x block (128 × 64) per block of ΔW holding entries
            ("dv = block SDDMM (gyᵀ·x blocks + gather)", 2 * n * o * k * _nonempty_fraction(nnz, o, k),
             e * (n * k + n * o) + nnz * 24, "tc"),
        ]
    raise ValueError(f"no roofline for {name!r} (Triton kernels exist for {FAMILIES})")


def _nonempty_fraction(nnz: int, o: int, k: int, bo: int = 128, bi: int = 64) -> float:
    """Expected fraction of ΔW's bo × bi blocks holding an entry of a uniform random mask."""
    blocks = -(-o // bo) * -(-k // bi)
    return 1.0 - (1.0 - 1.0 / blocks) ** nnz


def predict(flops: float, nbytes: float, unit: str, gpu: str) -> float:
    g = GPUS[gpu]
    return max(flops / g[unit], nbytes / g["bw"])


def frozen_seconds(shape, tokens: int, gpu: str) -> float:
    """The frozen layer, forward + backward (two GEMMs, bf16)."""
    n, k, o = tokens, shape.in_features, shape.out_features
    return 2 * predict(2 * n * k * o, 2 * (n * k + o * k + n * o), "tc", gpu)


def predicted_seconds(name: str, shape, tokens: int, rank: int, gpu: str) -> float | None:
    """Predicted fwd+bwd seconds of the Triton path, or None where there is no model."""
    if name not in FAMILIES or gpu not in GPUS:
        return None
    return sum(predict(f, b, u, gpu) for _, f, b, u in kernel_costs(name, shape, tokens, rank))


def gpu_of(device_text: str) -> str | None:
    """"H200" / "H100" from an environment record's device text, else None."""
    for g in GPUS:
        if g in (device_text or ""):
            return g
    return None


def roofline_markdown(shapes, tokens: int, rank: int) -> str:
    out = [f"Roofline, bf16, n = {tokens} tokens, r = {rank} (µs per fwd+bwd of one layer)"]
    for fam in FAMILIES:
        out += [f"\n#### {fam}\n", "| shape | kernel | GFLOP | MB | H100 µs | H200 µs |", "|---|---|---|---|---|---|"]
        for key in shapes:
            s = workloads.shape_of(key)
            tot = {g: 0.0 for g in GPUS}
            for name, fl, by, unit in kernel_costs(fam, s, tokens, rank):
                t = {g: predict(fl, by, unit, g) for g in GPUS}
                for g in GPUS:
                    tot[g] += t[g]
                out.append(f"| {key} | {name} | {fl / 1e9:.3f} | {by / 1e6:.1f} | "
                           f"{t['H100'] * 1e6:.1f} | {t['H200'] * 1e6:.1f} |")
            fz = {g: frozen_seconds(s, tokens, g) for g in GPUS}
            out.append(f"| {key} | **total** (frozen fwd+bwd: {fz['H100'] * 1e6:.1f} / {fz['H200'] * 1e6:.1f} µs)"
                       f" | | | **{tot['H100'] * 1e6:.1f}** ({tot['H100'] / fz['H100']:.2f}×) | "
                       f"**{tot['H200'] * 1e6:.1f}** ({tot['H200'] / fz['H200']:.2f}×) |")
    return "\n".join(out)


def main(argv=None) -> int:
    import cases

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(cases.MAIN_SHAPES["cuda"]))
    p.add_argument("--tokens", type=int, default=workloads.GPU_TOKENS)
    p.add_argument("--rank", type=int, default=cases.DEFAULT_RANK)
    a = p.parse_args(argv)
    print(roofline_markdown(a.shapes, a.tokens, a.rank))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
