"""Hadamard (LoHa) micro-benchmark: which form of each part wins, per shape, side by side.

Per layer shape (n = 1024 tokens; the end-to-end bench's projections) and rank r (r1 = r2 = r),
every provider runs forward + backward (x, and all four factors need gradients), interleaved
within each repetition so that load changes hit all of them alike:

    frozen      F.linear(x, W)                         the floor: x·Wᵀ and gy·W
    peft        F.linear(x, W) + F.linear(x, ΔW)       peft LoHa's arithmetic (ΔW with autograd)
    factored    Khatri–Rao for forward, dx and grads   ΔW never built
    dense       W' = W + s·M1⊙M2 transient; G = gyᵀ·x  one GEMM forward and dx, one n×out×in for G
    dense+kr    dense forward and dx, Khatri–Rao grads
    auto        the plan the cost model picks (printed)

Columns: ms (median), over frozen (%; median-based and min-based: the least disturbed step on a
shared machine), and the cost model's predicted extra FLOP-equivalents
(hadamard.part_costs) as a % of the frozen layer's 4·n·in·out.

First a per-part table (forward, dx, grads; each form's least disturbed time against the cost
model's FLOP-equivalents), then the layer table above.

    python bench/bench_hadamard.py [--ranks 8 16] [--shapes ...] [--reps 7] [--threads N] [--no-layer]
"""
import argparse
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.measure import environment, interleaved_times  # noqa: E402
from pypeft_fast.workloads import SHAPES as _PROJECTIONS  # noqa: E402
from pypeft_fast.families.hadamard import (  # noqa: E402
    METHODS, HadamardHP, HadamardPlan, TorchHadamard, delta_weight, part_costs, plan_for,
)

TOKENS = 4 * 256  # the e2e bench's batch 4 × 256


@dataclass(frozen=True)
class LayerShape:
    n: int
    in_f: int
    out_f: int


SHAPES = {f"llama-1024/{name}": LayerShape(TOKENS, p.in_features, p.out_features)
          for name, p in (("attn", _PROJECTIONS["pf-bench/q_proj"]), ("up", _PROJECTIONS["pf-bench/up_proj"]),
                          ("down", _PROJECTIONS["pf-bench/down_proj"]))}
"""The e2e bench model's distinct projection shapes (workloads.SHAPES "pf-bench") at its tokens."""


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in columns))


PLANS = {
    "factored": HadamardPlan("factored", "factored", "factored"),
    "dense": HadamardPlan("dense", "dense", "dense"),
    "dense+kr": HadamardPlan("dense", "dense", "factored"),
    "auto": "auto",
}
SCALING = 2.0


def times_interleaved(fns: dict, reps: int) -> dict:
    """``{name: (median s, min s)}`` of :func:`measure.interleaved_times` (the min is the least
    disturbed repetition on a shared machine)."""
    return {name: (statistics.median(ts), min(ts)) for name, ts in interleaved_times(fns, reps=reps).items()}


def predicted_extra(s, r, plan: HadamardPlan) -> float:
    c = part_costs(s.n, s.in_f, s.out_f, r, r)
    dx = c["dx"][plan.dx]
    if plan.dx == "factored" and plan.grads == "factored":
        dx = 2.0 * s.n * r * r * s.in_f
    return c["forward"][plan.forward] + dx + c["grads"][plan.grads]


def layer_calls(s, r):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.n, s.in_f, generator=g).requires_grad_(True)
    W = torch.randn(s.out_f, s.in_f, generator=g) / s.in_f**0.5
    P = [torch.randn(*shape, generator=g).div_(shape[0] ** 0.5).requires_grad_(True)
         for shape in ((s.out_f, r), (r, s.in_f), (s.out_f, r), (r, s.in_f))]
    gy = torch.randn(s.n, s.out_f, generator=g)

    def step(fn):
        def run():
            x.grad = None
            for p in P:
                p.grad = None
            fn().backward(gy)
        return run

    calls = {"frozen": step(lambda: F.linear(x, W)),
             "peft": step(lambda: F.linear(x, W) + F.linear(x, delta_weight(*P, SCALING)))}
    for name, plan in PLANS.items():
        calls[name] = step(lambda plan=plan: pf.hadamard_linear(x, W, None, *P, SCALING, method=plan))
    return calls


