"""Turns ``pytest bench/ --benchmark-json out.json`` into a Markdown table and a PNG.

    python bench/report.py out.json [--md report.md] [--png report.png] [--mode full]

Markdown: one table per case family and mode; a row per (shape, rank, tokens, implementation)
with the median, achieved GFLOP/s and GB/s, the ratio to the frozen GEMM (timed in the same
rounds) and the speed-up over the reference (peft / materialise) of the same group; then the
limit table: the adapter's FLOP share beside each implementation's measured overhead (mode
full). PNG: ratio to the frozen GEMM per family and implementation (mode ``--mode``), one bar
per shape. Also imported by bench/conftest.py (the terminal summary) and scripts/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))         # bench/roofline.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pypeft_fast from a checkout

IMPL_ORDER = ("reference", "torch", "cpp", "triton", "cuda", "auto")


def load_rows(path: str) -> list[dict]:
    """The ``extra_info`` of every benchmark in a pytest-benchmark JSON (cases timed by
    bench/test_kernels.py), with the median from the stats when extra_info lacks it; or the
    lines of a ``--bench-rows`` file (``.jsonl``)."""
    with open(path) as f:
        if path.endswith(".jsonl"):  # --bench-rows: extra_info lines, as they were measured
            rows = [json.loads(line) for line in f if line.strip()]
            return [dict(r, kind=r.get("kind", "op" if "op" in r else "layer")) for r in rows]
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if "family" not in info:
            continue
        info.setdefault("kind", "op" if "op" in info else "layer")
        info.setdefault("median_s", b["stats"]["median"])
        rows.append(info)
    return rows


def _impl_key(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(out)


def _groups(rows):
    g = defaultdict(dict)
    for r in rows:
        g[(r["family"], r["shape"], r["rank"], r["tokens"], r["mode"])][r["impl"]] = r
    return g


def _predicted(r: dict) -> str:
    """bench/roofline.py's prediction for a Triton row (mode full) on an H100/H200, else ""."""
    if r.get("backend") != "triton" or r["mode"] != "full":
        return ""
    import roofline
    from pypeft_fast import workloads

    gpu = roofline.gpu_of(r.get("device", ""))
    if gpu is None:
        return ""
    shape = workloads.shape_of(r["shape"])
    t = roofline.predicted_seconds(r["family"], shape, r["tokens"], r["rank"], gpu)
    if t is None:
        return ""
    return f"{t * 1e3:.3g} ({t / roofline.frozen_seconds(shape, r['tokens'], gpu):.2f}×)"


def timing_tables(rows: list[dict], markdown: bool = True) -> str:
    groups = _groups(rows)
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        for mode in ("forward", "backward", "full"):
            keys = [k for k in groups if k[0] == fam and k[4] == mode]
            if not keys:
                continue
            body = []
            for k in keys:
                impls = groups[k]
                ref = impls.get("reference")
                for impl in sorted(impls, key=_impl_key):
                    r = impls[impl]
                    name = impl if impl != "reference" else r.get("reference_name", "reference")
                    if impl == "auto":
                        name = f"auto ({r.get('backend')})"
                    speed = "—" if ref is None or impl == "reference" else f"{ref['median_s'] / r['median_s']:.2f}×"
                    body.append([k[1], str(k[2]), str(k[3]), name, _fmt_ms(r["median_s"]),
                                 _fmt_ms(r["frozen_s"]), f"{r['ratio_to_frozen']:.2f}", speed,
                                 f"{r['gflops_per_s']:.1f}", f"{r['gb_per_s']:.1f}", _predicted(r)])
            out.append(f"\n#### {fam} — {mode}\n" if markdown else f"\n{fam} — {mode}")
            out.append(_table(["shape", "r", "tokens", "impl", "ms", "frozen ms", "× frozen",
                               "speed-up over reference", "GFLOP/s", "GB/s",
                               "roofline ms (× frozen)"], body, markdown))
    return "\n".join(out)


def layer_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind", "layer") == "layer"]


def limit_table(rows: list[dict], markdown: bool = True) -> str:
    """Per family, shape, rank, tokens (mode full): the adapter's FLOP share (written-down
    formula, pypeft_fast/workloads.py) beside each implementation's measured overhead over the
    frozen GEMM (ratio − 1, frozen timed in the same rounds)."""
    full = [r for r in layer_rows(rows) if r["mode"] == "full"]
    if not full:
        return "(no mode-full results: nothing to compare with the FLOP share)"
    groups = _groups(full)
    impls = sorted({r["impl"] for r in full}, key=_impl_key)
    body = []
    for k, by_impl in groups.items():
        any_row = next(iter(by_impl.values()))
        cells = [k[0], k[1], str(k[2]), str(k[3]), f"{100 * any_row['adapter_flop_share']:.1f} %"]
        for impl in impls:
            r = by_impl.get(impl)
            cells.append("" if r is None else f"{100 * (r['ratio_to_frozen'] - 1):+.1f} %")
        body.append(cells)
    names = [i if i != "reference" else "reference (peft / materialise)" for i in impls]
    head = ["family", "shape", "r", "tokens", "FLOP share"] + [f"{n} overhead" for n in names]
    return _table(head, body, markdown)


