"""The bench's variants: one :class:`VariantSpec` per adapter, in :data:`VARIANTS` (the table is
the only place that names them; adding one is an entry here).

Each spec builds, from a copy of the base model, the pair it compares: the baseline (peft's own
implementation, or a materialising reference where peft has none) and pypeft_fast on a copy of
the *same* adapter weights (``pf.patch`` of that peft model, or ``pf.inject``)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .model import TARGET_MODULES, floor_copy, materialising_copy, randomise_zeros


@dataclass(frozen=True)
class VariantSpec:
    name: str                           # CLI name (``--families``); also the row's "family"
    family: str                         # the pypeft_fast family it runs (``--backend`` key)
    short: str                          # plot label: "LoRA", "LoKr", ...
    describe: Callable[[object], str]   # a -> "LoRA r=16 dropout 0.05"
    peft_config: Callable[[object], object] | None = None   # a -> peft config (baseline: peft)
    inject_config: Callable[[object, str], object] | None = None  # (a, backend) -> DeltaConfig
    aliases: tuple[str, ...] = ()

    @property
    def baseline(self) -> str:
        return "peft" if self.peft_config is not None else "reference"


def _lora(a):
    from peft import LoraConfig
    return LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=a.lora_dropout,
                      target_modules=list(TARGET_MODULES))


def _dora(p):
    """peft DoRA at dropout p (None: --lora-dropout): p = 0 and p > 0 are different math in peft
    (p > 0 adds base(drop(x)) terms), so both get a row."""
    def make(a):
        from peft import LoraConfig
        return LoraConfig(r=a.rank, lora_alpha=2 * a.rank, use_dora=True,
                          lora_dropout=a.lora_dropout if p is None else p,
                          target_modules=list(TARGET_MODULES))
    return make


def _lokr(a):
    from peft import LoKrConfig
    return LoKrConfig(r=a.rank, alpha=a.rank, target_modules=list(TARGET_MODULES))


def _loha(a):
    from peft import LoHaConfig
    return LoHaConfig(r=a.rank, alpha=a.rank, target_modules=list(TARGET_MODULES))


def _shira(a):
    from peft import ShiraConfig
    return ShiraConfig(r=a.rank, target_modules=list(TARGET_MODULES))


def _phm(a, backend):
    import pypeft_fast as pf
    return pf.DeltaConfig(family="phm", target_modules=list(TARGET_MODULES), n=a.phm_n,
                          rank=a.phm_rank, shared_A=True, backend=backend)


VARIANTS: dict[str, VariantSpec] = {s.name: s for s in (
    VariantSpec("lowrank", "lowrank", "LoRA", lambda a: f"LoRA r={a.rank} dropout {a.lora_dropout:g}",
                peft_config=_lora, aliases=("lora",)),
    VariantSpec("dora", "lowrank", "DoRA", lambda a: f"DoRA r={a.rank} dropout 0", peft_config=_dora(0.0)),
    VariantSpec("dora-dropout", "lowrank", "DoRA p", lambda a: f"DoRA r={a.rank} dropout {a.lora_dropout:g}",
                peft_config=_dora(None)),
    VariantSpec("kronecker", "kronecker", "LoKr", lambda a: f"LoKr r={a.rank}",
                peft_config=_lokr, aliases=("lokr",)),
    VariantSpec("loha", "hadamard", "LoHa", lambda a: f"LoHa r={a.rank}",
                peft_config=_loha, aliases=("hadamard",)),
    VariantSpec("sparse", "sparse", "SHiRA", lambda a: f"SHiRA r={a.rank}",
                peft_config=_shira, aliases=("shira",)),
    VariantSpec("phm", "phm", "PHM", lambda a: f"PHM n={a.phm_n} rank {a.phm_rank}",
                inject_config=_phm, aliases=("compacter",)),
)}
"""Every variant the bench knows, in table order."""


def resolve_name(name: str) -> str | None:
    """A CLI name or alias -> the variant's name (None if unknown)."""
    name = name.strip().lower()
    for spec in VARIANTS.values():
        if name == spec.name or name in spec.aliases:
            return spec.name
    return None


@dataclass
class Variant:
    """One model the bench trains: the floor, a baseline or pypeft_fast, for one variant."""

    family: str   # the variant's name ("floor" for the floor)
    impl: str     # "floor", "peft", "reference" or "pypeft_fast"
    label: str
    model: nn.Module
    opt: torch.optim.Optimizer | None = None
    trainable_params: int = 0
    report: object = None  # pf.PatchReport for patched peft models
    error: str | None = None  # set when a step raised: the row is reported, the others go on
    extra: dict = field(default_factory=dict)


def build_pair(spec: VariantSpec, a, base: nn.Module, backend: str) -> list[Variant]:
    """``[baseline, pypeft_fast]`` for ``spec`` on copies of ``base``."""
    import pypeft_fast as pf

    what = spec.describe(a)
    if spec.peft_config is not None:
        from peft import get_peft_model

        torch.manual_seed(1)
        peft_model = get_peft_model(copy.deepcopy(base), spec.peft_config(a))
        randomise_zeros(peft_model)
        fast = copy.deepcopy(peft_model)
        report = pf.patch(fast, strict=True, backend=backend)
        return [Variant(spec.name, "peft", f"peft {what}", peft_model),
                Variant(spec.name, "pypeft_fast", f"pypeft_fast {what}", fast, report=report)]
    fast = pf.inject(copy.deepcopy(base), spec.inject_config(a, backend))
    randomise_zeros(fast)
    ref = materialising_copy(fast)
    return [Variant(spec.name, "reference", f"reference {what} (ΔW built, F.linear)", ref),
            Variant(spec.name, "pypeft_fast", f"pypeft_fast {what}", fast)]


def build_variants(a, base: nn.Module) -> list[Variant]:
    """``[floor, (baseline, pypeft_fast) per selected variant]`` on copies of ``base``, each with
    its AdamW over its trainable Parameters."""
    variants = [Variant("floor", "floor", "floor (norms only)", floor_copy(base))]
    for name in a.families:
        variants += build_pair(VARIANTS[name], a, base, a.backends[VARIANTS[name].family])
    for v in variants:
        params = [p for p in v.model.parameters() if p.requires_grad]
        v.trainable_params = sum(p.numel() for p in params)
        v.opt = torch.optim.AdamW(params, lr=1e-4)
        v.model.train()
    return variants