def part_calls(s, r):
    """One call per (part, method), the frozen GEMM of that part included (forward: x·Wᵀ; dx:
    gy·W; grads: none), plus the frozen GEMMs alone: {part: {method or "frozen": fn}}."""
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(s.n, s.in_f, generator=g), torch.randn(s.n, s.out_f, generator=g)
    W = torch.randn(s.out_f, s.in_f, generator=g) / s.in_f**0.5
    P = tuple(torch.randn(*shape, generator=g) for shape in ((s.out_f, r), (r, s.in_f), (s.out_f, r), (r, s.in_f)))
    hp = {m: HadamardHP(SCALING, HadamardPlan(m, m, m)) for m in METHODS}
    K = TorchHadamard
    calls = {"forward": {"frozen": lambda: F.linear(x, W)},
             "dx": {"frozen": lambda: gy @ W},
             "grads": {}}
    for m in METHODS:
        calls["forward"][m] = lambda m=m: K.forward(x, W, None, P, (), hp[m])
        calls["dx"][m] = lambda m=m: K.backward(gy, x, W, P, (), (), hp[m], True, (False,) * 4)
        calls["grads"][m] = lambda m=m: K.backward(gy, x, W, P, (), (), hp[m], False, (True,) * 4)
    return calls


def run_parts(shapes, ranks, reps, env):
    """Per part: the least disturbed time (min over ``reps``, interleaved) of each form, the extra
    over the frozen GEMM of that part, and the cost model's prediction of the extra."""
    rows = []
    for key in shapes:
        s = SHAPES[key]
        for r in ranks:
            costs = part_costs(s.n, s.in_f, s.out_f, r, r)
            auto = plan_for(s.n, s.in_f, s.out_f, r, r)
            for part, provs in part_calls(s, r).items():
                times = times_interleaved(provs, reps=reps)
                frozen = times["frozen"][1] if "frozen" in times else 0.0
                for m in METHODS:
                    rows.append({"shape": key, "r": r, "part": part, "form": m,
                                 "min ms": times[m][1] * 1e3,
                                 "extra ms": (times[m][1] - frozen) * 1e3,
                                 "model GFLOP-eq": costs[part][m] / 1e9,
                                 "auto": "*" if getattr(auto, part) == m else "", **env})
    print("\nhadamard parts: least disturbed time (min of the interleaved repetitions); extra = over "
          "the part's frozen GEMM; * = the form the cost model picks")
    print_table(rows, ["shape", "r", "part", "form", "min ms", "extra ms", "model GFLOP-eq", "auto"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--ranks", nargs="*", type=int, default=[8, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-layer", action="store_true", help="only the per-part table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    rows = run_parts(args.shapes, args.ranks, max(args.reps, 9), env)
    if args.no_layer:
        return rows
    for key in args.shapes:
        s = SHAPES[key]
        frozen_flops = 4.0 * s.n * s.in_f * s.out_f
        for r in args.ranks:
            times = times_interleaved(layer_calls(s, r), reps=args.reps)
            auto = plan_for(s.n, s.in_f, s.out_f, r, r)
            for prov, (t, t_min) in times.items():
                plan = auto if prov == "auto" else PLANS.get(prov)
                pred = None if not isinstance(plan, HadamardPlan) else 100 * predicted_extra(s, r, plan) / frozen_flops
                rows.append({"shape": key, "r": r, "provider": prov, "ms": t * 1e3,
                             "over frozen %": 100 * (t / times["frozen"][0] - 1),
                             "(min-based)": 100 * (t_min / times["frozen"][1] - 1),
                             "predicted %": pred,
                             "plan": f"{plan.forward}/{plan.dx}/{plan.grads}" if isinstance(plan, HadamardPlan) else "",
                             **env})
    print("\nhadamard: forward+backward per layer, median ms, providers interleaved (side by side)")
    print_table(rows, ["shape", "r", "provider", "ms", "over frozen %", "(min-based)", "predicted %", "plan"])
    print(f"device {env['device']}, torch {env['torch']}, {env['date']}")
    return rows


if __name__ == "__main__":
    main()
