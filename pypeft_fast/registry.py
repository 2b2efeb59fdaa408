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
Most kernels implement only the delta: :class:`pypeft_fast.families._layer.DeltaKernels` writes
the frozen GEMMs and the bias once and calls their ``delta_forward`` / ``delta_backward``.

Routing. A :class:`Kernels` object may also say, per call, what it does not serve::

    supports(x, weight, params, aux, hp) -> None | str     # None: served; else the reason

(``x`` the caller's ``(..., in)`` input, the rest as the kernels will get them). Without the
method it serves every call (the torch kernels). Every family's public function picks its
kernels through :func:`kernels_for`, the one routing rule: an explicitly requested backend
(argument or ``PYPEFT_FAST_BACKEND``) that cannot run on the device, or whose ``supports``
declines the call, raises ``RuntimeError`` naming the layer, family, backend, shapes and reason;
``"auto"`` walks :data:`AUTO_PREFERENCE`, skips a backend that cannot run (a WARNING, once per
family, backend and device type) or that declines the call (INFO, once per family, backend and
reason) on the ``pypeft_fast`` logger, and takes the next one. The
kernels themselves never hand a call to another backend's kernels.
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

    # Optional: ``supports(x, weight, params, aux, hp) -> str | None`` (module docstring).


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
_warned_declines: set[tuple[str, str, str]] = set()


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
                    f"{family}'s kernels: {', '.join(sorted(fam.backends)) or 'none'})")
        reason = _UNREGISTERED_REASON.get(backend, "no kernels registered")
        return f"backend {backend!r} has no {family} kernels: {reason}"
    probe = _AVAILABILITY.get(backend)
    if probe is None:
        return f"backend {backend!r} registered kernels but no availability probe"
    reason = probe(device)
    return None if reason is None else f"backend {backend!r} cannot run on {device}: {reason}"


def candidates(family: str, backend: str, device: torch.device) -> list[tuple[str, Kernels]]:
    """The backends that may run ``family`` on ``device``, in the order they are tried.

    An explicitly named backend (or ``PYPEFT_FAST_BACKEND``) is the only candidate, and must be
    able to run on ``device`` or this raises ``RuntimeError`` saying why. ``"auto"`` lists the
    backends of ``AUTO_PREFERENCE`` that registered the family with ``auto=True`` and can run
    there (saying once when it has to skip one it would have preferred), torch last.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown delta family {family!r}; registered: {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    if backend == "auto":
        backend = os.environ.get("PYPEFT_FAST_BACKEND") or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        reason = why_unavailable(family, backend, device)
        if reason is not None:
            raise RuntimeError(f"pypeft_fast {family}: requested {reason}")
        return [(backend, fam.backends[backend].kernels)]
    out = []
    for name in AUTO_PREFERENCE.get(device.type, ("torch",)):
        entry = fam.backends.get(name)
        if name == "torch" or (entry is not None and not entry.auto):
            continue  # torch goes last; a registered backend not faster than torch stays out
        reason = why_unavailable(family, name, device)
        if reason is None:
            out.append((name, entry.kernels))
        elif entry is not None:
            key = (family, name, device.type)
            if not torch.compiler.is_compiling() and key not in _warned_fallbacks:
                _warned_fallbacks.add(key)
                log.warning("pypeft_fast %s: %s; using the next backend", family, reason)
    out.append(("torch", fam.backends["torch"].kernels))
    return out


def resolve(family: str, backend: str, device: torch.device) -> tuple[str, Kernels]:
    """The backend that runs ``family`` on ``device`` when no call declines it (the first of
    :func:`candidates`): ``python -m pypeft_fast info``, the benchmark's labels."""
    return candidates(family, backend, device)[0]


def why_declined(kernels: Kernels, x, weight, params, aux, hp) -> str | None:
    """None when ``kernels`` serve this call, else their reason (``supports``)."""
    supports = getattr(kernels, "supports", None)
    return None if supports is None else supports(x, weight, params, aux, hp)


def _shapes(x, weight, params) -> str:
    def shape(t):
        return "(" + ", ".join(str(d) for d in t.shape) + ")" if isinstance(t, torch.Tensor) else "-"
    return (f"x {shape(x)}, weight {shape(weight)}, params "
            + ", ".join(shape(p) for p in params))


