"""pf.inject's view of the families' inject specs. Each spec lives in its family's slice
(``families/<name>_decl.py``, declared with ``registry.declare``; pypeft_fast/declaration.py):
adding a family to ``pf.inject`` touches no file here.

A spec says, for one family of :mod:`pypeft_fast.families`:

* ``options``: the :class:`DeltaConfig` fields it takes, with defaults (a callable default sees
  the config), and ``check_options(cfg)`` (``ValueError`` on a bad value);
* ``shapes(cfg, out, in, where)``: every per-layer tensor of a layer with weight (out, in) —
  ``{name: (shape, dtype kind)}``, kind ``"param"`` (trainable, adapter dtype) or ``"index"``
  (int64 buffer) — and ``shared_shapes(cfg)`` for Parameters shared by all injected layers;
* ``init_layer(cfg, tensors, weight, where)`` fills the new tensors so ΔW = 0 at step 0 while the
  gradient of the zero factor is not; ``init_shared`` likewise;
* ``call(m, x, weight, bias)``: the pf op for wrapper ``m`` (x: (..., in), weight: (out, in));
* ``delta_args(m)``: the arguments of the registry's ``FAMILIES[name].delta_weight`` (merge).

Wrapper attributes are the names in ``shapes``/``shared_shapes``; a pair factor (L, R) is stored
as ``<name>_left`` / ``<name>_right``. The helpers the specs share are ``inject/spec_tools.py``.
"""
from __future__ import annotations

from ..declaration import DeclaredTable


def _options(decls) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for d in decls:
        if d.inject is not None:
            for opt in d.inject.options:
                owners.setdefault(opt, []).append(d.name)
    return owners


SPECS = DeclaredTable(lambda decls: {d.name: d.inject for d in decls if d.inject is not None})
"""family name → spec (live). Families without one cannot be injected (patching peft still works)."""

FAMILY_OPTIONS = DeclaredTable(_options)
"""option → the families that take it (live)."""


def __getattr__(name):
    if name == "factorization":  # LoKr's, the kronecker family's own (families/kronecker_decl.py)
        from ..families.kronecker_decl import factorization
        return factorization
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
