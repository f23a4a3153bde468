"""Ray Tune search over the injection interval (and init, alpha, learning rate), with ASHA.

One trial = one point of the grid ``intervals x inits x alphas x lrs``. Each trial is a Tune
*driver function* (:func:`_trial_driver`) that runs Ray Train's ``TorchTrainer`` with the very
per-worker loop ``tli train`` uses (:func:`tli.train.stage.train_loop_per_worker`); metrics reach Tune
through ``TuneReportCallback`` (the Ray 2.60 Tune + Train pattern; ``Tuner(trainer)`` is gone).

The base model is read from disk once, by :func:`run_tune`, and its state dict put in Ray's
object store; each trial's workers build the upscaled model in memory from it
(:func:`build_trial_model`: :func:`tli.inject.stage.inject_in_memory` of a :func:`tli.inject.plan.make_plan`
plan), so nothing is re-read or written per trial. The objective is the loss on the corpus's
``validation`` split (never a benchmark test set; the ``heldout`` split stays untouched for the
final evaluation), reported every ``tune.eval_every`` steps so ASHA can stop poor trials early.

Output (``--out``, written in ``<out>.partial`` and renamed when the search is complete):
``trials.csv``, ``best.yaml`` (a whole run config accepted by ``tli inject --config`` and
``tli train --config``), ``tune.png``, ``tli_tune.json`` (inputs, resolved config, versions,
best trial) and ``ray/`` (Ray Tune's own experiment folder, one sub-folder per trial, named
after the trial).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tli import __version__
from tli.config import InjectConfig, RunConfig, TrainConfig, dump_yaml
from tli.errors import TliError

if TYPE_CHECKING:
    import torch

EXPERIMENT = "ray"  # Ray Tune's experiment folder inside the output
TRAIN_RUNS = "train_runs"  # Ray Train's per-trial run folders (removed when a trial ends)
STATE_FILE = "tli_tune.json"  # inputs + config (for --resume) and, at the end, the results
TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"
PLOT = "tune.png"
DRIVER_CPUS = 0.1  # what each trial's driver function reserves: it only waits on its trainer
METRIC = "objective"

CSV_FIELDS = (
    "rank", "trial", "interval", "init", "alpha", "lr", "layers_in", "layers_out",
    "layers_added", "params_added", "params_total", "steps_budget", "steps_run", "best_loss",
    "best_step", "final_loss", "objective", "stopped_early", "status", "error",
)  # fmt: skip


class TuneInterrupted(TliError):
    """The search was interrupted (Ctrl-C / SIGUSR1); ``tli tune --resume`` continues it."""

    exit_code = 130


class NoTrialSucceeded(TliError):
    """Every trial failed: the outputs are written, but there is no best configuration."""

    exit_code = 1


# ----------------------------------------------------------------------------- search space


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
        steps = t.steps
        if t.objective == "loss_at_equal_compute":
            # A deeper model costs more per step: it gets fewer steps for the same compute.
            steps = max(1, round(t.steps / ratio))
        points.append(SearchPoint(k, init, alpha, float(lr), steps, ratio))
    return points


def trial_train_config(cfg: RunConfig, point: SearchPoint) -> TrainConfig:
    """The ``train`` section a trial runs with: the user's, with the point's lr and budget."""
    return cfg.train.model_copy(
        update={
            "lr": point.lr,
            "steps": point.steps,
            "eval_every": cfg.tune.eval_every,
            "heldout_blocks": cfg.tune.heldout_blocks,
            "checkpoint_every": None,  # only the final checkpoint (Ray Train needs one)
        }
    )


def best_run_config(cfg: RunConfig, point: SearchPoint) -> RunConfig:
    """The run config with the winner's ``inject`` and ``train`` (lr) settings."""
    return cfg.model_copy(
        update={
            "inject": point.inject_config(cfg.inject),
            "train": cfg.train.model_copy(update={"lr": point.lr}),
        }
    )


