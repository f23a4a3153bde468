"""The pipeline's stages: a table from stage name to the ``run_*`` function it calls.

Each entry says which config sections a stage reads (its version hashes exactly these), which
inputs it takes from earlier stages, which of its output files are volatile (timings, dates:
listed in the manifest but left out of the content hash), and a small adapter that calls the
stage's one ``run_*`` function with the folders the store hands it. The logic of every stage
lives in its own module; the store (:mod:`tli.pipeline.store`) does versioning and caching, and
:mod:`tli.pipeline.runner` runs a stage here or as a Ray job.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tli.config import InjectConfig, RunConfig, TrainConfig, read_yaml
from tli.errors import TliError

# A stage adapter: (output folder to create, run config, input folders by name, Ray address).
Adapter = Callable[[Path, RunConfig, dict[str, Path], "str | None"], None]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage."""

    name: str
    sections: tuple[str, ...]  # config sections it reads (and its version hashes)
    inputs: tuple[str, ...]  # inputs from other stages, by name
    run: Adapter
    volatile: tuple[str, ...] = ()  # output files left out of the content hash
    model_subdir: str | None = None  # where an HF model folder sits in its output, if anywhere
    seed_of: tuple[str, str] | None = None  # (section, field) recorded as the manifest's seed
    # (section, field) naming a folder outside the store, whose content hash is an input: the
    # version hashes that content, not the path, so it is the same on every machine and clone.
    path_field: tuple[str, str] | None = None

    def params(self, cfg: RunConfig, inputs: dict[str, Path]) -> dict[str, Any]:
        """The resolved config this stage runs with (what its version hashes)."""
        resolved = resolved_config(self.name, cfg, inputs)
        out = {s: getattr(resolved, s).model_dump(mode="json") for s in self.sections}
        if self.path_field:
            section, field = self.path_field
            if out[section].get(field) is not None:
                out[section][field] = "(content: input source)"
        return out


def model_dir(output: Path) -> Path:
    """The HF model folder inside a stage's output (a trained model sits under ``model/``)."""
    for stage in STAGES.values():
        if stage.model_subdir and (output / stage.model_subdir / "config.json").is_file():
            return output / stage.model_subdir
    return output


# ---------------------------------------------------------------------------- tuned config


def _best(tune_out: Path) -> dict[str, Any]:
    f = tune_out / "best.yaml"
    if not f.is_file():
        raise TliError(f"{tune_out} has no best.yaml: the tune stage did not finish")
    return read_yaml(f)


def resolved_config(stage: str, cfg: RunConfig, inputs: dict[str, Path]) -> RunConfig:
    """The run config as ``stage`` sees it: the tune stage's winners replace the searched fields.

    The inject section is the winner's as a whole (interval, init, alpha are what Tune chose);
    of the train section only the learning rate is taken, and only when Tune searched it: steps,
    batch size etc. stay those of the run (a trial's steps are ``tune.steps``, not ``train.steps``).
    """
    tune_out = inputs.get("tune")
    if tune_out is None or stage not in ("inject", "train"):
        return cfg
    best = _best(tune_out)
    if stage == "inject" and best.get("inject"):
        return cfg.model_copy(update={"inject": InjectConfig.model_validate(best["inject"])})
    if stage == "train" and cfg.tune.lrs and (best.get("train") or {}).get("lr") is not None:
        lr = float(best["train"]["lr"])
        train = TrainConfig.model_validate({**cfg.train.model_dump(), "lr": lr})
        return cfg.model_copy(update={"train": train})
    return cfg


# ---------------------------------------------------------------------------- adapters


def _import_base(out: Path, cfg: RunConfig, inputs: dict[str, Path], ray: str | None) -> None:
    from tli.base import import_base

    # The bundled model is converted once into the user cache; the store keeps its own copy
    # (never a link: a later in-place save into the source must not change a stored version).
    src = Path(cfg.base.model) if cfg.base.model else import_base()
    check_model_folder(src)
    shutil.copytree(src, out)


