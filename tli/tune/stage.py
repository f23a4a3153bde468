"""The tune stage: Ray Tune over the injection interval (and init, alpha, lr), with ASHA.

One trial = one point of the grid ``intervals x inits x alphas x lrs`` (:mod:`tli.tune.space`),
run by :func:`tli.tune.trial.trial_driver`. The base is read from disk once, by
:func:`execute`, and its state dict put in Ray's object store; each trial's workers build the
upscaled model in memory from it, so nothing is re-read or written per trial. The objective is
the loss on the corpus's ``validation`` split (never a benchmark test set; the ``heldout`` split
stays untouched for the final evaluation), reported every ``tune.trial.validation.every`` steps
so ASHA can stop poor trials early.

Output: ``trials.csv``, ``best.yaml`` (a whole run config accepted by ``tli inject --config``
and ``tli train --config``), ``tune.png``, ``tli_tune.json`` (inputs, resolved config, versions,
best trial) and ``ray/`` (Ray Tune's own experiment folder, one sub-folder per trial, named
after the trial). A killed search resumes from ``ray/`` without rerunning finished trials.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tli import __version__, rayenv
from tli.config import RunConfig, Runtime, dump_yaml
from tli.errors import TliError
from tli.modelfolder import ModelFolder
from tli.output import partial_of, precheck, staged
from tli.provenance import header_fingerprint, package_versions
from tli.train.inputs import check_context, training_blocks, validation_blocks
from tli.tune.results import collect_trials, print_summary, write_plot, write_trials_csv
from tli.tune.space import (
    SearchPoint,
    best_run_config,
    search_points,
    trial_cfg,
    validate_search,
)
from tli.tune.trial import METRIC, stop_nonfinite, trial_driver, trial_name

EXPERIMENT = "ray"  # Ray Tune's experiment folder inside the output
TRAIN_RUNS = "train_runs"  # Ray Train's per-trial run folders (removed when a trial ends)
STATE_FILE = "tli_tune.json"  # inputs + config (for --resume) and, at the end, the results
TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"
PLOT = "tune.png"


class TuneInterrupted(TliError):
    """The search was interrupted (Ctrl-C / SIGUSR1); ``tli tune --resume`` continues it."""

    exit_code = 130


class NoTrialSucceeded(TliError):
    """Every trial failed: the outputs are written, but there is no best configuration."""

    exit_code = 1


@dataclass(frozen=True)
class TuneJob:
    """A search, checked: the base, the data, the grid with each trial's budget."""

    cfg: RunConfig
    base: ModelFolder
    data: list[Path]
    points: tuple[SearchPoint, ...]
    layer_params: int
    base_params: int
    runtime: Runtime
    callbacks: tuple[Any, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "stage": "tune",
            "base": str(self.base.path),
            "data": [str(p) for p in self.data],
            "trials": [{**asdict(p), "name": p.name} for p in self.points],
            "tune": self.cfg.tune.model_dump(mode="json"),
        }

    def state(self) -> dict[str, Any]:
        """What ``tli_tune.json`` holds before the search runs (``--resume`` compares it)."""
        return {
            "stage": "tune",
            "base_dir": str(self.base.path.resolve()),
            "data": [str(p.resolve()) for p in self.data],
            "config": self.cfg.model_dump(mode="json"),
            "input": {"name": self.base.name, "files": header_fingerprint(self.base.files)},
            "tli_version": __version__,
        }


def _counts(base: ModelFolder) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters of the base), from the headers alone."""
    assert base.arch is not None
    rx = base.arch.layer_re()
    per_layer = [0] * base.num_layers
    for name, ref in base.tensors.items():
        m = rx.fullmatch(name)
        if m and int(m.group(1)) < base.num_layers:
            per_layer[int(m.group(1))] += ref.numel
    return max(per_layer), base.parameters


def prepare(cfg: RunConfig, inputs: dict[str, Any], runtime: Runtime) -> TuneJob:
    """Every check before Ray starts: the base, the grid, the context, the data, capacity.

    Args:
        cfg: the run config (``tune``, ``inject`` and ``train`` sections are used).
        inputs: ``{"base": base model folder, "data": corpus folder or file(s)}``.
        runtime: Ray address, CPUs per worker.
    """
    base = ModelFolder.open(inputs["base"])
    validate_search(cfg, base.num_layers)
    check_context(base, cfg.train.seq_len)
    if rayenv.will_start_local(runtime.ray_address):
        rayenv.check_local_capacity(cfg.train.workers, cfg.tune.concurrency, cfg.train.gpu)
    data = inputs["data"]
    paths = [Path(p) for p in (data if isinstance(data, list | tuple) else [data])]
    training_blocks(paths, base.path, cfg.train)
    validation_blocks(paths, base.path, trial_cfg(cfg), required=True)
    layer_params, base_params = _counts(base)
    points = search_points(cfg, base.num_layers, layer_params, base_params)
    if cfg.train.warmup >= min(p.steps for p in points):
        print(
            f"note: --warmup {cfg.train.warmup} is not shorter than a trial's "
            f"{min(p.steps for p in points)} steps: trials never reach their learning rate "
            "(set --warmup below --steps for the search)",
            file=sys.stderr,
        )
    return TuneJob(cfg, base, paths, tuple(points), layer_params, base_params, runtime)


def resumable(out: Path) -> str | None:
    """What an interrupted search left in ``out``: its saved state and Ray Tune's experiment."""
    if (out / STATE_FILE).is_file() and any((out / EXPERIMENT).glob("experiment_state*.json")):
        done = sum(1 for _ in (out / EXPERIMENT).glob("*/result.json"))
        return f"search state with {done} trial folder(s)"
    return None


