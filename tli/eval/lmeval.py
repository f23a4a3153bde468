"""lm-eval behind one function: :func:`run_lm_eval` on an already loaded model.

lm-eval 0.4.13 from Python: ``device`` must be given (its default is cuda), ``TaskManager(
include_path=..., include_defaults=False)`` skips indexing its ~14,700 built-in tasks when only
tli's offline tasks are asked for, and on a CPU an explicit batch size pays (see
:data:`CPU_AUTO_BATCH`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tli.eval.tasks import TASKS_DIR

# Batch size that "auto" means on a CPU: lm-eval's own search picks 64 there, which runs ~6x
# slower than 16 (the largest batch wastes time on padding and cache misses).
CPU_AUTO_BATCH = 16


class _DropHints(logging.Filter):
    """Drop lm-eval's hints that do not apply to how tli calls it."""

    HINTS = (
        "Custom kwargs can be passed",  # printed for every task with a custom loader
        "model kwarg is not of type `str`",  # we pass a loaded model on purpose
        "Passed an already-initialized model",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(h in msg for h in self.HINTS)


_DROP_HINTS = _DropHints()
_HINT_LOGGERS = ("lm_eval.api.task", "lm_eval.models.huggingface")


@contextmanager
def _quiet_lm_eval(level: int = logging.ERROR) -> Iterator[None]:
    """Silence lm-eval below ``level`` (e.g. each offline task "overrides" a built-in one)."""
    lg = logging.getLogger("lm_eval")
    old = lg.level
    lg.setLevel(level)
    added = [n for n in _HINT_LOGGERS if _DROP_HINTS not in logging.getLogger(n).filters]
    for n in added:
        logging.getLogger(n).addFilter(_DROP_HINTS)
    try:
        yield
    finally:
        lg.setLevel(old)
        for n in added:  # only what this context added: contexts nest
            logging.getLogger(n).removeFilter(_DROP_HINTS)


@contextmanager
def _no_git_describe() -> Iterator[None]:
    """Keep ``simple_evaluate`` from running ``git describe`` in the working directory.

    The commit it records (``git_hash``) is of whatever repository the process was started in,
    not of the model, the tasks or tli (``provenance.json`` records those), and outside a
    repository git prints "fatal: not a git repository" into the user's output. The result's
    ``git_hash`` is null instead.
    """
    import lm_eval.evaluator as ev

    old = ev.get_git_commit_hash
    ev.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        ev.get_git_commit_hash = old


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_batch_size(batch_size: int | str, device: str) -> int | str:
    """``auto`` is lm-eval's own search on a GPU and a fixed 16 on a CPU (see CPU_AUTO_BATCH)."""
    if batch_size == "auto" and not device.startswith("cuda"):
        return CPU_AUTO_BATCH
    return batch_size


def json_default(o: Any) -> Any:
    try:
        from lm_eval.utils import handle_non_serializable

        return handle_non_serializable(o)
    except ImportError:  # pragma: no cover - lm-eval is installed with tli[eval]
        return str(o)


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    offline_only: bool,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int | str,
    device: str,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on an already loaded model; return its results dict."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval(logging.WARNING):
        with _quiet_lm_eval():
            # include_defaults=False skips indexing lm-eval's ~14,700 built-in tasks (~10 s)
            tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=not offline_only)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        with _no_git_describe():
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                log_samples=False,
                bootstrap_iters=1000,
            )
