"""Loads the optional backends; each registers its kernels and availability probe on import.

A missing or broken optional backend is logged (and shown by ``python -m pypeft_fast info``)
while the torch path keeps working. Nothing here initialises CUDA.
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger("pypeft_fast")

OPTIONAL = {
    # backend name(s): module that registers them
    "cpp/cuda": "pypeft_fast.native",
    "triton": "pypeft_fast.triton_backend",
}
LOAD_ERRORS: dict[str, str] = {}

for _names, _module in OPTIONAL.items():
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as e:  # not written yet / not installed
        if e.name != _module:
            LOAD_ERRORS[_names] = f"{type(e).__name__}: {e}"
            log.info("pypeft_fast: %s backend unavailable: %s", _names, e)
        else:
            LOAD_ERRORS[_names] = f"{_module} is not part of this build"
    except Exception as e:  # noqa: BLE001  (a broken optional backend must not break import)
        LOAD_ERRORS[_names] = f"{type(e).__name__}: {e}"
        log.warning("pypeft_fast: %s backend failed to load: %s", _names, e)
