"""`tli tune`: Ray Tune search over the injection interval (and init, alpha, lr), with ASHA."""

from __future__ import annotations

import argparse

from tli.errors import TliError

# Train fields that the tune section sets per trial (or that do not apply to a search): their
# flags would clash with tune's own --steps/--eval-every/--heldout-blocks or do nothing.
_TRAIN_FLAGS_EXCLUDED = ("steps", "eval_every", "heldout_blocks", "checkpoint_every")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tune`` sub-command."""
    from tli.cli.flags import add_section_flags

    p = subparsers.add_parser(
        "tune",
        help="search the injection interval (and init, alpha, lr) with Ray Tune + ASHA",
        description=(
            "Each trial upscales the base in memory with one point of the grid "
            "intervals x inits x alphas x lrs, continues pretraining it with the training "
            "code of `tli train` for up to --steps steps, and reports the validation loss "
            "every --eval-every steps; ASHA stops poor trials early. Writes OUT/trials.csv, "
            "OUT/best.yaml (for `tli inject --config` and `tli train --config`), OUT/tune.png, "
            "OUT/tli_tune.json and Ray Tune's experiment folder OUT/ray."
        ),
    )
    p.add_argument(
        "--model",
        help="base HF model folder (default: base.model from --config, else the bundled SmolLM2)",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="DIR|FILE",
        help="a corpus folder from `tli data build`, or .txt/.jsonl/.parquet file(s) "
        "(required unless --resume)",
    )
    p.add_argument("--config", help="run-config YAML; its tune, inject and train sections are used")
    p.add_argument(
        "--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search in OUT.partial (finished trials are not rerun)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT / discard OUT.partial")
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs each training worker reserves (default: local CPUs shared by the "
        "concurrent trials; 1 on a cluster)",
    )
    add_section_flags(p, "tune")
    add_section_flags(p, "train", exclude=_TRAIN_FLAGS_EXCLUDED)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Resolve the run config, run :func:`tli.tune.stage.run_tune`, print where the results went."""
    from pathlib import Path

    from tli.cli.flags import given_flags, resolve_run_config

    given = args.config or any(given_flags(args, s) for s in ("tune", "train"))
    if args.resume:
        # The interrupted search's saved inputs are used; anything given must match them.
        cfg = resolve_run_config(args, ["tune", "train"]) if given else None
        data = [Path(d) for d in args.data] if args.data else None
        model = Path(args.model) if args.model else None
    else:
        if not args.data:
            raise TliError("--data is required (a corpus folder or text/jsonl/parquet files)")
        cfg = resolve_run_config(args, ["tune", "train"])
        data = [Path(d) for d in args.data]
        model = args.model or cfg.base.model
        if model is None:
            from tli.base import import_base

            model = import_base()
        model = Path(model)
    from tli.tune.stage import run_tune

    out = run_tune(
        model,
        Path(args.out),
        data,
        cfg,
        ray_address=args.ray_address,
        resume=args.resume,
        force=args.force,
        cpus_per_worker=args.cpus_per_worker,
    )
    print(f"trials: {out / 'trials.csv'}")
    print(f"best config: {out / 'best.yaml'}")
    print(f"plot: {out / 'tune.png'}")
    return 0
