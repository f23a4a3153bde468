"""The tune stage: Ray Tune over the injection interval (and init, alpha, lr), with ASHA.

One trial = one point of the grid ``intervals x inits x alphas x lrs`` (:mod:`tli.tune.space`),
run by :func:`tli.tune.trial.trial_driver`. The base is read from disk once, by
:func:`execute`, and its state dict put in Ray's object store; each trial's workers build the
upscaled model in memory from it, so nothing is re-read or written per trial. The objective is
the loss on the corpus's ``validation`` split (never a benchmark test set; the ``heldout`` split
stays untouched for the final evaluation), reported every ``tune.trial.validation.every`` steps
so ASHA can stop poor trials early.

Output: ``trials.csv``, ``best.yaml`` (a whole run config accepted by ``tli inject --config``
and ``tli train --config``), ``tune.png``, ``search.md`` and ``rungs.csv`` (the trials compared
rung by rung at equal steps and at equal training FLOPs, and which comparison chose the winner:
:func:`tli.tune.results.rung_report`), ``tli_tune.json`` (inputs, resolved config, versions,
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

from tli import __version__, rayenv, remote, tracking
from tli.config import RunConfig, Runtime, dump_yaml
from tli.drills import drill
from tli.errors import TliError
from tli.modelfolder import ModelFolder
from tli.output import partial_of, precheck, staged
from tli.provenance import header_fingerprint, package_versions
from tli.train.inputs import (
    check_context,
    check_validation,
    count_training_blocks,
    training_blocks,
    training_stream,
    validation_blocks,
)
from tli.tune.results import (
    collect_trials,
    print_summary,
    rung_report,
    search_markdown,
    write_plot,
    write_rungs_csv,
    write_trials_csv,
)
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
RUNGS_CSV = "rungs.csv"  # every trial's validation loss at every report: step, FLOPs, rank
SEARCH_MD = "search.md"  # the trials compared at equal steps and at equal FLOPs


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
    rayenv.check_runtime(runtime.ray_address, runtime.storage, runtime.connect_timeout_s)
    data = inputs["data"]
    paths = [Path(p) for p in (data if isinstance(data, list | tuple) else [data])]
    count_training_blocks(paths, base.path, cfg.train)
    check_validation(paths, base.path, trial_cfg(cfg))
    layer_params, base_params = _counts(base)
    points = search_points(cfg, base.num_layers, layer_params, base_params,
                           flops_of=_flops_of(base, cfg))  # fmt: skip
    if cfg.train.warmup >= min(p.steps for p in points):
        print(
            f"note: --warmup {cfg.train.warmup} is not shorter than a trial's "
            f"{min(p.steps for p in points)} steps: trials never reach their learning rate "
            "(set --warmup below --trial-steps for the search)",
            file=sys.stderr,
        )
    return TuneJob(cfg, base, paths, tuple(points), layer_params, base_params, runtime)


def _flops_of(base: ModelFolder, cfg: RunConfig) -> Any:
    """Training FLOPs per token of the model an inject config makes of ``base`` (no weights:
    its config on the meta device), for the equal-compute comparisons."""
    from tli.compare.cost import training_cost
    from tli.inject.plan import make_plan
    from tli.inject.surgery import layer_lists, rewrite_config

    assert base.arch is not None
    lists = layer_lists(base.path, base.config, base.arch, base.num_layers)

    def flops(inject: Any) -> float:
        plan = make_plan(base.num_layers, inject)
        config = rewrite_config(base.config, plan, base.arch, lists)  # type: ignore[arg-type]
        train = cfg.train
        return training_cost(config, train.freeze, plan.new_layers, train.seq_len).flops_per_token

    return flops


def _tokens_per_step(cfg: RunConfig) -> int:
    t = cfg.train
    return t.seq_len * t.batch_size * t.workers * t.grad_accum


def resumable(out: Path) -> str | None:
    """What an interrupted search left for ``out``: its saved state and Ray Tune's experiment
    (in ``out/ray``, or under ``runtime.storage`` where its pointer says)."""
    exp = rayenv.ray_run(out, EXPERIMENT)
    names = remote.listdir(exp) if (out / STATE_FILE).is_file() else []
    if any(n.startswith("experiment_state") and n.endswith(".json") for n in names):
        done = sum(remote.is_file(remote.location_join(exp, n, "result.json")) for n in names)
        return f"search state with {done} trial folder(s) in {exp}, finished trials kept"
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
    drill("tune.results", 1)  # a no-op unless a fault drill is armed
    rows = collect_trials(grid, list(job.points), job.base.num_layers, job.layer_params,
                          job.base_params, _tokens_per_step(job.cfg))  # fmt: skip
    _write_results(job, out, rows, state, time.perf_counter() - t0)
    print_summary(rows)
    tracking.record_tune(label=job.base.name, params=_search_params(job), rows=rows)
    if rows[0]["objective"] is None if rows else True:
        raise NoTrialSucceeded(f"every trial failed: see {TRIALS_CSV}")


def _search(job: TuneJob, out: Path, resume: bool) -> Any:
    """Ray Tune's results of the whole grid (restored from ``out/ray`` when resuming)."""
    from ray import tune

    cfg, rt = job.cfg, job.runtime
    with rayenv.session(rt.ray_address, timeout_s=rt.connect_timeout_s) as started:
        # A cluster that can grow is waited for (the autoscaler asked), one that cannot refused.
        plan = rayenv.plan_on_cluster(
            cfg.train.workers, gpu=cfg.train.gpu, started=started, timeout_s=rt.scale_timeout_s,
            what="tune", concurrency=cfg.tune.concurrency, driver_cpus=rayenv.DRIVER_CPUS,
            cpus_per_worker=rt.cpus_per_worker, threads=rt.threads,
        )  # fmt: skip
        # Tune's experiment and the trials' Ray Train runs: in out, or under runtime.storage.
        storage = rayenv.ray_storage(out, rt.storage, EXPERIMENT)
        shared = {
            # Each trial's workers build their upscaled model from the stored base folder
            # (only their own shards under FSDP): no copy of the base in the object store.
            "base_dir": str(job.base.path.resolve()),
            **_trial_data(job),
            "run_config": cfg.model_dump(mode="json"),
            "num_layers": job.base.num_layers,
            "plan": plan,
            "train_storage": remote.location_join(storage, TRAIN_RUNS),
        }  # fmt: skip
        trainable = tune.with_resources(
            tune.with_parameters(trial_driver, shared=shared), {"CPU": rayenv.DRIVER_CPUS}
        )
        exp_path = rayenv.ray_run(out, EXPERIMENT)
        if resume and tune.Tuner.can_restore(exp_path):
            print(f"tli tune: resuming the search in {exp_path} ({resumable(out)})", flush=True)
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False,  # a failed trial is a result
                                       restart_errored=False)  # fmt: skip
        else:
            tuner = _new_tuner(job, trainable, storage)
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


