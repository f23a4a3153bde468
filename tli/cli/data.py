"""`tli data build`: the offline training corpus (train / validation / held-out splits)."""

from __future__ import annotations

import argparse

from tli.cli.flags import add_config_args, add_runtime_flags, add_section_flags
from tli.cli.jobs import add_dry_run


def register(sub: argparse._SubParsersAction) -> None:
    from tli.cli import OneLineParser

    p = sub.add_parser(
        "data",
        help="build the training corpus (offline: Wikipedia leads + Shakespeare)",
        description="Corpus commands. The corpus feeds training, tuning and the held-out loss.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=OneLineParser)
    b = dsub.add_parser(
        "build",
        help="assemble, clean, deduplicate and split the corpus",
        description="Assemble an English corpus offline from the bundled packages (and your "
        "own files), clean and deduplicate it, split it deterministically into train / "
        "validation / heldout .jsonl files and write manifest.json (sources, licences, "
        "documents, characters, tokens, sha256). Tokenising for the token counts also fills "
        "the block cache that training, tuning and evaluation read.",
    )
    b.add_argument("--out", default="corpus", help="corpus folder to create (default: corpus)")
    b.add_argument(
        "--tokenizer",
        help="model folder whose tokenizer counts the tokens (default: the bundled SmolLM2)",
    )
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_dry_run(b)
    add_config_args(b)
    add_runtime_flags(b, ["offline"])  # --no-offline: data.dataset may name a Hub dataset
    add_section_flags(b, "data")
    b.set_defaults(func=build_handler)
    p.set_defaults(func=lambda args: _no_sub(p))


def _no_sub(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def build_handler(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tli import hub
    from tli.cli.flags import resolve_args, runtime_of
    from tli.cli.jobs import print_job
    from tli.data.stage import prepare, run_data_build

    cfg = resolve_args(args).config.data
    runtime = runtime_of(args)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    with hub.mode(offline=runtime.offline):  # a Hub dataset: online only, cached once
        if args.dry_run:
            print_job(prepare(cfg, {"base": tokenizer} if tokenizer else {}, runtime))
            return 0
        out = run_data_build(cfg, Path(args.out), tokenizer, force=args.force, runtime=runtime)
    _print_summary(out)
    return 0


def _print_summary(out) -> None:
    from tli.data.stage import read_manifest

    m = read_manifest(out)
    print(f"corpus written to {out}")
    print(f"{'split':<11} {'documents':>10} {'characters':>12} {'tokens':>10}")
    for name, s in m["splits"].items():
        print(f"{name:<11} {s['documents']:>10,} {s['characters']:>12,} {s['tokens']:>10,}")
    tok = m["tokenizer"]["name"]
    print(f"tokens of {tok}'s tokenizer; training and evaluation cut their own blocks")
    for s in m["sources"]:
        print(
            f"source {s['name']}: {s['documents']:,} documents "
            f"({s['duplicates']} duplicates, {s['too_short']} too short dropped), {s['licence']}"
        )
