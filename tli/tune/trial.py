"""One Ray Tune trial: the ``tli train`` worker loop on one point's model, built in memory.

Each trial is a Tune *driver function* (:func:`trial_driver`) that runs Ray Train's
``TorchTrainer`` (:func:`tli.train.worker.make_trainer`) with the very per-worker loop
``tli train`` uses; metrics reach Tune through ``TuneReportCallback`` (the Ray 2.60 Tune + Train
pattern; ``Tuner(trainer)`` is gone). The trial's workers build the upscaled model in memory
from the stored base folder and the trial's plan, on the meta device, each reading only the
rows it trains (:class:`tli.train.shard.InjectedWeights`): no copy of the base per trial, none
in the object store. The data is the search's: every block in the object store, or each
worker's own stream (``train.feed: stream``).
"""

from __future__ import annotations

import math
from typing import Any

from tli import remote
from tli.config import RunConfig
from tli.tune.space import SearchPoint, trial_train_config

METRIC = "objective"


def build_trial_model(base: Any, plan: dict[str, Any]) -> Any:
    """The upscaled model of one trial, built in memory from a loaded base (the whole model).

    The trials themselves no longer use it (their workers read the base folder by rows); it is
    the plain reference that build is checked against.

    Args:
        base: ``{"config": <HF config dict>, "state": <state dict>}``, or a Ray object ref of it
            (the copy :func:`run_tune` put in the object store).
        plan: a :class:`tli.inject.plan.Plan` as a dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tli.inject.memory import inject_in_memory
    from tli.inject.plan import Plan

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


def stop_nonfinite(trial_id: str, result: dict[str, Any]) -> bool:
    """Tune stopper: a trial whose loss went NaN/inf is stopped (and recorded as failed)."""
    return bool(result.get("nonfinite"))


def trial_name(trial: Any) -> str:
    return trial.config["point"]["name"]


def trial_driver(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: run the ``tli train`` per-worker loop on this point's upscaled model."""
    import ray.tune

    from tli.inject.plan import make_plan
    from tli.train.worker import make_trainer

    p = dict(config["point"])
    p.pop("name", None)
    point = SearchPoint(**p)
    run = RunConfig.model_validate(shared["run_config"])
    train = trial_train_config(run, point)
    plan = make_plan(shared["num_layers"], point.inject_config(run.inject))
    name = ray.tune.get_context().get_trial_name()
    feed = None
    if shared.get("train_index") is not None:
        from tli.data.stream import feed_spec

        feed = feed_spec(shared["train_index"], train, 0, shared.get("cache_node"))
    loop_config = {
        "train": train.model_dump(mode="json"),
        "base_dir": shared["base_dir"],
        "plan": plan.to_dict(),
        "train_blocks": shared.get("train_blocks"),
        "val_blocks": shared["val_blocks"],
        "new_layers": list(plan.new_layers),
        "threads": shared["plan"].threads,
        "report_every": run.tune.trial.validation.every or point.steps,
    }
    storage = shared["train_storage"]  # a folder, or an s3:// URI under runtime.storage
    report = _report_callback(point.compute_ratio)
    trainer = make_trainer(loop_config, train, shared["plan"], storage=storage, name=name,
                           callbacks=[report], feed=feed)  # fmt: skip
    try:
        trainer.fit()
    finally:
        # The final checkpoint holds the trial's weights: not an output of the search.
        remote.remove_tree(remote.location_join(storage, name))