def environment_line(rows: list[dict]) -> str:
    r = rows[0]
    keys = ("device", "torch", "triton", "peft", "pypeft_fast", "threads", "date")
    return ", ".join(f"{k} {r.get(k)}" for k in keys if k in r) + f"; dtype {r.get('dtype')}"


def op_table(rows: list[dict], markdown: bool = True) -> str:
    """bench/test_ops.py's rows: per op and shape, each provider's median and torch/this."""
    g = defaultdict(dict)
    for r in rows:
        g[(r["family"], r["op"], r["shape"], r["rank"], r["tokens"])][r["provider"]] = r
    body = []
    for k, prov in g.items():
        t = prov.get("torch")
        for name in sorted(prov, key=lambda p: ("nodrop", "torch", "native").index(p) if p in ("nodrop", "torch", "native") else 9):
            r = prov[name]
            body.append([k[0], k[1], k[2], str(k[3]), str(k[4]), name, _fmt_ms(r["median_s"]),
                         "" if t is None or name == "nodrop" else f"{t['median_s'] / r['median_s']:.2f}×",
                         f"{r['gflops_per_s']:.1f}" if r["flops"] else "", f"{r['gb_per_s']:.1f}"])
    return _table(["family", "op", "shape", "r", "tokens", "provider", "ms", "torch/this", "GFLOP/s", "GB/s"],
                  body, markdown)


def markdown_report(rows: list[dict]) -> str:
    layer = [r for r in rows if r.get("kind", "layer") == "layer"]
    ops = [r for r in rows if r.get("kind") == "op"]
    if not rows:
        return "No micro-benchmark results (every case skipped, or the run was --benchmark-disable).\n"
    out = ["### Kernel micro-benchmarks", "", environment_line(rows), ""]
    if layer:
        out += ["Ratios to the frozen GEMM come from the same rounds (interleaved); speed-up = reference "
                "median / this median, same group.", timing_tables(layer), "",
                "#### The limit beside the measurement (mode full)", "", limit_table(layer), ""]
    if ops:
        out += ["#### Op level (bench/test_ops.py)", "", op_table(ops), ""]
    return "\n".join(out)


def plot(rows: list[dict], path: str, mode: str = "full") -> bool:
    """Bar chart of × frozen per family (subplots) and implementation (bars), one colour per
    shape; False when matplotlib is missing or there is nothing to draw."""
    sel = [r for r in layer_rows(rows) if r["mode"] == mode]
    if not sel:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/report.py: matplotlib is not installed: no PNG", file=sys.stderr)
        return False
    fams = list(dict.fromkeys(r["family"] for r in sel))
    ncols = min(4, len(fams))
    nrows = -(-len(fams) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 0.6, 2.9 * nrows + 1.0), squeeze=False,
                             sharey=True)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(fams):]:
        ax.axis("off")
    for ax, fam in zip(flat, fams):
        fr = [r for r in sel if r["family"] == fam]
        impls = sorted(dict.fromkeys(r["impl"] for r in fr), key=_impl_key)
        keys = list(dict.fromkeys((r["shape"], r["rank"], r["tokens"]) for r in fr))
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            vals = []
            for impl in impls:
                r = next((r for r in fr if r["impl"] == impl and (r["shape"], r["rank"], r["tokens"]) == key), None)
                vals.append(r["ratio_to_frozen"] if r else float("nan"))
            ax.bar([i + j * width for i in range(len(impls))], vals, width,
                   label=f"{key[0]} r{key[1]} n{key[2]}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.grid(axis="y", which="major", lw=0.3, alpha=0.5)
        names = [i if i != "reference" else fr[0].get("reference_name", "ref") for i in impls]
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(impls))], names, rotation=30, fontsize=8)
        ax.set_title(fam, fontsize=9)
    for row in axes:
        row[0].set_ylabel(f"time / frozen GEMM ({mode})", fontsize=8)
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.suptitle(environment_line(sel)[:160], fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.04 / nrows, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="pytest --benchmark-json output of pytest bench/")
    p.add_argument("--md", help="write the Markdown here (default: print it)")
    p.add_argument("--png", help="write the bar chart here")
    p.add_argument("--mode", default="full", choices=("forward", "backward", "full"))
    a = p.parse_args(argv)
    rows = load_rows(a.json)
    md = markdown_report(rows)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    else:
        print(md)
    if a.png and plot(rows, a.png, a.mode):
        print(f"bench/report.py: wrote {a.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
