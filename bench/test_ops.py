"""Op-level micro-benchmarks: a family's structured part alone, torch path vs the native op.

    pytest bench/test_ops.py --benchmark-only [-k sparse]

What bench_lowrank.py / bench_kronecker.py / bench_sparse.py timed before (bench/NOTES.md's
op tables), on the same case tensors as bench/test_kernels.py (``workloads.make_case``; the
selections of bench/cases.py, mode-free). Providers: ``torch`` (the torch backend's own code),
``native`` (``torch.ops.pypeft_fast``: the C++ kernels on CPU tensors, the CUDA kernels on CUDA
tensors) and, for lowrank, ``nodrop`` (the same GEMMs without dropout: the floor the fused mask
must approach). Ops, with the FLOPs and least bytes (fp32 elements e) in ``extra_info``:

    lowrank-dropout  mask   drop(x) = x ⊙ keep/(1-p)            0 FLOPs, 2·e·n·in bytes
                     down   u = drop(x)·Aᵀ                      2·n·in·r, e·n·in
                     bwd    dx += drop(t·A), dA = tᵀ·drop(x)    4·n·in·r, 3·e·n·in
                     tsum   uᵀ·gy (dB's token sum; skinny_t_mm) 2·n·out·r, e·n·out
                     tproj  gy·B (t, LoRA's backward; skinny_mm) 2·n·out·r, e·n·out
    kronecker        fwd    y += s·A·X·Bᵀ per token             2·macs_per_row·n, e·n·(in + 2·out)
                     bwd    dx += s·Aᵀ·G·B, dA, dB              2.5 × fwd, e·n·(out + 3·in)
    sparse           spmm_fwd  y += x·Sᵀ                        2·n·nnz, e·n·(in + 2·out) + 12·nnz
                     spmm_bwd  dx += gy·S  (CSC)                2·n·nnz, e·n·(out + 2·in) + 12·nnz
                     sddmm     dv = Σₙ gy[n,row]·x[n,col]       2·n·nnz, e·n·(in + out) + 16·nnz

``tsum`` and ``tproj`` are CPU kernels (on CUDA the cuBLAS GEMM runs; their native rows are skipped
there). Kronecker factors are LoKr's at the shape; a rank-k B is formed (b_out × b_in), as the native
kernels take it. Each provider's result is checked against the torch op in float64 (the
tolerance rule) with --benchmark-disable and in the tiny selection.
"""
from __future__ import annotations

import functools

import pytest
import torch

from pypeft_fast import measure, registry, workloads

import cases as _cases

OPS = {"lowrank-dropout": ("mask", "down", "bwd", "tsum", "tproj"), "kronecker": ("fwd", "bwd"),
       "sparse": ("spmm_fwd", "spmm_bwd", "sddmm")}


CPU_ONLY_OPS = {"tsum", "tproj"}  # skinny_t_mm, skinny_mm: no CUDA kernels


def _op_cases(selection, kind, tokens):
    out = []
    for c in _cases.cases(selection, kind, tokens):
        if c.family in OPS and c.impl == "reference" and c.mode == "full" and c.rank in (_cases.DEFAULT_RANK, _cases.TINY_RANK):
            for op in OPS[c.family]:
                for prov in ("torch", "native") + (("nodrop",) if c.family == "lowrank-dropout" and op in ("down", "bwd") else ()):
                    out.append((c.family, op, prov, c.shape, c.rank, c.tokens))
    return list(dict.fromkeys(out))


def pytest_generate_tests(metafunc):
    if "op_case" in metafunc.fixturenames:
        cfg = metafunc.config
        kind = "cuda" if (cfg.getoption("bench_device") == "cuda" or
                          (cfg.getoption("bench_device") == "auto" and torch.cuda.is_available())) else "cpu"
        cs = _op_cases(cfg.getoption("bench_selection"), kind, cfg.getoption("bench_tokens"))
        metafunc.parametrize("op_case", cs, ids=[f"{f}-{o}-{p}-{s}-r{r}-n{n}" for f, o, p, s, r, n in cs])


@functools.lru_cache(maxsize=1)
def _workload(*key):
    return workloads.make_case(*key)


