"""The profiler's results: :class:`MemoryReport` (one model), :class:`Comparison` (peft's forward
vs pypeft_fast on the same model), their terminal tables, JSON and Markdown."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from . import causes

MiB = 2 ** 20


def _cut(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def mib(n: float) -> str:
    v = n / MiB
    return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"


@dataclass
class ModuleMemory:
    """One unit (a module; an adapted layer with its children): bytes of its Parameters, their
    gradients and optimizer state, and the activations it saved, by cause."""
    name: str
    type: str
    layer: str | None
    kind: str
    adapted: bool
    params: int = 0
    trainable: int = 0
    grads: int = 0
    optimizer: int = 0
    weight_refs: int = 0
    saved: dict[str, int] = field(default_factory=dict)

    @property
    def saved_total(self) -> int:
        return sum(self.saved.values())


@dataclass
class CrossCheck:
    """The saved activations made in the forward (all causes but weight references and step
    inputs) against PyTorch's ``MemTracker`` activation bytes live after the same forward (the
    model output dropped, the loss kept). MemTracker also counts what the forward made and keeps
    other than through autograd (the 4-byte loss, caches on modules)."""
    saved_made_in_forward: int
    memtracker_activations: int

    @property
    def difference_pct(self) -> float:
        ref = self.memtracker_activations
        return 100.0 * (self.saved_made_in_forward - ref) / ref if ref else float("nan")

    def text(self) -> str:
        return (f"cross-check: saved activations made in the forward {mib(self.saved_made_in_forward)} MiB; "
                f"torch MemTracker activations after the forward {mib(self.memtracker_activations)} MiB "
                f"({self.difference_pct:+.2f} %)")


def _group(modules, key) -> dict[str, ModuleMemory]:
    out: dict[str, ModuleMemory] = {}
    for m in modules.values():
        k = key(m)
        g = out.setdefault(k, ModuleMemory(k, m.type, m.layer, m.kind, m.adapted))
        if g.type != m.type:
            g.type = "mixed"
        g.params += m.params
        g.trainable += m.trainable
        g.grads += m.grads
        g.optimizer += m.optimizer
        g.weight_refs += m.weight_refs
        for c, n in m.saved.items():
            g.saved[c] = g.saved.get(c, 0) + n
    return out


@dataclass
class MemoryReport:
    """One profiled training step. Bytes throughout; ``modules`` keyed by display name (peft's
    ``base_model.model.`` prefix dropped). ``projected`` is set on reports made by
    :func:`~.projection.project` (figures computed, not measured)."""
    label: str
    modules: dict[str, ModuleMemory]
    storages: list
    batch: int
    seq: int
    device: str
    param_dtype: str
    autocast: str | None
    peak_bytes: int
    peak_source: str
    peak_live_bytes: int
    peak_phase: str | None
    weight_ref_bytes: int
    batch_bytes: int
    crosscheck: CrossCheck | None
    snapshot: str | None
    loss: float | None
    environment: dict
    static_bytes: int = 0          # live before the step: Parameters, buffers, the batch
    param_dims: list = field(default_factory=list)  # every Parameter dimension (projection checks)
    projected: dict | None = None
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ totals and groupings
    def total(self, what: str) -> int:
        """Sum over the modules of ``params``, ``trainable``, ``grads``, ``optimizer`` or ``saved_total``."""
        return sum(getattr(m, what) for m in self.modules.values())

    params = property(lambda self: self.total("params"))
    trainable = property(lambda self: self.total("trainable"))
    grads = property(lambda self: self.total("grads"))
    optimizer = property(lambda self: self.total("optimizer"))
    saved = property(lambda self: self.total("saved_total"))

    def by_cause(self) -> dict[str, int]:
        out = {c: 0 for c in causes.CAUSES}
        for m in self.modules.values():
            for c, n in m.saved.items():
                out[c] += n
        return {c: n for c, n in out.items() if n}

    def by_kind(self) -> dict[str, ModuleMemory]:
        """Grouped by the module's path with its block index as ``*`` (``model.layers.*.self_attn.q_proj``)."""
        return _group(self.modules, lambda m: m.kind)

    def by_type(self) -> dict[str, ModuleMemory]:
        """Grouped by module class (``lora.Linear``, ``LlamaRMSNorm``, ...)."""
        return _group(self.modules, lambda m: m.type)

    def by_layer(self) -> dict[str, ModuleMemory]:
        """Grouped by repeated block (``model.layers.3``); modules outside the blocks under "(other)"."""
        return _group(self.modules, lambda m: m.layer or "(other)")

    # ------------------------------------------------------------------ output
    def summary_lines(self) -> list[str]:
        tag = " [PROJECTED]" if self.projected else ""
        lines = [f"{self.label}{tag}: batch {self.batch} × seq {self.seq}, {self.param_dtype}"
                 f"{', autocast ' + self.autocast if self.autocast else ''}, {self.device}",
                 f"  parameters {mib(self.params)} MiB (trainable {mib(self.trainable)}), gradients "
                 f"{mib(self.grads)} MiB, optimizer state {mib(self.optimizer)} MiB",
                 f"  saved activations {mib(self.saved)} MiB (weight references, not counted: "
                 f"{mib(self.weight_ref_bytes)} MiB)",
                 f"  peak {mib(self.peak_bytes)} MiB ({self.peak_source}"
                 f"{', during ' + self.peak_phase if self.peak_phase else ''})"]
        if self.crosscheck is not None and not self.projected:
            lines.append("  " + self.crosscheck.text())
        if self.projected:
            lines.append("  projected from a measured run: " + ", ".join(f"{k} {v}" for k, v in self.projected.items()))
        if self.snapshot:
            lines.append(f"  memory snapshot: {self.snapshot} (open at https://pytorch.org/memory_viz)")
        lines += [f"  note: {n}" for n in self.notes]
        return lines

    def table(self, top: int = 12, group: str = "module") -> str:
        rows = {"module": self.modules, "kind": self.by_kind(), "type": self.by_type(),
                "layer": self.by_layer()}[group]
        order = sorted(rows.values(), key=lambda m: -(m.saved_total + m.grads + m.optimizer))[:top]
        head = f"{group:<44} {'type':<22} {'params':>9} {'grads':>8} {'optim':>8} {'saved':>9}  top causes (MiB)"
        lines = [f"top {len(order)} by saved + gradients + optimizer state, MiB", head, "-" * len(head)]
        for m in order:
            top_causes = ", ".join(f"{c} {mib(n)}" for c, n in sorted(m.saved.items(), key=lambda kv: -kv[1])[:3])
            lines.append(f"{_cut(m.name, 44):<44} {m.type[:22]:<22} {mib(m.params):>9} {mib(m.grads):>8} "
                         f"{mib(m.optimizer):>8} {mib(m.saved_total):>9}  {top_causes}")
        lines.append("")
        lines.append("saved activations by cause")
        total = self.saved or 1
        for c, n in self.by_cause().items():
            lines.append(f"  {c:<28} {mib(n):>10} MiB  {100 * n / total:5.1f} %")
        lines.append(f"  {'total':<28} {mib(self.saved):>10} MiB")
        return "\n".join(self.summary_lines() + [""] + lines)

    def to_dict(self, storages: bool = False) -> dict:
        def mod(m):
            d = asdict(m)
            d["saved_total"] = m.saved_total
            return d
        d = {"label": self.label, "projected": self.projected, "batch": self.batch, "seq": self.seq,
             "device": self.device, "param_dtype": self.param_dtype, "autocast": self.autocast,
             "totals": {"params": self.params, "trainable": self.trainable, "grads": self.grads,
                        "optimizer": self.optimizer, "saved": self.saved, "weight_refs": self.weight_ref_bytes,
                        "peak": self.peak_bytes, "peak_live": self.peak_live_bytes},
             "peak_source": self.peak_source, "peak_phase": self.peak_phase,
             "by_cause": self.by_cause(),
             "by_kind": {k: mod(m) for k, m in self.by_kind().items()},
             "by_type": {k: mod(m) for k, m in self.by_type().items()},
             "by_layer": {k: mod(m) for k, m in self.by_layer().items()},
             "modules": {k: mod(m) for k, m in self.modules.items()},
             "crosscheck": None if self.crosscheck is None else {
                 **asdict(self.crosscheck), "difference_pct": self.crosscheck.difference_pct},
             "snapshot": self.snapshot, "loss": self.loss, "notes": self.notes,
             "environment": self.environment}
        if storages:
            d["storages"] = [asdict(s) for s in self.storages]
        return d

    def markdown(self) -> str:
        lines = [f"### Memory profile: {self.label}{' (projected)' if self.projected else ''}", ""]
        lines += [f"- {ln.strip()}" for ln in self.summary_lines()[1:]]
        lines += ["", "| cause | MiB | % |", "|---|---:|---:|"]
        total = self.saved or 1
        lines += [f"| {c} | {mib(n)} | {100 * n / total:.1f} |" for c, n in self.by_cause().items()]
        return "\n".join(lines)


