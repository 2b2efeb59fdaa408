"""The :class:`PatchReport`: every peft layer :func:`pf.patch` found, whether it is served, and
live per-layer counters of served calls and of calls that ran peft's forward (by reason)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("pypeft_fast")

PATCHED = "patched"


@dataclass
class LayerEntry:
    """One peft layer of the model as :func:`patch` found it."""

    name: str
    """Dotted module name in the model."""
    peft_type: str
    """peft method the layer belongs to (``lora``, ``lokr``, ``shira``, ``ia3``, ...)."""
    layer_type: str
    """``<method>.<class>``, e.g. ``lora.Linear`` or ``lora.Linear4bit``."""
    adapter: str
    """Active adapter(s) at patch time."""
    status: str
    """``"patched"`` when pypeft_fast serves the layer's forward, else the reason it does not."""
    installed: bool
    """Whether the layer got pypeft_fast's forward (it then re-checks on every call)."""
    served_calls: int = 0
    fallback_calls: Counter = field(default_factory=Counter)
    """Calls that ran peft's own forward, by reason."""

    def count_fallback(self, reason: str) -> None:
        if reason not in self.fallback_calls:
            _warn_once(reason, self.name)
        self.fallback_calls[reason] += 1


_warned: set[str] = set()


def _warn_once(reason: str, layer: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("pypeft_fast.patch: %s runs peft's own forward: %s (reported once per reason; "
                    "see the PatchReport for counts)", layer, reason)


class PatchReport:
    """What :func:`patch` did to every peft layer; prints as a table.

    The per-layer counters (``served_calls``, ``fallback_calls``) stay live after patching, so
    printing the report after training shows which calls ran peft's forward and why.
    """

    def __init__(self, entries: list[LayerEntry], kept: list[str] | None = None):
        self.entries = entries
        self.kept = kept or []
        """Names of peft wrappers that are not delta layers (``modules_to_save`` copies,
        trainable tokens): left untouched, not counted as unsupported."""

    @property
    def patched(self) -> list[LayerEntry]:
        return [e for e in self.entries if e.status == PATCHED]

    @property
    def unsupported(self) -> list[LayerEntry]:
        return [e for e in self.entries if e.status != PATCHED]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def counts(self) -> dict[str, int]:
        return {
            "layers": len(self.entries),
            "patched": len(self.patched),
            "installed_not_served": sum(e.installed and e.status != PATCHED for e in self.entries),
            "not_patchable": sum(not e.installed for e in self.entries),
        }

    def call_counts(self) -> tuple[int, Counter]:
        """``(served calls, Counter of peft-forward calls by reason)`` over every layer so far."""
        served = sum(e.served_calls for e in self.entries)
        fallbacks: Counter = Counter()
        for e in self.entries:
            fallbacks.update(e.fallback_calls)
        return served, fallbacks

    def summary(self) -> str:
        c = self.counts()
        reasons = Counter(e.status for e in self.unsupported)
        text = (f"pypeft_fast.patch: {c['layers']} peft layers, {c['patched']} patched, "
                f"{len(self.unsupported)} running peft's forward")
        if reasons:
            text += " (" + "; ".join(f"{n}× {r}" for r, n in reasons.most_common()) + ")"
        if self.kept:
            text += f"; {len(self.kept)} non-delta peft wrappers left as they are"
        served, fallbacks = self.call_counts()
        if served or fallbacks:
            total = served + sum(fallbacks.values())
            text += f"; calls so far: {served} of {total} served"
            if fallbacks:
                text += (f", {sum(fallbacks.values())} ran peft's forward ("
                         + "; ".join(f"{n}× {r}" for r, n in fallbacks.most_common()) + ")")
        return text

    def __str__(self) -> str:
        head = ("layer", "peft", "adapter", "status", "pf calls", "peft calls")
        rows = []
        for e in self.entries:
            fb = sum(e.fallback_calls.values())
            fb_text = str(fb)
            if fb:
                fb_text += " (" + ", ".join(f"{n}× {r}" for r, n in e.fallback_calls.most_common()) + ")"
            rows.append((e.name, e.layer_type, e.adapter, e.status, str(e.served_calls), fb_text))
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        widths[-1] = len(head[-1])  # last column is free text
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    def __repr__(self) -> str:
        c = self.counts()
        return f"PatchReport(layers={c['layers']}, patched={c['patched']}, unsupported={len(self.unsupported)})"
