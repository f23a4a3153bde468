"""The `tli` command: one sub-command per stage, each ending in one `run_*` call.

Sub-commands live in :mod:`tli.cli`, one module each, with a ``register(subparsers)``
function. Modules import heavy libraries (torch, ray, lm_eval) inside their handlers so that
``tli --help`` stays instant. Bad input raises :class:`tli.errors.TliError`, printed here as one
line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tli import __version__
from tli.drills import drill
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
    "compare",
    "pipeline",
    "runs",
    "export",
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


# Write errors that come from the machine, not from tli: one line, like bad input.
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file grew past the size limit",
    errno.EROFS: "the filesystem is read-only",
}


class _Stopped(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C (so every ``finally`` and staged output cleans up)."""


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: staged outputs remove their partial
    # folders (or keep a resumable one) and local Ray heads are stopped.
    raise _Stopped


def _interrupted(args: argparse.Namespace | None) -> str:
    """What an interrupted command left, in words (its staged output says what is true)."""
    if args is None or not getattr(args, "func", None):
        return "nothing was done"
    if getattr(args, "command", "") in ("pipeline", "demo"):
        return "finished stages stay in the store: run it again to continue"
    if hasattr(args, "resume"):
        return "a run that reached a checkpoint is kept beside --out: continue it with --resume"
    return "nothing was written: run the command again"


def main(argv: list[str] | None = None) -> int:
    """Run the ``tli`` command line; the exit code (0, 1 = failed, 2 = bad input, 130/143).

    Everything, parsing and set-up included, runs inside one ``try``: a Ctrl-C or SIGTERM in
    the first second is "interrupted" in one line, never a traceback.
    """
    previous = _set_sigterm(_terminate)
    name, args = "tli", None
    try:
        argv = sys.argv[1:] if argv is None else argv
        _offline_env()
        _, args = _parse(argv)
        if args is None:
            return 2
        name = f"tli {args.command}"
        _check_out(args)
        return int(args.func(args) or 0)
    except TliError as e:
        sys.stderr.write(f"{name}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt as e:
        how = "terminated" if isinstance(e, _Stopped) else "interrupted"
        sys.stderr.write(f"{name}: {how}: {_interrupted(args)}\n")
        return 143 if isinstance(e, _Stopped) else 130
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        sys.stderr.write(
            f"{name}: error: {_DISK_ERRORS[e.errno]}{where}: nothing was kept; free some "
            "space or write elsewhere (--out, --store)\n"
        )
        return 2
    finally:
        _set_sigterm(previous)


def _set_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler; the previous one (None off the main thread: left alone)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tli called from a thread): keep its handlers
        return None


def _offline_env() -> None:
    # Nothing in tli may reach a model or dataset hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray reads its auth mode once per process: fix it (and make sure a token exists) before
    # any stage imports ray.
    from tli.rayenv import ensure_auth

    ensure_auth()
    drill("cli.start", 1)  # a no-op unless a fault drill is armed


def _parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace | None]:
    """The parser and the parsed arguments (None: no command given, help printed)."""
    from tli.cli.flags import split_overrides

    argv, overrides = split_overrides(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return parser, None
    if extra:  # named after the command they were given to (argparse names only `tli`)
        words = [getattr(args, k, None) for k in ("command", "data_command", "action")]
        prog = " ".join(["tli", *[w for w in words if w]])
        sys.stderr.write(f"{prog}: error: unrecognized arguments: {' '.join(extra)} "
                         f"(see {prog} --help)\n")  # fmt: skip
        raise SystemExit(2)
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"`tli {args.command}` takes no SECTION.FIELD=VALUE overrides")
    args.overrides = overrides if hasattr(args, "overrides") else []
    return parser, args


# Arguments that name a command's inputs (files or folders it reads).
_INPUT_ARGS = ("model", "data", "heldout", "tokenizer", "compare", "file", "base", "config",
               "upscaled")  # fmt: skip


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an --out (or --store) that could destroy or write into an input, before any work.

    The stage functions protect the inputs they are given; this adds what only the command line
    knows (its --config files, every folder named on it) and the stage store: a --out that is,
    contains or lies inside a store would replace stored versions, which are never rewritten.
    """
    from tli.output import check_target, store_root_of

    inputs: list[Path] = []
    for a in _INPUT_ARGS:
        v = getattr(args, a, None)
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, str) and item and Path(item).exists():
                inputs.append(Path(item))
    out = getattr(args, "out", None)
    if out and hasattr(args, "force"):
        check_target(Path(out), inputs)
        store = store_root_of(Path(out))
        if store is not None:
            raise TliError(
                f"--out {out} lies in the stage store {store}: stored versions are never "
                "rewritten; choose a folder outside the store"
            )
    store = getattr(args, "runtime__store", None)
    if store and getattr(args, "command", "") in ("pipeline", "demo"):
        for p in inputs:
            if Path(store).absolute().resolve().is_relative_to(p.absolute().resolve()):
                raise TliError(
                    f"--store {store} lies inside the input {p}: choose a store outside it"
                )