def choose(family: str, options: list[tuple[str, Kernels]], where: str, x, weight, params, aux,
           hp, explicit: bool) -> Kernels:
    """The first of ``options`` (from :func:`candidates`) whose kernels serve this call. An
    explicit backend that declines raises; "auto" says once per (family, backend, reason)
    that it skips one and takes the next."""
    for i, (name, kernels) in enumerate(options):
        reason = why_declined(kernels, x, weight, params, aux, hp)
        if reason is None:
            return kernels
        if explicit:
            raise RuntimeError(f"pypeft_fast {family} ({where}): backend {name!r} cannot serve "
                               f"{reason} [{_shapes(x, weight, params)}]; backend='auto' runs "
                               f"the next backend that can, backend='torch' serves every call")
        key = (family, name, reason)
        if not torch.compiler.is_compiling() and key not in _warned_declines:
            _warned_declines.add(key)
            nxt = options[i + 1][0] if i + 1 < len(options) else None
            # INFO: a declined call is routine (LoRA at dropout 0 on CPU), results are the same
            log.info("pypeft_fast %s: backend %r does not serve %s; auto uses %r (said once)",
                     family, name, reason, nxt)
    raise RuntimeError(f"pypeft_fast {family} ({where}): no registered kernels serve this call "
                       f"[{_shapes(x, weight, params)}]; the torch kernels must serve every call")


def is_explicit(backend: str) -> bool:
    """Whether ``backend`` names one backend (the argument, or ``PYPEFT_FAST_BACKEND`` under
    "auto"): then a call it cannot serve raises instead of falling back."""
    return backend != "auto" or bool(os.environ.get("PYPEFT_FAST_BACKEND"))


def kernels_for(family: str, backend: str, where: str, x, weight, params, aux, hp) -> Kernels:
    """The kernels that run this call of ``family`` (the routing rule of the module docstring):
    ``x`` (..., in), ``weight``, ``params``, ``aux`` and ``hp`` as the Function will get them."""
    options = candidates(family, backend, x.device)
    return choose(family, options, where, x, weight, params, aux, hp, is_explicit(backend))


def declines(family: str, backend: str) -> str | None:
    """What ``backend``'s kernels of ``family`` decline per call (their ``supports`` docstring's
    first paragraph, on one line), or None when they serve every call: ``python -m pypeft_fast
    info``."""
    entry = FAMILIES[family].backends.get(backend)
    supports = None if entry is None else getattr(entry.kernels, "supports", None)
    doc = None if supports is None else (supports.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else None


def usable_backends(device: torch.device) -> dict[str, dict[str, str | None]]:
    """``{family: {backend: None or reason}}`` for ``python -m pypeft_fast info``."""
    return {
        fam: {b: why_unavailable(fam, b, device) for b in BACKENDS} for fam in sorted(FAMILIES)
    }


# ------------------------------------------------------------------------------ declarations
# What else a family declares once (pypeft_fast/declaration.py: public function, inject spec,
# benchmark cases, peft counterpart). inject, workloads, the benches and the profiler read
# DECLARATIONS through declaration.DeclaredTable views; routing above never looks at it.

DECLARATIONS: dict[str, object] = {}
DECLARATIONS_VERSION = 0
"""Bumped by every declare/undeclare: the DeclaredTable views rebuild when it changes."""


def declare(decl):
    """Register ``decl`` (a ``declaration.FamilyDeclaration``); the family itself too unless its
    module registered it already (with the same ``delta_weight``). Returns ``decl``."""
    global DECLARATIONS_VERSION
    if decl.name in DECLARATIONS:
        raise RuntimeError(f"delta family {decl.name!r} is declared twice")
    taken = {c.name: d.name for d in DECLARATIONS.values() for c in d.cases}
    clash = {c.name: taken[c.name] for c in decl.cases if c.name in taken}
    if clash:
        raise RuntimeError(f"delta family {decl.name!r}: case names {clash} are declared by other families")
    fam = FAMILIES.get(decl.name)
    if fam is None:
        register_family(decl.name, decl.delta_weight)
    elif fam.delta_weight is not decl.delta_weight:
        raise RuntimeError(f"delta family {decl.name!r}: the declaration's delta_weight is not the "
                           "registered one")
    from dataclasses import replace

    cases = tuple(replace(c, family=decl.name, function=decl.function.__name__) for c in decl.cases)
    decl = replace(decl, cases=cases)
    DECLARATIONS[decl.name] = decl
    DECLARATIONS_VERSION += 1
    return decl


def undeclare(name: str) -> None:
    """Forget family ``name`` entirely (its declaration and its registry entry): for a family
    declared in-process, e.g. a test's toy family."""
    global DECLARATIONS_VERSION
    DECLARATIONS.pop(name, None)
    FAMILIES.pop(name, None)
    DECLARATIONS_VERSION += 1
