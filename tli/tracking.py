"""Experiment tracking: MLflow runs and TensorBoard event files for the train, tune and eval stages.

Tracking is opt-in. :func:`tracking_uri` returns the configured ``tracking.mlflow_uri`` or the
``MLFLOW_TRACKING_URI`` environment variable, else ``None``; with ``None`` every ``log_*``
function returns at once and mlflow is never imported (it costs seconds to import).

**After the fact.** The stages already write their records (the step history, the trials,
lm-eval's ``results.json``...). :func:`log_train`, :func:`log_tune` and :func:`log_eval` log such
a finished record set in one go, from the process that owns the stage (the driver, the KFP
component), never from Ray workers: nothing depends on which node or rank a worker runs on,
a retried or resumed worker cannot log twice, and an MLflow metric history equals the stage's
records exactly (same steps, same values, the record's ``wall_time`` as timestamp). A stage
whose version was already logged is not logged again (see ``reuse``). The same holds for
:func:`tensorboard_train` / :func:`tensorboard_tune` (event files, exact float64 values).

**Live.** For watching a search while it runs, :func:`tune_callbacks` gives a Ray Tune callback
that logs each trial's reports as they arrive (one nested MLflow run per trial). Use it *or*
:func:`log_tune` for a search, not both: each makes its own runs.

Ray's own integrations, and where they fit (checked against ray 2.60):

- ``ray.air.integrations.mlflow.setup_mlflow`` starts a fluent MLflow run *inside* a trainable
  or a Train worker. It does not fit: tli logs from the owner of the records, not from workers
  (every rank would log, and a restarted worker opens a second run).
- ``ray.air.integrations.mlflow.MLflowLoggerCallback`` logs live per trial, on the driver: the
  right place. Used as is it does not fit tli's records: its step is ``timesteps_total`` or else
  Tune's ``training_iteration`` (1, 2, 3 per report, not the optimizer step: tli reports every
  ``eval_every`` steps); it logs every numeric key of the result, Ray's bookkeeping included
  (``time_this_iter_s``, ``pid``, ``done``...), one request per metric; the trial runs are not
  nested under a run for the search; it sets mlflow's process-global tracking URI and
  experiment; it flattens the config with ``/``. :func:`tune_callbacks` therefore builds on the
  same public hook (``ray.tune.logger.LoggerCallback``) with this module's MLflow logger: the
  step is the record's ``step``, the metrics are what the trial reported, one batch request per
  report, trial runs nested under one search run, no global state.
- ``ray.tune.logger.TBXLoggerCallback`` is added by Tune on its own (unless
  ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``): each trial folder already gets live event files,
  tags ``ray/tune/<key>``, step = ``training_iteration``, float32 values.
  :func:`tensorboard_tune` writes the finished search with tli's steps and exact values.

MLflow facts this module relies on (mlflow-skinny 3.17.2, checked):

- Limits (``mlflow.utils.validation``): param values 6000 characters, tag values 8000 (longer
  ones are truncated here, explicitly, as MLflow would by default), keys 250; ``log_batch``
  takes at most 1000 metrics, 100 params and 100 tags (1000 entities) per call.
- HTTP: by default a request is retried 7 times with backoff factor 2 and a 120 s timeout: a
  refused connection took 247 s to fail here, a silent host would take longer. Every call
  made here runs with
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` / ``_TIMEOUT`` bounded (values the
  user set are kept), and the first request to a server is made with no retry at all: a server
  that does not answer is one :class:`~tli.errors.TliError` within seconds.
- ``file:`` stores are in maintenance mode and refused unless ``MLFLOW_ALLOW_FILE_STORE=true``;
  it is set for the calls made here (a reader, e.g. ``mlflow ui``, needs it too). Prefer
  ``sqlite:///path.db`` or a server. ``sqlite:`` needs SQLAlchemy and alembic, which
  mlflow-skinny does not bring; ``mlflow server`` needs the full ``mlflow`` package.
- SQL stores (``sqlite:``, a server) keep NaN but store +-inf as +-1.797e308; ``file:`` keeps inf.
- MLflow's telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY=true`` unless set) before
  mlflow is first imported: clusters rarely allow the egress, and it is not ours to send.
- URIs may carry ``user:password@``; messages only ever show :func:`mask_uri`'s form, and no
  URI is logged as a param or tag.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from tli.errors import TliError

URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "tli"

Status = Literal["FINISHED", "FAILED", "KILLED"]
STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")

# MLflow 3.17's limits (mlflow/utils/validation.py: checked by the client, and by the SQL store
# behind a server).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100

# Record keys with a role of their own: the x axis and the timestamp, never metrics.
STEP_KEY = "step"
TIME_KEY = "wall_time"

TAG_STAGE = "tli.stage"
TAG_VERSION = "tli.version"
TAG_PIPELINE_RUN_ID = "tli.pipeline_run_id"
TAG_PIPELINE_RUN_NAME = "tli.pipeline_run_name"
TAG_BEST_TRIAL = "tli.best_trial"
TAG_TRIAL_STATUS = "tli.trial_status"
TAG_ERROR = "tli.error"
TAG_PARENT = "mlflow.parentRunId"  # what the MLflow UI nests runs by
_IDENTITY_TAGS = (TAG_STAGE, TAG_VERSION, TAG_PIPELINE_RUN_ID, TAG_PIPELINE_RUN_NAME)

# tli's trial statuses -> MLflow's run statuses. An ASHA stop is a normal end of a trial.
TRIAL_STATUS: dict[str, Status] = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "failed": "FAILED",
}

# Bounded HTTP for every MLflow call made here (MLflow's defaults: 7 retries, backoff 2,
# 120 s timeout, i.e. minutes per call against a dead server). The first request to a server
# gets no retry at all, so an unreachable one fails fast.
_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_PROBE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

# Ray Tune's own result keys (ray.tune.result.AUTO_RESULT_KEYS and friends): not tli metrics.
_RAY_RESULT_KEYS = frozenset(
    {
        "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore",
        "timesteps_total", "timesteps_since_restore", "iterations_since_restore",
        "episodes_total", "timestamp", "date", "pid", "hostname", "node_ip", "config",
        "trial_id", "experiment_id", "experiment_tag", "done", "checkpoint_dir_name",
        "should_checkpoint",
    }
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Configuration, names, values


def tracking_uri(configured: str | None) -> str | None:
    """The MLflow tracking URI to use, or ``None`` when tracking is off.

    Args:
        configured: ``tracking.mlflow_uri`` from the run config (wins when set).

    Returns:
        ``configured``, else the ``MLFLOW_TRACKING_URI`` environment variable, else ``None``.
        Blank values count as unset.
    """
    for value in (configured, os.environ.get(URI_ENV)):
        if value is not None and value.strip():
            return value.strip()
    return None


_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def mask_uri(text: str) -> str:
    """``text`` with the credentials of every URI in it masked (``http://***@host``).

    Args:
        text: A URI, or a message that may contain URIs.

    Returns:
        The text with each ``user:password@`` (or ``token@``) replaced by ``***@``.
    """
    return _USERINFO.sub("***@", text)


def stage_tags(
    stage: str,
    version: str,
    *,
    pipeline_run_id: str | None = None,
    pipeline_run_name: str | None = None,
) -> dict[str, str]:
    """The tags every tli run carries: the stage, its store version and the pipeline run.

    Args:
        stage: The stage name (``train``, ``tune``, ``eval``...).
        version: The stage's store version (16 hex digits).
        pipeline_run_id: The KFP run id, when run inside a pipeline.
        pipeline_run_name: The KFP run name, when run inside a pipeline.

    Returns:
        Tags for ``tags=`` of the logging functions (absent values are left out).
    """
    tags = {TAG_STAGE: stage, TAG_VERSION: version}
    if pipeline_run_id is not None:
        tags[TAG_PIPELINE_RUN_ID] = pipeline_run_id
    if pipeline_run_name is not None:
        tags[TAG_PIPELINE_RUN_NAME] = pipeline_run_name
    return tags


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as one flat dict: ``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``.

    Args:
        params: A (nested) mapping, e.g. the resolved run config.
        prefix: Prepended to every key (used by the recursion).

    Returns:
        Dotted keys to leaf values; ``None`` leaves are dropped (MLflow has no null).
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif value is not None:
            flat[name] = value
    return flat


def param_value(value: Any) -> str:
    """How a param value is written to MLflow: strings as is, lists/tuples as JSON, else ``str``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return json.dumps(list(value), default=str)
    return str(value)


def _is_number(value: Any) -> bool:
    # numbers.Real takes numpy scalars too (Ray results carry them). bool is an int: flags are
    # not series (MLflow itself refuses bool metrics).
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_time(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one record: its numeric values, without ``step`` and ``wall_time``.

    Args:
        record: One stage record (a train step, a trial report).

    Returns:
        Key -> float; ``None``, strings and booleans are skipped.
    """
    return {
        k: float(v) for k, v in record.items() if k not in (STEP_KEY, TIME_KEY) and _is_number(v)
    }


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def eval_metrics(results: Mapping[str, Any], heldout: Mapping[str, Any] | None) -> dict[str, float]:
    """The metrics of an evaluation: lm-eval's per-task values plus the held-out ones.

    ``results["results"][task]["acc,none"]`` -> ``<task>/acc``; a filter other than ``none``
    becomes a path level (``gsm8k/strict-match/exact_match``); non-numeric values (aliases,
    ``"N/A"`` stderrs) are skipped. ``results["n-samples"][task]["effective"]`` ->
    ``<task>/n_samples``. Each numeric held-out value -> ``heldout/<key>``.

    Args:
        results: lm-eval's results dict (``results.json``).
        heldout: The held-out evaluation (``loss``, ``perplexity``, ``bits_per_byte``...).

    Returns:
        Metric name -> value, names sorted.
    """
    out: dict[str, float] = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in values.items():
            if not _is_number(value):
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" if filt in ("", "none") else f"{task}/{filt}/{metric}"
            out[_BAD_KEY_CHARS.sub("_", name)] = float(value)
    for task, counts in (results.get("n-samples") or {}).items():
        if isinstance(counts, Mapping) and _is_number(counts.get("effective")):
            out[_BAD_KEY_CHARS.sub("_", f"{task}/n_samples")] = float(counts["effective"])
    for key, value in (heldout or {}).items():
        if _is_number(value):
            out[f"heldout/{key}"] = float(value)
    return dict(sorted(out.items()))


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The useful end of an exception message, masked, on one line."""
    msg = mask_uri(" ".join(str(err).split())) or type(err).__name__
    errno = re.findall(r"\[Errno -?\d+\] ([^'\")]+)", msg)
    if errno:  # urllib3's chain of wrappers ends in the one thing that matters
        return errno[-1].strip()
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# The tracker protocol


@dataclass(frozen=True)
class RunHandle:
    """What a tracker started: enough to nest runs under it and to point a user at it.

    Attributes:
        name: The run name.
        mlflow_run_id: The MLflow run id (``None`` without MLflow).
        mlflow_experiment_id: The MLflow experiment id.
        tensorboard_dir: The folder of the run's event files (``None`` without TensorBoard).
        url: The run's page on an MLflow server (credentials masked), else ``None``.
        reused: True when an identical, finished run was found and nothing was logged.
    """

    name: str
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    tensorboard_dir: Path | None = None
    url: str | None = None
    reused: bool = False


class Tracker(Protocol):
    """One run at a time: ``start``, log any number of metrics, ``end``."""

    def start(
        self,
        run_name: str,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        nested_under: RunHandle | None = None,
    ) -> RunHandle:
        """Start a run (params may be nested; they are flattened)."""
        ...

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, *, wall_time: float | None = None
    ) -> None:
        """Log metrics at ``step``, stamped ``wall_time`` (unix seconds; now when ``None``)."""
        ...

    def log_history(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Log whole records (``step``, ``wall_time`` and metrics each), in as few calls as can."""
        ...

    def end(self, status: Status = "FINISHED") -> None:
        """End the run with ``status``."""
        ...


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")


def _step_of(record: Mapping[str, Any]) -> int:
    step = record.get(STEP_KEY)
    if not _is_number(step) or int(step) != step:
        raise TliError(f"record has no integer {STEP_KEY!r}: {dict(record)!r:.200}")
    return int(step)


# --------------------------------------------------------------------------------------------
# MLflow


@contextlib.contextmanager
def _mlflow_env(uri: str, probe: bool = False) -> Iterator[None]:
    """Environment for tli's MLflow calls: bounded HTTP, file stores allowed; restored after."""
    wanted = dict(_HTTP_ENV)
    if uri.startswith("file:") or "://" not in uri:  # a plain path is a file store too
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    saved = {k: os.environ.get(k) for k in (*wanted, *_PROBE_ENV)}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)  # what the user set wins...
    if probe:
        os.environ.update(_PROBE_ENV)  # ...except for the first, fail-fast request
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_mlflow() -> Any:
    # Telemetry is read when mlflow is imported: switch it off first (unless the user set it).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def _is_store_error(err: BaseException) -> bool:
    """Errors from the store behind a URI (the user's input), as opposed to bugs here."""
    from mlflow.exceptions import MlflowException

    root = type(err).__module__.split(".")[0]
    return isinstance(err, MlflowException | OSError) or root in ("sqlalchemy", "requests")


class MlflowTracker:
    """A :class:`Tracker` logging to MLflow through ``MlflowClient`` (no fluent, global state).

    Args:
        uri: The tracking URI (``file:``, ``sqlite:``, ``http(s)://``...).
        experiment: The experiment name (created when missing).
    """

    def __init__(self, uri: str, experiment: str = DEFAULT_EXPERIMENT) -> None:
        self.uri = uri
        self.experiment = experiment
        self._client: Any = None
        self._experiment_id: str | None = None
        self._run_id: str | None = None
        self._kept_end_ms: int | None = None

    # -- plumbing

    @contextlib.contextmanager
    def _calls(self, what: str, probe: bool = False) -> Iterator[None]:
        """Run MLflow calls with tli's environment; store errors become one TliError line."""
        with _mlflow_env(self.uri, probe=probe):
            try:
                yield
            except TliError:
                raise
            except Exception as err:
                if not _is_store_error(err):
                    raise
                where = mask_uri(self.uri)
                if probe and self.uri.startswith(("http://", "https://")):
                    raise TliError(
                        f"MLflow tracking server {where} does not answer ({_one_line(err)}): "
                        f"start it or fix tracking.mlflow_uri / {URI_ENV} (unset both to turn "
                        "tracking off)"
                    ) from None
                raise TliError(
                    f"MLflow tracking at {where}: {what} failed ({_one_line(err)}): check the "
                    f"store, or fix tracking.mlflow_uri / {URI_ENV}"
                ) from None

    def _connect(self) -> None:
        """Client and experiment id, once; the first request is the fail-fast probe."""
        if self._experiment_id is not None:
            return
        _import_mlflow()
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        with self._calls(f"opening experiment {self.experiment!r}", probe=True):
            client = MlflowClient(tracking_uri=self.uri)
            exp = client.get_experiment_by_name(self.experiment)
        with self._calls(f"creating experiment {self.experiment!r}"):
            if exp is None:
                try:
                    exp_id = client.create_experiment(self.experiment)
                except MlflowException as err:
                    # Two stages starting at once: the other one created it first.
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp_id = client.get_experiment_by_name(self.experiment).experiment_id
            elif exp.lifecycle_stage != "active":
                raise TliError(
                    f"MLflow experiment {self.experiment!r} at {mask_uri(self.uri)} is deleted: "
                    "restore it (mlflow experiments restore) or choose another experiment"
                )
            else:
                exp_id = exp.experiment_id
        self._client, self._experiment_id = client, exp_id

    def _url(self, run_id: str) -> str | None:
        if not self.uri.startswith(("http://", "https://")):
            return None
        return f"{mask_uri(self.uri).rstrip('/')}/#/experiments/{self._experiment_id}/runs/{run_id}"

    def _handle(self, name: str, run_id: str, reused: bool = False) -> RunHandle:
        return RunHandle(
            name=name,
            mlflow_run_id=run_id,
            mlflow_experiment_id=self._experiment_id,
            url=self._url(run_id),
            reused=reused,
        )

    @property
    def run_id(self) -> str | None:
        """The id of the run started and not yet ended (``None`` between runs)."""
        return self._run_id

    def _require_run(self) -> str:
        if self._run_id is None:
            raise RuntimeError("MlflowTracker: no run started (call start() first)")
        return self._run_id

    # -- the protocol

    def start(
        self,
        run_name: str,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        nested_under: RunHandle | None = None,
        start_time: float | None = None,
    ) -> RunHandle:
        """Create the run with its tags and (flattened) params.

        Args:
            run_name: The run name.
            params: The run's parameters (nested sections are flattened with ``.``).
            tags: Tags, e.g. :func:`stage_tags`.
            nested_under: The parent run (sets ``mlflow.parentRunId``).
            start_time: Unix seconds the run started at (now when ``None``).

        Returns:
            The run's handle.
        """
        from mlflow.entities import Param

        self._connect()
        all_tags = {k: str(v) for k, v in tags.items()}
        if nested_under is not None and nested_under.mlflow_run_id is not None:
            all_tags[TAG_PARENT] = nested_under.mlflow_run_id
        flat = {k: param_value(v) for k, v in flatten_params(params).items()}
        for key in (*flat, *all_tags):
            if len(key) > MAX_KEY:
                raise TliError(f"MLflow keys are at most {MAX_KEY} characters: {key[:60]!r}...")
        # Truncated here rather than by MLflow: the same result whatever the client settings
        # (MLFLOW_TRUNCATE_LONG_VALUES) or server version.
        param_list = [Param(k, v[:MAX_PARAM_VALUE]) for k, v in flat.items()]
        with self._calls(f"creating run {run_name!r}"):
            # Tags (the parent's id among them) come with the run: it is never seen un-nested.
            run = self._client.create_run(
                self._experiment_id,
                start_time=None if start_time is None else _ms(start_time),
                tags={k: v[:MAX_TAG_VALUE] for k, v in all_tags.items()},
                run_name=run_name,
            )
        self._run_id = run.info.run_id
        try:
            with self._calls(f"logging the params of run {run_name!r}"):
                for i in range(0, len(param_list), MAX_PARAMS_TAGS_PER_BATCH):
                    chunk = param_list[i : i + MAX_PARAMS_TAGS_PER_BATCH]
                    self._client.log_batch(self._run_id, params=chunk)
        except BaseException:
            _end_quietly(self, "FAILED")
            raise
        return self._handle(run_name, self._run_id)

    def find_finished(
        self, run_name: str, tags: Mapping[str, str], nested_under: RunHandle | None = None
    ) -> RunHandle | None:
        """A finished run of this experiment with this name and the same identity tags.

        Identity = ``tli.stage``, ``tli.version``, ``tli.pipeline_run_id``,
        ``tli.pipeline_run_name`` (equal, or absent on both) and the parent. Only looked for when
        ``tags`` has a ``tli.version``: a stage version's records never change.
        """
        if TAG_VERSION not in tags or any("'" in str(v) for v in (run_name, tags[TAG_VERSION])):
            return None
        self._connect()
        wanted = {k: str(tags[k]) for k in _IDENTITY_TAGS if k in tags}
        if nested_under is not None and nested_under.mlflow_run_id is not None:
            wanted[TAG_PARENT] = nested_under.mlflow_run_id
        query = (
            f"attributes.run_name = '{run_name}' and tags.`{TAG_VERSION}` = "
            f"'{tags[TAG_VERSION]}' and attributes.status = 'FINISHED'"
        )
        with self._calls(f"looking for run {run_name!r}"):
            runs = self._client.search_runs([self._experiment_id], query, max_results=50)
        for run in runs:
            have = run.data.tags
            if all(have.get(k) == wanted.get(k) for k in (*_IDENTITY_TAGS, TAG_PARENT)):
                return self._handle(run_name, run.info.run_id, reused=True)
        return None

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, *, wall_time: float | None = None
    ) -> None:
        """Log ``metrics`` at ``step`` in one request (``None`` values skipped)."""
        self.log_history([{**metrics, STEP_KEY: step, TIME_KEY: wall_time}])

    def log_history(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Log records with ``log_batch``, 1000 metrics per request."""
        from mlflow.entities import Metric

        run_id = self._require_run()
        now = _ms(time.time())
        metrics = []
        for rec in records:
            step = _step_of(rec)
            wall = rec.get(TIME_KEY)
            ts = _ms(wall) if _is_time(wall) else now
            metrics += [Metric(k, v, ts, step) for k, v in record_metrics(rec).items()]
        with self._calls("logging metrics"):
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self._client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add tags to the current run (e.g. the best trial, known only at the end)."""
        from mlflow.entities import RunTag

        run_id = self._require_run()
        tag_list = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        with self._calls("setting tags"):
            for i in range(0, len(tag_list), MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(run_id, tags=tag_list[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def end(
        self, status: Status = "FINISHED", *, end_time: float | None = None,
        keep_end_time: bool = False,
    ) -> None:  # fmt: skip
        """Mark the run ended (``end_time`` in unix seconds; now when ``None``).

        ``keep_end_time``: a run taken up again with :meth:`resume` keeps the end time it had.
        """
        _check_status(status)
        run_id = self._require_run()
        ms = None if end_time is None else _ms(end_time)
        if ms is None and keep_end_time:
            ms = self._kept_end_ms
        with self._calls("ending the run"):
            self._client.set_terminated(run_id, status=status, end_time=ms)
        self._run_id = None

    def resume(self, run_id: str) -> None:
        """Take up an existing run again (to add tags or change its status)."""
        self._connect()
        with self._calls(f"reading run {run_id}"):
            info = self._client.get_run(run_id).info
        self._run_id, self._kept_end_ms = run_id, info.end_time

    def _identity_query(self, run_name: str, tags: Mapping[str, str]) -> str | None:
        key = TAG_VERSION if TAG_VERSION in tags else TAG_STAGE
        if key not in tags or any("'" in str(v) for v in (run_name, tags[key])):
            return None
        return f"attributes.run_name = '{run_name}' and tags.`{key}` = '{tags[key]}'"

    def latest_run(self, run_name: str, tags: Mapping[str, str]) -> RunHandle | None:
        """The newest top-level run (any status) of this name with the same identity tags."""
        query = self._identity_query(run_name, tags)
        if query is None:
            return None
        self._connect()
        wanted = {k: str(tags[k]) for k in _IDENTITY_TAGS if k in tags}
        with self._calls(f"looking for run {run_name!r}"):
            runs = self._client.search_runs([self._experiment_id], query, max_results=50,
                                            order_by=["attributes.start_time DESC"])  # fmt: skip
        for run in runs:
            have = run.data.tags
            if TAG_PARENT not in have and all(have.get(k) == wanted.get(k) for k in _IDENTITY_TAGS):
                return self._handle(run_name, run.info.run_id)
        return None

    def child_runs(self, parent: RunHandle) -> dict[str, str]:
        """``{run name: run id}`` of the runs nested under ``parent`` (the newest of a name)."""
        self._connect()
        query = f"tags.`{TAG_PARENT}` = '{parent.mlflow_run_id}'"
        with self._calls("listing nested runs"):
            runs = self._client.search_runs([self._experiment_id], query, max_results=1000,
                                            order_by=["attributes.start_time DESC"])  # fmt: skip
        out: dict[str, str] = {}
        for run in runs:
            out.setdefault(run.info.run_name, run.info.run_id)
        return out


# --------------------------------------------------------------------------------------------
# TensorBoard


def _safe_dirname(name: str) -> str:
    cleaned = re.sub(r"[^\w.\-=,+]", "_", name).strip(".")
    return cleaned or "run"


class TensorBoardTracker:
    """A :class:`Tracker` writing TensorBoard event files (tensorboardX, no TensorFlow).

    A top-level run writes into ``logdir`` itself, a nested run into ``<parent's dir>/<name>``
    (TensorBoard shows each folder as a run). Scalars are written as float64 tensor summaries
    of the ``scalars`` plugin (what ``torch.utils.tensorboard`` writes with
    ``double_precision=True``), so the values read back equal the records exactly (tensorboardX's
    ``add_scalar`` would round them to float32). Params become the HParams dashboard's
    hyperparameters, written at :meth:`end` with the metric names seen; tags are not written
    (TensorBoard has no place for them). Files hold nothing but the records: the same records
    give the same bytes, apart from the timestamps (the file-version event's, and any record's
    without a ``wall_time``) and the file name.

    Args:
        logdir: The folder for the top-level run (created).
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self._writer: Any = None
        self._dir: Path | None = None
        self._params: dict[str, Any] = {}
        self._metric_names: set[str] = set()
        self._last_wall: float | None = None

    def start(
        self,
        run_name: str,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        nested_under: RunHandle | None = None,
    ) -> RunHandle:
        """Open the run's event file (refused if the folder already has one)."""
        from tensorboardX import FileWriter

        if nested_under is not None and nested_under.tensorboard_dir is not None:
            folder = nested_under.tensorboard_dir / _safe_dirname(run_name)
        else:
            folder = self.logdir
        if folder.is_dir() and any(folder.glob("events.out.tfevents.*")):
            raise TliError(
                f"{folder} already has TensorBoard event files: remove them or choose another "
                "folder (a second file would mix two runs in one TensorBoard run)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        # A long flush interval: everything is flushed at end(); no background writes meanwhile.
        self._writer = FileWriter(str(folder), max_queue=1000, flush_secs=3600)
        self._dir = folder
        self._params = flatten_params(params)
        self._metric_names = set()
        self._last_wall = None
        return RunHandle(name=run_name, tensorboard_dir=folder)

    def _require_writer(self) -> Any:
        if self._writer is None:
            raise RuntimeError("TensorBoardTracker: no run started (call start() first)")
        return self._writer

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, *, wall_time: float | None = None
    ) -> None:
        """One event per call: all of ``metrics`` (sorted by name) at ``step``."""
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboardX.proto.tensor_pb2 import TensorProto
        from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

        writer = self._require_writer()
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if not values:
            return
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
        summary = Summary(
            value=[
                Summary.Value(
                    tag=key,
                    metadata=meta,
                    tensor=TensorProto(
                        dtype="DT_DOUBLE", double_val=[val], tensor_shape=TensorShapeProto()
                    ),
                )
                for key, val in sorted(values.items())
            ]
        )
        wall = time.time() if wall_time is None else float(wall_time)
        writer.add_summary(summary, global_step=int(step), walltime=wall)
        self._metric_names.update(values)
        self._last_wall = wall

    def log_history(self, records: Sequence[Mapping[str, Any]]) -> None:
        """One event per record."""
        for rec in records:
            wall = rec.get(TIME_KEY)
            self.log_metrics(
                record_metrics(rec), _step_of(rec), wall_time=wall if _is_time(wall) else None
            )

    def end(self, status: Status = "FINISHED") -> None:
        """Write the hparams session (when there are params), flush and close."""
        _check_status(status)
        writer = self._require_writer()
        if self._params:
            for summary in _hparams_summaries(self._params, sorted(self._metric_names), status):
                writer.add_summary(summary, walltime=self._last_wall)
        writer.flush()
        writer.close()
        self._writer = None


def _hparams_summaries(params: Mapping[str, Any], metrics: Sequence[str], status: str) -> list:
    """The HParams plugin's experiment, session-start and session-end summaries."""
    from tensorboardX.proto.api_pb2 import Status as TbStatus
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboardX.summary import hparams

    typed = {
        k: v if isinstance(v, str | bool | int | float) else param_value(v)
        for k, v in params.items()
    }
    exp, ssi, _ = hparams(typed, {m: 0.0 for m in metrics})  # metric values are not used
    # tensorboardX always reports success: say how the run really ended.
    tb_status = {"FINISHED": "STATUS_SUCCESS", "FAILED": "STATUS_FAILURE"}.get(
        status, "STATUS_UNKNOWN"
    )
    content = HParamsPluginData(
        session_end_info=SessionEndInfo(status=TbStatus.Value(tb_status)), version=0
    )
    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name="hparams", content=content.SerializeToString()
        )
    )
    sei = Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=meta)])
    return [exp, ssi, sei]


