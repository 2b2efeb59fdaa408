"""``pypeft-fast bench``: training steps of peft vs pypeft_fast on a Llama-architecture model.

One process, one base model (random weights from a config, seed 0), one batch; each
pypeft_fast row runs on a copy of the *same* adapter weights as the row it is compared with.
Rows, per precision (fp32; bf16 autocast where the device computes bf16 natively):

* ``floor`` — only the norm weights train: the same forward/backward through every layer, zero
  adapter cost. Overheads are measured against the floor of the same precision.
* one (baseline, pypeft_fast) pair per variant of :data:`variants.VARIANTS` — peft's LoRA/LoKr/
  SHiRA vs the same peft model after ``pf.patch``; PHM: ``pf.inject`` vs a materialising
  reference on the same Parameters.

Saved activations are the bytes of the tensors autograd saves during one forward
(:mod:`pypeft_fast.measure`), each storage counted once (including the frozen weights autograd
keeps a reference to); "excl. weights" leaves the model's own Parameter storages out.

Modules, one job each: :mod:`.model` (model, batch, reference), :mod:`.variants` (the variant
table), :mod:`.precision` (fp32 / autocast modes), :mod:`.timing` (steps, interleaved rounds,
saved bytes, profile), :mod:`.report` (rows, table, plot), :mod:`.cli` (arguments, main).
The project's own targets are in bench/NOTES.md, not in this output.
"""
from __future__ import annotations

from .cli import PRESETS, main, parse_args
from .precision import PRECISIONS
from .variants import VARIANTS

FAMILIES = tuple(VARIANTS)
"""The variant names, in table order (``--families``)."""

__all__ = ["main", "parse_args", "PRESETS", "PRECISIONS", "VARIANTS", "FAMILIES"]
