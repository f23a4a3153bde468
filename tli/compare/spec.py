"""The experiment file of ``tli compare``: which methods, on which base, data, budget and seeds.

An experiment is YAML (``experiments/NAME.yaml``), validated once into :class:`Experiment`:
unknown keys are errors, as in every tli config. Its ``base``, ``data``, ``train`` and ``eval``
sections are the run config's own models (:mod:`tli.config`), shared by every method and seed:
the same base, corpus, step budget, learning-rate schedule, sequence length, batch and
evaluation for all. What differs per method is its recipe (:mod:`tli.compare.recipes`): the
inject settings, matched to the others, and the freeze policy; per seed, ``train.seed``.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from tli.config import (
    BaseModelConfig,
    DataConfig,
    EvalConfig,
    Section,
    TrainConfig,
    parse_override,
    read_yaml,
    validate,
)

RecipeName = Literal["tli", "llama-pro", "dus", "moe", "stack"]
NAME = r"^[a-z0-9][a-z0-9._-]{0,39}$"
# Train fields that fix the token budget or the seed: equal for every method by construction.
BUDGET_FIELDS = ("steps", "seq_len", "batch_size", "grad_accum", "workers", "seed")


class MethodEntry(Section):
    """One method of the comparison: a recipe, optionally with settings of its own."""

    name: str = Field(pattern=NAME, description="its label in the report (and store folders)")
    recipe: RecipeName | None = Field(
        None, description="tli | llama-pro | dus | moe | stack; None = the name"
    )
    inject: dict[str, Any] = Field(
        {}, description="inject fields laid over the recipe's matched ones (e.g. placement: top)"
    )
    train: dict[str, Any] = Field(
        {}, description="train fields over the shared ones (not the budget: steps, seq_len, ...)"
    )

    @property
    def recipe_name(self) -> str:
        """The recipe this method uses (its own name when ``recipe`` is not given)."""
        return self.recipe or self.name

    @model_validator(mode="after")
    def _known_recipe_and_same_budget(self) -> MethodEntry:
        known = typing.get_args(RecipeName)
        if self.recipe_name not in known:
            raise PydanticCustomError(
                "recipe",
                "method {name}: give recipe (one of {known}) or use a recipe's name",
                {"name": self.name, "known": ", ".join(known)},
            )
        fixed = sorted(set(self.train) & set(BUDGET_FIELDS))
        if fixed:
            raise PydanticCustomError(
                "budget",
                "method {name}: train.{field} is shared by every method (equal training tokens "
                "and the experiment's seeds): set it in the experiment's train section",
                {"name": self.name, "field": fixed[0]},
            )
        return self


class Matching(Section):
    """How the methods are matched to each other (see :mod:`tli.compare.recipes`)."""

    interval: int = Field(
        5, ge=1, description="TLI's K: TLI and LLaMA Pro add N // K layers, DUS as many"
    )
    experts: int = Field(
        4, ge=2, description="MoE experts per layer; top_k is chosen for equal active parameters"
    )


class Experiment(Section):
    """A whole comparison: every method x seed from the same base, data and budget."""

    name: str = Field(pattern=NAME, description="the experiment's name (results/<name>/)")
    description: str = Field("", description="what it measures, for the report")
    base: BaseModelConfig = Field(BaseModelConfig(), description="the one base model")
    data: DataConfig = Field(DataConfig(), description="the one corpus")
    train: TrainConfig = Field(
        TrainConfig(),
        description="training shared by every method and seed (train.seed comes from seeds, "
        "train.freeze from each recipe)",
    )
    eval: EvalConfig = Field(EvalConfig(), description="evaluation of every model")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="training seeds (>= 3)")
    methods: list[RecipeName | MethodEntry] = Field(
        ["tli", "llama-pro", "dus", "moe", "stack"], min_length=1, description="what to compare"
    )
    reference: str | None = Field(
        "dus",
        description="the method whose final loss the others must reach (steps to reach it); "
        "None = none",
    )
    match: Matching = Field(Matching(), description="how the methods are matched")

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        names = [m.name for m in self.entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PydanticCustomError("dup", "method {n} is listed twice", {"n": dup[0]})
        if len(set(self.seeds)) != len(self.seeds):
            raise PydanticCustomError("seeds", "seeds repeat a value: list each once")
        if self.reference is not None and self.reference not in names:
            raise PydanticCustomError(
                "reference",
                "reference {r} is not among the methods ({names}): list it or set reference",
                {"r": self.reference, "names": ", ".join(names)},
            )
        if self.train.seed != TrainConfig.model_fields["seed"].default:
            raise PydanticCustomError("seed", "train.seed is set per run: list seeds instead")
        if self.train.freeze != TrainConfig.model_fields["freeze"].default:
            raise PydanticCustomError(
                "freeze",
                "train.freeze is each recipe's: set it per method (methods: [{name: ..., "
                "train: {freeze: ...}}])",
            )
        return self

    @property
    def entries(self) -> list[MethodEntry]:
        """Every method as a :class:`MethodEntry` (a bare recipe name is one with defaults)."""
        return [m if isinstance(m, MethodEntry) else MethodEntry(name=m) for m in self.methods]

    def to_json(self) -> dict[str, Any]:
        """The experiment as JSON (what the report's version hashes)."""
        return self.model_dump(mode="json")


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        nxt = data.get(k)
        if not isinstance(nxt, dict):
            nxt = data[k] = {}
        data = nxt
    data[path[-1]] = value


def load_experiment(path: str | Path, overrides: list[str] = ()) -> Experiment:  # type: ignore[assignment]
    """Read, override (``SECTION.FIELD=VALUE``, e.g. ``train.steps=5``) and validate an
    experiment file; bad input is one line (:class:`tli.errors.TliError`)."""
    data = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        _set(data, key, value)
    where = str(path) + (" + overrides" if overrides else "")
    return validate(Experiment, data, where)  # type: ignore[return-value]
