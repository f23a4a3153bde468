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
  ``placement`` chooses where the ``new_layers`` (default N // K) new layers go: ``uniform``
  (evenly: with the default count, exactly after every K-th layer), ``top`` (after each of the
  last ones, near the output: OpT-DeUS reports it trains fastest), ``middle`` (after each of
  the ones around the middle, as MIDAS grows), ``bottom`` (after each of the first ones).
- ``llama-pro`` (LLaMA Pro): the TLI identity plan under its own name; training then updates
  only the new layers (``train.freeze: original``, enforced by :class:`tli.config.RunConfig`).
- ``dus`` (SOLAR): layers [0, N-M) then [M, N); 2N - 2M layers, all plain copies.
- ``stack`` (G_stack): the whole stack ``repeat`` times.
- ``moe`` (sparse upcycling, :mod:`tli.inject.moe`): the layer stack is unchanged (N -> N, every
  layer ``original``) while each MLP becomes experts; the plan records the MoE settings. It has
  no new layers, so ``--freeze original`` (which trains the new layers) is refused for it:
  sparse upcycling trains every parameter (``--freeze none``), and a policy that trains only
  the experts and routers would need a parameter-level freeze, which tli does not have.
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
        """True when every new layer is an exact identity (the model computes the same function).

        For ``moe``: when no expert is noised (identical experts compute the dense MLP).
        """
        if self.method == "moe":
            return float(self.params.get("noise") or 0.0) == 0.0
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


PLACEMENTS = ("uniform", "top", "middle", "bottom")


def tli_positions(
    n: int,
    *,
    interval: int | None = None,
    positions: list[int] | None = None,
    placement: str | None = None,
    count: int | None = None,
) -> list[int]:
    """The original layers (0-based, sorted) that a new layer goes after.

    Args:
        n: number of input layers.
        interval: K; the default count is N // K, and ``uniform`` with that count puts the new
            layers after layers K-1, 2K-1, ... exactly.
        positions: explicit layers; replaces all of the others.
        placement: uniform | top | middle | bottom (None = uniform).
        count: how many new layers (None = N // K).
    """
    if positions is not None:
        bad = [p for p in positions if not 0 <= p < n]
        if bad:
            raise TliError(f"positions {bad} out of range: the model has layers 0..{n - 1}")
        if len(set(positions)) != len(positions):
            raise TliError(f"positions {positions} repeat a layer: list each at most once")
        if not positions:
            raise TliError("positions is empty: give at least one layer index")
        return sorted(positions)
    place = placement or "uniform"
    if place not in PLACEMENTS:
        raise TliError(f"placement {place!r}: choose from {', '.join(PLACEMENTS)}")
    if count is None and (interval is None or not 1 <= interval <= n):
        raise TliError(f"interval {interval} out of range: it must be in 1..{n} (N = {n})")
    c = n // interval if count is None else count  # type: ignore[operator]
    if not 1 <= c <= n:
        raise TliError(f"new_layers {c} out of range: it must be in 1..{n} (N = {n})")
    if place == "uniform":
        # Evenly spread: after layer ceil((i + 1) * N / c) - 1; with c = N // K and K dividing
        # N these are K-1, 2K-1, ...; otherwise they keep the first K-1 layers together.
        if count is None:
            return [i for i in range(n) if (i + 1) % interval == 0]
        return [(i + 1) * n // c - 1 for i in range(c)]
    start = {"bottom": 0, "middle": (n - c) // 2, "top": n - c}[place]
    return list(range(start, start + c))


def plan_tli(
    n: int,
    *,
    interval: int | None = None,
    positions: list[int] | None = None,
    init: Literal["identity", "copy", "interpolate"] = "identity",
    alpha: float | None = None,
    source: Literal["prev", "next"] = "prev",
    placement: str | None = None,
    count: int | None = None,
    method: str = "tli",
) -> Plan:
    """TLI: a new layer after every ``interval`` layers, or after each of ``positions``.

    Args:
        n: number of input layers.
        interval: K; new layers go after original layers K-1, 2K-1, ... (0-based).
        positions: explicit original-layer indices to insert after; overrides ``interval``.
        init: identity | copy | interpolate.
        alpha: output-projection scale; defaults to 0 for identity and 1 otherwise.
        source: copy the layer before (prev) or after (next) the new one.
        placement: where the ``count`` new layers go (see :func:`tli_positions`).
        count: how many new layers; None = N // interval.
        method: the plan's name: ``tli``, or ``llama-pro`` for the same identity plan whose
            training updates only the new layers.
    """
    after = tli_positions(n, interval=interval, positions=positions, placement=placement,
                          count=count)  # fmt: skip
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
        "interval": interval if positions is None and count is None else None,  # what counted
        "positions": after,
        "init": init,
        "alpha": scale,
        "source": source,
        "placement": None if positions is not None else (placement or "uniform"),
        "new_layers": len(after),
    }
    return Plan(method, params, n, tuple(out))


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


def plan_moe(n: int, spec: dict[str, Any]) -> Plan:
    """MoE upcycling: the same N layers (each MLP becomes experts); ``spec`` is the MoeSpec."""
    return Plan("moe", dict(spec), n, tuple(LayerSpec(i, (i,), "original") for i in range(n)))


def moe_spec(cfg: Any) -> Any:
    """The :class:`tli.inject.moe.MoeSpec` of an ``inject`` section with ``method: moe``."""
    from tli.inject.moe import MoeSpec

    kw: dict[str, Any] = {"experts": cfg.experts, "top_k": cfg.top_k}
    for key, name in (("router_init", "router_init"), ("expert_noise", "noise"),
                        ("moe_seed", "seed"), ("shared_expert_size", "shared_expert_size"),
                        ("aux_loss_coef", "router_aux_loss_coef")):  # fmt: skip
        if getattr(cfg, key) is not None:
            kw[name] = getattr(cfg, key)
    return MoeSpec(**kw)


def make_plan(num_layers: int, cfg: Any) -> Plan:
    """The plan for ``num_layers`` input layers from an :class:`tli.config.InjectConfig`."""
    if num_layers < 1:
        raise TliError(f"the model has {num_layers} layers: nothing to inject into")
    if cfg.method in ("tli", "llama-pro"):
        tli = cfg.method == "tli"  # llama-pro: identity copies of the layer before, always
        return plan_tli(
            num_layers,
            interval=cfg.interval,
            positions=list(cfg.positions) if cfg.positions is not None else None,
            init=cfg.init if tli else "identity",
            alpha=cfg.alpha if tli else None,
            source=cfg.source if tli else "prev",
            placement=cfg.placement,
            count=cfg.new_layers,
            method=cfg.method,
        )
    if cfg.method == "dus":
        return plan_dus(num_layers, cfg.overlap)
    if cfg.method == "stack":
        return plan_stack(num_layers, cfg.repeat)
    if cfg.method == "moe":
        return plan_moe(num_layers, moe_spec(cfg).to_dict())
    raise TliError(f"unknown method {cfg.method!r}: use tli, llama-pro, dus, stack or moe")
