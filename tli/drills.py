"""Fault drills: a failure made on purpose at a named point, for tests and rehearsals.

No public signature carries a test hook; a drill is armed by one environment variable, read
here and nowhere else::

    TLI_DRILL="train.step=3:raise-once"     the last Train worker raises once at step 3
    TLI_DRILL="inject.shard=model.safetensors:kill"
                                            SIGKILL this process once that shard is written

Several drills are separated by commas. Actions:

- ``raise`` / ``raise-once``: raise :class:`DrillFailure`; ``raise-once`` leaves a marker file
  in ``TLI_DRILL_DIR`` (default: the system temp dir) so that a restarted worker does not fail
  again.
- ``kill``: a real SIGKILL of the process, not an exception: nothing gets to clean up.
- ``term`` / ``int``: SIGTERM / SIGINT to the process, as a scheduler or a Ctrl-C would send it.

The points (``point=value``):

=================  ========================================================================
cli.start=1        the command line, before the command is parsed (its first second)
inject.run=FILE    an output shard half written (after its first byte range)
inject.shard=FILE  an output shard written completely
data.split=SPLIT   a split's .jsonl written (train, validation, heldout)
data.tokens=SPLIT  a split counted in tokens (and its token cache filled)
eval.loaded=1      the model loaded, before any score
eval.written=1     the scores written, before the table and provenance
train.step=N       a Train worker about to run step N (kills the worker, not the command)
train.finish=1     the trained model written out, before metrics and provenance
tune.results=1     every trial finished, before the results are written
=================  ========================================================================
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

VAR = "TLI_DRILL"
DIR_VAR = "TLI_DRILL_DIR"
_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}


class DrillFailure(RuntimeError):
    """The failure a ``raise``/``raise-once`` drill makes."""


def _armed() -> dict[str, tuple[str, str]]:
    """``{point: (value, action)}`` from ``TLI_DRILL``."""
    out = {}
    for item in (os.environ.get(VAR) or "").split(","):
        point, _, rest = item.strip().partition("=")
        value, _, action = rest.partition(":")
        if point and value and action:
            out[point] = (value, action)
    return out


def env() -> dict[str, str]:
    """The drill variables to hand to worker processes (empty when no drill is armed)."""
    return {k: os.environ[k] for k in (VAR, DIR_VAR) if os.environ.get(k)}


def drill(point: str, value: object) -> None:
    """Fail here if a drill is armed for ``point`` at ``value`` (no-op otherwise)."""
    armed = _armed().get(point)
    if armed is None or armed[0] != str(value):
        return
    action = armed[1]
    if action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[action])
        if action != "kill":
            return  # the handler runs in the main thread: the command unwinds from there
    if action == "raise-once":
        marker = Path(os.environ.get(DIR_VAR) or tempfile.gettempdir()) / (
            f".tli-drill-{point}-{value}"
        )
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("failed once\n")
    raise DrillFailure(f"drill: failure at {point}={value} ({VAR})")
