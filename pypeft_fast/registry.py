"""The one registry of delta families and of the backends that implement them.

A *family* is one structured ΔW (low-rank, Kronecker, PHM, sparse). Adding a family touches one
place: a module in ``pypeft_fast/families/`` that calls :func:`register_family` with

* ``delta_weight(params, hp) -> (out, in)`` — materialises ΔW. Only the float64 reference, tests
  and ``merge`` use it; no training step ever calls it.
* one :class:`Kernels` per backend (``register_kernels``). The ``torch`` kernels are the default
  everywhere; ``cpp``/``cuda`` (``csrc/``) and ``triton`` (``kernels/``) register themselves when
  their code imports.

A :class:`Kernels` object computes, on 2-D views (``x2d: (n, in)``, ``gy2d: (n, out)``)::

    forward(x2d, weight, bias, params, aux, hp)            -> (y2d, extras)
    backward(gy2d, x2d, weight, params, aux, extras, hp,
             needs_dx, needs_dparams)                       -> (dx2d | None, tuple of dparam | None)

``params`` are the trainable delta tensors, ``aux`` the non-differentiable ones (a dropout seed, a
sparse layout), ``extras`` what forward chose to keep for backward (factor-sized only), ``hp`` a
frozen dataclass of Python scalars. The bias gradient is computed once, in the autograd Function.
In backward, ``weight`` is a shape-only stand-in (stride 0, no data) when ``needs_dx`` is False.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

log = logging.getLogger("pypeft_fast")

BACKENDS = ("torch", "cpp", "cuda", "triton")
"""Every backend name a user may request, besides ``"auto"``."""

# Order in which "auto" tries backends on each device type. A backend only takes part for a
# family if it registered that family with ``auto=True`` (i.e. the benchmark shows it faster).
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}


class Kernels(Protocol):
    def forward(self, x2d, weight, bias, params, aux, hp): ...

    def backward(self, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams): ...


@dataclass
class BackendEntry:
    kernels: Kernels
    auto: bool
    """Whether ``backend="auto"`` may choose it (measured faster than the torch path)."""


@dataclass
class Family:
    name: str
    delta_weight: Callable[..., torch.Tensor]
    backends: dict[str, BackendEntry] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {}

# Why a backend cannot run on a device type; None means it can. Backends register a probe.
_AVAILABILITY: dict[str, Callable[[torch.device], str | None]] = {
    "torch": lambda device: None,
}
_UNREGISTERED_REASON: dict[str, str] = {
    "cpp": "the native extension pypeft_fast._C is not built or failed to load "
    "(see `python -m pypeft_fast info`)",
    "cuda": "the native extension pypeft_fast._C was not built with CUDA kernels",
    "triton": "triton is not installed or the Triton kernels failed to import",
}
_warned_fallbacks: set[tuple[str, str, str]] = set()


def register_family(name: str, delta_weight: Callable[..., torch.Tensor]) -> Family:
    if name in FAMILIES:
        raise RuntimeError(f"delta family {name!r} is registered twice")
    FAMILIES[name] = Family(name, delta_weight)
    return FAMILIES[name]


def register_kernels(family: str, backend: str, kernels: Kernels, *, auto: bool = True) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    FAMILIES[family].backends[backend] = BackendEntry(kernels, auto)


def register_availability(backend: str, probe: Callable[[torch.device], str | None]) -> None:
    """``probe(device)`` returns None when ``backend`` can run there, else the reason it cannot."""
    _AVAILABILITY[backend] = probe


def why_unavailable(family: str, backend: str, device: torch.device) -> str | None:
    fam = FAMILIES[family]
    if backend not in fam.backends:
        if any(backend in other.backends for other in FAMILIES.values()):
            return (f"backend {backend!r} has no {family} kernels (the backend is loaded; "
                    f"{family} is implemented on the torch path only)")
        reason = _UNREGISTERED_REASON.get(backend, "no kernels registered")
        return f"backend {backend!r} has no {family} kernels: {reason}"
    probe = _AVAILABILITY.get(backend)
    if probe is None:
        return f"backend {backend!r} registered kernels but no availability probe"
    reason = probe(device)
    return None if reason is None else f"backend {backend!r} cannot run on {device}: {reason}"


def resolve(family: str, backend: str, device: torch.device) -> tuple[str, Kernels]:
    """Pick the kernels for ``family`` on ``device``.

    An explicitly named backend must run or raise ``RuntimeError`` saying why. ``"auto"`` walks
    ``AUTO_PREFERENCE`` and, when it has to skip a backend it would have preferred, says so once.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown delta family {family!r}; registered: {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        reason = why_unavailable(family, backend, device)
        if reason is not None:
            raise RuntimeError(f"pypeft_fast {family}: requested {reason}")
        return backend, fam.backends[backend].kernels
    forced = os.environ.get("PYPEFT_FAST_BACKEND")
    if forced:
        return resolve(family, forced, device)
    for name in AUTO_PREFERENCE.get(device.type, ("torch",)):
        entry = fam.backends.get(name)
        if name != "torch" and entry is not None and not entry.auto:
            continue  # registered, but not faster than torch for this family
        reason = why_unavailable(family, name, device)
        if reason is None:
            return name, fam.backends[name].kernels
        if name != "torch" and entry is not None:
            key = (family, name, device.type)
            if key not in _warned_fallbacks:
                _warned_fallbacks.add(key)
                log.warning("pypeft_fast %s: %s; using the next backend", family, reason)
    return "torch", fam.backends["torch"].kernels


def usable_backends(device: torch.device) -> dict[str, dict[str, str | None]]:
    """``{family: {backend: None or reason}}`` for ``python -m pypeft_fast info``."""
    return {
        fam: {b: why_unavailable(fam, b, device) for b in BACKENDS} for fam in sorted(FAMILIES)
    }
