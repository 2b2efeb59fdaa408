"""Running the bench: one training step, the interleaved timing loop over every (precision,
variant) run, the saved activations, and an optional per-op profile.

A step is forward (causal-LM cross-entropy; under the precision's autocast), backward,
``AdamW.step()`` and ``zero_grad``. Runs are interleaved — warm-ups for all, then round after
round of one step each — so a change in machine load hits every row alike.
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import torch

from ..measure import saved_activation_bytes, timed
from .precision import Precision
from .variants import Variant


@dataclass
class Run:
    """One row of the table: a variant's model stepped at one precision."""

    precision: Precision
    variant: Variant
    times: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    saved_nonparam_bytes: int = 0
    served_calls: int = 0     # patched models: calls pypeft_fast served during this run's steps
    fallback_calls: int = 0   # ... and calls that ran peft's forward

    @property
    def step_s(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def label(self) -> str:
        return f"[{self.precision.name}] {self.variant.label}"


def _calls(report) -> tuple[int, int]:
    if report is None:
        return 0, 0
    return (sum(e.served_calls for e in report.entries),
            sum(sum(e.fallback_calls.values()) for e in report.entries))


def train_step(run: Run, batch, device) -> torch.Tensor:
    v = run.variant
    served0, fell0 = _calls(v.report)
    with run.precision.context(device):
        loss = v.model(**batch).loss
    loss.backward()
    v.opt.step()
    v.opt.zero_grad(set_to_none=True)
    served1, fell1 = _calls(v.report)
    run.served_calls += served1 - served0
    run.fallback_calls += fell1 - fell0
    return loss


def _guarded(run: Run, fn):
    v = run.variant
    if v.error is not None:
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (one broken variant must not hide the others)
        v.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        v.opt.zero_grad(set_to_none=True)
        print(f"\npypeft-fast bench: {run.label} failed and is skipped: {v.error}", file=sys.stderr)
        return None


def measure(runs: list[Run], batch: dict, device, warmup: int, steps: int, progress: bool = True) -> None:
    """Warm-ups, interleaved timed rounds, then the saved activations of one forward per run."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs) * (warmup + steps + 1), desc="bench", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for r in runs:
        bar.set_postfix_str(f"warm-up {r.label}")
        for _ in range(warmup):
            _guarded(r, lambda: train_step(r, batch, device))
            bar.update()
    for i in range(steps):
        for r in runs:
            bar.set_postfix_str(f"round {i + 1}/{steps} {r.label}")
            t = _guarded(r, lambda: timed(lambda: train_step(r, batch, device), device))
            if t is not None:
                r.times.append(t)
            bar.update()
    for r in runs:
        bar.set_postfix_str(f"saved activations {r.label}")

        def saved():
            with r.precision.context(device):
                return saved_activation_bytes(r.variant.model, batch)

        got = _guarded(r, saved)
        if got is not None:
            r.saved_bytes, r.saved_nonparam_bytes = got
        r.variant.opt.zero_grad(set_to_none=True)
        bar.update()
    bar.close()


def profile(runs: list[Run], batch, device, top: int) -> str:
    """One extra step per run under ``torch.profiler``: the ``top`` ops by self CPU time, and what
    each run spends more than its precision's floor, op by op (where the overhead goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    per: dict[str, dict[str, tuple[float, int]]] = {}
    runs = [r for r in runs if r.variant.error is None]
    for r in runs:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with tprofile(activities=acts) as prof:
            train_step(r, batch, device)
        per[r.label] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    floors = {r.precision.name: per[r.label] for r in runs if r.variant.impl == "floor"}
    lines = []
    for r in runs:
        ops, floor = per[r.label], floors.get(r.precision.name, {})
        is_floor = r.variant.impl == "floor"
        lines.append(f"\n== {r.label}: {sum(t for t, _ in ops.values()):.0f} ms self CPU time in ops")
        for k, (t, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
            extra = "" if is_floor else f"   ({t - floor.get(k, (0.0, 0))[0]:+8.1f} ms vs floor)"
            lines.append(f"   {t:9.1f} ms  {n:6d}×  {k}{extra}")
        if not is_floor:
            diff = {k: t - floor.get(k, (0.0, 0))[0] for k, (t, _) in ops.items()}
            worst = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
            lines.append("   largest increases over the floor: " +
                         ", ".join(f"{k} {d:+.1f} ms" for k, d in worst if d > 0))
    return "\n".join(lines)
