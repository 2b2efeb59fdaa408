"""``pf.patch(model)``: make the LoRA, LoKr and SHiRA ``Linear`` layers of a peft model compute
through pypeft_fast's ops, in place, on the layers' own Parameters; ``pf.unpatch(model)`` undoes
it. Layers that cannot be served run peft's forward and are listed in the :class:`PatchReport`.

Modules: :mod:`.report` (the report), :mod:`.checks` (conditions shared by every method),
:mod:`.methods` (one handler per peft method, in dispatch order), :mod:`.install` (discovery,
the per-instance forward, patch/unpatch). peft and transformers are imported lazily.
"""
from .install import is_patched, patch, unpatch
from .report import PATCHED, LayerEntry, PatchReport

__all__ = ["patch", "unpatch", "is_patched", "PatchReport", "LayerEntry", "PATCHED"]
