"""pytest configuration of the kernel micro-benchmarks (``pytest bench/``, pytest-benchmark).

Options (besides pytest-benchmark's own ``--benchmark-*``):

    --bench-selection default|full|tiny   the case matrix (bench/cases.py); default: default
    --bench-device auto|cpu|cuda          auto: cuda when a GPU is visible
    --bench-dtype fp32|bf16|fp16|bf16+fp32-adapter
                                          activations/W and adapter dtypes (default: fp32 on CPU,
                                          bf16 with fp32 adapters — peft's default — on a GPU)
    --bench-tokens N                      tokens per call instead of the selection's
    --bench-rounds N, --bench-warmup N    timed / warm-up rounds per case (CPU 5 / 1, GPU 15 / 3)
    --bench-threads N                     torch.set_num_threads
    --bench-check                         check every case against float64 (always on with
                                          --benchmark-disable and in the tiny selection)
    --bench-rows PATH.jsonl               also append each result as a JSON line at once

Timed runs are autosaved to .benchmarks/ (compare with ``--benchmark-compare``). After the run
the terminal summary prints, per case family and shape, the adapter's FLOP share beside the
measured overhead over the frozen GEMM (the limit beside the measurement).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))                    # bench/cases.py
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/numerics.py: the tolerance rule

import cases  # noqa: E402

ROUNDS = {"cpu": (5, 1), "cuda": (15, 3)}
DTYPE_DEFAULT = {"cpu": "fp32", "cuda": "bf16+fp32-adapter"}


def pytest_addoption(parser):
    g = parser.getgroup("pypeft_fast micro-benchmarks")
    g.addoption("--bench-selection", default="default", choices=("default", "full", "tiny"))
    g.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"))
    g.addoption("--bench-dtype", default=None,
                choices=("fp32", "bf16", "fp16", "bf16+fp32-adapter"))
    g.addoption("--bench-tokens", type=int, default=None)
    g.addoption("--bench-rounds", type=int, default=None)
    g.addoption("--bench-warmup", type=int, default=None)
    g.addoption("--bench-threads", type=int, default=None)
    g.addoption("--bench-check", action="store_true")
    g.addoption("--bench-rows", default=None, metavar="PATH.jsonl",
                help="append every result's extra_info as a JSON line as soon as it is measured")


def _device_kind(config) -> str:
    d = config.getoption("bench_device")
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return d


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-benchmark reads its options: keep every timed run for --benchmark-compare.
    if not config.getoption("benchmark_disable", False) and not config.getoption("benchmark_autosave", None):
        from pytest_benchmark.utils import get_tag  # what --benchmark-autosave stores: commit_date
        config.option.benchmark_autosave = get_tag()
    if config.getoption("bench_threads"):
        torch.set_num_threads(config.getoption("bench_threads"))
    config._pf_bench_rows = []


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    kind = _device_kind(cfg)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    cs = cases.cases(cfg.getoption("bench_selection"), kind, cfg.getoption("bench_tokens"), interp)
    metafunc.parametrize("case", cs, ids=[c.id for c in cs])


@pytest.fixture(scope="session")
def bench_env(request):
    """Device, dtypes, rounds and the environment record shared by every case."""
    from numerics import DTYPE_CASES
    from pypeft_fast import measure

    cfg = request.config
    kind = _device_kind(cfg)
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA GPU visible")
    dtype_name = cfg.getoption("bench_dtype") or DTYPE_DEFAULT[kind]
    rounds, warmup = ROUNDS[kind]
    disabled = bool(cfg.getoption("benchmark_disable", False))
    selection = cfg.getoption("bench_selection")
    return {
        "device": torch.device(kind),
        "dtype_name": dtype_name,
        "dtype": DTYPE_CASES[dtype_name][0],
        "adapter_dtype": DTYPE_CASES[dtype_name][1],
        "rounds": cfg.getoption("bench_rounds") or rounds,
        "warmup": cfg.getoption("bench_warmup") if cfg.getoption("bench_warmup") is not None else warmup,
        "check": disabled or selection == "tiny" or cfg.getoption("bench_check"),
        "selection": selection,
        "environment": measure.environment(torch.device(kind)),
        "rows": cfg._pf_bench_rows,
        "rows_path": cfg.getoption("bench_rows"),
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = getattr(config, "_pf_bench_rows", [])
    if not rows:
        return
    from report import limit_table  # bench/report.py

    terminalreporter.write_sep("=", "pypeft_fast: the limit beside the measurement")
    terminalreporter.write_line(limit_table(rows, markdown=False))
