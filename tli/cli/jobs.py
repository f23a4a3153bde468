"""What every stage command does around its stage: the model it defaults to, ``--dry-run``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run", action="store_true", help="check everything, print the job, write nothing"
    )


def print_job(job: Any) -> None:
    """The prepared job as YAML: what would run, with every input checked."""
    import yaml

    print(yaml.safe_dump(job.describe(), sort_keys=False, width=100).rstrip())


def model_or_base(given: str | None, configured: str | None) -> Path:
    """``--model``, else ``base.model`` from the config, else the bundled SmolLM2 (cached).

    An ``s3://`` model is fetched once into the cache (:mod:`tli.sources`).
    """
    if given or configured:
        from tli import sources

        return sources.local(given or configured, what="--model" if given else "base.model")  # type: ignore[arg-type]
    from tli.base import import_base

    return import_base()