def execute(job: TuneJob, out: Path) -> None:
    """Run the search into ``out`` (resuming Ray Tune's experiment there when there is one).

    Raises:
        TuneInterrupted: the search was interrupted; running it again continues it.
        NoTrialSucceeded: every trial failed (after the outputs are written).
    """
    resume = resumable(out) is not None
    state = json.loads((out / STATE_FILE).read_text()) if resume else job.state()
    if not resume:
        (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    t0 = time.perf_counter()
    grid = _search(job, out, resume)
    rows = collect_trials(grid, list(job.points), job.base.num_layers, job.layer_params,
                          job.base_params)  # fmt: skip
    _write_results(job, out, rows, state, time.perf_counter() - t0)
    print_summary(rows)
    if rows[0]["objective"] is None if rows else True:
        raise NoTrialSucceeded(f"every trial failed: see {TRIALS_CSV}")


def _search(job: TuneJob, out: Path, resume: bool) -> Any:
    """Ray Tune's results of the whole grid (restored from ``out/ray`` when resuming)."""
    import ray
    from ray import tune

    from tli.modelfolder import load_causal_lm

    cfg, rt = job.cfg, job.runtime
    local = rayenv.will_start_local(rt.ray_address)
    with rayenv.session(rt.ray_address) as started:
        plan = rayenv.plan_workers(
            ray.cluster_resources().get("CPU", 0), cfg.train.workers,
            concurrency=cfg.tune.concurrency, driver_cpus=rayenv.DRIVER_CPUS,
            share_all=local or started or _single_node(), cpus_per_worker=rt.cpus_per_worker,
            threads=rt.threads,
        )  # fmt: skip
        model = load_causal_lm(job.base.path)  # the one read of the base
        state = {k: v.detach() for k, v in model.state_dict().items()}
        shared = {
            "base": ray.put({"config": model.config.to_dict(), "state": state}),
            "train_blocks": ray.put(training_blocks(job.data, job.base.path, cfg.train)),
            "val_blocks": ray.put(validation_blocks(job.data, job.base.path, trial_cfg(cfg),
                                                    required=True)),
            "run_config": cfg.model_dump(mode="json"),
            "num_layers": job.base.num_layers,
            "plan": plan,
            "train_storage": str((out / TRAIN_RUNS).resolve()),
        }  # fmt: skip
        del model, state
        trainable = tune.with_resources(
            tune.with_parameters(trial_driver, shared=shared), {"CPU": rayenv.DRIVER_CPUS}
        )
        exp_path = str((out / EXPERIMENT).resolve())
        if resume and tune.Tuner.can_restore(exp_path):
            print(f"tli tune: resuming the search in {exp_path}", flush=True)
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False,  # a failed trial is a result
                                       restart_errored=False)  # fmt: skip
        else:
            tuner = _new_tuner(job, trainable, out)
        grid = tuner.fit()
        # What a resume will see: the experiment state Tune saved before it cleaned up (after
        # an interrupt the in-memory trials all read TERMINATED, the saved ones RUNNING).
        saved_trials = tune.ExperimentAnalysis(exp_path).trials
        done = sum(t.status in ("TERMINATED", "ERROR") for t in saved_trials)
        if done < len(job.points):
            raise TuneInterrupted(
                f"search interrupted after {done} of {len(job.points)} trials: continue it "
                "with tli tune --resume (or rerun the pipeline)"
            )
    return grid


def _new_tuner(job: TuneJob, trainable: Any, out: Path) -> Any:
    from ray import tune

    cfg = job.cfg
    return tune.Tuner(
        trainable,
        param_space={
            "point": tune.grid_search([{**asdict(p), "name": p.name} for p in job.points])
        },
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            scheduler=_scheduler(cfg),
            max_concurrent_trials=cfg.tune.concurrency,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out.resolve()),
            stop=stop_nonfinite,
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,  # Tune's status table; the workers print a line per step
            callbacks=list(job.callbacks),
        ),
    )


