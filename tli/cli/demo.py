"""`tli demo`: the main job (`make run`): the pipeline on the embedded defaults, here."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from tli.cli.flags import add_config_args, add_runtime_flags

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the embedded defaults (bundled SmolLM2, local Ray)",
        description="The same as `tli pipeline run --preset default`: import the bundled "
        "SmolLM2-135M, build the offline corpus, search the injection interval with Ray Tune, "
        "train the winner with Ray Train, evaluate base/injected/trained, write a report. "
        "About 15-20 minutes on 2 CPU cores; later runs reuse every stored stage.",
    )
    add_config_args(p, preset="default")
    add_runtime_flags(p, ["store", "ray_jobs"])
    p.set_defaults(func=_demo, base=None, rerun=[])


def _demo(args: argparse.Namespace) -> int:
    from tli.cli.pipeline import _run

    return _run(args)
