"""The `tli` command: one sub-command per stage, each ending in one `run_*` call.

Sub-commands live in :mod:`tli.cli`, one module each, with a ``register(subparsers)``
function. Modules import heavy libraries (torch, ray, lm_eval) inside their handlers so that
``tli --help`` stays instant. Bad input raises :class:`tli.errors.TliError`, printed here as one
line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Any

from tli import __version__
from tli.errors import TliError

# Order here is the order in `tli --help`.
COMMAND_MODULES = [
    "demo",
    "config",
    "import_base",
    "inject",
    "check",
    "data",
    "eval",
    "train",
    "tune",
    "pipeline",
    "runs",
]
# Commands registered by a module of another name.
_MODULE_OF = {"import-gguf": "import_base"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2, as argparse does)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser, or, when ``argv`` starts with a known command, just that command's.

    Importing one command module instead of all of them keeps start-up short (a `tli inject`
    is often a fraction of a second of work).
    """
    first = argv[0] if argv else ""
    only = _MODULE_OF.get(first, first.replace("-", "_"))
    modules = [only] if only in COMMAND_MODULES else COMMAND_MODULES
    parser = OneLineParser(
        prog="tli",
        description="Depth up-scaling of LLMs by Transformer Layer Injection, on Ray and KFP.",
    )
    parser.add_argument("--version", action="version", version=f"tli {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in modules:
        try:
            mod = importlib.import_module(f"tli.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tli.cli.{name}":
                continue  # not written yet
            raise
        mod.register(sub)
    return parser


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: staged outputs remove their partial
    # folders (or keep a resumable one) and local Ray heads are stopped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Nothing in tli may reach a model or dataset hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray reads its auth mode once per process: fix it (and make sure a token exists) before
    # any stage imports ray.
    from tli.rayenv import ensure_auth

    ensure_auth()
    argv = sys.argv[1:] if argv is None else argv
    from tli.cli.flags import split_overrides

    argv, overrides = split_overrides(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"`tli {args.command}` takes no SECTION.FIELD=VALUE overrides")
    args.overrides = overrides if hasattr(args, "overrides") else []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except TliError as e:
        sys.stderr.write(f"tli {args.command}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("tli: interrupted\n")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