def _write_results(
    job: TuneJob, out: Path, rows: list[dict[str, Any]], state: dict[str, Any], wall: float
) -> None:
    import shutil

    write_trials_csv(rows, out / TRIALS_CSV)
    write_plot(rows, out / PLOT, job.cfg.tune.objective)
    best = rows[0] if rows and rows[0]["objective"] is not None else None
    if best is not None:
        point = next(p for p in job.points if p.name == best["trial"])
        header = (
            f"# tli tune: best of {len(rows)} trials: {best['trial']} "
            f"(validation loss {best['objective']:.4f} after {best['steps_run']} steps)\n"
            "# use with: tli inject --config best.yaml ... ; tli train --config best.yaml ...\n"
        )
        (out / BEST_YAML).write_text(header + dump_yaml(best_run_config(job.cfg, point)))
    state["result"] = {
        "best": {k: v for k, v in best.items() if k != "history"} if best else None,
        "trials": len(rows),
        "status": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
        "wall_s": wall,
        "versions": package_versions(("torch", "ray", "transformers")),
    }
    (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(out / TRAIN_RUNS, ignore_errors=True)


def _scheduler(cfg: RunConfig) -> Any:
    """ASHA on the validation loss (``None`` = run every trial to its budget)."""
    if not cfg.tune.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Equal compute: a deeper model's steps count for more, so rungs compare equal compute.
    time_attr = "compute" if cfg.tune.objective == "loss_at_equal_compute" else "step"
    max_t = cfg.tune.trial.steps
    grace = min(cfg.tune.trial.validation.every or max_t, max_t)
    return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=grace, reduction_factor=2)


def _single_node() -> bool:
    """A Ray of one node no bigger than this machine (tests, notebooks, a local head)."""
    import os

    import ray

    return len(ray.nodes()) == 1 and ray.cluster_resources().get("CPU", 0) <= (os.cpu_count() or 1)


# ---------------------------------------------------------------------------- the command


def _saved_inputs(out: Path, base: Any, data: Any, cfg: RunConfig | None) -> tuple[Any, Any, Any]:
    """For ``--resume``: the interrupted search's inputs; any given must equal them."""
    path = partial_of(out) / STATE_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise TliError(
            f"nothing to resume: {partial_of(out)} holds no interrupted search "
            "(start a new one)"
        ) from None
    given = {
        "base_dir": str(Path(base).resolve()) if base is not None else None,
        "data": _data_list(data) if data is not None else None,
        "config": cfg.model_dump(mode="json") if cfg is not None else None,
    }
    diff = [k for k, v in given.items() if v is not None and v != saved[k]]
    if diff:
        raise TliError(
            f"--resume with a different {' and '.join(diff)} than the interrupted search: "
            "give the same (or none) or start over with --force"
        )
    return saved["base_dir"], saved["data"], RunConfig.model_validate(saved["config"])


def run_tune(
    base_dir: str | Path | None,
    out_dir: str | Path,
    data: str | Path | list[str | Path] | None,
    cfg: RunConfig | None,
    *,
    resume: bool = False,
    force: bool = False,
    runtime: Runtime | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Search injection/training hyperparameters with Ray Tune; write the results to ``out_dir``.

    Args:
        base_dir: the base model's HF folder (the one being upscaled).
        out_dir: output folder; must not exist unless ``force``. Work happens in its partial
            folder (``.<out>.partial``), renamed when the search is complete.
        data: a corpus folder from ``tli data build`` or text/jsonl/parquet file(s).
        cfg: the run config (``tune``, ``inject`` and ``train`` sections are used).
        resume: continue the interrupted search; finished trials are not rerun. ``base_dir``,
            ``data`` and ``cfg`` may then be None (the saved ones are used); when given they
            must match the saved ones.
        force: replace an existing ``out_dir`` and discard an interrupted search.
        runtime: Ray address, CPUs per worker.
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
    if resume:
        base_dir, data, cfg = _saved_inputs(out, base_dir, data, cfg)
    if base_dir is None or data is None or cfg is None:
        raise TliError("a new search needs the base model, the data and the config")
    precheck(out, force=force, protect=[Path(base_dir)])
    job = prepare(cfg, {"base": Path(base_dir), "data": data}, runtime or Runtime())
    job = TuneJob(**{**job.__dict__, "callbacks": tuple(callbacks)})
    failed: NoTrialSucceeded | None = None
    with staged(out, force=force, resume=resume, resumable=resumable,
                protect=[job.base.path]) as st:  # fmt: skip
        try:
            execute(job, st.path)
        except NoTrialSucceeded as e:
            failed = e  # the outputs are complete: keep them, then say so
    if failed is not None:
        raise NoTrialSucceeded(f"every trial failed: see {out / TRIALS_CSV}")
    return out


def _data_list(data: Any) -> list[str]:
    items = data if isinstance(data, list | tuple) else [data]
    return [str(Path(p).resolve()) for p in items]
