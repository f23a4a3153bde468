"""The compared methods as named recipes, and how they are matched to each other.

A *recipe* is what a method means in a comparison: its inject settings and its training freeze
policy. Matching (:func:`match_methods`) turns the recipes into the settings of one base:

- ``tli``: TLI identity, one new layer after every K layers (N -> N + N // K), **all parameters
  trained** (``freeze: none``). DUS and MoE upcycling train the whole model in their papers, and
  the TLI paper compares against them under continued pretraining; training everything makes
  the initialisation the one difference between TLI and DUS. Training only the new layers is a
  method of its own here: ``llama-pro``.
- ``llama-pro``: the same identity plan, training only the new layers (``freeze: original``).
- ``dus``: SOLAR's depth up-scaling with the overlap M that gives TLI's layer count
  (2N - 2M = N + N // K; one layer more when the parity does not allow it): equal added
  parameters, as every added layer is a copy of one of the same size.
- ``moe``: sparse upcycling with ``match.experts`` experts and the ``top_k`` whose active
  parameters per token come nearest to TLI's total (equal compute per token; with experts as
  wide as the dense MLP the total cannot match: it is E times the MLPs).
- ``stack``: G_stack as it comes (the stack twice: 2N layers).

Every method trains for the same steps on the same batches (equal training tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tli.compare.spec import Experiment, MethodEntry
from tli.config import InjectConfig, RunConfig, Runtime, TrainConfig
from tli.errors import TliError
from tli.modelfolder import ModelFolder


@dataclass(frozen=True)
class Recipe:
    """One method as a comparison uses it."""

    name: str
    title: str
    paper: str
    freeze: str  # the train.freeze it trains with
    what: str  # one line for the report


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("tli", "TLI", "arXiv 2410.11654", "none",
               "identity copy of the layer before, after every K layers; all parameters trained"),
        Recipe("llama-pro", "LLaMA Pro", "arXiv 2401.02415", "original",
               "the TLI identity plan; only the new layers trained"),
        Recipe("dus", "DUS (SOLAR)", "arXiv 2312.15166", "none",
               "two copies of the stack joined with M layers dropped at the seam; all trained"),
        Recipe("moe", "MoE upcycling", "arXiv 2212.05055", "none",
               "every MLP becomes E identical experts plus a router; all trained, with the "
               "load-balancing loss"),
        Recipe("stack", "G_stack", "arXiv 2405.15319", "none",
               "the whole stack repeated twice; all trained"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Matched:
    """One method's settings on one base, and what they give."""

    name: str
    recipe: Recipe
    inject: InjectConfig
    train: TrainConfig  # the shared training with the recipe's freeze (seed set per run)
    layers: int
    parameters: int
    active: int  # parameters one token uses (= parameters but for MoE)
    note: str  # how it was matched, with the numbers

    def train_for(self, seed: int) -> TrainConfig:
        """The training config of this method's run with ``seed``."""
        return self.train.model_copy(update={"seed": seed})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the report shows of the method (and its version hashes)."""
        return {
            "name": self.name,
            "recipe": self.recipe.name,
            "title": self.recipe.title,
            "paper": self.recipe.paper,
            "what": self.recipe.what,
            "freeze": self.train.freeze,
            "inject": self.inject.model_dump(mode="json", exclude_defaults=True),
            "layers": self.layers,
            "parameters": self.parameters,
            "active": self.active,
            "note": self.note,
        }


def _sizes(cfg: InjectConfig, base: ModelFolder) -> tuple[int, int, int]:
    """(layers, parameters, active parameters) of ``base`` injected with ``cfg`` (headers only)."""
    from tli.inject.stage import prepare

    job = prepare(cfg, {"base": base.path}, Runtime(progress=False))
    p = job.parameters
    return job.plan.num_layers_out, p["after"], p.get("active", p["after"])


def _moe_top_k(base: ModelFolder, experts: int, target: int) -> tuple[int, str]:
    """The top_k whose active parameters come nearest ``target``, and the candidates."""
    from tli.inject.moe import MoeSpec, moe_param_counts

    active = {k: moe_param_counts(base.config, MoeSpec(experts, k)).active
              for k in range(1, experts + 1)}  # fmt: skip
    k = min(active, key=lambda k: (abs(active[k] - target), k))
    shown = [f"top-{j}: {active[j]:,}" for j in sorted(active) if abs(j - k) <= 1]
    return k, "; ".join(shown)


def _matched_inject(entry: MethodEntry, base: ModelFolder, k: int, tli: tuple[int, int]):
    """The recipe's inject settings, matched to TLI K=``k`` (layers, parameters)."""
    n = base.num_layers
    target_layers, tli_params = tli
    name = entry.recipe_name
    if name in ("tli", "llama-pro"):
        return {"method": name, "interval": k}, f"K={k}: {n} -> {target_layers} layers"
    if name == "dus":
        m = (n - n // k) // 2  # 2N - 2M = N + N // K, rounded to the pair below
        if not 0 <= m < n:
            raise TliError(f"method {entry.name}: no DUS overlap gives {target_layers} layers")
        layers = 2 * n - 2 * m
        same = "the same as TLI" if layers == target_layers else (
            f"one more than TLI's {target_layers}: DUS adds layers in pairs")  # fmt: skip
        return {"method": "dus", "overlap": m}, f"overlap M={m}: {n} -> {layers} layers, {same}"
    if name == "moe":
        e = int(entry.inject["experts"])
        top_k, shown = _moe_top_k(base, e, tli_params)
        note = (f"{e} experts, top-{top_k}: the active parameters per token nearest TLI's "
                f"{tli_params:,} ({shown})")  # fmt: skip
        return {"method": "moe", "experts": e, "top_k": top_k}, note
    return {"method": "stack", "repeat": 2}, f"as it comes: {n} -> {2 * n} layers"


def _valid(method: str, section: str, model: type, data: dict[str, Any]) -> Any:
    """``model`` validated from ``data``, or one line naming the method and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join([section] * bool(section) + [str(p) for p in first["loc"]])
        raise TliError(f"method {method}: {where + ': ' if where else ''}{first['msg']}") from None


def match_methods(exp: Experiment, base: ModelFolder) -> list[Matched]:
    """Every method of ``exp`` with its matched settings on ``base``, checked against it.

    Raises:
        TliError: a method's settings do not apply to the base (one line naming the method).
    """
    n = base.num_layers
    k = exp.match.interval
    if not 1 <= k <= n:
        raise TliError(f"match.interval {k} is outside 1..{n} (the base has {n} layers)")
    tli_layers, tli_params, _ = _sizes(InjectConfig(interval=k), base)
    out = []
    for entry in exp.entries:
        recipe = RECIPES[entry.recipe_name]
        if entry.recipe_name == "moe":
            entry = entry.model_copy(
                update={"inject": {"experts": exp.match.experts, **entry.inject}}
            )
        matched, note = _matched_inject(entry, base, k, (tli_layers, tli_params))
        given = sorted(set(entry.inject) & set(matched) - {"experts"})
        if given:
            note = f"as given ({', '.join(f'{f}={entry.inject[f]}' for f in given)})"
        inject = _valid(entry.name, "inject", InjectConfig, {**matched, **entry.inject})
        shared = {**exp.train.model_dump(), "freeze": recipe.freeze}
        train = _valid(entry.name, "train", TrainConfig, {**shared, **entry.train})
        _valid(entry.name, "", RunConfig, {"inject": inject, "train": train})  # llama-pro's freeze
        layers, params, active = _sizes(inject, base)
        if entry.recipe_name in ("tli", "llama-pro") and not given:
            note += f", +{params - base.parameters:,} parameters"
        own = {k: v for k, v in entry.inject.items() if k not in matched}
        if own:  # e.g. a placement variant: tli-top = tli with placement top
            note += "; " + ", ".join(f"{k}={v}" for k, v in own.items())
        out.append(Matched(entry.name, recipe, inject, train, layers, params, active, note))
    return out
