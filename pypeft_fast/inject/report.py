"""``trainable_report``: trainable and total parameters per module type, as a table.

Each Parameter is counted once (a Compacter A shared by every layer counts once, under the first
module that holds it) and attributed to the module that holds it directly; injected layers show as
``DeltaLinear[<family>]`` (their delta Parameters) and their frozen base layers under the base type.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .modules import DeltaLinear


@dataclass
class ReportRow:
    module_type: str
    modules: int
    trainable: int
    total: int


@dataclass
class TrainableReport:
    rows: list[ReportRow]
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        w = max([len("module type"), *(len(r.module_type) for r in self.rows)])
        head = f"{'module type':<{w}}  {'modules':>7}  {'trainable':>12}  {'total':>12}  {'trainable %':>11}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            pct = 100.0 * r.trainable / r.total if r.total else 0.0
            lines.append(f"{r.module_type:<{w}}  {r.modules:>7}  {r.trainable:>12,}  {r.total:>12,}  {pct:>10.2f}%")
        lines.append("-" * len(head))
        lines.append(f"{'total':<{w}}  {'':>7}  {self.trainable:>12,}  {self.total:>12,}  "
                     f"{100.0 * self.fraction:>10.2f}%")
        return "\n".join(lines)

    __repr__ = __str__


def trainable_report(model: nn.Module) -> TrainableReport:
    """Rows sorted by trainable parameters, then total. ``print(pf.trainable_report(model))``."""
    seen: set[int] = set()
    rows: dict[str, ReportRow] = {}
    for mod in model.modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        key = f"DeltaLinear[{mod.family}]" if isinstance(mod, DeltaLinear) else type(mod).__name__
        row = rows.setdefault(key, ReportRow(key, 0, 0, 0))
        row.modules += 1
        row.trainable += sum(p.numel() for p in own if p.requires_grad)
        row.total += sum(p.numel() for p in own)
    ordered = sorted(rows.values(), key=lambda r: (-r.trainable, -r.total, r.module_type))
    return TrainableReport(ordered, sum(r.trainable for r in ordered), sum(r.total for r in ordered))
