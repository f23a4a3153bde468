"""Tokenising corpus shards with Ray Data (the path :func:`tli.data.stream.tokenise` takes when
Ray is up).

:class:`CorpusParts` is a datasource whose read tasks read parts of corpus shards as text rows;
:func:`tokenised_dataset` maps them through the tokenizer (``map_batches``); :func:`ray_rows`
gives the rows, in order, to the driver, which appends them to the token cache. This module
imports Ray at the top: only code that runs under Ray imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.data
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from tli.config import DataConfig
from tli.data.shards import Part, encode, part_texts


def quiet_data() -> None:
    """No Ray Data progress bars or per-dataset log lines (they would drown the step line).

    The DataContext of the driver is what Ray Train hands to its workers.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... and no line saying that the bars are off.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


class CorpusParts(Datasource):
    """Text rows ``(file, split, text)`` of corpus parts, one read task per part, in order."""

    def __init__(self, parts: list[Part], split: str, data_cfg: DataConfig) -> None:
        self.parts, self.split, self.data_cfg = parts, split, data_cfg

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, **_: Any) -> list[ReadTask]:
        return [ReadTask(_texts_reader(p, self.split, self.data_cfg),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None))
                for p in self.parts]  # fmt: skip


def _texts_reader(part: Part, split: str, data_cfg: DataConfig):
    def read() -> Iterator[Any]:
        rows = list(part_texts(part, split, data_cfg))
        yield BlockAccessor.batch_to_block({
            "file": np.full(len(rows), part.file, dtype=np.int64),
            "split": np.array([s for s, _ in rows], dtype=object),
            "text": np.array([t for _, t in rows], dtype=object),
        })  # fmt: skip

    return read


def _tokenise_batch(batch: Any, tokenizer_dir: str, fingerprint: str) -> Any:
    import pyarrow as pa

    ids = encode(batch.column("text").to_pylist(), tokenizer_dir, fingerprint)
    return pa.table({
        "file": batch.column("file"),
        "split": batch.column("split"),
        "tokens": pa.array(ids, type=pa.list_(pa.int32())),
    })  # fmt: skip


def tokenised_dataset(
    parts: list[Part], split: str, tokenizer_dir: str, fingerprint: str, data_cfg: DataConfig
) -> ray.data.Dataset:
    """The Ray Data pipeline: read parts -> tokenise; rows ``(file, split, tokens)`` in order."""
    quiet_data()
    ds = ray.data.read_datasource(CorpusParts(parts, split, data_cfg),
                                  override_num_blocks=max(1, len(parts)))  # fmt: skip
    kw = {"tokenizer_dir": tokenizer_dir, "fingerprint": fingerprint}
    ds = ds.map_batches(_tokenise_batch, batch_format="pyarrow", batch_size=256, fn_kwargs=kw)
    ds.context.execution_options.preserve_order = True  # the cache holds the stream in order
    return ds


def ray_rows(parts, split, tokenizer_dir, fp, data_cfg) -> Iterator[tuple[int, str, Any]]:
    """The tokenised rows of ``parts`` from the Ray Data pipeline, in order."""
    ds = tokenised_dataset(parts, split, tokenizer_dir, fp, data_cfg)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        files = batch.column("file").to_pylist()
        splits = batch.column("split").to_pylist()
        tokens = batch.column("tokens")
        for j in range(batch.num_rows):
            yield files[j], splits[j], tokens[j].values.to_numpy(zero_copy_only=False)
