"""``pypeft-fast bench``: argument parsing and the run, start to end."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

import torch

from .precision import PRECISIONS, default_precisions
from .variants import VARIANTS, resolve_name

PRESETS = {
    # hidden 1024, 4 layers, batch 4 × 256, r = 16 (MEASURED.md's configuration)
    "default": dict(hidden=1024, intermediate=2752, layers=4, heads=16, vocab=4096, batch=4, seq=256,
                    rank=16, steps=5, warmup=2, threads=None),
    # CI smoke test: every code path in seconds. One thread: at this size a second thread buys
    # nothing, and on a loaded 2-core machine two spinning OpenMP threads made each step ~50×
    # slower (0.5 s instead of 10 ms, measured under load average 5).
    "tiny": dict(hidden=64, intermediate=176, layers=2, heads=4, vocab=256, batch=2, seq=32,
                 rank=4, steps=2, warmup=1, threads=1),
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma list of integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def parse_args(argv):
    from ..registry import BACKENDS

    names = ", ".join(VARIANTS)
    p = argparse.ArgumentParser(
        prog="pypeft-fast bench",
        description="Training-step time and saved activations: peft vs pypeft_fast on a "
                    "Llama-architecture model built from a config (random weights), in fp32 and "
                    "under bf16 autocast.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="model/batch size (default: hidden 1024, 4 layers, batch 4×256; tiny: CI smoke)")
    for name, help_text in (("hidden", "hidden size"), ("intermediate", "MLP size"), ("layers", "decoder layers"),
                            ("heads", "attention heads"), ("vocab", "vocabulary"), ("batch", "sequences per step"),
                            ("steps", "timed steps per row (median reported)"), ("warmup", "untimed steps first")):
        p.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (overrides the preset)")
    for name, help_text in (("seq", "tokens per sequence"), ("rank", "r for LoRA, DoRA, LoKr, LoHa and SHiRA")):
        p.add_argument(f"--{name}", type=_int_list, default=None,
                       help=f"{help_text} (overrides the preset); a comma list, e.g. 8,16,64, runs the "
                            "scaling view: the bench once per value, then time over floor beside the "
                            "FLOP share per variant and value")
    p.add_argument("--families", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {names} (also: "
                        f"{', '.join(a for s in VARIANTS.values() for a in s.aliases)})")
    p.add_argument("--precision", default="auto",
                   help=f"comma-separated subset of {', '.join(PRECISIONS)}; each gets its own floor. "
                        "auto (default): fp32, plus bf16-autocast on a GPU and on CPUs with native bf16 "
                        "(AVX512-BF16/AMX). '-autocast': fp32 weights, torch.autocast; 'bf16': bf16 base, "
                        "fp32 adapters")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--phm-n", type=int, default=4, help="PHM terms n (default 4)")
    p.add_argument("--phm-rank", type=int, default=1,
                   help="rank k of PHM's B factors, Bᵢ = Sᵢ·Tᵢ (default 1: Compacter's fast weights)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto",
                   help="pypeft_fast backend: auto (default), torch, cpp, cuda or triton for every family, "
                        "or per family, e.g. lowrank=torch,sparse=cpp (the others stay auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; the tiny preset uses 1)")
    p.add_argument("--json", metavar="PATH", help="write the rows (with device, versions, date) as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="bar charts of time and memory overhead")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the table, profile one more step per row and print its N most "
                        "expensive ops and the largest increases over the floor")
    a = p.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.ranks = a.rank if isinstance(a.rank, list) else [a.rank]
    a.seqs = a.seq if isinstance(a.seq, list) else [a.seq]
    a.rank, a.seq = a.ranks[0], a.seqs[0]
    if any(v <= 0 for v in a.ranks + a.seqs):
        p.error(f"--rank and --seq must be positive, got {a.ranks} and {a.seqs}")
    wanted = [f for f in a.families.split(",") if f.strip()]
    resolved = [resolve_name(f) for f in wanted]
    bad = [f.strip().lower() for f, r in zip(wanted, resolved) if r is None]
    if bad:
        p.error(f"--families: unknown {bad}; choose from {names}")
    a.families = [f for f in VARIANTS if f in resolved]
    families = sorted({s.family for s in VARIANTS.values()})
    a.backends = {f: "auto" for f in families}
    for part in a.backend.split(","):
        fam, _, be = part.strip().rpartition("=")
        fam = VARIANTS[resolve_name(fam)].family if fam and resolve_name(fam) else fam.lower()
        if be not in ("auto", *BACKENDS) or (fam and fam not in families):
            p.error(f"--backend {a.backend!r}: expected auto|{'|'.join(BACKENDS)} or family=backend pairs "
                    f"with families {', '.join(families)}")
        for f in ([fam] if fam else families):
            a.backends[f] = be
    if a.precision != "auto":
        a.precision = [x.strip() for x in a.precision.split(",") if x.strip()]
        unknown = [x for x in a.precision if x not in PRECISIONS]
        if unknown or not a.precision:
            p.error(f"--precision: unknown {unknown}; choose from {', '.join(PRECISIONS)}")
    for k in ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq", "rank", "steps"):
        if getattr(a, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(a, k)}")
    if a.phm_rank <= 0:
        p.error("--phm-rank must be positive")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.hidden % a.heads:
        p.error(f"--hidden {a.hidden} must be divisible by --heads {a.heads}")
    if "phm" in a.families and (a.hidden % a.phm_n or a.intermediate % a.phm_n):
        p.error(f"PHM n={a.phm_n} must divide hidden {a.hidden} and intermediate {a.intermediate}")
    if not 0.0 <= a.lora_dropout < 1.0:
        p.error("--lora-dropout must be in [0, 1)")
    return a


def pf_backends(a, device) -> dict[str, str]:
    """The backend each selected variant's family resolves to on ``device``."""
    from .. import registry

    out = {}
    for name in a.families:
        fam = VARIANTS[name].family
        want = a.backends[fam]
        try:
            got = registry.resolve(fam, want, device)[0]
            out[fam] = got if want == "auto" else f"{got} (requested)"
        except Exception as e:  # noqa: BLE001
            out[fam] = f"error: {e}"
    return out


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    combos = [(r, q) for q in a.seqs for r in a.ranks]
    if len(combos) == 1:
        return run_bench(a)[0]
    from .report import scaling_table

    rc, sweep = 0, []
    for i, (r, q) in enumerate(combos, 1):
        print(f"pypeft-fast bench: scaling view {i}/{len(combos)}: r = {r}, seq = {q}", flush=True)
        b = copy.copy(a)
        b.rank, b.seq, b.json, b.plot, b.profile = r, q, None, None, 0
        code, result = run_bench(b)
        rc = rc or code
        sweep += [dict(row, rank=r, seq=q) for row in result]
    print(scaling_table(sweep))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ranks": a.ranks, "seqs": a.seqs, "rows": sweep}, f, indent=2)
        print(f"wrote {a.json}")
    return rc


