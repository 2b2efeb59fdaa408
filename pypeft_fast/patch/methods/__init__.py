"""The peft methods ``pf.patch`` serves: one handler module per method, tried in this order.

A handler module defines ``PEFT_CLASS = (module path, class name)`` (the exact peft layer class
it serves) and ``Handler`` with::

    peft_type                                  # "lora", "lokr", ...
    adapter_reason(module, adapter, training)  # None, or why this adapter cannot be served
    call_reason(module, adapter, x)            # optional: None, or why this input cannot be served
    forward(module, adapter, x, state)         # y through a pypeft_fast op

Adding a method: write its module here and add its name to ``METHODS``.
"""
from __future__ import annotations

import importlib

METHODS = ("lora", "lokr", "loha", "shira")
"""Handler modules, in dispatch order."""


def handlers() -> dict[type, type]:
    """``{exact peft layer class: Handler}`` for the methods whose peft classes import."""
    found = {}
    for name in METHODS:
        mod = importlib.import_module(f"{__name__}.{name}")
        path, cls_name = mod.PEFT_CLASS
        cls = getattr(importlib.import_module(path), cls_name)
        found.setdefault(cls, mod.Handler)
    return found


def served_methods() -> tuple[str, ...]:
    return METHODS
