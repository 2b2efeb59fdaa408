"""Projection: a measured short/shallow run's figures at another depth, batch and sequence length.

From a :class:`~.report.MemoryReport` measured at batch b, sequence s and L blocks per stack:

* Depth: the first block of a stack differs (after a frozen embedding its input needs no
  gradient, so e.g. dropout masks are not kept there); it is kept once and the other measured
  blocks stand for the remaining L' − 1 (their figures × (L' − 1)/(L − 1)). Modules outside the
  blocks are kept once. Parameters, gradients and optimizer state follow this rule alone.
* Saved activations, per saved storage (its shape is recorded): × f_b if a dimension equals b
  (or b·s), × f_s for every dimension equal to s (attention scores are s × s: quadratic) —
  f_b = b'/b, f_s = s'/s; storages without such dimensions stay; then the depth rule.
* Peak: (measured peak − live before the step − saved activations) is the step's transient
  (gradients of the logits, one block's temporaries): it scales with the tokens, not the depth;
  projected peak = live-before' + saved' + transient × tokens'/tokens, and at least
  Parameters' + gradients' + optimizer state' (a peak during the optimizer step).

A dimension that is also a model dimension (s = hidden size, say) cannot be told apart: the
projection refuses such a measured run (measure at a sequence length no weight has).
"""
from __future__ import annotations

import copy
from collections import Counter

from .report import MemoryReport, ModuleMemory


def _stack(layer: str | None) -> str | None:
    return layer.rsplit(".", 1)[0] if layer else None


def measured_depth(report: MemoryReport) -> dict[str, int]:
    """``{stack: number of blocks}`` seen in the report (``model.layers`` → 2)."""
    layers = {m.layer for m in report.modules.values() if m.layer}
    return dict(Counter(_stack(layer) for layer in layers))


def ambiguous_dims(report: MemoryReport, batch: bool = True, seq: bool = True) -> list[str]:
    """Why the measured batch (if it is to change) or sequence length (likewise) cannot be told
    from model dimensions (empty: fine)."""
    dims = set(report.param_dims)
    b, s = report.batch, report.seq
    checks = ([("seq", s)] if seq else []) + ([("batch", b)] if batch else []) + \
        ([("batch × seq", b * s)] if batch or seq else [])
    out = [f"{what} = {v} is also a Parameter dimension" for what, v in checks if v > 1 and v in dims]
    if (batch or seq) and b > 1 and s > 1 and b == s:
        out.append(f"batch = seq = {b}")
    return out


def token_factor(shape, b: int, s: int, fb: float, fs: float) -> float:
    k_s, has_b = 0, False
    for d in shape:
        if b > 1 and s > 1 and d == b * s:
            k_s, has_b = k_s + 1, True
        elif s > 1 and d == s:
            k_s += 1
        elif b > 1 and d == b:
            has_b = True
    batch = fb if (has_b or b == 1) and (k_s or has_b) else 1.0
    return batch * fs ** k_s


def project(report: MemoryReport, *, layers: int | None = None, batch: int | None = None,
            seq: int | None = None) -> MemoryReport:
    """The report's figures at ``layers`` blocks per stack, ``batch`` and ``seq`` (None: as
    measured); the result has ``projected`` set and one row per module kind (block index ``*``)."""
    if report.projected:
        raise ValueError("project() takes a measured report, not a projected one")
    why = ambiguous_dims(report, batch=batch not in (None, report.batch), seq=seq not in (None, report.seq))
    if why:
        raise ValueError("cannot project from this run: " + "; ".join(why) +
                         " (measure at a batch/sequence length no weight dimension has)")
    b, s = report.batch, report.seq
    b2, s2 = batch or b, seq or s
    fb, fs = b2 / b, s2 / s
    depth = measured_depth(report)
    first = {}
    for m in report.modules.values():
        if m.layer:
            st, idx = m.layer.rsplit(".", 1)
            first[st] = min(first.get(st, int(idx)), int(idx))

    def depth_factor(m: ModuleMemory) -> float:
        if not m.layer or not layers:
            return 1.0
        st, idx = m.layer.rsplit(".", 1)
        n = depth[st]
        if n == 1:
            return float(layers)
        return 1.0 if int(idx) == first[st] else (layers - 1) / (n - 1)

    rows: dict[str, ModuleMemory] = {}
    for m in report.modules.values():
        k = m.kind
        g = rows.setdefault(k, ModuleMemory(k, m.type, m.layer and _stack(m.layer) + ".*", k, m.adapted))
        f = depth_factor(m)
        g.params += round(m.params * f)
        g.trainable += round(m.trainable * f)
        g.grads += round(m.grads * f)
        g.optimizer += round(m.optimizer * f)
        g.weight_refs += round(m.weight_refs * f)
    for st in report.storages:
        if st.cause == "weight reference":
            continue
        m = report.modules[st.unit]
        g = rows[m.kind]
        g.saved[st.cause] = g.saved.get(st.cause, 0) + round(
            st.nbytes * token_factor(st.shape, b, s, fb, fs) * depth_factor(m))

    out = copy.copy(report)
    out.modules, out.storages = rows, []
    out.batch, out.seq = b2, s2
    out.crosscheck, out.snapshot, out.loss = None, None, None
    extra_params = out.params - report.params
    static2 = report.static_bytes + extra_params + report.batch_bytes * (fb * fs - 1)
    transient = max(report.peak_bytes - report.static_bytes - report.saved, 0)
    peak = static2 + out.saved + transient * fb * fs
    out.peak_bytes = int(max(peak, out.params + out.grads + out.optimizer))
    out.peak_live_bytes = out.peak_bytes
    out.static_bytes = int(static2)
    out.batch_bytes = int(report.batch_bytes * fb * fs)
    out.projected = {"measured": f"batch {b} × seq {s}, " + ", ".join(f"{st} {n}" for st, n in depth.items()),
                     "target": f"batch {b2} × seq {s2}" + (f", {layers} blocks per stack" if layers else "")}
    out.notes = list(report.notes)
    return out
