"""The search space: one trial per point of ``intervals x inits x alphas x lrs``.

Each point has a deterministic name (its folder name too) and a step budget; under the
``loss_at_equal_compute`` objective a deeper model gets fewer steps for the same compute.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tli.config import InjectConfig, RunConfig, TrainConfig
from tli.errors import TliError


@dataclass(frozen=True)
class SearchPoint:
    """One trial's hyperparameters, its step budget and its cost relative to the cheapest trial.

    ``compute_ratio`` is the trial's parameter count over the smallest trial's; under the
    ``loss_at_equal_compute`` objective a trial trains ``steps`` = the budget divided by it
    (rounded, at least 1).
    """

    interval: int
    init: str
    alpha: float | None
    lr: float
    steps: int
    compute_ratio: float = 1.0

    @property
    def name(self) -> str:
        """Deterministic trial name (also its folder name): only the hyperparameters."""
        parts = [f"K{self.interval}", self.init]
        if self.alpha is not None:
            parts.append(f"a{self.alpha:g}")
        parts.append(f"lr{self.lr:g}")
        return "-".join(parts)

    def inject_config(self, base: InjectConfig) -> InjectConfig:
        """``base`` with this point's interval, init and alpha."""
        return base.model_copy(
            update={"interval": self.interval, "init": self.init, "alpha": self.alpha}
        )


def _dedup(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def validate_search(cfg: RunConfig, num_layers: int) -> None:
    """Check the search space against a base with ``num_layers`` layers (one-line errors)."""
    t = cfg.tune
    if cfg.inject.method != "tli":
        raise TliError(
            f"tune searches TLI injection intervals, but inject.method is {cfg.inject.method!r}: "
            "set inject.method to tli"
        )
    if cfg.inject.positions is not None:
        raise TliError(
            "inject.positions is set, which overrides the interval being searched: remove it"
        )
    for what, values in (
        ("--intervals", t.intervals), ("--inits", t.inits), ("--alphas", t.alphas),
        ("--lrs", t.lrs),
    ):  # fmt: skip
        if values is not None and len(values) == 0:
            raise TliError(f"empty search space: {what} lists no value")
    bad = [k for k in t.intervals if not 1 <= k <= num_layers]
    if bad:
        raise TliError(
            f"interval {bad[0]} is outside 1..{num_layers} (the base has {num_layers} layers): "
            f"choose intervals between 1 and {num_layers}"
        )
    for a in t.alphas or []:
        if not math.isfinite(a):
            raise TliError(f"alpha {a} is not a finite number")
    for lr in t.lrs or []:
        if not (math.isfinite(lr) and lr > 0):
            raise TliError(f"learning rate {lr} must be a positive finite number")


def search_points(cfg: RunConfig, num_layers: int, layer_params: int, base_params: int):
    """The grid, in a fixed order (intervals outermost), with budgets; validates it first.

    Args:
        cfg: the run config (``tune``, ``inject`` and ``train`` sections are used).
        num_layers: the base's decoder layer count.
        layer_params: parameters of one decoder layer (what each injected layer adds).
        base_params: the base's parameter count.
    """
    validate_search(cfg, num_layers)
    t = cfg.tune
    intervals = _dedup(t.intervals)
    inits = _dedup(t.inits)
    alphas: list[float | None] = _dedup(t.alphas) if t.alphas is not None else [None]
    lrs = _dedup(t.lrs) if t.lrs is not None else [cfg.train.lr]
    total = {k: base_params + (num_layers // k) * layer_params for k in intervals}
    smallest = min(total.values())
    points = []
    for k, init, alpha, lr in itertools.product(intervals, inits, alphas, lrs):
        ratio = total[k] / smallest
        steps = t.trial.steps
        if t.objective == "loss_at_equal_compute":
            # A deeper model costs more per step: it gets fewer steps for the same compute.
            steps = max(1, round(t.trial.steps / ratio))
        points.append(SearchPoint(k, init, alpha, float(lr), steps, ratio))
    return points


def trial_train_config(cfg: RunConfig, point: SearchPoint) -> TrainConfig:
    """The ``train`` section a trial runs with: the user's, with ``tune.trial`` laid over it and
    the point's lr and budget."""
    return cfg.train.model_copy(
        update={
            "lr": point.lr,
            "steps": point.steps,
            "validation": cfg.tune.trial.validation,
            "checkpoint_every": None,  # only the final checkpoint (Ray Train needs one)
        }
    )


def trial_cfg(cfg: RunConfig) -> TrainConfig:
    """The train section every trial shares (its validation split's blocks and cadence)."""
    return cfg.train.model_copy(update={"validation": cfg.tune.trial.validation})


def best_run_config(cfg: RunConfig, point: SearchPoint) -> RunConfig:
    """The run config with the winner's ``inject`` and ``train`` (lr) settings."""
    return cfg.model_copy(
        update={
            "inject": point.inject_config(cfg.inject),
            "train": cfg.train.model_copy(update={"lr": point.lr}),
        }
    )
