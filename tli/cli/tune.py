"""`tli tune`: Ray Tune search over the injection interval (and init, alpha, lr), with ASHA."""

from __future__ import annotations

import argparse

from tli.errors import TliError

# Train fields that tune.trial sets per trial (or that do not apply to a search): their flags
# would do nothing (the trial's are --trial-steps, --trial-validation-blocks, ...).
_TRAIN_FLAGS_EXCLUDED = ("steps", "validation", "checkpoint_every")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tune`` sub-command."""
    from tli.cli.flags import add_config_args, add_runtime_flags, add_section_flags
    from tli.cli.jobs import add_dry_run

    p = subparsers.add_parser(
        "tune",
        help="search the injection interval (and init, alpha, lr) with Ray Tune + ASHA",
        description=(
            "Each trial upscales the base in memory with one point of the grid "
            "intervals x inits x alphas x lrs, continues pretraining it with the training "
            "code of `tli train` for up to --trial-steps steps, and reports the validation "
            "loss every --trial-validation-every steps; ASHA stops poor trials early. Writes "
            "OUT/trials.csv, OUT/best.yaml (for `tli inject --config` and `tli train "
            "--config`), OUT/tune.png, OUT/tli_tune.json and Ray Tune's experiment folder "
            "OUT/ray."
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search in .OUT.partial (finished trials are not rerun)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT / discard .OUT.partial")
    add_dry_run(p)
    add_config_args(p)
    add_runtime_flags(p, ["ray_address", "threads", "cpus_per_worker", "storage",
                          "connect_timeout_s", "scale_timeout_s"])  # fmt: skip
    add_section_flags(p, "tune")
    add_section_flags(p, "train", exclude=_TRAIN_FLAGS_EXCLUDED)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Resolve the run config, run :func:`tli.tune.stage.run_tune`, print where results went."""
    from pathlib import Path

    from tli import sources
    from tli.cli.flags import given_flags, resolve_args, runtime_of, tracked
    from tli.cli.jobs import model_or_base, print_job
    from tli.tune.stage import prepare, run_tune

    runtime = runtime_of(args)
    given = (
        args.config
        or args.preset
        or args.overrides
        or any(given_flags(args, s) for s in ("tune", "train"))
    )
    if args.resume:
        # The interrupted search's saved inputs are used; anything given must match them.
        cfg = resolve_args(args).config if given else None
        data = [Path(d) for d in args.data] if args.data else None
        model = Path(args.model) if args.model else None
    else:
        if not args.data:
            raise TliError("--data is required (a corpus folder or text/jsonl/parquet files)")
        cfg = resolve_args(args).config
        data = sources.local_all(args.data, what="--data")  # s3:// fetched once into the cache
        model = model_or_base(args.model, cfg.base.model)
    if args.dry_run:
        if cfg is None or model is None or data is None:
            raise TliError("--dry-run needs --data (and the config) of the search to check")
        print_job(prepare(cfg, {"base": model, "data": data}, runtime))
        return 0
    with tracked(cfg, "tune"):
        out = run_tune(model, Path(args.out), data, cfg, resume=args.resume, force=args.force,
                       runtime=runtime)  # fmt: skip
    print(f"trials: {out / 'trials.csv'}")
    print(f"best config: {out / 'best.yaml'}")
    print(f"plot: {out / 'tune.png'}")
    return 0
