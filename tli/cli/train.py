"""`tli train`: continued pretraining of an (upscaled) model with Ray Train."""

from __future__ import annotations

import argparse
import sys

from tli.errors import TliError

RUNTIME_FLAGS = ["ray_address", "threads", "cpus_per_worker", "peak_tflops", "max_failures",
                 "report_every", "keep_checkpoints", "compile", "storage", "connect_timeout_s",
                 "scale_timeout_s"]  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    from tli.cli.flags import add_config_args, add_runtime_flags, add_section_flags
    from tli.cli.jobs import add_dry_run

    p = subparsers.add_parser(
        "train",
        help="continue pretraining a model with Ray Train (DDP/FSDP, CPU or GPU)",
        description=(
            "Continue pretraining an HF model folder (usually from `tli inject`) with Ray "
            "Train's TorchTrainer. Writes OUT/model (HF folder), OUT/metrics.jsonl and "
            "OUT/tli_train.json; work in progress and checkpoints live in .OUT.partial until "
            "the run completes."
        ),
    )
    p.add_argument("--model", required=True, help="HF model folder (or s3://...) to train")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="DIR|FILE",
        help="a corpus folder from `tli data build`, or .txt/.jsonl/.parquet file(s)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from .OUT.partial"
    )
    p.add_argument("--force", action="store_true", help="replace OUT / discard .OUT.partial")
    add_dry_run(p)
    add_config_args(p)
    add_runtime_flags(p, RUNTIME_FLAGS)
    add_section_flags(p, "train")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Resolve the train config, run :func:`tli.train.stage.run_train`, print where it went."""
    from pathlib import Path

    from tli import sources
    from tli.cli.flags import resolve_args, runtime_of, tracked
    from tli.cli.jobs import print_job
    from tli.train.stage import prepare, run_train

    run = resolve_args(args).config
    cfg = run.train
    runtime = runtime_of(args)
    data = sources.local_all(args.data, what="--data")  # s3:// fetched once into the cache
    data_arg = data[0] if len(data) == 1 else data
    model = sources.local(args.model, what="--model")
    if args.dry_run:
        print_job(prepare(cfg, {"model": model, "data": data_arg}, runtime))
        return 0
    try:
        with tracked(run, "train"):
            out = run_train(model, Path(args.out), data_arg, cfg, resume=args.resume,
                            force=args.force, runtime=runtime)  # fmt: skip
    except TliError:
        raise
    except Exception as e:
        from ray.train import TrainingFailedError  # Ray is imported by now

        if not isinstance(e, TrainingFailedError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(
            f"tli train: training failed: {first}\n"
            f"tli train: the checkpoints are kept: rerun with --resume to continue\n"
        )
        return 1
    print(f"trained model: {out / 'model'}")
    print(f"metrics: {out / 'metrics.jsonl'}")
    return 0