def _calls(family, w, dtype):
    """{op: {provider: fn}} on copies of the case's tensors in ``dtype`` (fresh accumulators)."""
    nat = torch.ops.pypeft_fast
    x = w.x.detach().to(dtype)
    gy = w.gy.detach().to(dtype)
    if family == "lowrank-dropout":
        from pypeft_fast.philox import apply_keep, dropout_rows, keep_rows
        A = w.params["A"].detach().to(dtype)
        seed, p = w.fixed["seed"], w.fixed["dropout"]
        B = w.params["B"].detach().to(dtype)
        t = (gy @ B).mul_(w.fixed["scaling"])
        u = x @ A.t()
        dx = torch.zeros_like(x)

        def torch_bwd():
            keep = keep_rows(seed, *x.shape, p, device=x.device)
            dx.add_(apply_keep(t @ A, keep, p, inplace=True))
            return t.t() @ apply_keep(x, keep, p)

        def nodrop_bwd():
            dx.addmm_(t, A)
            return t.t() @ x

        return {"mask": {"torch": lambda: dropout_rows(x, seed, p), "native": lambda: nat.philox_dropout(x, seed, p)},
                "down": {"torch": lambda: dropout_rows(x, seed, p) @ A.t(), "nodrop": lambda: x @ A.t(),
                         "native": lambda: nat.lowrank_dropout_down(x, A, seed, p)},
                "bwd": {"torch": torch_bwd, "nodrop": nodrop_bwd,
                        "native": lambda: nat.lowrank_dropout_bwd(t, x, A, seed, p, dx, True)},
                "tsum": {"torch": lambda: u.t() @ gy, "native": lambda: nat.skinny_t_mm(u, gy)},
                "tproj": {"torch": lambda: gy @ B, "native": lambda: nat.skinny_mm(gy, B)}}
    if family == "kronecker":
        from pypeft_fast.families.kronecker import torch_kronecker_acc, torch_kronecker_bwd
        P = {k: v.detach().to(dtype) for k, v in w.params.items()}
        A = P["A"].unsqueeze(0)
        B = (P["B"] if "B" in P else P["B_left"] @ P["B_right"]).unsqueeze(0)
        s = w.fixed["scaling"]
        y, dx = torch.zeros_like(gy), torch.zeros_like(x)
        return {"fwd": {"torch": lambda: torch_kronecker_acc(y, x, A, B, s),
                        "native": lambda: (nat.kronecker_apply_acc(y, x, A, B, s), y)[1]},
                "bwd": {"torch": lambda: torch_kronecker_bwd(gy, x, A, B, s, dx, True, True)[1:],  # (dA, dB)
                        "native": lambda: nat.kronecker_apply_bwd(gy, x, A, B, s, dx, True, True)}}
    if family == "sparse":
        from pypeft_fast.families.sparse import build_layout
        L = build_layout(w.fixed["indices"], w.shape.out_features, w.shape.in_features)
        v = w.params["values"].detach().to(dtype)
        v_csr, v_csc = v[L.csr_perm].contiguous(), v[L.csc_perm].contiguous()
        y, dx = torch.zeros_like(gy), torch.zeros_like(x)
        return {"spmm_fwd": {"torch": lambda: (nat.torch_spmm_csr_t_acc(y, L.row_ptr, L.csr_col, v_csr, x), y)[1],
                             "native": lambda: (nat.sparse_spmm_csr_t_acc(y, L.row_ptr, L.csr_col, v_csr, x), y)[1]},
                "spmm_bwd": {"torch": lambda: (nat.torch_spmm_csr_t_acc(dx, L.col_ptr, L.csc_row, v_csc, gy), dx)[1],
                             "native": lambda: (nat.sparse_spmm_csr_t_acc(dx, L.col_ptr, L.csc_row, v_csc, gy), dx)[1]},
                "sddmm": {"torch": lambda: nat.torch_sddmm_csr(L.row_ptr, L.csr_col, gy, x),
                          "native": lambda: nat.sparse_sddmm_csr(L.row_ptr, L.csr_col, gy, x)}}
    raise ValueError(family)


def _cost(family, op, w, e):
    n, i, o = w.tokens, w.shape.in_features, w.shape.out_features
    if family == "lowrank-dropout":
        r = w.rank
        return {"mask": (0.0, 2.0 * e * n * i), "down": (2.0 * n * i * r, e * n * i),
                "bwd": (4.0 * n * i * r, 3.0 * e * n * i), "tsum": (2.0 * n * o * r, e * n * o),
                "tproj": (2.0 * n * o * r, e * n * o)}[op]
    if family == "kronecker":
        fwd = workloads.adapter_flops("kronecker", w.shape, w.rank, n, "forward")
        return (fwd, e * n * (i + 2 * o)) if op == "fwd" else (2.5 * fwd, e * n * (o + 3 * i))
    nnz = w.params["values"].numel()
    return {"spmm_fwd": (2.0 * n * nnz, e * n * (i + 2 * o) + 12.0 * nnz),
            "spmm_bwd": (2.0 * n * nnz, e * n * (o + 2 * i) + 12.0 * nnz),
            "sddmm": (2.0 * n * nnz, e * n * (i + o) + 16.0 * nnz)}[op]


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def test_op(op_case, bench_env, benchmark):
    from numerics import assert_within

    family, op, prov, shape, rank, tokens = op_case
    device = bench_env["device"]
    fam = workloads.CASE_FAMILIES[family].family
    if prov == "native":
        backend = "cuda" if device.type == "cuda" else "cpp"
        why = registry.why_unavailable(fam, backend, device)
        if why is not None:
            pytest.skip(why)
        if op in CPU_ONLY_OPS and device.type != "cpu":
            pytest.skip(f"{op}: a CPU kernel (on {device.type} the cuBLAS GEMM runs)")
    dtype = bench_env["dtype"]
    w = _workload(family, shape, rank, tokens, dtype, device, bench_env["adapter_dtype"])
    fn = _calls(family, w, dtype)[op][prov]

    def target():
        fn()
        measure.synchronize(device)

    benchmark.group = f"op {family} {op} {shape} r{rank} n{tokens}"
    benchmark.pedantic(target, rounds=bench_env["rounds"], warmup_rounds=bench_env["warmup"])
    if bench_env["check"] and prov != "nodrop":
        got = _first(_calls(family, w, dtype)[op][prov]())
        ref = _first(_calls(family, w, torch.float64)[op]["torch"]())
        base = _first(_calls(family, w, dtype)[op]["torch"]())
        assert_within(f"{family} {op} {prov}", got.cpu(), ref.cpu(), base.cpu(), base.dtype)
    if benchmark.enabled and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        flops, nbytes = _cost(family, op, w, workloads.elem_bytes(dtype))
        benchmark.extra_info.update({
            "kind": "op", "family": family, "op": op, "provider": prov, "shape": shape, "rank": rank, "tokens": tokens,
            "dtype": bench_env["dtype_name"], "flops": flops, "bytes": nbytes, "median_s": median,
            "gflops_per_s": flops / median / 1e9, "gb_per_s": nbytes / median / 1e9,
            **bench_env["environment"]})