def _data(out: Path, cfg: RunConfig, inputs: dict[str, Path], ray: str | None) -> None:
    from tli.data.corpus import run_data_build

    run_data_build(cfg.data, out, tokenizer_dir=inputs["base"])


def _tune(out: Path, cfg: RunConfig, inputs: dict[str, Path], ray: str | None) -> None:
    from tli.tune.stage import run_tune

    run_tune(inputs["base"], out, inputs["data"], cfg, ray_address=ray)


def _inject(out: Path, cfg: RunConfig, inputs: dict[str, Path], ray: str | None) -> None:
    from tli.inject.stage import run_inject

    cfg = resolved_config("inject", cfg, inputs)
    run_inject(inputs["base"], out, cfg.inject, progress=False)


def _train(out: Path, cfg: RunConfig, inputs: dict[str, Path], ray: str | None) -> None:
    from tli.train.stage import run_train

    cfg = resolved_config("train", cfg, inputs)
    if ray is None and os.environ.get("RAY_ADDRESS") and not cfg.train.gpu:
        # Inside a stage job: join the job's cluster here, so each CPU worker can be given
        # its share of the cluster's CPUs (run_train's default on a cluster is one each).
        import ray as ray_lib

        from tli.train.stage import ray_session

        with ray_session(None):
            cpus = int(ray_lib.cluster_resources().get("CPU", 1))
            cpw = max(1, cpus // cfg.train.workers)
            run_train(
                model_dir(inputs["model"]), out, inputs["data"], cfg.train, cpus_per_worker=cpw
            )
        return
    run_train(model_dir(inputs["model"]), out, inputs["data"], cfg.train, ray_address=ray)


def _eval(out: Path, cfg: RunConfig, inputs: dict[str, Path], ray: str | None) -> None:
    from tli.eval.stage import run_eval

    run_eval(model_dir(inputs["model"]), out, cfg.eval, heldout_data=inputs["data"])


def _report(out: Path, cfg: RunConfig, inputs: dict[str, Path], ray: str | None) -> None:
    from tli.pipeline.report import run_report

    run_report(out, inputs)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("import-base", ("base",), (), _import_base, path_field=("base", "model")),
        Stage("data", ("data",), ("base",), _data, seed_of=("data", "seed")),
        Stage(
            "tune",
            ("inject", "train", "tune"),
            ("base", "data"),
            _tune,
            # Ray's own experiment folder and timings differ between identical searches.
            volatile=("ray/*", "train_runs/*", "*.png", "*.log", "tli_tune.json"),
            seed_of=("train", "seed"),
        ),
        Stage("inject", ("inject",), ("base", "tune"), _inject),
        Stage(
            "train",
            ("train",),
            ("model", "data", "tune"),
            _train,
            volatile=("tli_train.json", "model/tli_train.json", "metrics.jsonl", "ray/*"),
            model_subdir="model",
            seed_of=("train", "seed"),
        ),
        Stage(
            "eval",
            ("eval",),
            ("model", "data"),
            _eval,
            # lm-eval stamps dates and durations; provenance records the wall time.
            volatile=("results.json", "provenance.json"),
        ),
        Stage(
            "report",
            (),
            (
                "base",
                "data",
                "tune",
                "inject",
                "train",
                "eval_base",
                "eval_injected",
                "eval_trained",
            ),
            _report,
            volatile=("*.png", "report.html"),
        ),
    )
}


def get_stage(name: str) -> Stage:
    """The stage called ``name``, or a one-line error listing the stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise TliError(f"unknown stage {name!r}: choose from {', '.join(STAGES)}") from None


# ---------------------------------------------------------------------------- helpers


def check_model_folder(path: Path) -> None:
    """Raise a one-line error unless ``path`` is an HF folder with safetensors weights."""
    if not path.is_dir():
        raise TliError(f"base model {path} is not a folder: give an HF model folder")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise TliError(
            f"base model {path} has no config.json and *.safetensors: give an HF model folder"
        )
