"""``python -m pypeft_fast info``: library versions and, per family, which backends can run."""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys

import torch


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def report() -> str:
    import pypeft_fast
    from pypeft_fast import backends, registry

    lines = [f"pypeft_fast {pypeft_fast.__version__}", f"python       {platform.python_version()}"]
    for dist in ("torch", "triton", "peft", "transformers"):
        lines.append(f"{dist:<13}{_version(dist)}")
    # torch.cuda.is_available() does not create a CUDA context.
    lines.append(f"cuda         {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible'}")
    lines.append(f"cpu          {platform.machine()}, torch capability "
                 f"{torch.backends.cpu.get_cpu_capability()} (the native loops' vector width "
                 "follows it: README, Native kernels)")
    native = sys.modules.get("pypeft_fast.native")
    if native is not None:
        b = native.BUILD_INFO
        lines.append(f"native ext   built against torch {b.get('torch_version')}, "
                     f"CUDA kernels: {('yes, ' + b.get('cuda_archs', '')) if b.get('with_cuda') else 'no'}")
    else:
        lines.append("native ext   not loaded")
    for name, err in backends.LOAD_ERRORS.items():
        lines.append(f"  {name} backend: {err}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"\nbackends on {device} (auto picks the first usable one marked *, or for a "
                     "call it declines the next one):")
        for fam, table in registry.usable_backends(device).items():
            chosen, _ = registry.resolve(fam, "auto", device)
            lines.append(f"  {fam}:")
            for backend, why in table.items():
                mark = "*" if backend == chosen else " "
                text = "usable" if why is None else "no — " + why
                declined = registry.declines(fam, backend) if why is None else None
                if declined:  # per call, the routing rule: explicit raises, auto takes the next
                    text += f" (per call: {declined[0].lower() + declined[1:]})"
                lines.append(f"   {mark} {backend:<7}{text}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="pypeft-fast info", description=__doc__).parse_args(argv)
    print(report())
    return 0
