"""Injection plans: which input layer each output layer is built from, and how.

Planning is pure: no tensors, no I/O. A :class:`Plan` is a frozen value that can be compared in
tests and written as JSON (``tli_plan.json`` next to every injected model). Executors (the
streaming one in :mod:`tli.inject.stage`, the in-memory one for Tune trials) only follow it.

Methods (N = number of input layers):

- ``tli``: one new layer after every K original layers, N -> N + floor(N / K). A new layer is a
  copy of its neighbour (``source`` prev: the layer before it; next: the layer after it, or the one
  before when it is last) or the mean of both neighbours (``interpolate``), with its
  residual-writing output projections scaled by ``out_scale``: 0 for ``identity`` (the block is
  then exactly x -> x in a pre-norm model), 1 for ``copy``/``interpolate``, ``alpha`` if given.
  ``positions`` replaces the interval: a new layer after each listed original layer.
- ``dus`` (SOLAR): layers [0, N-M) then [M, N); 2N - 2M layers, all plain copies.
- ``stack`` (G_stack): the whole stack ``repeat`` times.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tli.errors import TliError

PLAN_FILE = "tli_plan.json"

Init = Literal["original", "copy", "identity", "interpolate"]


@dataclass(frozen=True)
class LayerSpec:
    """How one output layer is built.

    Attributes:
        index: position in the output stack.
        sources: input layers whose weights it takes (one, or two averaged for interpolate).
        init: ``original`` (an input layer, unchanged), ``copy``, ``identity`` or ``interpolate``.
        out_scale: factor on the residual-writing projections (attention o_proj, MLP down_proj);
            1.0 leaves them as they are, 0.0 zeroes them.
    """

    index: int
    sources: tuple[int, ...]
    init: Init
    out_scale: float = 1.0

    @property
    def source(self) -> int:
        """The (first) input layer this layer is built from."""
        return self.sources[0]

    @property
    def new(self) -> bool:
        """True for an injected layer (not one of the base's layers in its first use)."""
        return self.init != "original"


@dataclass(frozen=True)
class Plan:
    """A complete injection plan for one model."""

    method: str
    params: dict[str, Any] = field(hash=False, compare=True)
    num_layers_in: int
    layers: tuple[LayerSpec, ...]

    @property
    def num_layers_out(self) -> int:
        return len(self.layers)

    @property
    def new_layers(self) -> tuple[int, ...]:
        """Output indices of injected layers (those that did not exist in the base)."""
        return tuple(s.index for s in self.layers if s.new)

    @property
    def function_preserving(self) -> bool:
        """True when every new layer is an exact identity (the model computes the same function)."""
        n_orig = sum(1 for s in self.layers if not s.new)
        return n_orig == self.num_layers_in and all(
            s.out_scale == 0.0 for s in self.layers if s.new
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": self.params,
            "num_layers_in": self.num_layers_in,
            "num_layers_out": self.num_layers_out,
            "new_layers": list(self.new_layers),
            "function_preserving": self.function_preserving,
            "layers": [
                {**asdict(s), "sources": list(s.sources), "new": s.new} for s in self.layers
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        layers = tuple(
            LayerSpec(
                index=int(x["index"]),
                sources=tuple(int(s) for s in x["sources"]),
                init=x["init"],
                out_scale=float(x["out_scale"]),
            )
            for x in d["layers"]
        )
        return cls(d["method"], dict(d["params"]), int(d["num_layers_in"]), layers)


def read_plan(model_dir: str | Path) -> Plan | None:
    """The plan stored with an injected model, or None when the folder has none."""
    p = Path(model_dir) / PLAN_FILE
    if not p.is_file():
        return None
    try:
        return Plan.from_dict(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise TliError(f"{p} is not a valid tli plan ({e}); re-run tli inject") from None


# ---------------------------------------------------------------------------- planners


def _orig(out: list[LayerSpec], i: int) -> None:
    out.append(LayerSpec(len(out), (i,), "original"))


def plan_tli(
    n: int,
    *,
    interval: int | None = None,
    positions: list[int] | None = None,
    init: Literal["identity", "copy", "interpolate"] = "identity",
    alpha: float | None = None,
    source: Literal["prev", "next"] = "prev",
) -> Plan:
    """TLI: a new layer after every ``interval`` layers, or after each of ``positions``.

    Args:
        n: number of input layers.
        interval: K; new layers go after original layers K-1, 2K-1, ... (0-based).
        positions: explicit original-layer indices to insert after; overrides ``interval``.
        init: identity | copy | interpolate.
        alpha: output-projection scale; defaults to 0 for identity and 1 otherwise.
        source: copy the layer before (prev) or after (next) the new one.
    """
    if positions is not None:
        bad = [p for p in positions if not 0 <= p < n]
        if bad:
            raise TliError(f"positions {bad} out of range: the model has layers 0..{n - 1}")
        if len(set(positions)) != len(positions):
            raise TliError(f"positions {positions} repeat a layer: list each at most once")
        if not positions:
            raise TliError("positions is empty: give at least one layer index")
        after = sorted(positions)
    else:
        if interval is None or not 1 <= interval <= n:
            raise TliError(f"interval {interval} out of range: it must be in 1..{n} (N = {n})")
        after = [i for i in range(n) if (i + 1) % interval == 0]
    if init == "identity" and alpha not in (None, 0.0):
        raise TliError(
            f"alpha {alpha} contradicts init identity (alpha 0): use --init copy with --alpha"
        )
    scale = (0.0 if init == "identity" else 1.0) if alpha is None else float(alpha)
    insert = set(after)
    out: list[LayerSpec] = []
    for i in range(n):
        _orig(out, i)
        if i in insert:
            nxt = i + 1 if i + 1 < n else i  # the last layer has no next: fall back to itself
            if init == "interpolate":
                srcs: tuple[int, ...] = (i, nxt) if nxt != i else (i,)
            else:
                srcs = (nxt,) if source == "next" else (i,)
            out.append(LayerSpec(len(out), srcs, init, scale))
    params = {
        "interval": None if positions is not None else interval,
        "positions": after,
        "init": init,
        "alpha": scale,
        "source": source,
    }
    return Plan("tli", params, n, tuple(out))


def plan_dus(n: int, overlap: int | None = None) -> Plan:
    """SOLAR depth up-scaling: layers [0, N-M) then [M, N), plain copies."""
    m = n // 4 if overlap is None else overlap
    if not 0 <= m < n:
        raise TliError(f"overlap {m} out of range: it must be in 0..{n - 1} (N = {n})")
    out: list[LayerSpec] = []
    for i in range(n - m):
        _orig(out, i)
    for i in range(m, n):
        if i < n - m:  # second use of a layer the first half already has: a new copy
            out.append(LayerSpec(len(out), (i,), "copy"))
        else:
            _orig(out, i)
    return Plan("dus", {"overlap": m}, n, tuple(out))


def plan_stack(n: int, repeat: int = 2) -> Plan:
    """G_stack: the whole stack repeated ``repeat`` times (first copy original, rest new)."""
    if repeat < 2:
        raise TliError(f"repeat {repeat} must be >= 2")
    out: list[LayerSpec] = []
    for r in range(repeat):
        for i in range(n):
            if r == 0:
                _orig(out, i)
            else:
                out.append(LayerSpec(len(out), (i,), "copy"))
    return Plan("stack", {"repeat": repeat}, n, tuple(out))


def make_plan(num_layers: int, cfg: Any) -> Plan:
    """The plan for ``num_layers`` input layers from an :class:`tli.config.InjectConfig`."""
    if num_layers < 1:
        raise TliError(f"the model has {num_layers} layers: nothing to inject into")
    if cfg.method == "tli":
        return plan_tli(
            num_layers,
            interval=cfg.interval,
            positions=list(cfg.positions) if cfg.positions is not None else None,
            init=cfg.init,
            alpha=cfg.alpha,
            source=cfg.source,
        )
    if cfg.method == "dus":
        return plan_dus(num_layers, cfg.overlap)
    if cfg.method == "stack":
        return plan_stack(num_layers, cfg.repeat)
    raise TliError(f"unknown method {cfg.method!r}: use tli, dus or stack")