@dataclass
class Comparison:
    """peft's forward (``baseline``) and pypeft_fast (``fast``: pf.patch or an injected family)
    on the same model, batch and step."""
    baseline: MemoryReport
    fast: MemoryReport

    def saved_saving(self) -> tuple[int, float]:
        d = self.baseline.saved - self.fast.saved
        return d, 100.0 * d / self.baseline.saved if self.baseline.saved else float("nan")

    def peak_saving(self) -> int:
        return self.baseline.peak_bytes - self.fast.peak_bytes

    def sentence(self) -> str:
        d, pct = self.saved_saving()
        tag = "projected: " if self.fast.projected else "measured: "
        who = "patching" if self.fast.label.startswith("pf.patch") else "pypeft_fast"
        return (f"{tag}{who} saves {d / MiB:,.2f} MiB ({pct:.1f} %) of saved activations and "
                f"{self.peak_saving() / MiB:,.2f} MiB of peak ({self.baseline.label} → {self.fast.label})")

    def table(self, top: int = 12) -> str:
        a, b = self.baseline.by_kind(), self.fast.by_kind()
        keys = sorted(set(a) | set(b), key=lambda k: -max(a[k].saved_total if k in a else 0,
                                                          b[k].saved_total if k in b else 0))[:top]
        head = f"{'module (all blocks)':<44} {'saved A':>9} {'saved B':>9} {'B − A':>9}  A: top cause → B: top cause"
        lines = [f"A = {self.baseline.label}, B = {self.fast.label}; MiB", head, "-" * len(head)]

        def top_cause(m):
            if m is None or not m.saved:
                return "-"
            c, n = max(m.saved.items(), key=lambda kv: kv[1])
            return f"{c} {mib(n)}"
        for k in keys:
            ma, mb = a.get(k), b.get(k)
            sa, sb = (ma.saved_total if ma else 0), (mb.saved_total if mb else 0)
            lines.append(f"{_cut(k, 44):<44} {mib(sa):>9} {mib(sb):>9} {mib(sb - sa):>9}  {top_cause(ma)} → {top_cause(mb)}")
        lines += ["", f"{'by cause':<44} {'A':>9} {'B':>9} {'B − A':>9}"]
        ca, cb = self.baseline.by_cause(), self.fast.by_cause()
        for c in causes.CAUSES:
            if c in ca or c in cb:
                lines.append(f"  {c:<42} {mib(ca.get(c, 0)):>9} {mib(cb.get(c, 0)):>9} {mib(cb.get(c, 0) - ca.get(c, 0)):>9}")
        for what, x, y in (("saved activations", self.baseline.saved, self.fast.saved),
                           ("gradients", self.baseline.grads, self.fast.grads),
                           ("optimizer state", self.baseline.optimizer, self.fast.optimizer),
                           ("peak", self.baseline.peak_bytes, self.fast.peak_bytes)):
            lines.append(f"{what:<44} {mib(x):>9} {mib(y):>9} {mib(y - x):>9}")
        return "\n".join(lines + ["", self.sentence()])

    def to_dict(self, storages: bool = False) -> dict:
        d, pct = self.saved_saving()
        return {"baseline": self.baseline.to_dict(storages), "fast": self.fast.to_dict(storages),
                "saved_saving_bytes": d, "saved_saving_pct": pct, "peak_saving_bytes": self.peak_saving(),
                "summary": self.sentence()}

    def markdown(self) -> str:
        d, pct = self.saved_saving()
        rows = ["| | " + self.baseline.label + " | " + self.fast.label + " |", "|---|---:|---:|"]
        for what, x, y in (("saved activations (MiB)", self.baseline.saved, self.fast.saved),
                           ("peak (MiB)", self.baseline.peak_bytes, self.fast.peak_bytes),
                           ("gradients (MiB)", self.baseline.grads, self.fast.grads),
                           ("optimizer state (MiB)", self.baseline.optimizer, self.fast.optimizer)):
            rows.append(f"| {what} | {mib(x)} | {mib(y)} |")
        return "\n".join([f"### Memory profile: {self.baseline.label} vs {self.fast.label}", "",
                          f"**{self.sentence()}**", "", *rows, "",
                          self.baseline.markdown(), "", self.fast.markdown()])


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj.to_dict(), f, indent=1, default=str)
