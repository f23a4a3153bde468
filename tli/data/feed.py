"""The Ray Data side of streamed training data (see :mod:`tli.data.stream` for the whole).

- :class:`BlockFeed`: a datasource whose read tasks read one Train worker's micro-batches of
  blocks from the token cache by byte range, in :class:`tli.train.step.DataOrder`, from the
  step a checkpoint says. Read tasks take no CPU (reading a few MB is no work, and the Train
  workers hold the CPUs) and run one at a time per worker, on the node that holds the cache.
- :class:`StreamFeed`: the ``ray.train.DataConfig`` that gives every worker its own
  :class:`BlockFeed` dataset, for ``ray.train.get_dataset_shard(TRAIN)``; built for the world
  size Ray Train starts (so a run resumed on another number of workers gets its new shares).
- :class:`StreamBatches`: a worker's :class:`tli.train.step.Batches` over that iterator.

This module imports Ray at the top: only code that runs under Ray imports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.data
import ray.train
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from tli.data.raytok import quiet_data
from tli.data.stream import FeedSpec
from tli.errors import TliError
from tli.train.step import DataOrder

TRAIN = "train"  # the dataset name a worker asks get_dataset_shard for


# ----------------------------------------------------------------------------- the block feed


class BlockFeed(Datasource):
    """One worker's micro-batches: rows ``(step, micro, ids[T])``, ``B`` rows per micro-step."""

    def __init__(self, spec: FeedSpec, rank: int, world: int) -> None:
        self.spec, self.rank, self.world = spec, rank, world

    def _ranges(self) -> list[tuple[int, int]]:
        s, per = self.spec, self.spec.steps_per_task
        return [(a, min(a + per, s.steps)) for a in range(s.start_step, s.steps, per)]

    def estimate_inmemory_data_size(self) -> int | None:
        s = self.spec
        return (s.steps - s.start_step) * s.grad_accum * s.batch_size * (s.seq_len * 4 + 16)

    def get_read_tasks(self, parallelism: int, **_: Any) -> list[ReadTask]:
        s = self.spec
        tasks = []
        for a, b in self._ranges():
            n = (b - a) * s.grad_accum * s.batch_size
            meta = BlockMetadata(num_rows=n, size_bytes=n * (s.seq_len * 4 + 16), exec_stats=None)
            tasks.append(ReadTask(_blocks_reader(s, self.rank, self.world, a, b), meta))
        return tasks


def _blocks_reader(spec: FeedSpec, rank: int, world: int, first: int, end: int):
    def read() -> Iterator[Any]:
        order = DataOrder(spec.n_blocks, spec.batch_size, world, spec.grad_accum, spec.seed)
        cache: dict = {}
        steps, micros, rows = [], [], []
        for step in range(first, end):
            for micro in range(spec.grad_accum):
                rows += order.rows(step, micro, rank, cache).tolist()
                steps += [step] * spec.batch_size
                micros += [micro] * spec.batch_size
        yield BlockAccessor.batch_to_block({
            "step": np.asarray(steps, dtype=np.int64),
            "micro": np.asarray(micros, dtype=np.int64),
            "ids": spec.index.blocks(rows, spec.seq_len),  # [R, T] int32
        })  # fmt: skip

    return read


def rank_dataset(spec: FeedSpec, rank: int, world: int) -> ray.data.Dataset:
    """Worker ``rank``'s dataset of ``world``: its blocks, in order, read where the cache is."""
    feed = BlockFeed(spec, rank, world)
    # Every Ray node carries its id as a label: the read tasks run where the cache was written.
    where = {"ray.io/node-id": spec.node_id} if spec.node_id is not None else None
    ds = ray.data.read_datasource(feed, num_cpus=0, concurrency=1, label_selector=where,
                                  override_num_blocks=max(1, len(feed._ranges())))  # fmt: skip
    ds.context.execution_options.preserve_order = True
    return ds


class StreamFeed(ray.train.DataConfig):
    """Ray Train's data config for the streamed feed: every worker its own :class:`BlockFeed`.

    Ray Train calls :meth:`configure` whenever it starts a worker group (a restart after a
    failure too), with the world size it started.
    """

    def __init__(self, spec: FeedSpec) -> None:
        super().__init__(datasets_to_split=[])
        self.spec = spec

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[override]
        return [{TRAIN: rank_dataset(self.spec, r, world_size).iterator()}
                for r in range(world_size)]  # fmt: skip


def trainer_datasets(spec: FeedSpec, workers: int) -> tuple[dict[str, Any], StreamFeed]:
    """``(datasets, dataset_config)`` for a ``TorchTrainer`` fed by the stream.

    The dataset named here is rank 0's: it only declares the name; :class:`StreamFeed` hands
    each worker its own.
    """
    quiet_data()
    return {TRAIN: rank_dataset(spec, 0, workers)}, StreamFeed(spec)


# ----------------------------------------------------------------------------- the worker side


class StreamBatches:
    """A worker's micro-batches from its Ray Data shard (:class:`tli.train.step.Batches`).

    The stream starts at the step the run started from. After a restart that Ray Train
    recovers by itself, the worker resumes from a later checkpoint than the stream's start: it
    passes over the micro-batches before its step (reading them costs little; training is the
    work), and any batch out of order is an error, never silently trained on.
    """

    def __init__(self, shard: Any, spec: FeedSpec) -> None:
        self.spec = spec
        self.n_blocks = spec.n_blocks
        self._shard = shard
        self._it: Iterator[dict[str, Any]] | None = None

    def bind(self, order: DataOrder, rank: int) -> None:
        s = self.spec
        mine = (s.n_blocks, s.batch_size, s.grad_accum, s.seed)
        theirs = (order.n_blocks, order.batch_size, order.grad_accum, order.seed)
        if mine != theirs:
            raise TliError(f"the stream was built for {mine}, the run needs {theirs}: a bug")
        self.rank = rank

    def get(self, step: int, micro: int) -> Any:
        import torch

        if self._it is None:
            types = {"ids": torch.int64, "step": torch.int64, "micro": torch.int64}
            batches = self._shard.iter_torch_batches(
                batch_size=self.spec.batch_size, prefetch_batches=4, dtypes=types
            )
            self._it = iter(batches)
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                raise TliError(f"the data stream ended before step {step + 1}: a bug") from None
            at = (int(batch["step"][0]), int(batch["micro"][0]))
            if not bool((batch["step"] == at[0]).all() & (batch["micro"] == at[1]).all()):
                raise TliError(f"a streamed batch mixes micro-steps near step {at[0] + 1}: a bug")
            if at < (step, micro):
                continue  # before the checkpoint this worker resumed from
            if at > (step, micro):
                raise TliError(f"the stream is at step {at[0] + 1}, training at {step + 1}: a bug")
            return batch["ids"]  # [B, T]
