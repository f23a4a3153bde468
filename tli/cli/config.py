"""`tli config show`: the resolved run config, and where every value came from."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from tli.cli import OneLineParser
    from tli.cli.flags import add_config_args

    p = sub.add_parser("config", help="print the resolved run config and each value's origin")
    ps = p.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineParser,
                          required=True)  # fmt: skip
    s = ps.add_parser(
        "show",
        help="the run config a command would use: preset, files and overrides resolved",
        description="Resolve --preset, --config files and SECTION.FIELD=VALUE overrides the "
        "way every command does, validate the result, and print it as YAML with the origin "
        "of each value (default, a preset, a file, an override).",
    )
    add_config_args(s)
    s.add_argument("--section", help="print only this section")
    s.set_defaults(func=_show)


def show_text(resolved, section: str | None = None) -> str:
    """The YAML of a resolved config with ``# origin`` on every line that has a value."""
    data = resolved.config.model_dump(mode="json")
    lines: list[str] = []
    for name, fields in data.items():
        if section and name != section:
            continue
        lines.append(f"{name}:")
        _lines(fields, name, 1, resolved, lines)
    return "\n".join(lines)


def _lines(fields: dict, at: str, depth: int, resolved, lines: list[str]) -> None:
    import yaml

    pad = "  " * depth
    for key, value in fields.items():
        where = f"{at}.{key}"
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            _lines(value, where, depth + 1, resolved, lines)
            continue
        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{f'{pad}{key}: {text}':<46} # {resolved.origin(where)}")


def _show(args: argparse.Namespace) -> int:
    from tli.cli.flags import resolve_args
    from tli.config import RunConfig
    from tli.errors import TliError

    if args.section and args.section not in RunConfig.model_fields:
        raise TliError(
            f"unknown section {args.section!r}: choose from {', '.join(RunConfig.model_fields)}"
        )
    print(show_text(resolve_args(args), args.section))
    return 0
