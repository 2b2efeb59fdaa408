"""``pypeft-fast profile``: where a PEFT training step's memory goes, per module and by cause,
and what pypeft_fast saves (``--compare``). See README "Memory profiling".

Examples::

    pypeft-fast profile --preset bench --method lora --r 16 --dropout 0.05 --compare
    pypeft-fast profile --preset llama-3-8b --method lora --compare --project-layers 32 --project-seq 4096
    pypeft-fast profile --model ./my-model --method lowrank --r 8 --json out.json --plot out.png
"""
from __future__ import annotations

import argparse
import sys

import torch

from .models import DTYPES, PRESETS, ProfileError

_MiB = 2 ** 20


def parse_args(argv):
    from .methods import all_methods

    p = argparse.ArgumentParser(prog="pypeft-fast profile", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"built-in model shape: {', '.join(PRESETS)} (default bench)")
    src.add_argument("--model", metavar="PATH", help="local Hugging Face model directory (config.json; random weights)")
    p.add_argument("--layers", type=int, help="depth to build (default: the preset's reduced depth / the config's)")
    p.add_argument("--method", default="lora", help=f"one of {', '.join(all_methods())} (default lora)")
    p.add_argument("--adapter", metavar="DIR", help="a saved peft adapter directory (instead of --method)")
    p.add_argument("--r", type=int, help="rank (lora, dora, lokr, loha, shira; lowrank r; kronecker/phm rank)")
    p.add_argument("--alpha", type=float, help="scaling numerator (default: = r)")
    p.add_argument("--dropout", type=float, help="adapter dropout (lora, dora, lowrank)")
    p.add_argument("--density", type=float, help="mask density (sparse)")
    p.add_argument("--n", type=int, help="PHM terms (phm)")
    p.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear (default)")
    p.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    p.add_argument("--seq", type=int, help="sequence length (default: the preset's)")
    p.add_argument("--dtype", choices=list(DTYPES), help="base model dtype (default float32; bfloat16 for the 7B/8B presets on CUDA)")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], help="run forward and loss under torch.autocast")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compare", action="store_true", help="peft's forward vs pypeft_fast, side by side")
    p.add_argument("--patch", action="store_true", help="profile the pf.patch-ed peft model (without --compare)")
    p.add_argument("--project-layers", type=int, help="project to this many blocks per stack")
    p.add_argument("--project-batch", type=int, help="project to this batch size")
    p.add_argument("--project-seq", type=int, help="project to this sequence length")
    p.add_argument("--top", type=int, default=12, help="rows in the module table (default 12)")
    p.add_argument("--group", choices=["module", "kind", "type", "layer"], default="module",
                   help="rows of the table: each module, module kind (block index *), class, block")
    p.add_argument("--json", metavar="PATH", help="write the report(s) as JSON")
    p.add_argument("--plot", metavar="PNG", help="stacked bars by cause per module kind")
    p.add_argument("--markdown", metavar="PATH", help="write a short Markdown summary")
    p.add_argument("--snapshot", metavar="PICKLE", help="CUDA: a memory snapshot for pytorch.org/memory_viz")
    p.add_argument("--no-crosscheck", action="store_true", help="skip PyTorch's MemTracker cross-check")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _options(a) -> dict:
    return {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "density": a.density, "n": a.n}


def _targets(a):
    return "all-linear" if a.targets == "all-linear" else [t for t in a.targets.split(",") if t]


def _projecting(a) -> bool:
    return any(v is not None for v in (a.project_layers, a.project_batch, a.project_seq))


def _measured_seq(cfg, seq: int, batch: int, note: list) -> int:
    """A sequence length no Parameter dimension equals (else the projection cannot tell them apart)."""
    dims = {getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "vocab_size", "d_model", "d_ff",
                                      "num_attention_heads", "num_key_value_heads", "head_dim", "d_kv")
            if isinstance(getattr(cfg, k, None), int)}
    s = seq
    while s in dims or s * batch in dims or s == batch:
        s += 1
    if s != seq:
        note.append(f"measured at seq {s}, not {seq}: {seq} (or batch × {seq}) is a model dimension, "
                    "which the projection could not tell apart")
    return s


