"""The bench's results: one row (dict) per run, the text table, the plot.

Every overhead is against the floor *of the same precision* (the frozen model under the same
autocast); "vs peft" is the baseline's median step over pypeft_fast's, same precision.
"""
from __future__ import annotations

import textwrap

import torch

from .timing import Run
from .variants import VARIANTS


def rows(runs: list[Run], env: dict) -> list[dict]:
    floors = {r.precision.name: r for r in runs if r.variant.impl == "floor"}
    baselines = {(r.precision.name, r.variant.family): r for r in runs
                 if r.variant.impl in ("peft", "reference")}
    out = []
    for r in runs:
        v, floor = r.variant, floors[r.precision.name]
        ref = baselines.get((r.precision.name, v.family))
        fast = v.impl == "pypeft_fast"

        def over(x, f):
            return x / f - 1.0 if f else None

        row = {
            "precision": r.precision.name, "family": v.family, "impl": v.impl, "label": v.label,
            "dtype": str(r.precision.base_dtype).replace("torch.", ""),
            "autocast": None if r.precision.autocast is None else str(r.precision.autocast).replace("torch.", ""),
            "step_s": r.step_s, "step_s_all": r.times,
            "step_s_min": min(r.times) if r.times else None,
            "time_over_floor": over(r.step_s, floor.step_s),
            "time_over_floor_min": over(min(r.times), min(floor.times)) if r.times and floor.times else None,
            "speedup_vs_peft": ref.step_s / r.step_s if (ref is not None and fast) else None,
            "saved_bytes": r.saved_bytes,
            "saved_over_floor": over(r.saved_bytes, floor.saved_bytes),
            "saved_nonparam_bytes": r.saved_nonparam_bytes,
            "saved_nonparam_over_floor": over(r.saved_nonparam_bytes, floor.saved_nonparam_bytes),
            "trainable_params": v.trainable_params,
            **env,
        }
        if v.report is not None:
            row["pf_served_calls"], row["pf_fallback_calls"] = r.served_calls, r.fallback_calls
        if v.error is not None:
            row["error"] = v.error
            for k in ("step_s", "step_s_min", "time_over_floor_min", "speedup_vs_peft", "time_over_floor",
                      "saved_over_floor", "saved_nonparam_over_floor"):
                row[k] = None
        out.append(row)
    return out


def add_flop_shares(result_rows: list[dict], a, runs, batch, device) -> None:
    """``flop_share`` per row: the adapter's FLOPs over the floor step's (:mod:`.flops`), the
    limit printed beside the measured time over the floor; for pypeft_fast's rows under autocast
    also ``fp32_rate_ratio`` (ρ) and ``flop_share_at_fp32_rate``, the delta's FLOPs priced at ρ
    (the extra frozen GEMMs of DoRA with dropout at 1): the limit of a delta accumulated in
    float32 beside frozen GEMMs in bf16/fp16 (:mod:`.flops`; ρ = 1 for a float32 floor)."""
    from .flops import adapter_step_flops, fp32_rate_ratio, step_flops

    floor_flops = {r.precision.name: step_flops(r.variant.model, batch, r.precision.context(device))
                   for r in runs if r.variant.impl == "floor" and r.variant.error is None}
    ratios = {p.name: (1.0 if p.frozen_gemm_dtype == torch.float32 else
                       fp32_rate_ratio(a, device, p.frozen_gemm_dtype))
              for p in dict.fromkeys(r.precision for r in runs)}
    for row in result_rows:
        extra = adapter_step_flops(row["family"], a) if row["impl"] != "floor" else None
        total = floor_flops.get(row["precision"])
        row["adapter_flops"], row["floor_step_flops"] = extra, total
        row["flop_share"] = share = extra / total if (extra is not None and total) else None
        fast = row["impl"] == "pypeft_fast"
        rho = row["fp32_rate_ratio"] = ratios[row["precision"]] if fast else None
        row["flop_share_at_fp32_rate"] = None
        if fast and share:
            frozen = adapter_step_flops(row["family"], a, "frozen")
            row["flop_share_at_fp32_rate"] = ((extra - frozen) * rho + frozen) / total


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:+.1f} %"


HEAD = ("precision", "variant", "step s", "vs peft", "time over floor", "(min-based)", "FLOP share",
        "at fp32 rate", "saved MiB", "mem over floor", "excl. weights", "trainable")


