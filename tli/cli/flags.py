"""CLI flags generated from the config models, and the one way a command resolves its config.

- :func:`add_section_flags`: one flag per field of a run-config section (``--seq-len`` for
  ``train.seq_len``), whose default is "not given": the model's default shows in the help.
- :func:`add_runtime_flags`: the same for the :class:`tli.config.Runtime` fields a command uses.
- :func:`add_config_args`: ``--preset``, ``--config`` (repeatable) and ``KEY=VALUE`` overrides.
- :func:`resolve_args`: :func:`tli.config.resolve` of the preset, the files, the overrides and
  then the flags given; :func:`runtime_of`: the runtime from the flags given.

Every command resolves its config this way, so a value means the same wherever it is given.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

from tli.config import PRESETS, Resolved, RunConfig, Runtime, Section, parse_size, resolve

_SEP = "__"  # argparse dest = "<section>__<field>"
RUNTIME = "runtime"
# A command-line override: a dotted key, '=', a value (e.g. train.lr=3e-4).
OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+=")
# Options whose own value is written KEY=VALUE: the word after them is theirs, not an override.
KEY_VALUE_OPTIONS = ("--driver",)


def _scalar(tp: Any):
    """A converter for one value of type ``tp`` (int, float, str or a Literal)."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)

        def lit(text: str) -> Any:
            for c in choices:
                if str(c) == text:
                    return c
            raise ValueError(text)

        lit.__name__ = "one of " + "|".join(str(c) for c in choices)
        return lit
    if tp in (int, float, str):
        return tp
    # int | Literal["auto"] and similar unions: try each member in turn.
    members = typing.get_args(tp)

    def union(text: str) -> Any:
        for m in members:
            if m is type(None):
                continue
            try:
                return _scalar(m)(text)
            except (TypeError, ValueError):
                continue
        raise ValueError(text)

    union.__name__ = " or ".join(getattr(_scalar(m), "__name__", str(m)) for m in members)
    return union


def _split_list(item_type: Any):
    def parse(text: str) -> list[Any]:
        out = []
        for t in (t.strip() for t in text.split(",")):
            if not t:
                continue
            try:
                out.append(_scalar(item_type)(t))
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(
                    f"{t!r} is not a valid {getattr(item_type, '__name__', 'value')}"
                ) from None
        return out

    return parse


def _strip_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return tp


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_FROM_FIELD = object()


def _add_field(group: Any, dest: str, name: str, field: Any, default: Any = _FROM_FIELD) -> None:
    """One flag for one pydantic field (booleans as --x/--no-x, lists as A,B,...)."""
    flag = "--" + name.replace("_", "-")
    tp = _strip_none(field.annotation)
    default = field.default if default is _FROM_FIELD else default
    shown = "none" if default is None else default
    if isinstance(shown, list):
        shown = ",".join(str(x) for x in shown) or "none"
    help_ = f"{field.description or ''} (default: {shown})"
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_}
    if tp is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        group.add_argument(flag, type=_split_list(item), metavar="A,B,...", **kw)
    elif name == "shard_size":
        group.add_argument(flag, type=_size, metavar="SIZE", **kw)
    else:
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
        # str choices: let argparse say "invalid choice ... (choose from ...)"
        conv = str if choices and all(isinstance(c, str) for c in choices) else _scalar(tp)
        group.add_argument(flag, type=conv, choices=choices,
                           metavar=None if choices else name.upper(), **kw)  # fmt: skip


def _sub_model(field: Any) -> type[Section] | None:
    tp = _strip_none(field.annotation)
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


