"""`cattn demo` (the main job) and `cattn replay`; each subcommand lives in its own module."""
from __future__ import annotations

import argparse
import importlib

# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "demo": ("cattn.demo", "multi-turn chat on the embedded SmolLM2-135M, cattn vs recompute"),
    "replay": ("cattn.replay.cli", "replay a multi-turn trace through the KV store policies"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=False)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:  # a subcommand whose optional extra is not installed
            p.set_defaults(_missing=str(exc))
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    if getattr(args, "_missing", None):
        parser.error(f"{args.command} needs an optional dependency: {args._missing} (pip install 'cattn[hf]')")
    return importlib.import_module(args._module).run(args) or 0
