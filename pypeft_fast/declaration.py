"""What a delta family declares, once: the one object every consumer of a family reads.

A family's slice is ``families/<name>.py`` (the math: ``delta_weight``, the torch kernels, the
public function; it calls ``registry.register_family`` / ``register_kernels``) and
``families/<name>_decl.py``, which ends with::

    DECLARATION = registry.declare(FamilyDeclaration(
        name="<name>", function=<name>_linear, delta_weight=delta_weight,
        inject=<Name>Spec,                  # pf.inject: options, tensor shapes, init, call, merge
        cases=(CaseFamily("<name>", setup=..., flops=..., params=...), ...),  # benches, profiler
        peft_counterpart="<peft method>",   # the profiler's --compare baseline, or None
    ))

The registry keeps it (``registry.DECLARATIONS``); ``pf.inject`` (``inject/specs.py``: ``SPECS``,
``FAMILY_OPTIONS``), the workloads of the micro-benchmarks, the e2e bench's FLOP share and the
profiler (``workloads.CASE_FAMILIES``, ``make_case``, ``adapter_flops``, ...), ``bench/cases.py``
and the generic tests read these live :class:`DeclaredTable` views, so a new declaration shows
up everywhere without an edit there. The test cases are the family's test module's own
(``tests/test_<name>.py``: its ``CASES``, read by ``tests/numerics.py: declared_cases``).

The inject spec (``inject``) is a class with static methods — see ``inject/specs.py`` for the
protocol: ``options`` (the ``DeltaConfig`` fields it takes, with defaults), ``check_options``,
``scaling``, ``shapes``, ``init_layer``, ``call``, ``delta_args`` and optionally
``shared_shapes`` / ``init_shared``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import registry


@dataclass(frozen=True)
class CaseFamily:
    """One benchmark/profiler case of a family (``workloads.make_case(name, ...)``).

    * ``setup(facts, g, case) -> (params, fixed, ours, reference, delta, mask)``: the tensors and
      callables of the case (``facts``: shape, in, out, rank, device, seed; ``g(*size, scale,
      adapter)`` draws from the case's generator; see ``workloads.make_case``).
    * ``flops(shape, rank, tokens) -> (forward, backward)``: the FLOPs the delta adds to the
      frozen layer (``workloads.adapter_flops``).
    * ``params(shape, rank) -> int``: trainable delta elements (``workloads.adapter_params``).
    * ``saved_floats(rank)``: fp32 values per token forward writes for backward (``bytes_moved``;
      lowrank's u = x·Aᵀ).
    * ``forced_form``: the case forces one form of its family (LoHa's factored / dense): the
      default micro-bench selection runs it at mode full at the first main shape only.
    * ``formula``: the name of its row in the FLOP table (and of bench/roofline.py's model).

    ``family`` and ``function`` (the public function's name) are filled in by ``declare``.
    """

    name: str
    setup: Callable = None
    flops: Callable = None
    params: Callable = None
    reference_name: str = "peft"
    formula: str = ""
    options: dict = field(default_factory=dict)
    saved_floats: Callable[[int], int] = lambda rank: 0
    forced_form: bool = False
    family: str = ""
    function: str = ""


@dataclass(frozen=True)
class FamilyDeclaration:
    """Everything a family declares (module docstring)."""

    name: str
    function: Callable
    delta_weight: Callable
    inject: Any = None
    cases: tuple[CaseFamily, ...] = ()
    peft_counterpart: str | None = None

    def __post_init__(self):
        where = f"declaration of family {self.name!r}"
        if not callable(self.function) or not callable(self.delta_weight):
            raise TypeError(f"{where}: function and delta_weight must be callables")
        missing = [c.name for c in self.cases if c.setup is None or c.flops is None or c.params is None]
        if missing:
            raise TypeError(f"{where}: cases {missing} need setup=, flops= and params=")
        if self.inject is not None:
            need = ("options", "check_options", "scaling", "shapes", "init_layer", "call", "delta_args")
            lacking = [a for a in need if not hasattr(self.inject, a)]
            if lacking:
                raise TypeError(f"{where}: inject spec {self.inject!r} lacks {lacking}")


class DeclaredTable(Mapping):
    """A read-only, live table built from every declaration (``build(declarations) -> dict``),
    rebuilt only when a family is declared or undeclared (a dict lookup on the per-call path)."""

    def __init__(self, build: Callable[[Iterable[FamilyDeclaration]], dict]):
        self._build = build
        self._version = -1
        self._table: dict = {}

    def _current(self) -> dict:
        if self._version != registry.DECLARATIONS_VERSION:
            self._table = self._build(tuple(registry.DECLARATIONS.values()))
            self._version = registry.DECLARATIONS_VERSION
        return self._table

    def __getitem__(self, key):
        return self._current()[key]

    def __iter__(self):
        return iter(self._current())

    def __len__(self):
        return len(self._current())

    def __contains__(self, key):
        return key in self._current()

    def __repr__(self):
        return f"DeclaredTable({self._current()!r})"