def _add_fields(
    group: Any, section: str, cls: type[Section], prefix: str, skip: Any, defaults: Any = None
) -> None:
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        if skip(key):
            continue
        default = getattr(defaults, name) if defaults is not None else field.default
        sub = _sub_model(field)
        if sub is None:
            _add_field(group, f"{section}{_SEP}{key}", key.replace(".", "_"), field, default)
            continue
        # A nested part (train.validation): its fields as --validation-blocks, ...
        _add_fields(group, section, sub, f"{key}.", skip, default)
        if type(None) in typing.get_args(field.annotation):  # optional: --no-heldout = None
            group.add_argument(
                "--no-" + key.replace(".", "-").replace("_", "-"),
                dest=f"{section}{_SEP}{key}",
                action="store_const",
                const=None,
                default=argparse.SUPPRESS,
                help=f"none at all ({key}: {field.description})",
            )


def add_section_flags(
    parser: argparse.ArgumentParser,
    section: str,
    *,
    only: list[str] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """One flag per field of config section ``section`` (``--seq-len`` for ``seq_len``);
    nested parts flattened (``--validation-every`` for ``train.validation.every``)."""
    cls: type[Section] = RunConfig.model_fields[section].annotation  # type: ignore[assignment]
    group = parser.add_argument_group(f"{section} options (config section '{section}')")

    def skip(key: str) -> bool:
        top = key.split(".")[0]
        return (only is not None and top not in only) or top in exclude or key in exclude

    _add_fields(group, section, cls, "", skip)


def add_runtime_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """Add a flag for each listed :class:`tli.config.Runtime` field (never in a version)."""
    group = parser.add_argument_group("runtime options (how it runs; never in a version)")
    for name in names:
        _add_field(group, f"{RUNTIME}{_SEP}{name}", name, Runtime.model_fields[name])


def add_config_args(parser: argparse.ArgumentParser, *, preset: str | None = None) -> None:
    """``--preset``, ``--config FILE`` (repeatable) and the ``KEY=VALUE`` overrides."""
    parser.add_argument(
        "--preset",
        default=preset,
        metavar="|".join(PRESETS),
        help=f"embedded run config to start from (default: {preset or 'none'})",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="run-config YAML laid over the preset (repeatable; later files win)",
    )
    parser.set_defaults(overrides=[])
    parser.epilog = (
        "Any config value can also be given as SECTION.FIELD=VALUE (e.g. train.lr=3e-4 "
        "eval.tasks=[piqa]); flags and overrides win over files and presets. "
        "`tli config show` prints the resolved config and where each value came from."
    )


def given_flags(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The fields of ``section`` (or ``runtime``) that were given on the command line."""
    pre = section + _SEP
    return {k[len(pre) :]: v for k, v in vars(args).items() if k.startswith(pre)}


def resolve_args(args: argparse.Namespace) -> Resolved:
    """The run config of a command: preset, ``--config`` files, overrides, then flags."""
    overrides: list[Any] = list(getattr(args, "overrides", []))
    for section in RunConfig.model_fields:
        for name, value in given_flags(args, section).items():
            flag = "--" + name.replace(".", "-").replace("_", "-")
            overrides.append(((section, *name.split(".")), value, flag))
    return resolve(getattr(args, "preset", None), getattr(args, "config", []) or [], overrides)


def runtime_of(args: argparse.Namespace, **defaults: Any) -> Runtime:
    """The runtime options given as flags (over ``defaults``), validated once."""
    from tli.config import validate

    return validate(Runtime, {**defaults, **given_flags(args, RUNTIME)}, "flags")  # type: ignore[return-value]


@contextlib.contextmanager
def tracked(run: RunConfig | None, stage: str) -> Iterator[None]:
    """A standalone command's tracking: the config's ``tracking`` section (else the environment),
    as the pipeline runner sets it for a stored stage (no store version: none is tagged)."""
    from tli import tracking

    section = run.tracking if run is not None else None
    with tracking.tracking_stage(tracking.stage_tracking(section, stage=stage)):
        yield


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``KEY=VALUE`` overrides from the other arguments (they may come anywhere)."""
    rest, overrides = [], []
    for i, a in enumerate(argv):
        value_of = i > 0 and argv[i - 1] in KEY_VALUE_OPTIONS  # `--driver eval.gpus=1`
        (overrides if OVERRIDE.match(a) and not value_of else rest).append(a)
    return rest, overrides
