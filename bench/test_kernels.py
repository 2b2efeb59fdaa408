"""Kernel micro-benchmarks: one adapted layer, forward / backward / full, every implementation.

    pytest bench/ --benchmark-only                         # the default selection (minutes)
    pytest bench/ --benchmark-only -k "lowrank and full"   # pytest's own selection
    pytest bench/ --benchmark-only --bench-selection full  # the whole matrix (opt-in)
    pytest bench/ --benchmark-disable --bench-selection tiny   # CI: every case once, checked
    pytest bench/ --benchmark-only --benchmark-compare     # against the last autosaved run
    pytest bench/ --benchmark-only --benchmark-json out.json && python bench/report.py out.json

Each case (bench/cases.py) takes its tensors from ``pypeft_fast.workloads.make_case``. Timing is
pytest-benchmark's ``pedantic``: one call per round, the clock read around the call and a
``torch.cuda.synchronize()`` inside the timed function on a GPU (pytest-benchmark's timer is
wall-clock). Modes: ``forward`` = the training forward (autograd records the graph; the output
is dropped), ``backward`` = ``y.backward(gy)`` of a forward run in the untimed setup, ``full`` =
both. The frozen GEMM alone (``F.linear(x, W)`` and, backward, ``dx = gy·W``) is timed in every
round's setup, interleaved with the case, so ``ratio_to_frozen`` compares two numbers taken
under the same machine load. ``extra_info`` of every result: the FLOP and byte formulas'
values (pypeft_fast/workloads.py), achieved GFLOP/s and GB/s, the frozen GEMM's median and the
ratio to it, the adapter's FLOP share, dtypes, and the environment record (device, versions,
threads, date: ``pypeft_fast.measure.environment``). Groups: family × shape × rank × tokens ×
mode, so pytest-benchmark's table lists the implementations of one group side by side.
"""
from __future__ import annotations

import functools
import json
import statistics

import pytest
import torch

from pypeft_fast import measure, registry, workloads


@functools.lru_cache(maxsize=1)
def _workload(*key):
    """The cases of one (family, shape, rank, tokens) run one after another (bench/cases.py's
    order): they share one set of tensors (a GPU case holds ~10⁸ values)."""
    return workloads.make_case(*key)


def _resolve_impl(case, device):
    """(how the case is called: "reference" or a backend name, the mask the dropout uses)."""
    fam = workloads.CASE_FAMILIES[case.family].family
    if case.impl == "reference":
        return "reference", "peft"
    if case.impl == "auto":  # routed per call, as a user's call is (a backend may decline it)
        return "auto", "ours"
    why = registry.why_unavailable(fam, case.impl, device)
    if why is not None:
        pytest.skip(why)
    return case.impl, "ours"


def _run_mode(fn, w, mode, device):
    """(setup, target) for pedantic: the target is what is timed."""
    def sync():
        measure.synchronize(device)

    def clear():
        w.zero_grad()
        sync()

    if mode == "forward":
        def target():
            fn()
            sync()
        return clear, target
    if mode == "full":
        def target():
            fn().backward(w.gy)
            sync()
        return clear, target

    def setup():
        w.zero_grad()
        y = fn()
        sync()
        return (y,), {}

    def target(y):
        y.backward(w.gy)
        sync()
    return setup, target


def _frozen_seconds(w, mode, device) -> float:
    """One timed call of the frozen GEMM alone in ``mode`` (forward: x·Wᵀ with the graph
    recorded; backward: dx = gy·W; full: both)."""
    frozen = w.frozen()
    if mode == "forward":
        return measure.timed(frozen, device)
    if mode == "full":
        t = measure.timed(lambda: frozen().backward(w.gy), device)
    else:
        y = frozen()
        t = measure.timed(lambda: y.backward(w.gy), device)
    w.x.grad = None
    return t


