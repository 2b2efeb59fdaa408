"""``DeltaConfig``: which layers to wrap, with which family, with which options.

Options belong to families (each family's inject spec, ``families/<name>_decl.py``, lists its
options and defaults; ``specs.SPECS`` is the live table of them).
Leaving an option ``None`` takes the family's default; setting an option of another family is a
``ValueError`` (nothing is silently ignored). After construction every option of the chosen family
holds its resolved value, so ``to_dict()`` writes exactly what the adapter computes with.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..registry import BACKENDS
from .specs import FAMILY_OPTIONS, SPECS

FORMAT = "pypeft_fast.inject/1"


@dataclass
class DeltaConfig:
    """Which ``nn.Linear`` / GPT-2 ``Conv1D`` layers get which structured ΔW.

    ``target_modules``: a list of names (a layer matches when its dotted name equals an entry or
    ends with ``"." + entry``, as in peft), a string (a regular expression that must match the whole
    dotted name), or ``"all-linear"`` (every Linear/Conv1D except the output embedding).
    ``exclude_modules``: the same forms, removed from the match.
    ``trainable_modules``: the same forms (no "all-linear"): modules left fully trainable besides
    the deltas, like peft's ``modules_to_save`` — e.g. ``["classifier"]`` for a new head; their
    Parameters are saved with the adapter. A module may not be both targeted and trainable.

    Family options (None → default):

    * ``lowrank``: ``r`` (8), ``alpha`` (= r; scaling = alpha / r), ``dropout`` (0.0, on the
      adapter's input, training mode only), ``magnitude`` (False; True: DoRA), ``activation``
      (None, "relu", "gelu", "silu": a parallel adapter's f between A and B), ``gate`` (False;
      True: UniPELT's per-token gate σ(x·w_g + b_g) on the delta).
    * ``kronecker``: ``factor_shape`` — the shape ``(a_out, a_in)`` of the small factor A (None:
      chosen per layer by LoKr's ``factorization(dim, decompose_factor)``), ``decompose_factor``
      (-1), ``rank`` (None: dense B; k: B = B_left (b_out, k) @ B_right (k, b_in)), ``scaling`` (1.0).
    * ``phm``: ``n`` (4) terms with A: (n, n, n) and B: (n, out/n, in/n); ``shared_A`` (True: one
      A Parameter for every injected layer, Compacter's "slow" weights); ``rank`` (None: dense B;
      k: Bᵢ = B_leftᵢ (out/n, k) @ B_rightᵢ (k, in/n), Compacter's "fast" weights); ``scaling`` (1.0).
    * ``sparse``: ``density`` (0.01) of each weight's entries, ``mask`` ("random", "largest" — the
      largest |W| entries —, or "block"), ``block_size`` ((8, 8), mask="block" only), ``seed`` (0),
      ``scaling`` (1.0).
    * ``hadamard`` (peft LoHa): ``r`` (8), ``alpha`` (= r; scaling = alpha / r); ΔW =
      scaling·(W1a·W1b) ⊙ (W2a·W2b).

    ``adapter_dtype``: None → float32 over a float16/bfloat16 base (like peft's
    ``autocast_adapter_dtype``), else the base weight's dtype. ``backend``: passed to the ops.
    """

    family: str
    target_modules: str | list[str]
    exclude_modules: str | list[str] | None = None
    trainable_modules: str | list[str] | None = None
    backend: str = "auto"
    adapter_dtype: str | None = None
    # lowrank (r, alpha also hadamard)
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    magnitude: bool | None = None
    activation: str | None = None
    gate: bool | None = None
    # kronecker, phm, sparse
    scaling: float | None = None
    # kronecker
    factor_shape: tuple[int, int] | None = None
    decompose_factor: int | None = None
    # kronecker, phm
    rank: int | None = None
    # phm
    n: int | None = None
    shared_A: bool | None = None
    # sparse
    density: float | None = None
    mask: str | None = None
    block_size: tuple[int, int] | None = None
    seed: int | None = None

    def __post_init__(self):
        where = "DeltaConfig"
        if self.family not in SPECS:
            raise ValueError(f"{where}: unknown family {self.family!r}; expected one of {sorted(SPECS)}")
        spec = SPECS[self.family]
        self.target_modules = _names(where, "target_modules", self.target_modules, required=True)
        self.exclude_modules = _names(where, "exclude_modules", self.exclude_modules, required=False)
        self.trainable_modules = _names(where, "trainable_modules", self.trainable_modules,
                                        required=False)
        if self.trainable_modules == "all-linear":
            raise ValueError(f"{where}: trainable_modules='all-linear' would train every linear "
                             "layer fully; name the modules (e.g. ['classifier'])")
        for opt, owners in FAMILY_OPTIONS.items():
            if opt not in spec.options and getattr(self, opt) is not None:
                raise ValueError(f"{where}: option {opt}={getattr(self, opt)!r} belongs to family "
                                 f"{'/'.join(owners)}, not {self.family!r}; leave it unset")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"{where}: backend {self.backend!r}; expected 'auto' or one of "
                             f"{list(BACKENDS)}")
        if self.adapter_dtype is not None and self.adapter_dtype not in _DTYPES:
            raise ValueError(f"{where}: adapter_dtype {self.adapter_dtype!r}; expected one of "
                             f"{sorted(_DTYPES)} or None")
        for opt, default in spec.options.items():
            if getattr(self, opt) is None:
                setattr(self, opt, default(self) if callable(default) else default)
        spec.check_options(self)

    def options(self) -> dict[str, Any]:
        """The resolved options of this config's family."""
        return {k: getattr(self, k) for k in SPECS[self.family].options}

    def to_dict(self) -> dict[str, Any]:
        d = {"family": self.family, "target_modules": self.target_modules,
             "exclude_modules": self.exclude_modules, "trainable_modules": self.trainable_modules,
             "backend": self.backend,
             "adapter_dtype": self.adapter_dtype}
        for k, v in self.options().items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeltaConfig":
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DeltaConfig.from_dict: unknown keys {unknown}; expected a subset of "
                             f"{sorted(known)}")
        return cls(**d)  # a family's check_options turns its list-valued options back into tuples


_DTYPES = {"float32", "float64", "bfloat16", "float16"}


def _names(where, arg, value, required):
    if value is None:
        if required:
            raise ValueError(f"{where}: {arg} is required (a list of names, a regex, or 'all-linear')")
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where}: {arg} is an empty string")
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        if not value:
            raise ValueError(f"{where}: {arg} is an empty list")
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ValueError(f"{where}: {arg} must be a string or a list of non-empty strings, got {value!r}")