def _trial_data(job: TuneJob) -> dict[str, Any]:
    """The trials' data: every block in the object store (``train.feed: memory``), or the
    train split's token index for each trial's Ray Data feed (``stream``; tokenised here, with
    Ray Data, where the cache lacks shards), and the validation blocks (the objective)."""
    import ray

    cfg = job.cfg
    val = validation_blocks(job.data, job.base.path, trial_cfg(cfg), required=True)
    if cfg.train.feed == "memory":
        train = {"train_blocks": ray.put(training_blocks(job.data, job.base.path, cfg.train))}
    else:
        train = {"train_index": training_stream(job.data, job.base.path, cfg.train),
                 "cache_node": ray.get_runtime_context().get_node_id()}  # fmt: skip
    return {**train, "val_blocks": ray.put(val)}


def _new_tuner(job: TuneJob, trainable: Any, storage: str) -> Any:
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
            storage_path=storage,
            stop=stop_nonfinite,
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,  # Tune's status table; the workers print a line per step
            callbacks=[
                *job.callbacks,
                *tracking.live_tune_callbacks(label=job.base.name, params=_search_params(job)),
            ],
        ),
    )


def _search_params(job: TuneJob) -> dict[str, Any]:
    """What a search's tracking run shows as params: the sections it reads."""
    return {k: getattr(job.cfg, k).model_dump(mode="json") for k in ("tune", "inject", "train")}


def _write_results(
    job: TuneJob, out: Path, rows: list[dict[str, Any]], state: dict[str, Any], wall: float
) -> None:
    import shutil

    write_trials_csv(rows, out / TRIALS_CSV)
    write_plot(rows, out / PLOT, job.cfg.tune.objective)
    rungs = rung_report(rows, job.cfg.tune.objective)
    write_rungs_csv(rows, out / RUNGS_CSV)
    (out / SEARCH_MD).write_text(search_markdown(rows, rungs))
    best = rows[0] if rows and rows[0]["objective"] is not None else None
    if best is not None:
        point = next(p for p in job.points if p.name == best["trial"])
        header = (
            f"# tli tune: best of {len(rows)} trials: {best['trial']} "
            f"(validation loss {best['objective']:.4f} after {best['steps_run']} steps)\n"
            f"# chosen by {rungs['chosen_by']}"
            + (f"; at equal training FLOPs {rungs['flops_best']} is best" if rungs["flops_best"]
               else "") + f" (see {SEARCH_MD})\n"
            "# use with: tli inject --config best.yaml ... ; tli train --config best.yaml ...\n"
        )  # fmt: skip
        (out / BEST_YAML).write_text(header + dump_yaml(best_run_config(job.cfg, point)))
    state["result"] = {
        "best": {k: v for k, v in best.items() if k != "history"} if best else None,
        "chosen_by": rungs["chosen_by"],
        "equal_flops_best": rungs["flops_best"],
        "equal_flops_agrees": rungs["agree"],
        "trials": len(rows),
        "status": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
        "wall_s": wall,
        "versions": package_versions(("torch", "ray", "transformers")),
    }
    (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    exp = rayenv.ray_run(out, EXPERIMENT)
    if exp != str((out / EXPERIMENT).resolve()):  # the output holds it whatever the storage
        remote.copy_tree(exp, out / EXPERIMENT)
    remote.remove_tree(remote.location_join(rayenv.stored_at(out, EXPERIMENT), TRAIN_RUNS))
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


# ---------------------------------------------------------------------------- the command


def _saved_inputs(out: Path, base: Any, data: Any, cfg: RunConfig | None) -> tuple[Any, Any, Any]:
    """For ``--resume``: the interrupted search's inputs; any given must equal them."""
    path = partial_of(out) / STATE_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise TliError(
            f"nothing to resume: {partial_of(out)} holds no interrupted search (start a new one)"
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
