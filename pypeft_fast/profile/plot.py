"""``--plot``: saved activations per module kind, stacked by cause, the variants side by side."""
from __future__ import annotations

from . import causes
from .report import MiB, MemoryReport

_COLORS = {causes.INPUT: "#4c72b0", causes.DROPOUT: "#dd8452", causes.CAST: "#c44e52",
           causes.ADAPTER: "#55a868", causes.WEIGHT_SIZED: "#8172b3", causes.ATTENTION: "#937860",
           causes.NORM: "#da8bc3", causes.ACTIVATION: "#8c8c8c", causes.OTHER: "#ccb974",
           causes.STEP_INPUT: "#64b5cd"}


def plot(reports: list[MemoryReport], path: str, top: int = 10, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [r.by_kind() for r in reports]
    keys = sorted({k for ks in kinds for k in ks},
                  key=lambda k: -max(ks[k].saved_total if k in ks else 0 for ks in kinds))
    keys = [k for k in keys if any(k in ks and ks[k].saved_total for ks in kinds)][:top]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(keys) + 2), 4.8))
    used, top_y = set(), 0.0
    for i, (r, ks) in enumerate(zip(reports, kinds)):
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(keys))]
        bottom = [0.0] * len(keys)
        for c in causes.CAUSES:
            h = [ks[k].saved.get(c, 0) / MiB if k in ks else 0.0 for k in keys]
            if not any(h):
                continue
            ax.bar(xs, h, width * 0.95, bottom=bottom, color=_COLORS[c], label=c if c not in used else None,
                   edgecolor="white", linewidth=0.3)
            used.add(c)
            bottom = [b + v for b, v in zip(bottom, h)]
        top_y = max([top_y, *bottom])
        for x, b in zip(xs, bottom):
            ax.text(x, b, chr(ord("A") + i), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.replace("model.layers.*.", "") for k in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("saved activations (MiB, all blocks)")
    ax.set_ylim(0, top_y * 1.1 or 1.0)
    variants = "; ".join(f"{chr(ord('A') + i)} = {r.label}{' (projected)' if r.projected else ''}: "
                         f"{r.saved / MiB:,.1f} MiB saved, peak {r.peak_bytes / MiB:,.1f} MiB"
                         for i, r in enumerate(reports))
    ax.set_title(title or variants, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
