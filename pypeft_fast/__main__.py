"""``python -m pypeft_fast <command>`` / ``pypeft-fast <command>``.

Commands: ``info`` (versions, usable backends and why others are not), ``bench`` (the
end-to-end comparison on a built-in tiny Llama; see README).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("pypeft_fast.info", "versions and which backends are usable (and why not)"),
    "bench": ("pypeft_fast.bench", "end-to-end training-step comparison against peft on a tiny Llama"),
    "profile": ("pypeft_fast.profile.cli", "memory of one training step per module and by cause; --compare peft vs pypeft_fast"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pypeft-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