# ----------------------------------------------------------------------------- inside Ray


def build_trial_model(base: Any, plan: dict[str, Any]) -> Any:
    """The upscaled model of one trial, built in memory from the shared base.

    Args:
        base: ``{"config": <HF config dict>, "state": <state dict>}``, or a Ray object ref of it
            (the copy :func:`run_tune` put in the object store).
        plan: a :class:`tli.inject.plan.Plan` as a dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tli.inject.plan import Plan
    from tli.inject.stage import inject_in_memory

    if type(base).__name__ == "ObjectRef":
        import ray

        base = ray.get(base)
    config = AutoConfig.for_model(**base["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # A copy into the model's own storage: the object store's buffers must stay untouched.
    model.load_state_dict(base["state"], strict=True)
    return inject_in_memory(model, Plan.from_dict(plan))


def trial_metrics(metrics: dict[str, Any], compute_ratio: float) -> dict[str, Any]:
    """What a trial adds to each Ray Train report before Tune sees it.

    ``objective``: the validation loss (inf when not finite, so a diverged trial ranks last);
    ``compute``: steps in units of the cheapest trial's step (ASHA's clock for
    ``loss_at_equal_compute``); ``nonfinite``: the training or validation loss is NaN/inf.
    """
    val = metrics.get("val_loss")
    loss = metrics.get("loss")
    bad = any(x is not None and not math.isfinite(x) for x in (val, loss))
    objective = val if val is not None and math.isfinite(val) else math.inf
    return {
        METRIC: objective,
        "compute": metrics.get("step", 0) * compute_ratio,
        "nonfinite": bad,
    }


def _report_callback(compute_ratio: float) -> Any:
    """A ``TuneReportCallback`` that adds :func:`trial_metrics` to every report."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _TrialReport(TuneReportCallback):
        def __init__(self, ratio: float) -> None:
            super().__init__()
            self.ratio = ratio

        def after_report(self, run_context, metrics, checkpoint):  # type: ignore[override]
            first = {**metrics[0], **trial_metrics(metrics[0], self.ratio)}
            # The trial's final checkpoint is not a Tune result: keep it out of Tune's state.
            super().after_report(run_context, [first, *metrics[1:]], None)

    return _TrialReport(compute_ratio)


def _stop_nonfinite(trial_id: str, result: dict[str, Any]) -> bool:
    """Tune stopper: a trial whose loss went NaN/inf is stopped (and recorded as failed)."""
    return bool(result.get("nonfinite"))


def _trial_name(trial: Any) -> str:
    return trial.config["point"]["name"]


def _trial_driver(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: run the ``tli train`` per-worker loop on this point's upscaled model."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer

    from tli.inject.plan import make_plan
    from tli.train.stage import WORKER_RUNTIME_ENV, train_loop_per_worker

    p = dict(config["point"])
    p.pop("name", None)
    point = SearchPoint(**p)
    run = RunConfig.model_validate(shared["run_config"])
    train = trial_train_config(run, point)
    plan = make_plan(shared["num_layers"], point.inject_config(run.inject))
    name = ray.tune.get_context().get_trial_name()
    loop_config = {
        "train": train.model_dump(mode="json"),
        "build_model": functools.partial(build_trial_model, shared["base"], plan.to_dict()),
        "train_blocks": shared["train_blocks"],
        "val_blocks": shared["val_blocks"],
        "new_layers": list(plan.new_layers),
        "threads": shared["threads"],
        "report_every": run.tune.eval_every,
    }
    resources: dict[str, float] = {"CPU": shared["cpus_per_worker"]}
    if train.gpu:
        resources["GPU"] = 1
    storage = Path(shared["train_storage"])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.workers, use_gpu=train.gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            callbacks=[_report_callback(point.compute_ratio)],
            worker_runtime_env=WORKER_RUNTIME_ENV,
        ),
    )
    try:
        trainer.fit()
    finally:
        # The final checkpoint holds the trial's weights: not an output of the search.
        shutil.rmtree(storage / name, ignore_errors=True)