def table(result_rows: list[dict]) -> str:
    body = []
    for r in result_rows:
        floor = r["impl"] == "floor"
        if r.get("error"):
            body.append((r["precision"], r["label"], "failed", "—", "—", "—", "—", "—", "—", "—", "—",
                         f"{r['trainable_params']:,}"))
            continue
        body.append((
            r["precision"], r["label"], f"{r['step_s']:.3f}",
            "—" if r["speedup_vs_peft"] is None else f"{r['speedup_vs_peft']:.2f}×",
            "—" if floor else _pct(r["time_over_floor"]),
            f"{r['step_s_min']:.3f} s" if floor else _pct(r["time_over_floor_min"]),
            _pct(r.get("flop_share")),
            _pct(r.get("flop_share_at_fp32_rate")) if r.get("fp32_rate_ratio", 1.0) != 1.0 else "—",
            f"{r['saved_bytes'] / 2**20:.1f}",
            "—" if floor else _pct(r["saved_over_floor"]),
            f"{r['saved_nonparam_bytes'] / 2**20:.1f}" + ("" if floor else
                                                          f" ({_pct(r['saved_nonparam_over_floor'])})"),
            f"{r['trainable_params']:,}",
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEAD)]
    left = (0, 1)

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i in left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i in left else ("-" * (w + 1) + ":")
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(HEAD), sep] + [line(b) for b in body])


def scaling_table(sweep_rows: list[dict]) -> str:
    """The scaling view: per precision and variant, time over the floor beside the FLOP share at
    every (r, seq) of the sweep, and their ratio (how far from the arithmetic limit)."""
    head = ("precision", "variant", "r", "seq", "time over floor", "FLOP share", "time / share",
            "at fp32 rate", "mem over floor")
    body = []
    for r in sweep_rows:
        if r["impl"] == "floor":
            continue
        short = VARIANTS[r["family"]].short if r["family"] in VARIANTS else r["family"]
        t, share = r.get("time_over_floor"), r.get("flop_share")
        ratio = f"{t / share:.2f}" if (t is not None and share) else "—"
        at32 = r.get("flop_share_at_fp32_rate") if r.get("fp32_rate_ratio", 1.0) != 1.0 else None
        body.append((r["precision"], f"{r['impl']} {short}", str(r["rank"]), str(r["seq"]), _pct(t),
                     _pct(share), ratio, _pct(at32), _pct(r.get("saved_over_floor"))))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(b) for b in body])


def notes(result_rows: list[dict]) -> list[str]:
    """Failed rows and calls that ran peft's forward (facts about this run, not targets)."""
    out = []
    for r in result_rows:
        if r.get("error"):
            out.append(f"FAILED [{r['precision']}] {r['label']}: {r['error']}")
        elif r.get("pf_fallback_calls"):
            out.append(f"NOTE [{r['precision']}] {r['label']}: {r['pf_fallback_calls']} of "
                       f"{r['pf_fallback_calls'] + r['pf_served_calls']} calls ran peft's forward "
                       "(see the PatchReport)")
    return out


def plot(result_rows: list[dict], path: str, title: str) -> None:
    """Time and saved-activation overhead over the floor, per variant, one row of panels per
    precision: baseline (peft / materialising reference) and pypeft_fast side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = list(dict.fromkeys(r["precision"] for r in result_rows))
    fams = [f for f in VARIANTS if any(r["family"] == f for r in result_rows)]
    fig, axes = plt.subplots(len(precisions), 2, figsize=(11, 4.2 * len(precisions)),
                             constrained_layout=True, squeeze=False)
    width = 0.38
    for axrow, prec in zip(axes, precisions):
        mine = [r for r in result_rows if r["precision"] == prec]
        for ax, key, what in ((axrow[0], "time_over_floor", "step time"),
                              (axrow[1], "saved_over_floor", "saved activations")):
            for j, (impl, color) in enumerate((("baseline", "#c44e52"), ("pypeft_fast", "#4c72b0"))):
                vals = []
                for f in fams:
                    r = next((r for r in mine if r["family"] == f and
                              (r["impl"] == impl or (impl == "baseline" and r["impl"] in ("peft", "reference")))),
                             None)
                    vals.append(100 * r[key] if r and r.get(key) is not None else None)
                xs = [i + (j - 0.5) * width for i in range(len(fams))]
                name = "peft / materialising reference" if impl == "baseline" else "pypeft_fast"
                bars = ax.bar(xs, [0.0 if v is None else v for v in vals], width, label=name, color=color)
                ax.bar_label(bars, labels=["failed" if v is None else f"{v:+.0f}%" for v in vals],
                             fontsize=8, padding=2)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xticks(range(len(fams)))
            # "dora-dropout" beside "kronecker" overlapped on one line: names break at "-"
            ax.set_xticklabels([f.replace("-", "-\n") + f"\n({VARIANTS[f].short})" for f in fams], fontsize=8)
            ax.set_ylabel(f"{what} over the {prec} floor (%)")
            ax.set_title(f"{prec}: {what} overhead (lower is better)")
            ax.legend(fontsize=8, loc="upper left")
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, 0), hi * 1.18)
    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
