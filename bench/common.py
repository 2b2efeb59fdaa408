"""Shared benchmark harness: layer shapes from real model configs, timing, FLOP formulas, the
environment row. Every bench/bench_<family>.py uses it, so speed and memory runs share one
setup factory per op and every result row records device, versions and date.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import platform
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerShape:
    model: str
    layer: str
    n: int        # tokens per step (batch × sequence)
    in_f: int
    out_f: int


# The end-to-end benchmark's default model (Llama architecture: hidden 1024, intermediate 2752,
# batch 4 × 256 tokens): one entry per distinct projection shape.
SHAPES = {
    "llama-1024/attn": LayerShape("llama-h1024-i2752", "q/k/v/o_proj", 4 * 256, 1024, 1024),
    "llama-1024/up": LayerShape("llama-h1024-i2752", "gate/up_proj", 4 * 256, 1024, 2752),
    "llama-1024/down": LayerShape("llama-h1024-i2752", "down_proj", 4 * 256, 2752, 1024),
}


def median_time(fn, *, warmup: int = 2, reps: int = 7) -> float:
    """Median wall time of ``fn()`` in seconds (CPU: synchronous; CUDA: synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_times_interleaved(fns: dict, *, warmup: int = 2, reps: int = 9) -> dict:
    """Median wall time (s) of each ``fns[name]()``, the providers run in turn within every
    repetition, so that a change in machine load hits all of them alike (side by side)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_op_table(title: str, shapes: list[str], op_calls, op_cost, reps: int,
                 extra_columns: tuple[str, ...] = (), no_ratio: tuple[str, ...] = ()) -> list[dict]:
    """The op-level table of a family bench: for every shape, ``op_calls(shape) -> (extra row
    fields, {op: {provider: fn}})`` timed side by side (:func:`median_times_interleaved`), with
    ``op_cost(op, shape, **extra) -> (FLOPs, bytes)``; torch/this is the speed-up over the
    "torch" provider (left empty for the providers in ``no_ratio``)."""
    env = environment()
    rows = []
    for key in shapes:
        s = SHAPES[key]
        extra, calls = op_calls(s)
        for op, provs in calls.items():
            flops, byts = op_cost(op, s, **extra)
            times = median_times_interleaved(provs, reps=reps)
            for prov, t in times.items():
                ratio = times["torch"] / t if "torch" in times and prov not in no_ratio else None
                rows.append({"shape": key, **extra, "op": op, "provider": prov, "ms": t * 1e3,
                             "ms/1M elem": t * 1e3 / (s.n * s.in_f / 1e6), "torch/this": ratio,
                             "GFLOP/s": flops / t / 1e9 if flops else None, "GB/s": byts / t / 1e9,
                             **env})
    print(f"\n{title}: median ms; torch/this = speed-up over the torch path (run side by side)")
    print_table(rows, ["shape", *extra_columns, "op", "provider", "ms", "torch/this", "GFLOP/s", "GB/s"])
    print(f"device {env['device']}, torch {env['torch']}, {env['date']}")
    return rows


def frozen_linear_flops(s: LayerShape, needs_dx: bool = True) -> float:
    """Forward y = x·Wᵀ plus, in backward, dx = gy·W (W frozen: no weight gradient)."""
    return 2.0 * s.n * s.in_f * s.out_f * (2 if needs_dx else 1)


def environment() -> dict:
    def v(d):
        try:
            return _md.version(d)
        except _md.PackageNotFoundError:
            return None
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": v("torch"), "triton": v("triton"), "peft": v("peft"), "transformers": v("transformers"),
        "pypeft_fast": v("pypeft_fast"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


# --- one runner for every family: providers side by side, modes forward / backward / full ---

def _flat(P):
    return [t for p in P for t in (p if isinstance(p, tuple) else (p,))]


def time_modes(call, x, P, gy) -> dict:
    """Median seconds for ``forward`` (no graph), ``full`` (forward + backward) and their
    difference ``backward``."""
    def fwd():
        with torch.no_grad():
            call(x, P)

    def full():
        x.grad = None
        for t in _flat(P):
            t.grad = None
        call(x, P).backward(gy)

    t_fwd, t_full = median_time(fwd), median_time(full)
    return {"forward": t_fwd, "full": t_full, "backward": t_full - t_fwd}


def run_family_bench(family: str, make, shapes: list[str], providers: list[str], flops) -> list[dict]:
    """``make(shape) -> (x, W, P, {provider: call(x, P)})``; ``flops(shape, P)`` = the delta's
    forward+backward FLOPs. Prints one table; returns the rows (with the environment)."""
    env = environment()
    rows = []
    for key in shapes:
        s = SHAPES[key]
        x, W, P, calls = make(s)
        gy = torch.randn(s.n, s.out_f, dtype=x.dtype)
        base = None
        for prov in providers:
            if prov not in calls:
                continue
            t = time_modes(calls[prov], x, P, gy)
            if prov == "frozen":
                base = t["full"]
            extra = flops(s, P) if prov != "frozen" else 0.0
            rows.append({"family": family, "shape": key, "provider": prov, **{k: v * 1e3 for k, v in t.items()},
                         "over_frozen_%": None if base is None else 100 * (t["full"] / base - 1),
                         "delta_GFLOP/s": extra / max(t["full"] - (base or 0), 1e-9) / 1e9 if extra else None,
                         **env})
    print(f"\n{family}: times in ms (median), overhead of forward+backward over the frozen layer")
    print_table(rows, ["shape", "provider", "forward", "backward", "full", "over_frozen_%", "delta_GFLOP/s"])
    print(f"device {env['device']}, torch {env['torch']}, {env['date']}")
    return rows


def available_backends(family: str) -> list[str]:
    from pypeft_fast import registry
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [b for b in registry.BACKENDS if registry.why_unavailable(family, b, dev) is None]


def ops_and_layer_cli(doc: str, family: str, run_ops, make_layer, layer_flops,
                      layer_providers=("frozen", "torch", "cpp", "triton", "cuda")) -> None:
    """The command line shared by the benches that print an op-level table (``run_ops(shapes,
    reps)``) and then the layer-level table of :func:`run_family_bench`."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-layer", action="store_true", help="only the op-level table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_ops(args.shapes, args.reps)
    if not args.no_layer:
        run_family_bench(family, make_layer, args.shapes, list(layer_providers), layer_flops)