def run_bench(a) -> tuple[int, list[dict]]:
    """One bench at ``a.rank`` and ``a.seq``: prints the table; returns (exit code, rows)."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"pypeft-fast bench needs transformers and peft (pip install 'pypeft_fast[hf]'): {e}",
              file=sys.stderr)
        return 2, []
    from ..measure import device_text, environment
    from .model import build_base, make_batch
    from .report import add_flop_shares, notes, plot, rows, table
    from .timing import Run, measure, profile
    from .variants import build_variants

    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("pypeft-fast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2, []
    note = None
    if a.precision == "auto":
        a.precision, note = default_precisions(device)
    precisions = [PRECISIONS[n] for n in a.precision]

    title = (f"Llama hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, "
             f"vocab {a.vocab}; batch {a.batch}×{a.seq}; {', '.join(a.precision)} on {device_text(device)}; "
             f"median of {a.steps} steps after {a.warmup} warm-ups")
    print(f"pypeft-fast bench: {title}", flush=True)
    if note:
        print(f"note: {note}", flush=True)
    if device.type == "cpu" and load is not None and load > 0.5:
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores when the bench started; other "
              "processes share the CPU, so absolute times are inflated (rows are interleaved, so the "
              "ratios suffer less)", flush=True)
    print("pypeft_fast backends: " + ", ".join(f"{k}={v}" for k, v in pf_backends(a, device).items()),
          flush=True)
    # One set of models per base dtype: the autocast precisions step the fp32 models themselves.
    models = {}
    for dtype in dict.fromkeys(p.base_dtype for p in precisions):
        base = build_base(a, device, dtype)
        models[dtype] = build_variants(a, base)
        del base
    runs = [Run(p, v) for p in precisions for v in models[p.base_dtype]]
    batch = make_batch(a, device)
    measure(runs, batch, device, a.warmup, a.steps, progress=not a.no_progress)
    floors_failed = [r for r in runs if r.variant.impl == "floor" and r.variant.error]
    if floors_failed:
        raise RuntimeError(f"the floor failed, nothing to compare with: {floors_failed[0].variant.error}")
    env = environment(device)
    result = rows(runs, env)
    add_flop_shares(result, a, runs, batch, device)
    print(table(result))
    for n in notes(result):
        print(n)
    if a.json:
        doc = {"config": {k: getattr(a, k) for k in ("preset", "hidden", "intermediate", "layers", "heads",
                                                      "vocab", "batch", "seq", "rank", "steps", "warmup",
                                                      "families", "precision", "lora_dropout", "phm_n",
                                                      "phm_rank", "backend")},
               **env, "pf_backends": pf_backends(a, device), "load_average_at_start": load,
               "rows": result}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {a.json}")
    if a.plot:
        plot(result, a.plot, title)
        print(f"wrote {a.plot}")
    if a.profile:
        print(profile(runs, batch, device, a.profile))
    bad = [r for r in result if r.get("error") or not (r["step_s"] > 0 and math.isfinite(r["step_s"]))]
    return (1 if bad else 0), result