# ----------------------------------------------------------------------------- Ray session


def local_ray_temp_dir() -> str:
    """The temp dir of the local Ray :func:`tune_ray_session` starts (short: unix sockets live
    there and their paths must stay under 107 bytes; never the shared default /tmp/ray)."""
    return f"/tmp/tli_tune_{os.getpid()}"


@contextlib.contextmanager
def tune_ray_session(address: str | None) -> Iterator[None]:
    """Join Ray (the one in this process, ``address``/``RAY_ADDRESS``) or start a local one.

    A local Ray gets its dashboard: Ray Train's placement-group cleaner uses the State API to
    free the resources of a trial ASHA stops; without it the next trial waits forever. The
    cleaner finds the API server by auto-detection, which fails when several Rays run on one
    machine, so its address is handed to every worker in ``RAY_API_SERVER_ADDRESS``.
    """
    # Read by the Train controller at start: each ray.train.report() waits for its poll.
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    from tli.pipeline.head import free_port

    tmp = local_ray_temp_dir()
    port = free_port()
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _temp_dir=tmp,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    try:
        yield
    finally:
        ray.shutdown()
        for _ in range(3):  # Ray's last processes may still be writing logs there
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(tmp):
                break
            time.sleep(1)


# ----------------------------------------------------------------------------- results


def _first_line(err: BaseException | None) -> str:
    """The most telling line of a trial's error (the innermost exception's message)."""
    if err is None:
        return ""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln[:300]
    return (lines[-1] if lines else type(err).__name__)[:300]


def _history(df: Any) -> list[dict[str, Any]]:
    """A trial's reports (step, loss, val_loss, objective, compute, nonfinite) as dicts."""
    if df is None or len(df) == 0:
        return []
    keep = [c for c in ("step", "loss", "val_loss", METRIC, "compute", "nonfinite") if c in df]
    out = []
    for row in df[keep].to_dict("records"):
        out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
    return out


