"""Compile every Triton kernel for real GPUs without one: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` for sm_90 (H100/H200) and sm_80 (A100), every autotune
config, at the default benchmark layer (n = 4×256 tokens, in/out 1024 and 2752, r = 16, bf16).

Triton ships its own ``ptxas``; no CUDA driver or toolkit is needed. Arguments are specialised
the way Triton's launcher does at run time (pointers and multiples of 16 marked 16-divisible,
integers equal to 1 turned into constants), so the code compiled here is the code a GPU run
would build. Registers and spills come from ``ptxas -v`` on the generated PTX (same flags as
Triton), shared memory from the kernel metadata.

Run as ``python -m pypeft_fast.kernels.compile_check [--markdown] [--arch 90,80]`` with
``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions). Exit status 1
when any kernel spills registers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

N_TOKENS, D_MODEL, D_FF, RANK = 4 * 256, 1024, 2752, 16


@dataclass
class Result:
    kernel: str
    variant: str
    config: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int


def _kernels():
    """(kernel name, variant, JITFunction, configs (a list, or arch → list), run-time args,
    constexprs) to compile."""
    import triton.language as tl

    from . import kronecker, lowrank, sparse
    import triton

    from ._matmul import _strided_matmul_kernel, matmul_num_warps
    from ._utils import FP64_CONFIG, NARROW_CONFIG, gemm_configs

    bf, f32, i64 = "*bf16", "*fp32", "*i64"
    n, d, ff, r = N_TOKENS, D_MODEL, D_FF, RANK
    all_cfgs = gemm_configs()
    gemm_cfgs = [c for c in all_cfgs if c is not FP64_CONFIG and c is not NARROW_CONFIG]
    out = []

    def lowrank_args(x, c, dm, u, M, N, K, xs, ws, cs, ds):
        return dict(x_ptr=x, w_ptr=bf, bias_ptr=bf, c_ptr=c, d_ptr=dm, u_ptr=u, y_ptr=bf,
                    seed_ptr=i64, xin_ptr=bf, dd_ptr=f32, v_ptr=f32, dc_ptr=f32, cs_ptr=f32,
                    M=M, N=N, K=K, R=r, stride_xm=xs, stride_xk=1,
                    stride_wk=ws[0], stride_wn=ws[1], stride_ck=cs[0], stride_cr=cs[1],
                    stride_dr=ds[0], stride_dn=ds[1], stride_um=r, stride_ur=1, stride_ym=N,
                    stride_yn=1, stride_im=N, stride_in=1, stride_ddr=N, stride_ddn=1,
                    stride_vm=r, stride_vr=1, stride_dck=r, stride_dcr=1,
                    scaling=0.5, keep_scale=1.1, threshold=6554, alpha_d=0.5, alpha_c=0.5)

    base = dict(HAS_BIAS=False, ACC=tl.float32, UPCAST=False, PREC="ieee", BLOCK_R=16,
                GRAD_D=False, GRAD_C=False, COL_SCALE=False)
    lr = lowrank._lowrank_fwd_kernel
    # forward, dropout 0: u fused into the K-loop and stored
    out.append(("lowrank_fwd", "fwd: fused u, bf16", lr, gemm_cfgs,
                lowrank_args(bf, bf, bf, f32, n, ff, d, d, (1, d), (1, d), (1, r)),
                dict(base, FUSE_U=True, STORE_U=True, DROPOUT=False, GROUPED_RNG=False)))
    # forward, dropout > 0: u from the skinny pass
    out.append(("lowrank_fwd", "fwd: loaded u (dropout), bf16", lr, gemm_cfgs,
                lowrank_args(bf, bf, bf, f32, n, ff, d, d, (1, d), (1, d), (1, r)),
                dict(base, FUSE_U=False, STORE_U=False, DROPOUT=False, GROUPED_RNG=False)))
    # the whole backward: dx = gy·W + drop'(s·gy·B·A), t in the K-loop, dA and dB by atomics
    out.append(("lowrank_fwd", "bwd: dx + t + dA + dB, dropout mask, bf16", lr,
                lambda arch: lowrank.lowrank_configs(gemm_cfgs, (arch // 10, arch % 10),
                                                     fused_bwd=True, per_element_rng=False),
                lowrank_args(bf, bf, bf, f32, n, d, ff, ff, (d, 1), (r, 1), (d, 1)),
                dict(base, FUSE_U=True, STORE_U=False, DROPOUT=True, GROUPED_RNG=True,
                     GRAD_D=True, GRAD_C=True)))
    # in % 8 != 0: one Philox call per element
    out.append(("lowrank_fwd", "bwd: per-element Philox (in % 8 != 0), bf16", lr,
                lambda arch: lowrank.lowrank_configs(all_cfgs, (arch // 10, arch % 10),
                                                     fused_bwd=True, per_element_rng=True),
                lowrank_args(bf, bf, bf, f32, n, d + 1, ff, ff, (d + 1, 1), (r, 1), (d + 1, 1)),
                dict(base, FUSE_U=True, STORE_U=False, DROPOUT=True, GROUPED_RNG=False,
                     GRAD_D=True, GRAD_C=True)))
    # peft's default: bf16 base, fp32 adapter (hi/lo split MMAs); first config only
    out.append(("lowrank_fwd", "fwd: fused u, bf16 x + fp32 A/B", lr, gemm_cfgs[:1],
                lowrank_args(bf, f32, f32, f32, n, ff, d, d, (1, d), (1, d), (1, r)),
                dict(base, FUSE_U=True, STORE_U=True, DROPOUT=False, GROUPED_RNG=False)))

    # DoRA (dropout 0): c = m / ‖W + s·B·A‖ in the epilogue, fp32 shift as the bias
    out.append(("lowrank_fwd", "fwd: fused u, DoRA column scale, bf16 x + fp32 A/B", lr, gemm_cfgs[:1],
                lowrank_args(bf, f32, f32, f32, n, ff, d, d, (1, d), (1, d), (1, r))
                | dict(bias_ptr=f32),
                dict(base, HAS_BIAS=True, COL_SCALE=True, FUSE_U=True, STORE_U=True, DROPOUT=False,
                     GROUPED_RNG=False)))

    # fp64 operands (float64 inputs on a GPU): the small tile
    f64 = "*fp64"
    out.append(("lowrank_fwd", "bwd: dx + t + dA + dB, dropout mask, fp64", lr, [FP64_CONFIG],
                lowrank_args(f64, f64, f64, f64, n, d, ff, ff, (d, 1), (r, 1), (d, 1))
                | dict(w_ptr=f64, bias_ptr=f64, y_ptr=f64, xin_ptr=f64, dd_ptr=f64,
                       v_ptr=f64, dc_ptr=f64),
                dict(base, ACC=tl.float64, FUSE_U=True, STORE_U=False, DROPOUT=True,
                     GROUPED_RNG=True, GRAD_D=True, GRAD_C=True)))

    sp = sparse._sparse_fwd_kernel
    out.append(("sparse_fwd", "fwd: W tile + CSR delta, bf16", sp,
                lambda arch: [c for c in sparse.sparse_gemm_configs((arch // 10, arch % 10))
                              if c is not FP64_CONFIG and c is not NARROW_CONFIG],
                dict(x_ptr=bf, w_ptr=bf, bias_ptr=bf, ptr_ptr=i64, idx_ptr=i64, perm_ptr=i64,
                     val_ptr=bf, y_ptr=bf, M=n, N=ff, K=d, stride_xm=d, stride_xk=1,
                     stride_wk=1, stride_wn=d, stride_ym=ff, stride_yn=1, scaling=0.5),
                dict(HAS_BIAS=False, ACC=tl.float32, UPCAST=False, PREC="ieee")))
    bo, bi, bmm, be = 128, 64, 64, 128
    out.append(("sparse_sddmm", "dv: block gyᵀ·x + gather, bf16", sparse._sparse_sddmm_kernel,
                [None],
                dict(gy_ptr=bf, x_ptr=bf, tile_ptr=i64, local_ptr="*i32", dst_ptr=i64,
                     out_ptr=f32, M=n, N_OUT=ff, N_IN=d, TILES_I=d // bi, M_PER_SPLIT=n,
                     stride_gm=ff, stride_gn=1, stride_xm=d, stride_xk=1, stride_os=28180,
                     scaling=0.5),
                dict(ACC=tl.float32, UPCAST=False, PREC="ieee", BLOCK_O=bo, BLOCK_I=bi,
                     BLOCK_M=bmm, BLOCK_E=be)))

    kr = kronecker._kronecker_fwd_kernel

    def kron_args(h):  # LoKr-like factors for 1024 -> 2752: A (h, 43, 32), B (h, 64, 32)
        return dict(x_ptr=bf, w_ptr=bf, bias_ptr=bf, u_ptr=f32, b_ptr=bf, y_ptr=bf,
                    M=n, N=ff, K=d, QD=64, C=32, HC=32 * h, stride_xm=d, stride_xk=1,
                    stride_wk=1, stride_wn=d, stride_un=43 * h * 32, stride_up=h * 32,
                    stride_uh=32, stride_uc=1, stride_bh=2048, stride_bc=1, stride_bq=32,
                    stride_ym=ff, stride_yn=1)

    kcx = dict(HAS_BIAS=False, ACC=tl.float32, UPCAST=False, PREC="ieee")
    out.append(("kronecker_fwd", "kronecker: epilogue Σ U·B (h·b_in = 32), bf16", kr, gemm_cfgs,
                kron_args(1), dict(kcx, BLOCK_C=32)))
    out.append(("kronecker_fwd", "phm h = 4: epilogue Σ U·B (h·b_in = 128), bf16", kr, gemm_cfgs,
                kron_args(4), dict(kcx, BLOCK_C=kronecker.block_c(128, interpret=False))))

    sm = _strided_matmul_kernel

    def sm_args(lt, rt, P, Q, K, lp, lk, rk, rq, op, oq, row_len=d):
        return dict(l_ptr=lt, r_ptr=rt, out_ptr=f32, seed_ptr=i64, P=P, Q=Q, K=K,
                    K_PER_SPLIT=K // 4, P_INNER=1, Q_INNER=1, K_INNER=1, row_len=row_len,
                    s_lpo=lp, s_lpi=0, s_lko=lk, s_lki=0, s_rko=rk, s_rki=0, s_rqo=rq, s_rqi=0,
                    s_os=P * Q, s_opo=op, s_opi=0, s_oqo=oq, s_oqi=0, alpha=0.5,
                    threshold=6554)

    smc = dict(ACC=tl.float32, UPCAST=False, PREC="ieee", BLOCK_K=64)

    def warps(bp, bq):  # the launcher's choice for a bp × bq tile
        return [triton.Config({}, num_warps=matmul_num_warps(bp, bq), num_stages=3)]
    out.append(("strided_matmul", "u = drop(x)·Aᵀ (n, r), bf16", sm, warps(128, 16),
                sm_args(bf, bf, n, r, d, d, 1, 1, d, r, 1),
                dict(smc, DROP=1, GROUPED_RNG=True, BLOCK_P=128, BLOCK_Q=16)))
    out.append(("strided_matmul", "dA = tᵀ·drop(x) (r, in), fp32 × bf16", sm, warps(16, 128),
                sm_args(f32, bf, r, d, n, 1, r, d, 1, d, 1),
                dict(smc, DROP=2, GROUPED_RNG=True, BLOCK_P=16, BLOCK_Q=128)))
    # the largest tile strided_matmul picks (128 × 64 × 64), fp32 × bf16 (kron dA), div/mod K
    big = sm_args(f32, bf, 128 * 4, d, n * 32, 32, 1, d, 1, d, 1)
    big.update(P_INNER=43, K_INNER=32, s_lpi=32, s_lki=1, s_rki=1)
    out.append(("strided_matmul", "largest tile, fp32 × bf16, (n, l) K index", sm,
                warps(128, 64), big,
                dict(smc, DROP=0, GROUPED_RNG=False, BLOCK_P=128, BLOCK_Q=64)))
    out.append(("strided_matmul", "dB = gyᵀ·u (out, r), bf16 × fp32", sm, warps(128, 16),
                sm_args(bf, f32, ff, r, n, 1, ff, r, 1, r, 1),
                dict(smc, DROP=0, GROUPED_RNG=False, BLOCK_P=128, BLOCK_Q=16)))
    return out


def _signature(fn, args, constexprs):
    """Triton's run-time specialisation: (signature, constexprs, attrs)."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
            check=True, capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def _compile_index(args):
    index, archs = args
    return _compile_one(jobs(archs)[index])


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, variant, fn, cfg, args, constexprs, arch = job
    cx = dict(constexprs)
    options = {}
    if cfg is not None:
        cx.update(cfg["kwargs"])
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    sig, consts, attrs = _signature(fn, args, cx)
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options=options)
    regs, spills = _ptxas_stats(k.asm["ptx"], arch)
    label = "—" if not (cfg and cfg["kwargs"]) else (
        "M{BLOCK_M} N{BLOCK_N} K{BLOCK_K}".format(**cfg["kwargs"])
        + f" w{cfg['num_warps']} s{cfg['num_stages']}")
    if not (cfg and cfg["kwargs"]):
        label = " ".join(f"{k}{v}" for k, v in cx.items() if k.startswith("BLOCK_"))
        label += f" w{k.metadata.num_warps}"
    return Result(name, variant, label, arch, regs, spills, k.metadata.shared,
                  k.metadata.num_warps)