def build(a, progress):
    """Validate everything, then build the model variants: ``[(label, model)], batch, cfg, notes``."""
    from . import methods, models

    notes: list[str] = []
    if a.adapter is None:
        methods.check_method(a.method, _options(a))
    if a.compare and a.patch:
        raise ProfileError("--patch and --compare: --compare already profiles the patched model")
    if a.patch and a.adapter is None and a.method not in methods.PEFT_METHODS:
        raise ProfileError(f"--patch applies to peft methods ({', '.join(methods.PEFT_METHODS)}), not {a.method}")
    if a.adapter is not None and a.model is None:
        raise ProfileError("--adapter needs --model (the base model directory the adapter was trained on)")
    preset = PRESETS.get(a.preset or "bench") if a.model is None else None
    if a.model is None and preset is None:
        raise ProfileError(f"unknown preset {a.preset!r}; choose from {', '.join(PRESETS)}")
    cfg = models.path_config(a.model, a.layers) if a.model else models.preset_config(a.preset or "bench", a.layers)
    for what, v in (("--layers", a.layers), ("--batch", a.batch), ("--seq", a.seq), ("--r", a.r)):
        if v is not None and v < 1:
            raise ProfileError(f"{what} must be ≥ 1, got {v}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[a.dtype or (preset.dtype if preset and device.type == "cuda" else "float32")]
    batch_n = a.batch or (preset.batch if preset else 2)
    seq = a.seq or (preset.seq if preset else 128)
    if _projecting(a):
        seq = _measured_seq(cfg, seq, batch_n, notes)
    elif preset is not None and models.depth(cfg) < preset.full_layers:
        notes.append(f"{models.depth(cfg)} of the real model's {preset.full_layers} blocks: "
                     f"--project-layers {preset.full_layers} for the full depth")
    if a.snapshot and device.type != "cuda":
        raise ProfileError("--snapshot records the CUDA allocator; this run is on cpu")
    what = f"--preset {a.preset or 'bench'}" if a.model is None else f"--model {a.model}"
    models.check_fits(what, cfg, dtype, 2 if a.compare else 1, device)
    progress.set_postfix_str("building the model")
    base = models.build_model(cfg, dtype, device)
    batch = models.make_batch(cfg, batch_n, seq, device)
    if models.model_class(cfg).__name__ == "AutoModel":
        batch.pop("labels")
    try:
        vs = methods.variants(base, a.method, _targets(a), _options(a), a.compare, a.patch, a.adapter)
    except ProfileError:
        raise
    except ValueError as e:  # peft/pf config errors: bad input
        raise ProfileError(str(e).splitlines()[0]) from None
    return vs, batch, cfg, notes, preset


def run(a) -> int:
    from tqdm.auto import tqdm

    from .plot import plot
    from .projection import project
    from .report import Comparison, write_json
    from .runner import profile_memory

    if a.threads:
        torch.set_num_threads(a.threads)
    bar = tqdm(total=1, desc="profile", disable=a.quiet, file=sys.stderr, dynamic_ncols=True)
    try:
        vs, batch, cfg, notes, preset = build(a, bar)
        bar.reset(total=3 * len(vs))
        autocast = DTYPES[a.autocast] if a.autocast else None
        reports = []
        for label, model in vs:
            def phase(name, label=label):
                bar.set_postfix_str(f"{label}: {name}")
                bar.update()
            reports.append(profile_memory(model, batch, label=label, autocast=autocast,
                                          crosscheck=not a.no_crosscheck, snapshot=a.snapshot, on_phase=phase))
            reports[-1].notes += notes
    finally:
        bar.close()
    if _projecting(a):
        layers = a.project_layers
        reports = [project(r, layers=layers, batch=a.project_batch, seq=a.project_seq) for r in reports]
    result = Comparison(*reports) if a.compare else reports[0]
    if a.compare:
        for r in reports:
            print(r.table(top=a.top, group=a.group if not r.projected else "module"))
            print()
        print(result.table(top=a.top))
    else:
        print(result.table(top=a.top, group=a.group if not result.projected else "module"))
    if a.json:
        write_json(result, a.json)
        print(f"wrote {a.json}")
    if a.plot:
        plot(reports, a.plot)
        print(f"wrote {a.plot}")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(result.markdown() + "\n")
        print(f"wrote {a.markdown}")
    return 0


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(a)
    except ProfileError as e:
        print(f"pypeft-fast profile: error: {e}", file=sys.stderr)
        return 2