def collect_trials(
    result_grid: Any,
    points: list[SearchPoint],
    num_layers: int,
    layer_params: int,
    base_params: int,
) -> list[dict[str, Any]]:
    """One row per grid point from Ray Tune's results, best first (failed and unrun last)."""
    by_name: dict[str, Any] = {}
    for r in result_grid:
        name = (r.config or {}).get("point", {}).get("name") or Path(r.path).name
        by_name[name] = r
    rows = []
    for pt in points:
        r = by_name.get(pt.name)
        hist = _history(r.metrics_dataframe) if r is not None else []
        added = num_layers // pt.interval
        row: dict[str, Any] = {
            "trial": pt.name,
            "interval": pt.interval,
            "init": pt.init,
            "alpha": pt.alpha,
            "lr": pt.lr,
            "layers_in": num_layers,
            "layers_out": num_layers + added,
            "layers_added": added,
            "params_added": added * layer_params,
            "params_total": base_params + added * layer_params,
            "steps_budget": pt.steps,
            "steps_run": int(hist[-1]["step"]) if hist else 0,
            "history": hist,
        }
        finite = [h for h in hist if h.get("val_loss") is not None and not h.get("nonfinite")
                  and math.isfinite(h["val_loss"])]  # fmt: skip
        best = min(finite, key=lambda h: h["val_loss"]) if finite else None
        row["best_loss"] = best["val_loss"] if best else None
        row["best_step"] = int(best["step"]) if best else None
        last = hist[-1] if hist else None
        row["final_loss"] = last.get("val_loss") if last else None
        err = ""
        if r is not None and r.error is not None:
            status, err = "failed", _first_line(r.error)
        elif last is not None and last.get("nonfinite"):
            status, err = "failed", f"non-finite loss at step {int(last['step'])}"
        elif r is None or not hist:
            status = "not run"
        elif row["steps_run"] < pt.steps:
            status = "stopped"
        else:
            status = "completed"
        row["status"] = status
        row["error"] = err
        row["stopped_early"] = status == "stopped"
        # The objective: the last finite validation loss the trial reached (ASHA compared
        # trials on it at each rung); failed trials have none.
        ok = status in ("completed", "stopped") and row["final_loss"] is not None
        row["objective"] = row["final_loss"] if ok and math.isfinite(row["final_loss"]) else None
        rows.append(row)

    def key(row: dict[str, Any]) -> tuple:
        has = row["objective"] is not None
        # Completed trials before stopped ones of equal loss; then the grid order (stable sort).
        return (not has, row["objective"] if has else 0.0, row["status"] != "completed")

    rows.sort(key=key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``trials.csv``: one row per trial, every hyperparameter and result, best first."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})


def write_plot(rows: list[dict[str, Any]], path: Path, objective: str) -> None:
    """``tune.png``: validation loss vs step per trial; best loss vs interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in sorted(rows, key=lambda r: r["trial"]):
        pts = [(h["step"], h["val_loss"]) for h in row["history"]
               if h.get("val_loss") is not None and math.isfinite(h["val_loss"])]  # fmt: skip
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        style = "-" if row["status"] == "completed" else "--"
        label = f"{row['trial']} ({row['status']})"
        ax1.plot(xs, ys, style, marker="o", markersize=3, label=label)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("validation loss (nats/token)")
    ax1.set_title("validation loss per trial (dashed: stopped or failed)")
    if ax1.lines:
        ax1.legend(fontsize=7)
    groups: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["best_loss"] is None:
            continue
        g = row["init"] + (f" a{row['alpha']:g}" if row["alpha"] is not None else "")
        g += f" lr{row['lr']:g}"
        groups.setdefault(g, []).append((row["interval"], row["best_loss"]))
    for g, pts in sorted(groups.items()):
        pts.sort()
        xs, ys = zip(*pts, strict=True)
        ax2.plot(xs, ys, marker="o", label=g)
    ax2.set_xlabel("injection interval K")
    ax2.set_ylabel("best validation loss")
    ax2.set_title("best loss vs interval" + (" (equal compute)" if objective != "loss" else ""))
    if ax2.lines:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(rows: list[dict[str, Any]], file: Any = None) -> None:
    """The trials as a table, best first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tli tune: trials, best first")
    for col in ("#", "trial", "K", "init", "alpha", "lr", "+layers", "+params", "steps",
                "best loss", "final loss", "status"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("trial", "init", "status") else "right")
    for row in rows:
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        table.add_row(
            str(row["rank"]), row["trial"], str(row["interval"]), row["init"],
            _fmt(row["alpha"]) or "-", f"{row['lr']:g}", str(row["layers_added"]),
            f"{row['params_added']:,}", f"{row['steps_run']}/{row['steps_budget']}",
            _fmt(row["best_loss"]), _fmt(row["final_loss"]), status[:80],
        )  # fmt: skip
    Console(file=file or sys.stdout, width=160).print(table)


# ----------------------------------------------------------------------------- run_tune


def _base_counts(state: dict[str, torch.Tensor], num_layers: int) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters of the base, tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in state.values():
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel()
    per_layer = [0] * num_layers
    for k, t in state.items():
        parts = k.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) < num_layers:
                per_layer[int(parts[i + 1])] += t.numel()
    return max(per_layer), total


def _read_state(partial: Path) -> dict[str, Any]:
    path = partial / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise TliError(
            f"{partial} has no readable {STATE_FILE}: nothing to resume; start a new search"
        ) from None


