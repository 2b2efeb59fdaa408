"""Packaging: the CLI, lean import, and the Triton kernels living inside the package."""
import importlib.util
import subprocess
import sys

import pytest


def test_info_lists_versions_and_backends_with_reasons():
    out = subprocess.run([sys.executable, "-m", "pypeft_fast", "info"], capture_output=True, text=True, check=True).stdout
    for word in ("torch", "triton", "peft", "transformers", "hadamard", "lowrank", "kronecker", "phm", "sparse"):
        assert word in out
    assert "usable" in out
    assert "no — " in out  # e.g. cuda on this machine, with the reason


def test_import_initialises_no_cuda():
    code = ("import torch, pypeft_fast; import sys; "
            "sys.exit(1 if torch.cuda.is_initialized() else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_are_a_subpackage_not_a_top_level_module():
    import pypeft_fast.kernels  # noqa: F401
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "pypeft_fast" not in (spec.origin or ""), (
        "a top-level `kernels` module from this project would shadow Hugging Face's `kernels`")


def test_cli_rejects_unknown_command():
    r = subprocess.run([sys.executable, "-m", "pypeft_fast", "frobnicate"], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown command" in r.stderr


@pytest.mark.parametrize("family", ["hadamard", "lowrank", "kronecker", "phm", "sparse"])
def test_every_family_is_registered_with_a_torch_path(family):
    import pypeft_fast as pf
    assert "torch" in pf.FAMILIES[family].backends


def test_every_cli_command_listed_in_help_imports():
    """A command in `--help` whose module does not exist (the old `demo`) is a crash for users."""
    import importlib

    from pypeft_fast.__main__ import COMMANDS
    for name, (module, _help) in COMMANDS.items():
        assert importlib.util.find_spec(module) is not None, f"`pypeft-fast {name}` points at missing {module}"
        assert callable(getattr(importlib.import_module(module), "main", None)), f"{module} has no main()"


def test_csrc_shared_headers_include_no_family_header():
    """csrc/common/ (generic) and csrc/philox/ (shared RNG) include only each other and csrc/ops.h,
    never a family's header; and no C++ file defines a schema (pypeft_fast/_ops.py is the one
    definition): csrc/README.md."""
    import pathlib
    import re
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    shared = {"common", "philox"}
    for path in sorted(csrc.rglob("*")):
        if path.suffix not in (".h", ".cuh", ".cpp", ".cu"):
            continue
        text = path.read_text()
        assert not re.search(r"\bTORCH_LIBRARY\s*\(", text), f"{path}: schemas belong in _ops.py"
        if path.parent.name not in shared:
            continue
        for inc in re.findall(r'#include "([^"]+)"', text):
            target = (path.parent / inc).resolve()
            assert target.parent == csrc or target.parent.name in shared, (
                f"{path} includes the family header {inc}")


def test_build_tools_are_pinned_and_every_script_installs_the_pins():
    """setuptools is pinned (requirements/build.txt), never upgraded to whatever is newest: the
    `license = { text = ... }` table in pyproject.toml is deprecated from setuptools 77 on, and
    its SPDX replacement fails validation before 77 (the GPU image's version is unknown). Every
    script that makes a venv installs that file."""
    import pathlib
    import re

    import setuptools
    root = pathlib.Path(__file__).resolve().parent.parent
    pins = {}
    for line in (root / "requirements" / "build.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements/build.txt: {line!r} is not pinned with =="
            pins[name] = version
    assert {"pip", "setuptools", "wheel"} <= pins.keys(), pins
    # (this venv's setuptools may differ: torch 2.11 itself pins setuptools < 82, which the
    # device-versions venv then gets; the license table builds with every setuptools ≥ 64)
    assert int(setuptools.__version__.split(".")[0]) >= 64, setuptools.__version__
    for script in ("scripts/setup_env.sh", ".ci/device_versions.sh", ".ci/build_cuda.sh"):
        text = (root / script).read_text()
        assert "requirements/build.txt" in text, f"{script} does not install requirements/build.txt"
        unpinned = [ln for ln in text.splitlines()
                    if "pip install" in ln and re.search(r"\bsetuptools\b(?![=<>])", ln)]
        assert not unpinned, f"{script} installs an unpinned setuptools: {unpinned}"
