"""`tli export`: a finished model with its model card and lineage, to a folder, S3 or the Hub."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command."""
    from tli.cli.flags import add_runtime_flags

    p = sub.add_parser(
        "export",
        help="write a model with its model card and lineage to a folder, s3:// or the Hub",
        description=(
            "Export a store version (a unique prefix, or STAGE/VERSION, of train, inject or "
            "import-base) or a model folder: the model's files, README.md (the model card: "
            "method, plan, base, data, training, evaluation table, lineage) and "
            "tli_lineage.json. A folder appears only when complete; an s3:// upload ends with "
            "a completion marker; --push-to-hub needs --no-offline and HF_TOKEN."
        ),
    )
    p.add_argument("source", metavar="VERSION|DIR", help="a store version or a model folder")
    p.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="DIR|s3://...",
        help="where to write it (repeatable; hf://org/name pushes to the Hub)",
    )
    p.add_argument(
        "--push-to-hub", metavar="ORG/NAME", help="also push it to this Hub model repo (private)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing folder or prefix")
    add_runtime_flags(p, ["store", "offline"])
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from tli.cli.flags import runtime_of
    from tli.export import HUB_SCHEME, run_export

    runtime = runtime_of(args)
    destinations = list(args.to)
    if args.push_to_hub:
        destinations.append(HUB_SCHEME + args.push_to_hub)
    written = run_export(
        args.source, destinations, store=runtime.store, force=args.force, offline=runtime.offline
    )
    for w in written:
        extra = w.get("url") or f"{w.get('files')} files"
        print(f"exported to {w['to']} ({extra}; sha256 {w['sha256'][:16]})")
    return 0