def run_tune(
    base_dir: str | Path | None,
    out_dir: str | Path,
    data: str | Path | list[str | Path] | None,
    cfg: RunConfig | None,
    *,
    ray_address: str | None = None,
    resume: bool = False,
    force: bool = False,
    cpus_per_worker: float | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Search injection/training hyperparameters with Ray Tune; write the results to ``out_dir``.

    Args:
        base_dir: the base model's HF folder (the one being upscaled).
        out_dir: output folder; must not exist unless ``force``. Work happens in
            ``<out_dir>.partial``, renamed when the search is complete.
        data: a corpus folder from ``tli data build`` or text/jsonl/parquet file(s).
        cfg: the run config (``tune``, ``inject`` and ``train`` sections are used).
        ray_address: an existing Ray cluster (else ``RAY_ADDRESS``, else a local Ray started
            here; a Ray already initialised in this process is used as is).
        resume: continue the interrupted search in ``<out_dir>.partial``; finished trials are
            not rerun. ``base_dir``, ``data`` and ``cfg`` may then be None (the saved ones are
            used); when given they must match the saved ones.
        force: replace an existing ``out_dir`` and discard an interrupted search.
        cpus_per_worker: CPUs each Ray Train worker reserves (default: a local Ray's CPUs
            shared by ``tune.concurrency`` trials; 1 on a cluster).
        callbacks: extra Ray Tune callbacks (e.g. ``MLflowLoggerCallback``); saved with the
            experiment, so a resumed search keeps them.

    Returns:
        ``out_dir``.

    Raises:
        TliError: bad input (found before Ray starts or anything is written).
        TuneInterrupted: the search was interrupted; ``resume=True`` continues it.
        NoTrialSucceeded: every trial failed (the outputs are still written).
    """
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    # ---- the inputs: given, or saved by the interrupted search
    if out.exists() and not force:
        raise TliError(f"output dir {out} exists: choose another --out or pass --force")
    saved = None
    if resume:
        if not partial.exists():
            raise TliError(f"nothing to resume: {partial} does not exist (start a new search)")
        saved = _read_state(partial)
        given = {
            "base_dir": str(Path(base_dir).resolve()) if base_dir is not None else None,
            "data": _data_list(data) if data is not None else None,
            "config": cfg.model_dump(mode="json") if cfg is not None else None,
        }
        diff = [k for k, v in given.items() if v is not None and v != saved[k]]
        if diff:
            raise TliError(
                f"--resume with a different {' and '.join(diff)} than the interrupted search: "
                "give the same (or none) or start over with --force"
            )
        base_dir, data = saved["base_dir"], saved["data"]
        cfg = RunConfig.model_validate(saved["config"])
    elif partial.exists() and not force:
        raise TliError(
            f"{partial} holds an interrupted search: pass --resume to continue it "
            "or --force to start over"
        )
    if base_dir is None or data is None or cfg is None:
        raise TliError("a new search needs the base model, the data and the config")
    base = Path(base_dir)
    paths = [Path(p) for p in _data_list(data)]
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise TliError(f"--cpus-per-worker must be positive, got {cpus_per_worker}")

    # ---- every input check before Ray starts or anything is written
    from tli.inject.arch import arch_for
    from tli.inject.stage import _fingerprint, layer_count, read_config
    from tli.inject.stio import read_checkpoint

    config = read_config(base)
    spec = arch_for(config, list(read_checkpoint(base)))
    n_layers = layer_count(config, spec)
    validate_search(cfg, n_layers)
    train = cfg.train
    ctx = config.get("max_position_embeddings")
    if isinstance(ctx, int) and train.seq_len > ctx:
        raise TliError(
            f"--seq-len {train.seq_len} is longer than the model's context ({ctx} tokens)"
        )
    slots = cfg.tune.concurrency * train.workers
    local = not _ray_initialized() and not (ray_address or os.environ.get("RAY_ADDRESS"))
    if local:
        ncpu = os.cpu_count() or 1
        if slots > ncpu:
            raise TliError(
                f"{cfg.tune.concurrency} concurrent trials x {train.workers} workers need "
                f"{slots} CPUs, this machine has {ncpu}: lower --concurrency or --workers"
            )
        if train.gpu:
            import torch

            if torch.cuda.device_count() < slots:
                raise TliError(
                    f"--gpu with {slots} workers at once needs {slots} GPUs, this machine has "
                    f"{torch.cuda.device_count()}: lower --concurrency or --workers"
                )

    from tli.data.corpus import load_blocks

    train_blocks = load_blocks(paths, base, train.seq_len, "train")  # [n, T]
    if train_blocks.shape[0] < train.batch_size * train.workers:
        raise TliError(
            f"the training split has {train_blocks.shape[0]} blocks of {train.seq_len} tokens, "
            f"fewer than one global batch ({train.batch_size} x {train.workers} workers)"
        )
    val = load_blocks(paths, base, train.seq_len, "validation")  # [m, T]
    n_val = min(cfg.tune.heldout_blocks, val.shape[0]) // train.workers * train.workers
    if n_val == 0:
        raise TliError(
            f"{val.shape[0]} validation blocks cannot be shared by {train.workers} workers: "
            "use more data or a shorter --seq-len"
        )
    val_blocks = val[:n_val].clone()  # [n_val, T]

    from tli.base import load_causal_lm

    model = load_causal_lm(base)  # the one read of the base
    state = {k: v.detach() for k, v in model.state_dict().items()}
    layer_params, base_params = _base_counts(state, n_layers)
    points = search_points(cfg, n_layers, layer_params, base_params)
    if train.warmup >= min(p.steps for p in points):
        print(
            f"note: --warmup {train.warmup} is not shorter than a trial's "
            f"{min(p.steps for p in points)} steps: trials never reach their learning rate "
            "(set --warmup below --steps for the search)",
            file=sys.stderr,
        )

    # ---- write the inputs (for --resume), then Ray
    if partial.exists() and not resume:
        shutil.rmtree(partial)  # --force: start over
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TliError(f"cannot write to {partial.parent}: {e.strerror}") from None
    if saved is None:
        saved = {
            "stage": "tune",
            "base_dir": str(base.resolve()),
            "data": [str(p.resolve()) for p in paths],
            "config": cfg.model_dump(mode="json"),
            "input": {"name": base.name, "files": _fingerprint(base)},
            "tli_version": __version__,
        }
        (partial / STATE_FILE).write_text(json.dumps(saved, indent=2) + "\n")

    import ray
    from ray import tune

    t0 = time.perf_counter()
    with tune_ray_session(ray_address):
        total_cpu = ray.cluster_resources().get("CPU", 0)
        if cpus_per_worker is not None:
            cpw = cpus_per_worker
        elif local or _owns_whole_machine(total_cpu):
            # Share the machine: each trial's driver takes a sliver, its workers the rest.
            cpw = math.floor(100 * (total_cpu - DRIVER_CPUS * cfg.tune.concurrency) / slots) / 100
        else:
            cpw = 1.0
        need = cfg.tune.concurrency * DRIVER_CPUS + slots * cpw
        if cpw <= 0 or need > total_cpu + 1e-9:
            raise TliError(
                f"{cfg.tune.concurrency} concurrent trials x {train.workers} workers x {cpw:g} "
                f"CPUs need {need:g} CPUs, the cluster has {total_cpu:g}: lower --concurrency"
            )
        shared = {
            "base": ray.put({"config": model.config.to_dict(), "state": state}),
            "train_blocks": ray.put(train_blocks),
            "val_blocks": ray.put(val_blocks),
            "run_config": cfg.model_dump(mode="json"),
            "num_layers": n_layers,
            "cpus_per_worker": cpw,
            "threads": max(1, round(cpw)),
            "train_storage": str((partial / TRAIN_RUNS).resolve()),
        }
        del model, state
        trainable = tune.with_resources(
            tune.with_parameters(_trial_driver, shared=shared), {"CPU": DRIVER_CPUS}
        )
        exp_path = partial / EXPERIMENT
        if resume and tune.Tuner.can_restore(str(exp_path.resolve())):
            tuner = tune.Tuner.restore(
                str(exp_path.resolve()),
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=False,  # a failed trial stays failed: it is a result
                restart_errored=False,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "point": tune.grid_search([{**asdict(p), "name": p.name} for p in points])
                },
                tune_config=tune.TuneConfig(
                    metric=METRIC,
                    mode="min",
                    scheduler=_scheduler(cfg, points),
                    max_concurrent_trials=cfg.tune.concurrency,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                    reuse_actors=False,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(partial.resolve()),
                    stop=_stop_nonfinite,
                    failure_config=tune.FailureConfig(max_failures=0),
                    verbose=1,  # Tune's status table; the workers print a line per step
                    callbacks=list(callbacks),
                ),
            )
        grid = tuner.fit()
        # What --resume will see: the experiment state Tune saved before it cleaned up (after an
        # interrupt the in-memory trials all read TERMINATED, the saved ones RUNNING/PENDING).
        saved_trials = tune.ExperimentAnalysis(str(exp_path.resolve())).trials
        done = sum(t.status in ("TERMINATED", "ERROR") for t in saved_trials)
        if done < len(points):
            raise TuneInterrupted(
                f"search interrupted after {done} of {len(points)} trials: continue it with "
                f"tli tune --resume --out {out}"
            )
    wall = time.perf_counter() - t0

    rows = collect_trials(grid, points, n_layers, layer_params, base_params)
    write_trials_csv(rows, partial / TRIALS_CSV)
    write_plot(rows, partial / PLOT, cfg.tune.objective)
    best = rows[0] if rows and rows[0]["objective"] is not None else None
    if best is not None:
        point = next(p for p in points if p.name == best["trial"])
        header = (
            f"# tli tune: best of {len(rows)} trials: {best['trial']} "
            f"(validation loss {best['objective']:.4f} after {best['steps_run']} steps)\n"
            "# use with: tli inject --config best.yaml ... ; tli train --config best.yaml ...\n"
        )
        (partial / BEST_YAML).write_text(header + dump_yaml(best_run_config(cfg, point)))
    from tli.inject.stage import package_versions

    saved["result"] = {
        "best": {k: v for k, v in best.items() if k != "history"} if best else None,
        "trials": len(rows),
        "status": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
        "wall_s": wall,
        "versions": package_versions("torch", "ray", "transformers"),
    }
    (partial / STATE_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    shutil.rmtree(partial / TRAIN_RUNS, ignore_errors=True)
    from tli.inject.stage import swap_in

    swap_in(partial, out)  # --force: the old folder is replaced only now
    print_summary(rows)
    if best is None:
        raise NoTrialSucceeded(f"every trial failed: see {out / TRIALS_CSV}")
    return out


def _scheduler(cfg: RunConfig, points: list[SearchPoint]) -> Any:
    """ASHA on the validation loss (``None`` = run every trial to its budget)."""
    if not cfg.tune.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Equal compute: a deeper model's steps count for more, so rungs compare equal compute.
    time_attr = "compute" if cfg.tune.objective == "loss_at_equal_compute" else "step"
    max_t = cfg.tune.steps
    grace = min(cfg.tune.eval_every, max_t)
    return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=grace, reduction_factor=2)


def _owns_whole_machine(total_cpu: float) -> bool:
    """A Ray already initialised in this process on this machine alone (tests, notebooks)."""
    import ray

    return len(ray.nodes()) == 1 and total_cpu <= (os.cpu_count() or 1)


def _ray_initialized() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _data_list(data: Any) -> list[str]:
    items = data if isinstance(data, list | tuple) else [data]
    return [str(Path(p).resolve()) for p in items]
