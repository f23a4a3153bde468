"""`tli demo`: the main job (`make run`): the pipeline on the embedded defaults, here."""

from __future__ import annotations

import argparse

from tli.config import RunConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the embedded defaults (bundled SmolLM2, local Ray)",
        description="The same as `tli pipeline run --preset default`: import the bundled "
        "SmolLM2-135M, build the offline corpus, search the injection interval with Ray Tune, "
        "train the winner with Ray Train, evaluate base/injected/trained, write a report. "
        "About 15-20 minutes on 2 CPU cores; later runs reuse every stored stage.",
    )
    p.add_argument(
        "--store",
        default=RunConfig().pipeline.store,
        help=f"stage store folder (default: {RunConfig().pipeline.store})",
    )
    p.add_argument("--preset", default="default", help="default | smoke (default: default)")
    p.add_argument("--ray-address", help="job API of a running Ray head (default: start one)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from tli.cli.pipeline import _run

    ns = argparse.Namespace(
        config=None,
        preset=args.preset,
        base=None,
        store=args.store,
        rerun=[],
        set=[],
        ray_address=args.ray_address,
    )
    return _run(ns)