# --------------------------------------------------------------------------------------------
# Fan-out and run scope


class FanOutTracker:
    """A :class:`Tracker` that forwards every call to several trackers (MLflow and TensorBoard).

    Args:
        trackers: The trackers, called in this order.
    """

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def start(
        self,
        run_name: str,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        nested_under: RunHandle | None = None,
    ) -> RunHandle:
        """Start the run everywhere; the handle combines theirs."""
        handle = RunHandle(name=run_name)
        for tracker in self.trackers:
            got = tracker.start(run_name, params=params, tags=tags, nested_under=nested_under)
            handle = replace(
                handle,
                **{
                    k: getattr(got, k)
                    for k in ("mlflow_run_id", "mlflow_experiment_id", "tensorboard_dir", "url")
                    if getattr(got, k) is not None
                },
            )
        return handle

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, *, wall_time: float | None = None
    ) -> None:
        """Log everywhere."""
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step, wall_time=wall_time)

    def log_history(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Log everywhere."""
        for tracker in self.trackers:
            tracker.log_history(records)

    def end(self, status: Status = "FINISHED") -> None:
        """End everywhere (every tracker is ended even if one fails)."""
        errors = []
        for tracker in self.trackers:
            try:
                tracker.end(status)
            except Exception as err:  # re-raised below, once the others are ended
                errors.append(err)
        if errors:
            raise errors[0]


def open_tracker(
    mlflow_uri: str | None,
    tensorboard_dir: str | Path | None = None,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
) -> Tracker | None:
    """The tracker for what is configured: MLflow, TensorBoard, both (fan-out) or none.

    Args:
        mlflow_uri: From :func:`tracking_uri`; ``None`` = no MLflow.
        tensorboard_dir: Folder for event files; ``None`` = no TensorBoard.
        experiment: The MLflow experiment.

    Returns:
        A tracker, or ``None`` when nothing is configured.
    """
    trackers: list[Tracker] = []
    if mlflow_uri is not None:
        trackers.append(MlflowTracker(mlflow_uri, experiment))
    if tensorboard_dir is not None:
        trackers.append(TensorBoardTracker(tensorboard_dir))
    if not trackers:
        return None
    return trackers[0] if len(trackers) == 1 else FanOutTracker(trackers)


@contextlib.contextmanager
def tracked_run(
    tracker: Tracker,
    run_name: str,
    *,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    nested_under: RunHandle | None = None,
) -> Iterator[RunHandle]:
    """A run as a ``with`` block: ended FINISHED, FAILED on an exception, KILLED on Ctrl-C.

    Args:
        tracker: The tracker.
        run_name: The run name.
        params: The run's parameters.
        tags: The run's tags.
        nested_under: The parent run.

    Yields:
        The run's handle.
    """
    handle = tracker.start(run_name, params=params, tags=tags, nested_under=nested_under)
    try:
        yield handle
    except KeyboardInterrupt:
        _end_quietly(tracker, "KILLED")
        raise
    except BaseException:
        _end_quietly(tracker, "FAILED")
        raise
    tracker.end("FINISHED")


def _end_quietly(tracker: Tracker, status: Status) -> None:
    """End a run that is failing anyway: an error here must not hide the one that matters."""
    with contextlib.suppress(Exception):
        tracker.end(status)


# --------------------------------------------------------------------------------------------
# Whole record sets, after the fact


def _time_span(history: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """(start, end) unix seconds of a history: the first step's end minus its elapsed, the last
    step's end. So the run's duration in the MLflow UI is the training's."""
    walls = [r for r in history if _is_time(r.get(TIME_KEY))]
    if not walls:
        return None, None
    first, last = walls[0], walls[-1]
    elapsed = first.get("elapsed")
    start = first[TIME_KEY] - elapsed if _is_time(elapsed) else first[TIME_KEY]
    return float(start), float(last[TIME_KEY])


def log_train(
    uri: str | None,
    *,
    run_name: str,
    params: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    final: Mapping[str, Any] | None,
    tags: Mapping[str, str],
    experiment: str = DEFAULT_EXPERIMENT,
    status: Status = "FINISHED",
    reuse: bool = True,
) -> RunHandle | None:
    """Log a training run: config as params, every step record as metrics, the final results.

    Each record's numeric values (``loss``, ``lr``, ``grad_norm``, ``tokens``, ``mfu``,
    ``val_loss``...) become metric points at the record's ``step``, stamped with its
    ``wall_time``; ``None`` values are skipped. ``final`` is logged as ``final/<key>`` with the
    ``final_`` prefix dropped (``final/loss``, ``final/steps``...), at the last step, so it never
    adds a point to a history.

    Args:
        uri: From :func:`tracking_uri`; ``None`` = tracking off (returns ``None`` at once).
        run_name: The run name.
        params: The resolved config (nested sections; flattened to ``train.lr``...).
        history: One dict per optimizer step (``step``, ``wall_time``, metrics).
        final: The final results (``final_loss``, ``final_val_loss``, ``steps``...).
        tags: :func:`stage_tags` and any others.
        experiment: The MLflow experiment.
        status: How the training ended.
        reuse: Return the existing run instead when this stage version was logged already.

    Returns:
        The run's handle, or ``None`` when tracking is off.
    """
    if uri is None:
        return None
    tracker = MlflowTracker(uri, experiment)
    if reuse and (found := tracker.find_finished(run_name, tags)) is not None:
        return found
    last_step = max((_step_of(r) for r in history), default=0)  # bad records: before any run
    start, end = _time_span(history)
    handle = tracker.start(run_name, params=params, tags=tags, start_time=start)
    try:
        tracker.log_history(history)
        if final:
            finals = {f"final/{k.removeprefix('final_')}": v for k, v in final.items()}
            tracker.log_metrics(finals, last_step, wall_time=end)
    except BaseException:
        _end_quietly(tracker, "FAILED")
        raise
    tracker.end(status, end_time=end)
    return handle


def _trial_history(trial: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(trial.get("history") or [])


def log_tune(
    uri: str | None,
    *,
    search_name: str,
    params: Mapping[str, Any],
    trials: Sequence[Mapping[str, Any]],
    best: str | None,
    tags: Mapping[str, str],
    experiment: str = DEFAULT_EXPERIMENT,
    reuse: bool = True,
) -> RunHandle | None:
    """Log a search: one parent run, one nested run per trial (``mlflow.parentRunId``).

    Each trial is a mapping with ``name``, ``params`` (flat or nested), ``status``
    (``completed`` / ``stopped`` -> FINISHED, ``failed`` -> FAILED, anything else -> KILLED,
    also kept as tag ``tli.trial_status``), ``history`` (records with ``step`` and metrics such
    as ``loss``, ``val_loss``, ``objective``) and optionally ``error`` (tag ``tli.error``).
    The parent carries ``params`` and the tag ``tli.best_trial``; it is ended last, so a
    FINISHED parent means every trial was logged.

    Args:
        uri: From :func:`tracking_uri`; ``None`` = tracking off.
        search_name: The parent run's name.
        params: The search's resolved config.
        trials: The trials, in any order (logged in this order).
        best: The best trial's name (``None`` when every trial failed).
        tags: :func:`stage_tags` and any others; each trial run gets them too.
        experiment: The MLflow experiment.
        reuse: Return the existing parent instead when this stage version was logged already.

    Returns:
        The parent run's handle, or ``None`` when tracking is off.
    """
    if uri is None:
        return None
    parent_tracker = MlflowTracker(uri, experiment)
    if reuse and (found := parent_tracker.find_finished(search_name, tags)) is not None:
        return found
    for trial in trials:  # bad records: before any run
        if "name" not in trial:
            raise TliError(f"trial without a name: {dict(trial)!r:.200}")
        for rec in _trial_history(trial):
            _step_of(rec)
    parent_tags = dict(tags)
    if best is not None:
        parent_tags[TAG_BEST_TRIAL] = best
    parent = parent_tracker.start(search_name, params=params, tags=parent_tags)
    trial_tracker = MlflowTracker(uri, experiment)  # one trial run after the other
    try:
        for trial in trials:
            history = _trial_history(trial)
            status = str(trial.get("status", ""))
            trial_tags = {**tags, TAG_TRIAL_STATUS: status}
            if trial.get("error"):
                trial_tags[TAG_ERROR] = str(trial["error"])
            start, end = _time_span(history)
            trial_tracker.start(
                str(trial["name"]),
                params=trial.get("params") or {},
                tags=trial_tags,
                nested_under=parent,
                start_time=start,
            )
            trial_tracker.log_history(history)
            trial_tracker.end(TRIAL_STATUS.get(status, "KILLED"), end_time=end)
    except BaseException:
        if trial_tracker.run_id is not None:
            _end_quietly(trial_tracker, "FAILED")
        _end_quietly(parent_tracker, "FAILED")
        raise
    parent_tracker.end("FINISHED")
    return parent


def log_eval(
    uri: str | None,
    *,
    run_name: str,
    results: Mapping[str, Any],
    heldout: Mapping[str, Any] | None,
    tags: Mapping[str, str],
    experiment: str = DEFAULT_EXPERIMENT,
    params: Mapping[str, Any] | None = None,
    reuse: bool = True,
) -> RunHandle | None:
    """Log an evaluation: every metric of :func:`eval_metrics`, at step 0.

    Args:
        uri: From :func:`tracking_uri`; ``None`` = tracking off.
        run_name: The run name (e.g. the evaluated model's name).
        results: lm-eval's results dict (``results.json``).
        heldout: The held-out loss dict (``loss``, ``perplexity``, ``bits_per_byte``...).
        tags: :func:`stage_tags` and any others.
        experiment: The MLflow experiment.
        params: The eval config, when wanted as params.
        reuse: Return the existing run instead when this stage version was logged already.

    Returns:
        The run's handle, or ``None`` when tracking is off.
    """
    if uri is None:
        return None
    tracker = MlflowTracker(uri, experiment)
    if reuse and (found := tracker.find_finished(run_name, tags)) is not None:
        return found
    metrics = eval_metrics(results, heldout)
    handle = tracker.start(run_name, params=params or {}, tags=tags)
    try:
        tracker.log_metrics(metrics, 0)
    except BaseException:
        _end_quietly(tracker, "FAILED")
        raise
    tracker.end("FINISHED")
    return handle


def tensorboard_train(
    logdir: str | Path,
    history: Sequence[Mapping[str, Any]],
    *,
    params: Mapping[str, Any] | None = None,
) -> Path:
    """Write a training history as TensorBoard event files in ``logdir``.

    Args:
        logdir: The folder (created; refused if it already has event files).
        history: One dict per optimizer step.
        params: The resolved config, shown in the HParams dashboard.

    Returns:
        ``logdir``.
    """
    tracker = TensorBoardTracker(logdir)
    with tracked_run(tracker, "train", params=params or {}, tags={}):
        tracker.log_history(history)
    return Path(logdir)


def tensorboard_tune(logdir: str | Path, trials: Sequence[Mapping[str, Any]]) -> Path:
    """Write a search as TensorBoard event files: one sub-folder per trial, named after it.

    Each trial's params (and its status, as ``status``) go to the HParams dashboard, so the
    trials can be compared there by objective.

    Args:
        logdir: The folder (created); trials go to ``<logdir>/<trial name>/``.
        trials: As for :func:`log_tune`.

    Returns:
        ``logdir``.
    """
    root = Path(logdir)
    root.mkdir(parents=True, exist_ok=True)
    parent = RunHandle(name=root.name, tensorboard_dir=root)
    for trial in trials:
        status = str(trial.get("status", ""))
        tracker = TensorBoardTracker(root)
        params = {**flatten_params(trial.get("params") or {}), "status": status}
        tracker.start(str(trial["name"]), params=params, tags={}, nested_under=parent)
        tracker.log_history(_trial_history(trial))
        tracker.end(TRIAL_STATUS.get(status, "KILLED"))
    return root


# --------------------------------------------------------------------------------------------
# Live: Ray Tune


def tune_callbacks(
    uri: str | None,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    search_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    config_key: str | None = None,
) -> list:
    """Ray Tune callbacks that log each trial live to MLflow (``[]`` when tracking is off).

    One parent run named ``search_name`` (created when the search starts, FINISHED when it
    ends), one nested run per trial named after the trial (``trial_name_creator``), with the
    trial's config flattened as params. Every report is one ``log_batch``: the reported numeric
    values (Ray's own keys left out) at the report's ``step`` (Tune's ``training_iteration``
    when it has none), stamped with its ``wall_time`` when present. Pass the list to
    ``tune.RunConfig(callbacks=...)``; the callbacks run in the driver, so ``uri`` must be
    reachable from there. A resumed search opens new runs for the trials it restarts. An MLflow
    error never stops the search: it is said once on stderr and the logging stops.

    Args:
        uri: From :func:`tracking_uri`; ``None`` = tracking off.
        experiment: The MLflow experiment.
        search_name: The parent run's name.
        tags: :func:`stage_tags` and any others (parent and trials).
        params: The search's config, as the parent's params.
        config_key: Log only ``trial.config[config_key]`` as a trial's params (tli's searches
            keep a trial's hyperparameters under ``point``); ``None`` = the whole config.

    Returns:
        The callbacks (a list of one, or empty).
    """
    if uri is None:
        return []
    logger = _trial_logger_class()(uri, experiment, search_name, dict(tags), dict(params or {}))
    logger.config_key = config_key
    return [logger]


@functools.cache
def _trial_logger_class() -> type:
    """The Ray callback class, defined on first use so that ray is imported only then.

    Long because the class body sits inside it: a module-level subclass of Ray's
    ``LoggerCallback`` would import ray with tli.tracking.
    """
    from ray.tune.logger import LoggerCallback

    class MlflowTrialLogger(LoggerCallback):
        """Live per-trial MLflow logging (see :func:`tune_callbacks`)."""

        def __init__(
            self,
            uri: str,
            experiment: str,
            search_name: str,
            tags: dict[str, str],
            params: dict[str, Any],
        ) -> None:
            super().__init__()
            self.uri, self.experiment, self.search_name = uri, experiment, search_name
            self.tags, self.params = tags, params
            self._parent: MlflowTracker | None = None
            self._parent_handle: RunHandle | None = None
            self._trials: dict[Any, MlflowTracker] = {}
            self.config_key: str | None = None
            self._broken = False

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its run config (callbacks included) for resuming: no live clients.
            state = self.__dict__.copy()
            state.update(_parent=None, _parent_handle=None, _trials={}, _broken=False)
            return state

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update({"config_key": None, "_broken": False, **state})

        @contextlib.contextmanager
        def _guard(self, what: str) -> Iterator[None]:
            """An MLflow failure is said once and ends the live logging, never the search."""
            try:
                yield
            except Exception as err:
                if not self._broken:
                    import sys

                    sys.stderr.write(f"tli: live MLflow logging stopped: {what}: "
                                     f"{_one_line(err)}\n")  # fmt: skip
                self._broken = True

        def setup(self, *args: Any, **kwargs: Any) -> None:
            self._parent = MlflowTracker(self.uri, self.experiment)
            with self._guard("starting the search run"):
                self._parent_handle = self._parent.start(
                    self.search_name, params=self.params, tags=self.tags
                )

        def log_trial_start(self, trial: Any) -> None:
            if trial in self._trials or self._broken:
                return
            tracker = MlflowTracker(self.uri, self.experiment)
            config = trial.config
            if self.config_key is not None and isinstance(config.get(self.config_key), dict):
                config = config[self.config_key]
            with self._guard(f"starting the run of trial {trial}"):
                tracker.start(
                    str(trial), params=config, tags=self.tags, nested_under=self._parent_handle
                )
                self._trials[trial] = tracker

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            if trial not in self._trials:
                self.log_trial_start(trial)
            if trial not in self._trials:
                return
            step = result.get(STEP_KEY)
            if not _is_number(step) or int(step) != step:
                step = result.get("training_iteration", iteration)
            record = {k: v for k, v in result.items() if k not in _RAY_RESULT_KEYS}
            record[STEP_KEY] = int(step)
            with self._guard(f"logging trial {trial}"):
                self._trials[trial].log_history([record])

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            tracker = self._trials.pop(trial, None)
            if tracker is not None and tracker.run_id is not None:
                with self._guard(f"ending the run of trial {trial}"):
                    tracker.end("FAILED" if failed else "FINISHED")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            for trial in list(self._trials):
                self.log_trial_end(trial, failed=trial.status == "ERROR")
            if self._parent is not None and self._parent.run_id is not None:
                with self._guard("ending the search run"):
                    self._parent.end("FINISHED")

    return MlflowTrialLogger


# --------------------------------------------------------------------------------------------
# Stage runs: what the train, tune and eval stages call at the end of their work

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
TAG_INPUT = "tli.input."  # + input name: "stage/version" of each stored input
TB_STAGES = ("train", "tune")  # the stages with step histories for TensorBoard


@dataclass(frozen=True)
class StageTracking:
    """Where one stage run logs, and the tags that identify it.

    Attributes:
        stage: The stage name.
        version: Its store version; ``None`` for a standalone command (no store).
        mlflow_uri: From :func:`tracking_uri`; ``None`` = no MLflow.
        experiment: The MLflow experiment.
        tensorboard: The root folder of event files; ``None`` = no TensorBoard.
        tags: :func:`stage_tags`, the configured extra tags and ``tli.input.<name>``.
        inputs: ``{input name: "stage/version"}`` of its stored inputs.
    """

    stage: str
    version: str | None = None
    mlflow_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    tensorboard: Path | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)

    @property
    def on(self) -> bool:
        """Whether anything is tracked."""
        return self.mlflow_uri is not None or self.tensorboard is not None

    def run_name(self, label: str) -> str:
        """``<stage>-<version[:8]>`` (eval: ``eval-<model's stage>-<its version[:8]>``), or
        ``<stage>-<label>`` for a standalone command."""
        model = dict(self.inputs).get("model")
        if self.stage == "eval" and model:
            up_stage, _, up_version = model.partition("/")
            return f"eval-{up_stage}-{up_version[:8]}"
        return f"{self.stage}-{self.version[:8] if self.version else label}"

    def tensorboard_dir(self, label: str) -> Path | None:
        """``<root>/<stage>/<version or label>``, or ``None`` without TensorBoard."""
        if self.tensorboard is None:
            return None
        return self.tensorboard / self.stage / _safe_dirname(self.version or label)


def stage_tracking(
    config: Any,
    *,
    stage: str,
    version: str | None = None,
    inputs: Mapping[str, str] | None = None,
    root: str | Path | None = None,
) -> StageTracking:
    """Resolve the ``tracking`` section (and the environment) for one stage run.

    Args:
        config: The ``tracking`` section (a :class:`tli.config.TrackingConfig` or its dict);
            ``None`` = the environment alone (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``).
        stage: The stage name.
        version: Its store version (``None``: a standalone command).
        inputs: ``{input name: "stage/version"}`` of its stored inputs.
        root: What a relative ``tensorboard`` folder is relative to (the store), else the
            working directory.

    Returns:
        The :class:`StageTracking`.
    """
    if config is not None and not isinstance(config, Mapping):
        config = config.model_dump(mode="json")
    config = dict(config or {})
    experiment = config.get("experiment") or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    tb = config.get("tensorboard")
    tb_dir = None
    if tb:
        tb_dir = Path(tb).expanduser()
        if not tb_dir.is_absolute():
            tb_dir = Path(root or Path.cwd()).absolute() / tb_dir
    tags = {TAG_STAGE: stage, **({TAG_VERSION: version} if version else {})}
    tags.update({str(k): str(v) for k, v in (config.get("tags") or {}).items()})
    inputs = dict(inputs or {})
    tags.update({f"{TAG_INPUT}{k}": v for k, v in inputs.items()})
    return StageTracking(stage, version, tracking_uri(config.get("mlflow_uri")), experiment,
                         tb_dir, tags, inputs)  # fmt: skip


_ACTIVE: list[StageTracking] = []  # a stack: the stage run in progress in this process


@contextlib.contextmanager
def tracking_stage(settings: StageTracking) -> Iterator[StageTracking]:
    """Make ``settings`` what the stage's ``record_*`` calls log to, for the ``with`` block.

    An MLflow server that does not answer is one :class:`TliError` here, before the stage
    does any work (not after hours of training).
    """
    if settings.mlflow_uri is not None:
        MlflowTracker(settings.mlflow_uri, settings.experiment)._connect()
    _ACTIVE.append(settings)
    try:
        yield settings
    finally:
        _ACTIVE.remove(settings)


def current(stage: str) -> StageTracking:
    """The active stage run's settings, or (a standalone command) the environment's."""
    for settings in reversed(_ACTIVE):
        if settings.stage == stage:
            return settings
    return stage_tracking(None, stage=stage)


def _say(stage: str, handle: RunHandle | None, tb: Path | None) -> None:
    parts = []
    if handle is not None:
        where = handle.url or f"run {handle.mlflow_run_id}"
        parts.append(f"MLflow {where}" + (" (logged before)" if handle.reused else ""))
    if tb is not None:
        parts.append(f"TensorBoard {tb}")
    if parts:
        print(f"tli: {stage} tracked: {'; '.join(parts)}", flush=True)


@contextlib.contextmanager
def _best_effort(stage: str) -> Iterator[None]:
    """Tracking runs after the stage's results are complete: a failure is said, not raised
    (the results are kept; failing here would throw away a finished training)."""
    try:
        yield
    except Exception as err:
        import sys

        sys.stderr.write(
            f"tli: {stage}: tracking failed ({_one_line(err)}); the stage's results are stored "
            "all the same\n"
        )


def _fresh_tb(folder: Path | None) -> Path | None:
    """``folder`` unless it already has event files (this version was logged before)."""
    if folder is None or (folder.is_dir() and any(folder.rglob("events.out.tfevents.*"))):
        return None
    return folder


def record_train(
    *,
    label: str,
    params: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    final: Mapping[str, Any] | None,
) -> None:
    """Log a finished training (``metrics.jsonl`` and ``tli_train.json``'s result).

    Args:
        label: Names the run of a standalone command (the model's folder name).
        params: The resolved train section (and what else describes the run).
        history: The step records, as written to ``metrics.jsonl``.
        final: The final results (``tli_train.json``'s ``result``).
    """
    ctx = current("train")
    if not ctx.on:
        return
    with _best_effort("train"):
        handle = log_train(ctx.mlflow_uri, run_name=ctx.run_name(label), params=params,
                           history=history, final=final, tags=ctx.tags,
                           experiment=ctx.experiment)  # fmt: skip
        tb = _fresh_tb(ctx.tensorboard_dir(label))
        if tb is not None:
            tensorboard_train(tb, history, params=params)
        _say("train", handle, tb)


def record_eval(
    *,
    label: str,
    results: Mapping[str, Any] | None,
    heldout: Mapping[str, Any] | None,
    params: Mapping[str, Any],
) -> None:
    """Log an evaluation (``results.json`` and ``heldout.json``) as one run at step 0.

    Args:
        label: Names the run of a standalone command (the model's folder name).
        results: lm-eval's results (or ``None`` without tasks).
        heldout: The held-out loss record (or ``None``).
        params: The resolved eval section.
    """
    ctx = current("eval")
    if ctx.mlflow_uri is None:
        return
    with _best_effort("eval"):
        handle = log_eval(ctx.mlflow_uri, run_name=ctx.run_name(label), results=results or {},
                          heldout=heldout, tags=ctx.tags, experiment=ctx.experiment,
                          params=params)  # fmt: skip
        _say("eval", handle, None)


def tune_trials(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tune stage's result rows (:mod:`tli.tune.results`) as :func:`log_tune`'s trials."""
    out = []
    for row in rows:
        params = {k: row.get(k) for k in ("interval", "init", "alpha", "lr")}
        params["steps"] = row.get("steps_budget")
        trial = {"name": row["trial"], "params": params, "status": row.get("status", ""),
                 "history": list(row.get("history") or [])}  # fmt: skip
        if row.get("error"):
            trial["error"] = row["error"]
        out.append(trial)
    return out


def live_tune_callbacks(*, label: str, params: Mapping[str, Any]) -> list:
    """The live per-trial MLflow logger for a tli search (``[]`` when MLflow is off).

    Args:
        label: Names the search run of a standalone command.
        params: The search's resolved config (the parent run's params).
    """
    ctx = current("tune")
    if ctx.mlflow_uri is None:
        return []
    return tune_callbacks(ctx.mlflow_uri, experiment=ctx.experiment,
                          search_name=ctx.run_name(label), tags=ctx.tags, params=params,
                          config_key="point")  # fmt: skip


def record_tune(
    *, label: str, params: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Complete the search's MLflow record and write its TensorBoard files.

    The live logger (:func:`live_tune_callbacks`) made a search run and a nested run per trial;
    this adds what only the finished search knows: each trial's tli status (``completed``,
    ``stopped`` by ASHA, ``failed`` with its error) as tag and run status, and the best trial on
    the search run. Trials the live logger has no run for (a resumed search's earlier trials)
    are logged from their records; without any live search run, the whole search is logged
    after the fact (:func:`log_tune`).

    Args:
        label: Names the search run of a standalone command.
        params: The search's resolved config.
        rows: The result rows, best first (``trials.csv`` and each trial's history).
    """
    ctx = current("tune")
    if not ctx.on:
        return
    trials = tune_trials(rows)
    best = next((r["trial"] for r in rows if r.get("objective") is not None), None)
    with _best_effort("tune"):
        handle = None
        if ctx.mlflow_uri is not None:
            name = ctx.run_name(label)
            handle = _complete_live_search(ctx, name, trials, best)
            if handle is None:
                handle = log_tune(ctx.mlflow_uri, search_name=name, params=params, trials=trials,
                                  best=best, tags=ctx.tags, experiment=ctx.experiment)  # fmt: skip
        tb = _fresh_tb(ctx.tensorboard_dir(label))
        if tb is not None:
            tensorboard_tune(tb, trials)
        _say("tune", handle, tb)


def _complete_live_search(
    ctx: StageTracking, name: str, trials: Sequence[Mapping[str, Any]], best: str | None
) -> RunHandle | None:
    """Statuses and the best trial on the live logger's runs; ``None`` when there are none."""
    parent = MlflowTracker(ctx.mlflow_uri or "", ctx.experiment)
    found = parent.latest_run(name, ctx.tags)
    if found is None:
        return None
    children = parent.child_runs(found)
    for trial in trials:
        status = str(trial.get("status", ""))
        tags = {TAG_TRIAL_STATUS: status, **({TAG_ERROR: trial["error"]} if trial.get("error")
                                               else {})}  # fmt: skip
        run_id = children.get(str(trial["name"]))
        tracker = MlflowTracker(ctx.mlflow_uri or "", ctx.experiment)
        if run_id is None:  # no live run (e.g. a trial of an earlier, interrupted attempt)
            start, end = _time_span(trial.get("history") or [])
            tracker.start(str(trial["name"]), params=trial.get("params") or {},
                          tags={**ctx.tags, **tags}, nested_under=found,
                          start_time=start)  # fmt: skip
            tracker.log_history(trial.get("history") or [])
            tracker.end(TRIAL_STATUS.get(status, "KILLED"), end_time=end)
            continue
        tracker.resume(run_id)
        tracker.set_tags(tags)
        tracker.end(TRIAL_STATUS.get(status, "KILLED"), keep_end_time=True)
    parent.resume(found.mlflow_run_id or "")
    if best is not None:
        parent.set_tags({TAG_BEST_TRIAL: best})
    parent.end("FINISHED", keep_end_time=True)
    return found


def for_stage(
    config: Any, stage: str, version: str, inputs: Sequence[Any], root: str | Path
) -> StageTracking:
    """:func:`stage_tracking` for a stage run through the store.

    Args:
        config: The ``tracking`` section.
        stage: The stage name.
        version: Its version key.
        inputs: Its :class:`tli.pipeline.store.InputRef` list (the stored ones become tags).
        root: The store (relative TensorBoard folders are inside it).
    """
    ups = {i.name: f"{i.stage}/{i.version}" for i in inputs if getattr(i, "stage", None)}
    return stage_tracking(config, stage=stage, version=version, inputs=ups, root=root)


def with_pipeline_run(
    config: Mapping[str, Any] | None, *, name: str | None = None, id: str | None = None
) -> dict[str, Any]:
    """The ``tracking`` section with the KFP run's name and id among its tags.

    Args:
        config: The ``tracking`` section as a dict.
        name: The KFP run's name (``{{$.pipeline_job_name}}``).
        id: The KFP run's id (``{{$.pipeline_job_uuid}}``).
    """
    out = dict(config or {})
    tags = dict(out.get("tags") or {})
    for key, value in ((TAG_PIPELINE_RUN_NAME, name), (TAG_PIPELINE_RUN_ID, id)):
        if value:
            tags[key] = str(value)
    out["tags"] = tags
    return out
