"""Command-line interface: ``python -m dsv4lib <command> …``.

A thin shell: each subcommand lives in ``dsv4lib/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int`` and calls library functions.
Modules are imported only when their command runs, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help (the module dsv4lib.commands.<name> implements it)
COMMANDS: dict[str, str] = {
    "demo": "main job on the embedded model (notebooks through papermill)",
    "quantize": "self-calibrate and GPTQ-quantize the routed experts to INT2 g64",
    "verify": "check an INT2 dir against the upstream release (bit/nibble order, error)",
    "generate": "generate text from a prompt",
    "chat": "interactive multi-turn chat (REPL; works through a pipe)",
    "mmlu": "score MMLU 0-shot / 5-shot",
    "ppl": "perplexity, KL and top-1 agreement between two models",
    "bench": "full-scale GPU benchmark (synthetic V4-Flash weights)",
    "train": "train the embedded tiny model from the corpus",
}


def _module(name: str):
    return importlib.import_module(f"dsv4lib.commands.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsv4lib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            _module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=cmd)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(_module(args.command).run(args) or 0)
