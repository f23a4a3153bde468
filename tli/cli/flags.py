"""CLI flags generated from the config model, so no flag re-declares a default.

``add_section_flags`` turns each field of a config section into an argparse flag whose default is
"not given"; ``resolve_section`` reads the section from ``--config`` (if any), lays the flags that
were given over it and validates the result once with pydantic. The help text shows the model's
default.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from tli.config import RunConfig, Section, read_yaml, validate
from tli.errors import TliError

_SEP = "__"  # argparse dest = "<section>__<field>"


def _split_list(item_type: Any):
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        out = []
        for t in items:
            try:
                out.append(_scalar(item_type)(t))
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(
                    f"{t!r} is not a valid {getattr(item_type, '__name__', 'value')}"
                ) from None
        return out

    return parse


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


def _strip_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return tp


def add_section_flags(
    parser: argparse.ArgumentParser,
    section: str,
    *,
    only: list[str] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """Add one flag per field of config section ``section`` (``--seq-len`` for ``seq_len``)."""
    cls: type[Section] = RunConfig.model_fields[section].annotation  # type: ignore[assignment]
    group = parser.add_argument_group(f"{section} options (config section '{section}')")
    for name, field in cls.model_fields.items():
        if (only is not None and name not in only) or name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        tp = _strip_none(field.annotation)
        default = field.default
        shown = "none" if default is None else default
        if isinstance(shown, list):
            shown = ",".join(str(x) for x in shown) or "none"
        help_ = f"{field.description or ''} (default: {shown})"
        dest = f"{section}{_SEP}{name}"
        if tp is bool:
            group.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_,
            )
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            group.add_argument(
                flag,
                dest=dest,
                type=_split_list(item),
                default=argparse.SUPPRESS,
                metavar="A,B,...",
                help=help_,
            )
        else:
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
            # str choices: let argparse say "invalid choice ... (choose from ...)"
            conv = str if choices and all(isinstance(c, str) for c in choices) else _scalar(tp)
            group.add_argument(
                flag,
                dest=dest,
                type=conv,
                choices=choices,
                default=argparse.SUPPRESS,
                metavar=None if choices else name.upper(),
                help=help_,
            )


def given_flags(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The fields of ``section`` that were given on the command line."""
    pre = section + _SEP
    return {k[len(pre) :]: v for k, v in vars(args).items() if k.startswith(pre)}


def resolve_run_config(args: argparse.Namespace, sections: list[str]) -> RunConfig:
    """The run config from ``--config`` (if given) with the flags of ``sections`` laid over it.

    The whole file is validated (unknown keys anywhere are errors), then the flags, then the
    merged result, so every default comes from :mod:`tli.config`.
    """
    path = getattr(args, "config", None)
    data = read_yaml(path) if path else {}
    if path:  # errors in the file are reported against the file alone
        validate(RunConfig, data, str(path))
    any_flags = any(given_flags(args, s) for s in sections)
    origin = " + ".join(x for x in (str(path) if path else "", "flags" if any_flags else "") if x)
    for section in sections:
        flags = given_flags(args, section)
        if flags:
            merged = dict(data.get(section) or {})
            merged.update(flags)
            data[section] = merged
    return validate(RunConfig, data, origin or "defaults")  # type: ignore[return-value]


def resolve_section(args: argparse.Namespace, section: str) -> Section:
    """One validated section (see :func:`resolve_run_config`)."""
    return getattr(resolve_run_config(args, [section]), section)


def parse_int_list(text: str, what: str) -> list[int]:
    """Parse '3,7,11' into ints, or raise a one-line :class:`TliError` naming ``what``."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise TliError(f"{what} must be comma-separated integers, got {text!r}") from None
