"""`tli train`: continued pretraining of an (upscaled) model with Ray Train."""

from __future__ import annotations

import argparse
import sys

from tli.errors import TliError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    from tli.cli.flags import add_section_flags

    p = subparsers.add_parser(
        "train",
        help="continue pretraining a model with Ray Train (DDP/FSDP, CPU or GPU)",
        description=(
            "Continue pretraining an HF model folder (usually from `tli inject`) with Ray "
            "Train's TorchTrainer. Writes OUT/model (HF folder), OUT/metrics.jsonl and "
            "OUT/tli_train.json; work in progress and checkpoints live in OUT.partial until "
            "the run completes."
        ),
    )
    p.add_argument("--model", required=True, help="HF model folder to train")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="DIR|FILE",
        help="a corpus folder from `tli data build`, or .txt/.jsonl/.parquet file(s)",
    )
    p.add_argument("--config", help="run-config YAML; its train section is used")
    p.add_argument(
        "--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT.partial"
    )
    p.add_argument("--force", action="store_true", help="replace OUT / discard OUT.partial")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: its CPUs)")
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs each worker reserves (default: local CPUs / workers; 1 on a cluster)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="peak bf16 TFLOP/s of one device, for MFU (default: detected for known GPUs)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="worker failures Ray Train recovers from, from the latest checkpoint (default: 1)",
    )
    p.add_argument(
        "--report-every",
        type=int,
        default=10,
        help="steps between metric reports to Ray Train (default: 10)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model in each worker (GPUs)"
    )
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep Ray Train's checkpoints in OUT/ray"
    )
    add_section_flags(p, "train")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Resolve the train config, run :func:`tli.train.stage.run_train`, print where it went."""
    from pathlib import Path

    from tli.cli.flags import resolve_section

    cfg = resolve_section(args, "train")
    if args.max_failures < 0:
        raise TliError(f"--max-failures must be 0 or more, got {args.max_failures}")
    data = [Path(d) for d in args.data]
    from tli.train.stage import run_train

    try:
        out = run_train(
            Path(args.model),
            Path(args.out),
            data[0] if len(data) == 1 else data,
            cfg,  # type: ignore[arg-type]
            ray_address=args.ray_address,
            resume=args.resume,
            force=args.force,
            threads=args.threads,
            cpus_per_worker=args.cpus_per_worker,
            peak_tflops=args.peak_tflops,
            max_failures=args.max_failures,
            report_every=args.report_every,
            keep_checkpoints=args.keep_checkpoints,
            compile=args.compile,
        )
    except TliError:
        raise
    except Exception as e:
        from ray.train import TrainingFailedError  # Ray is imported by now

        if not isinstance(e, TrainingFailedError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(
            f"tli train: training failed: {first}\n"
            f"tli train: the checkpoints are kept in {args.out}.partial: rerun with --resume\n"
        )
        return 1
    print(f"trained model: {out / 'model'}")
    print(f"metrics: {out / 'metrics.jsonl'}")
    return 0
