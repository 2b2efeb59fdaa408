"""The PEFT methods the profiler puts on a model: peft's own (``lora``, ``dora``, ``lokr``,
``loha``, ``shira``; pypeft_fast's side of a comparison is ``pf.patch`` on a copy) and
pypeft_fast's injected families (``pf.inject``; their peft counterpart is the comparison's
baseline). Command-line options map to each method's own fields; an option the method does not
have is an error."""
from __future__ import annotations

import copy

from .models import ProfileError

# method -> (peft config class, {cli option: config field}, fixed fields)
PEFT_METHODS = {
    "lora": ("LoraConfig", {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}, {}),
    "dora": ("LoraConfig", {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}, {"use_dora": True}),
    "lokr": ("LoKrConfig", {"r": "r", "alpha": "alpha"}, {}),
    "loha": ("LoHaConfig", {"r": "r", "alpha": "alpha"}, {}),
    "shira": ("ShiraConfig", {"r": "r"}, {}),
}

# cli option -> DeltaConfig fields it may mean, in order
_INJECT_FIELDS = {"r": ("r", "rank"), "alpha": ("alpha",), "dropout": ("dropout",),
                  "density": ("density",), "n": ("n",)}


def families() -> tuple[str, ...]:
    """The injectable families (every declaration with an inject spec)."""
    from ..inject.specs import SPECS

    return tuple(SPECS)


def peft_counterparts() -> dict[str, str]:
    """injected family -> the peft method computing the same ΔW (the comparison's baseline), as
    each family declares it (``families/<name>_decl.py``: ``peft_counterpart``)."""
    from ..registry import DECLARATIONS

    return {n: d.peft_counterpart for n, d in DECLARATIONS.items() if d.peft_counterpart}


def __getattr__(name):
    if name == "PEFT_COUNTERPART":  # the old table's name, now read from the declarations
        return peft_counterparts()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def all_methods() -> tuple[str, ...]:
    return (*PEFT_METHODS, *sorted(families()))


def _given(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def peft_config(method: str, targets, options: dict):
    """The peft config for ``method`` with the given options (None: peft's default)."""
    import peft

    cls_name, fields, fixed = PEFT_METHODS[method]
    kw = dict(fixed)
    for opt, v in _given(options).items():
        if opt not in fields:
            raise ProfileError(f"--{opt} is not an option of {method} (its options: "
                               f"{', '.join('--' + o for o in fields)})")
        kw[fields[opt]] = v
    if "r" in kw and "alpha" in fields and fields["alpha"] not in kw:
        kw[fields["alpha"]] = kw["r"]  # scaling 1 unless --alpha says otherwise
    return getattr(peft, cls_name)(target_modules=targets, **kw)


def delta_config(family: str, targets, options: dict):
    from ..inject import DeltaConfig
    from ..inject.specs import SPECS

    if family not in SPECS:
        raise ProfileError(f"method {family!r} is not available in this pypeft_fast (families: "
                           f"{', '.join(SPECS)}; peft methods: {', '.join(PEFT_METHODS)})")
    own = SPECS[family].options
    kw = {}
    for opt, v in _given(options).items():
        field_ = next((f for f in _INJECT_FIELDS.get(opt, ()) if f in own), None)
        if field_ is None:
            raise ProfileError(f"--{opt} is not an option of {family} (its options: "
                               f"{', '.join(sorted(own))})")
        kw[field_] = v
    try:
        return DeltaConfig(family=family, target_modules=targets, **kw)
    except ValueError as e:
        raise ProfileError(str(e).splitlines()[0]) from None


def check_method(method: str, options: dict) -> None:
    """Fail early (before a model is built) on an unknown method or an option it lacks."""
    if method in PEFT_METHODS:
        peft_config(method, "all-linear", options)
    elif method in families():
        delta_config(method, "all-linear", options)
    else:
        raise ProfileError(f"unknown method {method!r}; choose from {', '.join(all_methods())}")


def variants(base, method: str, targets, options: dict, compare: bool, patch: bool, adapter: str | None):
    """``[(label, model)]``: the model to profile, or (with ``compare``) peft's forward then
    pypeft_fast's, on copies of ``base``."""
    import pypeft_fast as pf
    from peft import PeftModel, get_peft_model

    if adapter is not None:
        peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        label = f"peft {peft_model.peft_config['default'].peft_type.value.lower()} (adapter {adapter})"
        return _peft_pair(peft_model, label, compare, patch)
    if method in PEFT_METHODS:
        peft_model = get_peft_model(base, peft_config(method, targets, options))
        return _peft_pair(peft_model, f"peft {method}", compare, patch)
    fast = pf.inject(copy.deepcopy(base) if compare else base, delta_config(method, targets, options))
    out = [(f"pf.inject {method}", fast)]
    if compare:
        counterparts = peft_counterparts()
        counterpart = counterparts.get(method)
        if counterpart is None:
            raise ProfileError(f"--compare: {method} has no peft counterpart to compare with "
                               f"(counterparts: {', '.join(f'{k}↔{v}' for k, v in counterparts.items())})")
        peft_opts = {k: v for k, v in _given(options).items() if k in PEFT_METHODS[counterpart][1]}
        out.insert(0, (f"peft {counterpart}", get_peft_model(base, peft_config(counterpart, targets, peft_opts))))
    return out


def _peft_pair(peft_model, label, compare, patch):
    import pypeft_fast as pf

    if not compare and not patch:
        return [(label, peft_model)]
    fast = copy.deepcopy(peft_model) if compare else peft_model
    report = pf.patch(fast)
    served = sum(e.status == "patched" for e in report.entries)
    fast_label = label.replace("peft ", "pf.patch ", 1) + ("" if served == len(report.entries)
                                                          else f" ({served}/{len(report.entries)} layers served)")
    return ([(label, peft_model)] if compare else []) + [(fast_label, fast)]
