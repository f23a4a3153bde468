"""The search space: one trial per point of ``intervals x placements x inits x alphas x lrs``.

Each point has a deterministic name (its folder name too) and a step budget; under the
``loss_at_equal_compute`` objective a costlier model gets fewer steps for the same compute.
``placements`` says where the N // K new layers go (uniform, top, middle, bottom: see
:func:`tli.inject.plan.tli_positions`), so a search compares placements at equal added
parameters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tli.config import InjectConfig, RunConfig, TrainConfig
from tli.errors import TliError


@dataclass(frozen=True)
class SearchPoint:
    """One trial's hyperparameters, its step budget and its cost relative to the cheapest trial.

    ``compute_ratio`` is the trial's training FLOPs per step over the cheapest trial's (its
    parameter count over the smallest's when FLOPs are not given); under the
    ``loss_at_equal_compute`` objective a trial trains ``steps`` = the budget divided by it
    (rounded, at least 1). ``flops_per_token``: its training FLOPs per token, when known.
    """

    interval: int
    init: str
    alpha: float | None
    lr: float
    steps: int
    compute_ratio: float = 1.0
    placement: str = "uniform"
    flops_per_token: float | None = None

    @property
    def name(self) -> str:
        """Deterministic trial name (also its folder name): only the hyperparameters."""
        parts = [f"K{self.interval}"]
        if self.placement != "uniform":  # uniform names stay as they were before placements
            parts.append(self.placement)
        parts.append(self.init)
        if self.alpha is not None:
            parts.append(f"a{self.alpha:g}")
        parts.append(f"lr{self.lr:g}")
        return "-".join(parts)

    def inject_config(self, base: InjectConfig) -> InjectConfig:
        """``base`` with this point's interval, init and alpha."""
        placement = None if self.placement == "uniform" else self.placement
        return base.model_copy(
            update={"interval": self.interval, "init": self.init, "alpha": self.alpha,
                    "placement": placement}
        )  # fmt: skip


def _dedup(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def validate_search(cfg: RunConfig, num_layers: int) -> None:
    """Check the search space against a base with ``num_layers`` layers (one-line errors)."""
    t = cfg.tune
    if cfg.inject.method not in ("tli", "llama-pro"):
        raise TliError(
            f"tune searches TLI injection intervals, but inject.method is {cfg.inject.method!r}: "
            "set inject.method to tli (or llama-pro)"
        )
    if cfg.inject.placement is not None or cfg.inject.new_layers is not None:
        raise TliError(
            "inject.placement / inject.new_layers are set, but the search chooses where N // K "
            "layers go: list them in tune.placements instead"
        )
    if cfg.inject.positions is not None:
        raise TliError(
            "inject.positions is set, which overrides the interval being searched: remove it"
        )
    for what, values in (
        ("--intervals", t.intervals), ("--inits", t.inits), ("--alphas", t.alphas),
        ("--lrs", t.lrs), ("--placements", t.placements),
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


def search_points(
    cfg: RunConfig,
    num_layers: int,
    layer_params: int,
    base_params: int,
    flops_of: Callable[[InjectConfig], float] | None = None,
) -> list[SearchPoint]:
    """The grid, in a fixed order (intervals outermost), with budgets; validates it first.

    Args:
        cfg: the run config (``tune``, ``inject`` and ``train`` sections are used).
        num_layers: the base's decoder layer count.
        layer_params: parameters of one decoder layer (what each injected layer adds).
        base_params: the base's parameter count.
        flops_of: training FLOPs per token of the model an inject config makes (the tune
            stage passes :func:`tli.compare.cost.training_cost`'s); then the compute ratios are
            FLOPs ratios (a placement near the output back-propagates through fewer layers).
    """
    validate_search(cfg, num_layers)
    t = cfg.tune
    intervals = _dedup(t.intervals)
    places = _dedup(t.placements)
    inits = _dedup(t.inits)
    alphas: list[float | None] = _dedup(t.alphas) if t.alphas is not None else [None]
    lrs = _dedup(t.lrs) if t.lrs is not None else [cfg.train.lr]
    flops: dict[tuple[int, str], float | None] = {}
    for k, place in itertools.product(intervals, places):
        probe = SearchPoint(k, inits[0], None, 0.0, 1, placement=place)
        flops[k, place] = flops_of(probe.inject_config(cfg.inject)) if flops_of else None
    if flops_of:
        cost = {key: float(v) for key, v in flops.items()}  # type: ignore[arg-type]
    else:
        cost = {(k, p): float(base_params + (num_layers // k) * layer_params) for k, p in flops}
    cheapest = min(cost.values())
    points = []
    for k, place, init, alpha, lr in itertools.product(intervals, places, inits, alphas, lrs):
        ratio = cost[k, place] / cheapest
        steps = t.trial.steps
        if t.objective == "loss_at_equal_compute":
            # A costlier model gets fewer steps for the same compute.
            steps = max(1, round(t.trial.steps / ratio))
        points.append(SearchPoint(k, init, alpha, float(lr), steps, ratio, place, flops[k, place]))
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