def jobs(archs=(90, 80)):
    out = []
    for name, variant, fn, cfgs, args, cx in _kernels():
        for arch in archs:
            for cfg in (cfgs(arch) if callable(cfgs) else cfgs):
                c = None if cfg is None else dict(kwargs=dict(cfg.kwargs),
                                                   num_warps=cfg.num_warps,
                                                   num_stages=cfg.num_stages)
                out.append((name, variant, fn, c, args, cx, arch))
    return out


def run(archs=(90, 80), workers=None) -> list[Result]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces @triton.jit kernels")
    todo = jobs(archs)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_one(j) for j in todo]
    with ProcessPoolExecutor(workers) as pool:  # jobs hold JITFunctions: send indices
        return list(pool.map(_compile_index, [(i, archs) for i in range(len(todo))]))


def markdown(results: list[Result]) -> str:
    rows = ["| kernel | variant | config | sm | registers | spill bytes | shared KiB |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.kernel} | {r.variant} | {r.config} | {r.arch} | {r.registers} | "
                    f"{r.spill_bytes} | {r.shared_bytes / 1024:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--json", action="store_true", help="print one JSON object per kernel")
    a = p.parse_args(argv)
    results = run(tuple(int(x) for x in a.arch.split(",")))
    if a.json:
        for r in results:
            print(json.dumps(asdict(r)))
    else:
        print(markdown(results))
    spilled = [r for r in results if r.spill_bytes]
    for r in spilled:
        print(f"SPILL: {r.kernel} [{r.variant}] {r.config} sm_{r.arch}: {r.spill_bytes} bytes",
              file=sys.stderr)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