def _check(w, fn, mask_kind, name):
    """Output and every gradient against float64 (flash-attention's rule, tests/numerics.py):
    |got − f64| ≤ 2·|plain PyTorch at the case's dtypes − f64| + a few ulps."""
    from numerics import assert_within

    w.zero_grad()
    if mask_kind == "peft":
        torch.manual_seed(workloads.REFERENCE_RNG_SEED)
    y = fn()
    y.backward(w.gy)
    got = {"x": w.x.grad, **{k: p.grad for k, p in w.params.items()}}
    y64, g64 = w.expected(torch.float64, mask_kind)
    yb, gb = w.expected(None, mask_kind)
    assert_within(f"{name} y", y, y64, yb, yb.dtype)
    for k in g64:
        assert got[k] is not None, f"{name}: no gradient reached {k}"
        assert_within(f"{name} d{k}", got[k], g64[k], gb[k], gb[k].dtype)
    w.zero_grad()


def test_kernel(case, bench_env, benchmark):
    why = workloads.unavailable(case.family)
    if why is not None:
        pytest.skip(f"{case.family}: {why}")
    device = bench_env["device"]
    impl, mask_kind = _resolve_impl(case, device)
    if impl == "triton" and device.type == "cpu" and bench_env["selection"] != "tiny":
        pytest.skip("triton on CPU runs under its interpreter: checked in the tiny selection, never timed")
    w = _workload(case.family, case.shape, case.rank, case.tokens, bench_env["dtype"], device,
                  bench_env["adapter_dtype"])
    fn = w.reference() if impl == "reference" else w.ours(impl)
    try:  # an explicitly named backend that cannot serve this call raises: say why
        fn()
    except RuntimeError as e:
        if impl == "reference":
            raise
        pytest.skip(f"{impl} cannot serve {case.family} at {case.shape}: {e}")
    measure.synchronize(device)

    frozen_s: list[float] = []
    setup, target = _run_mode(fn, w, case.mode, device)

    def setup_with_frozen():
        frozen_s.append(_frozen_seconds(w, case.mode, device))
        return setup()

    benchmark.group = case.group
    rounds, warmup = bench_env["rounds"], bench_env["warmup"]
    benchmark.pedantic(target, setup=setup_with_frozen, rounds=rounds, warmup_rounds=warmup)

    if bench_env["check"]:
        _check(w, fn, mask_kind, case.id)
    if not benchmark.enabled or benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    frozen_median = statistics.median(frozen_s[warmup:] or frozen_s)
    shape = workloads.shape_of(case.shape)
    e = workloads.elem_bytes(bench_env["dtype"])
    ae = workloads.elem_bytes(bench_env["adapter_dtype"])
    frozen_flops = workloads.frozen_flops(shape, case.tokens, case.mode)
    adapter_flops = workloads.adapter_flops(case.family, shape, case.rank, case.tokens, case.mode)
    flops = frozen_flops + adapter_flops
    nbytes = workloads.bytes_moved(case.family, shape, case.rank, case.tokens, case.mode, e, ae)
    info = {
        "kind": "layer", "family": case.family, "impl": case.impl, "backend": impl,
        "reference_name": w.reference_name, "mode": case.mode, "shape": case.shape,
        "in_features": shape.in_features, "out_features": shape.out_features,
        "rank": case.rank, "tokens": case.tokens, "dtype": bench_env["dtype_name"],
        "flops": flops, "adapter_flops": adapter_flops, "frozen_flops": frozen_flops,
        "bytes": nbytes, "gflops_per_s": flops / median / 1e9, "gb_per_s": nbytes / median / 1e9,
        "median_s": median, "frozen_s": frozen_median, "ratio_to_frozen": median / frozen_median,
        "adapter_flop_share": workloads.adapter_flop_share(case.family, shape, case.rank, case.tokens),
        **bench_env["environment"],
    }
    benchmark.extra_info.update(info)
    bench_env["rows"].append(info)
    if bench_env["rows_path"]:  # one JSON line per result as it comes: survives a killed run
        with open(bench_env["rows_path"], "a") as f:
            f.write(json.dumps(info) + "\n")
