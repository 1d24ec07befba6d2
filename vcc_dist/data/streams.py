"""Ray Data streams for training: the SE cell stream and the ST set stream (docs/design.md §4).

    stream = cell_stream("corpus/", CellStreamConfig(batch_size=256), world_size=2)
    trainer = TorchTrainer(loop, datasets={"train": stream.dataset}, ...)
    # in each worker:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=256):
        x = batch["X"]                      # [256, G] float32 log1p(normalize_total)

    stream = set_stream("corpus/", SetStreamConfig(set_size=128, batch_size=16),
                        split="split.toml", world_size=2)
    for batch in shard.iter_torch_batches(batch_size=16):   # always stream.batch_size
        batch["ctrl"], batch["pert"]         # [16, 128, G] each
        batch["pert_index"], batch["batch_index"], batch["context_index"]   # [16]

How it runs: a custom :class:`ray.data.Datasource` turns the epoch's plan (vcc_dist.data.plans)
into read tasks, each reading whole plan units and emitting one packed row per batch (the
batch's normalised CSR rows and labels, passed by reference: a one-row pandas block);
``map_batches`` (fused into the same task) densifies them into one row per cell (SE) or per set
(ST), one Ray block per batch. Replace that transform (``transform=``) to emit other tensors
(e.g. SE tokens) from the same packed batches.

Epochs: Ray Data executes a dataset again for every epoch (``iter_*_batches`` on the shard); the
datasource counts its executions, so execution k plays epoch ``position.epoch + k``. Ray Train
splits the dataset across workers with ``streaming_split(equal=True)``; the plan has a multiple
of ``world_size`` batches of equal size, and ``preserve_order`` is set on the dataset so blocks
are dealt to workers deterministically. Batch order is identical for the same seed.

Resuming: every row carries ``epoch`` and ``step`` (the batch id within the epoch). A consumer
records the steps it consumed; after a restart, build the stream with
``StreamPosition(epoch, consumed=<steps consumed by all workers>)`` and those batches are not
read again (``consumed=n`` means steps 0..n-1).

Trainers that restart (Ray Train's ``FailureConfig`` re-splits the dataset after a worker
failure, which starts again from the dataset's initial state) pass ``board=<name>`` instead:
a small named actor (:func:`position_board`) holding the position to play; the datasource
reads it at the start of every execution. The trainer sets it before each epoch (rank 0, then
a barrier), so after any restart the stream resumes exactly where the checkpoint says.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vcc_dist import constants as K
from vcc_dist.data.corpus import load_manifest
from vcc_dist.data.embeddings import CorpusEmbeddings
from vcc_dist.data.labels import CorpusLabels, corpus_labels
from vcc_dist.data.plans import (
    CellPlan,
    CellStreamConfig,
    SetPlan,
    SetStreamConfig,
    StreamPosition,
    Unit,
    read_cell_unit,
)
from vcc_dist.data.reader import CorpusReader, CSRBlock
from vcc_dist.data.splits import TRAIN, SplitSpec

PACKED = "packed"


def _pack(d: dict[str, Any]):
    """One packed batch as a one-row pandas block. The read and the transform run fused in one
    task, so the dict passes by reference (no serialisation); if a block ever crosses
    processes, Ray pickles it with out-of-band numpy buffers."""
    return pd.DataFrame({PACKED: [d]})


def unpack_batches(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The packed batches (dicts of CSR parts and labels) in one ``map_batches`` input: what a
    custom ``transform=`` (e.g. vcc_dist.data.se_tokens) iterates over."""
    return list(batch[PACKED])


def _csr_parts(b: CSRBlock) -> dict[str, Any]:
    return {"data": b.data, "indices": b.indices, "indptr": b.indptr, "totals": b.totals,
            "normalized": b.normalized}


def _csr_from(d: dict[str, Any], n_cols: int) -> CSRBlock:
    return CSRBlock(d["data"], d["indices"], d["indptr"], d["totals"], n_cols,
                    bool(d.get("normalized", False)))


class _PackedTransform:
    """Shared part of the transforms: a generator yielding one output batch per packed batch.

    Ray may hand several packed batches to one call (it merges small read outputs); yielding
    them one by one keeps one training batch per output block (the block size target is 0.8x
    a batch), so a consumer never re-assembles a batch from pieces."""

    def __call__(self, batch: dict[str, np.ndarray]):
        for d in unpack_batches(batch):
            out = self.allocate(self.n_rows(d))
            self.fill(d, out)
            yield out


# ---------------------------------------------------------------------------------------------
# the datasource
# ---------------------------------------------------------------------------------------------


def _make_datasource_class():
    """The Datasource subclass, built once on first use."""
    class _PlanSource(Datasource):
        def __init__(self, read_units: Callable, units_for_epoch: Callable, bytes_per_batch: int,
                     position: StreamPosition, board: str | None = None):
            super().__init__()
            self._board = board
            self._read_units = read_units
            self._units_for_epoch = units_for_epoch
            self._bytes_per_batch = bytes_per_batch
            self._position = position
            self._executions = 0
            self._last: tuple[int, list] | None = None  # (epoch, units): Ray plans 3x an epoch

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            # Ray calls this for planning (no data_context) and once per execution = epoch
            if self._board is not None:
                if data_context is not None or self._executions == 0:
                    self._position = read_board(self._board)
                    self._executions = 1
                epoch, skip = self._position.epoch, self._position.skip_set()
            else:
                epoch = self._position.epoch + self._executions
                if data_context is not None:
                    self._executions += 1
                skip = self._position.skip_set() if epoch == self._position.epoch else frozenset()
            if self._last is None or self._last[0] != epoch:
                self._last = (epoch, self._units_for_epoch(epoch))
            units = [u for u in self._last[1]
                     if not all(b in skip for b in range(u.first_batch,
                                                         u.first_batch + u.n_batches))]
            # exactly `parallelism` tasks (empty ones when units are fewer, e.g. after a
            # resume): fewer tasks make Ray split every output block and stop fusing the read
            # with the transform
            n_tasks = max(1, int(parallelism or 1))
            tasks = []
            for chunk in np.array_split(np.arange(len(units)), n_tasks):
                us = [units[i] for i in chunk]
                nb = sum(u.n_batches for u in us)
                meta = BlockMetadata(num_rows=nb, size_bytes=nb * self._bytes_per_batch,
                                     input_files=None, exec_stats=None)
                tasks.append(ReadTask(functools.partial(self._read_units, epoch, us, skip), meta,
                                      per_task_row_limit=per_task_row_limit))
            return tasks

    return _PlanSource


@functools.lru_cache(maxsize=1)
def _datasource_class():
    return _make_datasource_class()


#: most read tasks per epoch (each reads one or more whole units)
MAX_READ_TASKS = 1024


def _make_board_class():
    @ray.remote(num_cpus=0)
    class _PositionBoard:
        def __init__(self, epoch: int, consumed: tuple[int, ...] | int):
            self.value = (int(epoch), consumed)

        def set(self, epoch: int, consumed: tuple[int, ...] | int) -> None:
            self.value = (int(epoch), consumed)

        def get(self):
            return self.value

    return _PositionBoard


@functools.lru_cache(maxsize=1)
def _board_class():
    return _make_board_class()


def position_board(name: str, position: StreamPosition | None = None):
    """Create the named actor telling a stream built with ``board=name`` which epoch to play
    next and which of its batches to skip; returns its handle. It lives as long as the
    process that created it (the driver), on the driver's node (as Ray Train's controller and
    dataset manager are), so that losing another host never loses the stream's position."""
    position = position or StreamPosition()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return _board_class().options(name=name, get_if_exists=False,
                                  scheduling_strategy=here).remote(
        position.epoch, position.consumed)


def set_board(name: str, position: StreamPosition) -> None:
    """Tell the stream of board ``name`` to play ``position`` on its next execution."""
    ray.get(ray.get_actor(name).set.remote(position.epoch, position.consumed))


def read_board(name: str) -> StreamPosition:
    try:
        actor = ray.get_actor(name)
    except ValueError:
        raise RuntimeError(f"the stream's position board {name!r} is gone: create it with "
                           "vcc_dist.data.streams.position_board in the driver before "
                           "iterating the stream") from None
    epoch, consumed = ray.get(actor.get.remote())
    return StreamPosition(int(epoch), consumed)


class Shared:
    """A large read-only object (a stream's plan, its label maps) put into Ray's object store
    once by the driver; read tasks carry only this handle and fetch the object at most once per
    worker process. Captured directly, the object would be serialised into every read task of
    every epoch (up to MAX_READ_TASKS copies)."""

    _cache: dict[str, Any] = {}  # this process's objects by ref id (the newest few kept)

    def __init__(self, obj: Any):
        self.ref = ray.put(obj)

    def get(self) -> Any:
        key = self.ref.hex()
        obj = Shared._cache.get(key)
        if obj is None:
            obj = ray.get(self.ref)
            if len(Shared._cache) >= 4:
                Shared._cache.pop(next(iter(Shared._cache)))
            Shared._cache[key] = obj
        return obj


def _dataset(read_units, units_for_epoch, bytes_per_batch, position, transform, n_units: int,
             board: str | None = None):
    """(the Ray dataset, its datasource)."""
    src = _datasource_class()(read_units, units_for_epoch, bytes_per_batch, position, board)
    # one read task per unit (up to MAX_READ_TASKS): with fewer tasks than its default
    # parallelism, Ray would split every read output into more blocks and stop fusing the
    # read with the transform below
    ds = ray.data.read_datasource(src, override_num_blocks=max(1, min(n_units, MAX_READ_TASKS)))
    # batch_size=None: whole blocks (one packed batch each); a batch_size would block fusion
    # of the read and the transform into one task (Ray fuses only without a row minimum)
    ds = ds.map_batches(transform, batch_size=None, batch_format="numpy", zero_copy_batch=True)
    # deterministic dealing of blocks to the workers of streaming_split (see module doc)
    ds.context.execution_options.preserve_order = True
    # exactly one block per batch: Ray emits a block once its buffer exceeds the target and
    # slices it only beyond 1.5x the target, so 0.8x a batch gives one batch per block. The
    # default (128 MB) would split a dense ST batch (2 x 16 x 128 x 18,080 float32 = 296 MB) or
    # merge small SE batches, and either costs the consumer a copy per batch
    ds.context.target_max_block_size = max(1, int(0.8 * bytes_per_batch))
    return ds, src


# ---------------------------------------------------------------------------------------------
# SE cell stream
# ---------------------------------------------------------------------------------------------


def _read_cell_units(reader: CorpusReader, cfg: CellStreamConfig, split: str,
                     shared_maps: Shared | dict, epoch: int, units: list[Unit], skip: frozenset):
    store_maps: dict[str, list[np.ndarray]] = (shared_maps.get() if isinstance(shared_maps, Shared)
                                               else shared_maps)
    B = cfg.batch_size
    for u in units:
        block, st, rows, steps = read_cell_unit(reader, cfg, split, epoch, u)
        labels = cell_labels(reader, store_maps, st, rows)
        for j in range(u.n_batches):
            step = u.first_batch + j
            if step in skip:
                continue
            sl = slice(j * B, (j + 1) * B)
            sub = _slice_rows(block, sl)
            yield _pack({"cells": _csr_parts(sub), "store": st[sl].astype(np.int32),
                         "row": rows[sl], "step": step, "epoch": epoch,
                         **{k: v[sl] for k, v in labels.items()}})


def cell_labels(reader, store_maps, st, rows) -> dict[str, np.ndarray]:
    """``context_index``, ``pert_index`` and ``batch_index`` (corpus-wide label indices) of
    the cells at (store ``st``, ``rows``); ``store_maps`` maps each store's codes to them."""
    out = {f"{k}_index": np.empty(rows.size, np.int32) for k in ("context", "pert", "batch")}
    keys = {"context": K.CONTEXT_KEY, "pert": K.PERT_KEY, "batch": K.BATCH_KEY}
    for s in np.unique(st):
        m = st == s
        codes = reader.store(int(s)).codes
        for short, key in keys.items():
            out[f"{short}_index"][m] = store_maps[key][int(s)][codes[key][rows[m]]]
    return out


# the former private name, still imported by vcc_dist.infer.st_predict (remove the alias when
# that module imports cell_labels)
cell_labels = cell_labels


def _slice_rows(b: CSRBlock, sl: slice) -> CSRBlock:
    a, z = sl.start, min(sl.stop, b.n_rows)
    ea, ez = int(b.indptr[a]), int(b.indptr[z])
    return CSRBlock(b.data[ea:ez], b.indices[ea:ez], b.indptr[a:z + 1] - ea, b.totals[a:z],
                    b.n_cols, b.normalized)


class DenseCells(_PackedTransform):
    """map_batches transform: packed batches of normalised cells -> one row per cell with ``X``
    [G] float32 over the selected genes, and its labels. Replace it (``transform=``) to tokenise
    for SE instead; it receives the same packed batches."""

    KEYS = ("store", "row", "context_index", "pert_index", "batch_index")

    def __init__(self, reader: CorpusReader):
        self.reader = reader

    def n_rows(self, d: dict[str, Any]) -> int:
        return int(d["row"].size)

    def allocate(self, n: int) -> dict[str, np.ndarray]:
        out = {"X": np.empty((n, self.reader.n_genes), np.float32),  # densify zeroes rows
               "store": np.empty(n, np.int32), "row": np.empty(n, np.int64)}
        out.update({k: np.empty(n, np.int32) for k in self.KEYS[2:]})
        out.update(step=np.empty(n, np.int64), epoch=np.empty(n, np.int32))
        return out

    def fill(self, d: dict[str, Any], out: dict[str, np.ndarray]) -> None:
        r = self.reader
        r.dense(r.normalize(_csr_from(d["cells"], r.n_vocab)), out=out["X"])
        for k in self.KEYS:
            out[k][:] = d[k]
        out["step"][:] = d["step"]
        out["epoch"][:] = d["epoch"]


@dataclass
class Stream:
    """A training stream: the Ray dataset plus what a consumer needs to interpret it."""

    dataset: Any  # ray.data.Dataset
    genes: list[str]
    labels: CorpusLabels
    batches_per_epoch: int  # over all workers (each worker gets batches_per_epoch / world_size)
    batch_size: int
    world_size: int
    config: Any
    reader: CorpusReader
    source: Any = None  # the Ray Datasource (its read tasks; see Shared)

    @property
    def batches_per_worker(self) -> int:
        return self.batches_per_epoch // self.world_size


def cell_stream(corpus_dir: str | os.PathLike, cfg: CellStreamConfig | None = None, *,
                split: str = TRAIN, world_size: int = 1,
                position: StreamPosition | None = None,
                transform: Callable | None = None, board: str | None = None) -> Stream:
    """The SE cell stream of a corpus (``split``: "train", or "val" with ``val_fraction``).
    ``board``: as for :func:`set_stream` (restartable trainers); ``position`` is then ignored."""
    cfg = cfg or CellStreamConfig()
    position = position or StreamPosition()
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    reader = CorpusReader(corpus_dir, genes=cfg.genes if isinstance(cfg.genes, str)
                          else list(cfg.genes), target_sum=cfg.target_sum, log1p=cfg.log1p,
                          normalize=cfg.normalize, decode_threads=cfg.decode_threads)
    genes = list(reader.genes)
    labels, _ = corpus_labels(reader)
    plan = CellPlan(reader.n_cells, cfg)
    units0 = plan.epoch_units(split, position.epoch, world_size)
    n_batches = plan.batches_per_epoch(split, world_size)
    if n_batches == 0:
        raise ValueError(f"the {split} cells ({plan.n_cells(split)}) do not fill one batch of "
                         f"{cfg.batch_size} per worker x {world_size} workers")
    read = functools.partial(_read_cell_units, reader, cfg, split, Shared(labels.store_maps))
    units_for = functools.partial(plan.epoch_units, split, world_size=world_size)
    # bytes of one output batch (a transform may say its own): dense X plus ~40 bytes of labels
    # per cell. It sets the block size target, so it must be close: a batch more than 1.5x
    # the target is cut into several blocks, which streaming_split deals to different workers
    per_row = getattr(transform, "bytes_per_row", None) or reader.n_genes * 4 + 40
    ds, src = _dataset(read, units_for, cfg.batch_size * per_row, position,
                       transform or DenseCells(reader), len(units0), board)
    return Stream(ds, genes, labels, n_batches, cfg.batch_size, world_size, cfg, reader, src)


# ---------------------------------------------------------------------------------------------
# ST set stream
# ---------------------------------------------------------------------------------------------


def _read_set_units(reader: CorpusReader, shared_plan: Shared | SetPlan, split: str, epoch: int,
                    units: list[Unit], skip: frozenset):
    plan: SetPlan = shared_plan.get() if isinstance(shared_plan, Shared) else shared_plan
    B, S = plan.cfg.batch_size, plan.cfg.set_size
    for u in units:
        d = plan.read_unit(reader, split, epoch, u)
        n_sets = d["set_id"].size
        for j in range(u.n_batches):
            step = u.first_batch + j
            if step in skip:
                continue
            a, z = j * B, min((j + 1) * B, n_sets)
            out = {k: v[a:z] for k, v in d.items() if isinstance(v, np.ndarray)}
            out["pert_cells"] = _csr_parts(_slice_rows(d["pert_cells"], slice(a * S, z * S)))
            out["ctrl_cells"] = _csr_parts(_slice_rows(d["ctrl_cells"], slice(a * S, z * S)))
            out["epoch"] = epoch
            yield _pack(out)


class DenseSets(_PackedTransform):
    """map_batches transform: packed batches of sets -> one row per set with ``ctrl`` and
    ``pert`` [S, G] float32 (normalised) and per-set indices."""

    KEYS = {"pert_index": np.int32, "context_index": np.int32, "batch_index": np.int32,
            "set_id": np.int64, "is_padding": bool, "step": np.int64}
    CELL_KEYS = {"pert_cell_batch": np.int32, "ctrl_cell_batch": np.int32,
                 "pert_store": np.int32, "pert_row": np.int64, "ctrl_store": np.int32,
                 "ctrl_row": np.int64}

    def __init__(self, reader: CorpusReader, set_size: int):
        self.reader = reader
        self.S = set_size

    def n_rows(self, d: dict[str, Any]) -> int:
        return int(d["set_id"].size)

    def allocate(self, n: int) -> dict[str, np.ndarray]:
        S, G = self.S, self.reader.n_genes
        # densify zeroes every row it writes
        out = {"ctrl": np.empty((n, S, G), np.float32), "pert": np.empty((n, S, G), np.float32)}
        out.update({k: np.empty(n, t) for k, t in self.KEYS.items()})
        out.update({k: np.empty((n, S), t) for k, t in self.CELL_KEYS.items()})
        out["epoch"] = np.empty(n, np.int32)
        return out

    def fill(self, d: dict[str, Any], out: dict[str, np.ndarray]) -> None:
        r, S = self.reader, self.S
        n = out["ctrl"].shape[0]
        for name in ("ctrl", "pert"):
            blk = r.normalize(_csr_from(d[f"{name}_cells"], r.n_vocab))
            r.dense(blk, out=out[name].reshape(n * S, r.n_genes))
        for k in list(self.KEYS) + list(self.CELL_KEYS):
            out[k][:] = d[k]
        out["epoch"][:] = d["epoch"]


def set_plan(corpus_dir: str | os.PathLike, cfg: SetStreamConfig,
             split: str | os.PathLike | SplitSpec | None,
             reader: CorpusReader | None = None) -> tuple[SetPlan, CorpusReader]:
    """The set plan of a corpus under a split file (None = every group is training)."""
    reader = reader or CorpusReader(corpus_dir, genes=cfg.genes if isinstance(cfg.genes, str)
                                    else list(cfg.genes), target_sum=cfg.target_sum,
                                    log1p=cfg.log1p, decode_threads=cfg.decode_threads)
    labels, groups = corpus_labels(reader)
    if split is None:
        roles = np.full(len(groups), TRAIN, dtype=object)
    else:
        spec = split if isinstance(split, SplitSpec) else SplitSpec.from_toml(split)
        sources = [s.source for s in load_manifest(reader.corpus_dir).stores]
        roles = spec.group_roles(groups, sources, labels.contexts, labels.perturbations,
                                 labels.control_index)
    return SetPlan(groups, roles, labels, cfg), reader


def set_stream(corpus_dir: str | os.PathLike, cfg: SetStreamConfig | None = None, *,
               split: str | os.PathLike | SplitSpec | None = None, role: str = TRAIN,
               world_size: int = 1, position: StreamPosition | None = None,
               transform: Callable | None = None, board: str | None = None,
               embeddings: str | None = None,
               plan: tuple[SetPlan, CorpusReader] | None = None) -> Stream:
    """The ST set stream of a corpus: ``role`` "train", "val" or "test" sets of ``split``.
    ``board``: the name of a :func:`position_board` that says which epoch each execution
    plays (for restartable trainers); ``position`` is then ignored. ``embeddings``: an obsm
    key (e.g. "X_se") of cell embeddings stored in the corpus: each set row then also carries
    ``ctrl_emb`` and ``pert_emb`` [S, E] (:class:`SetsWithEmbeddings`). ``plan``: what
    :func:`set_plan` returned for the same corpus, config and split, reused instead of built
    again (a pass over every store's labels on the driver)."""
    if embeddings is not None and transform is not None:
        raise ValueError("pass either transform= or embeddings= (a custom transform can gather "
                         "embeddings itself with vcc_dist.data.embeddings.CorpusEmbeddings)")
    cfg = cfg or SetStreamConfig()
    position = position or StreamPosition()
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    plan, reader = plan if plan is not None else set_plan(corpus_dir, cfg, split)
    units0 = plan.epoch_units(role, position.epoch, world_size)
    n_batches = sum(u.n_batches for u in units0)
    read = functools.partial(_read_set_units, reader, Shared(plan), role)
    units_for = functools.partial(plan.epoch_units, role, world_size=world_size)
    # bytes of one output batch: two dense [S, G] per set plus ~40 bytes of labels per cell
    per_batch = cfg.batch_size * cfg.set_size * (2 * reader.n_genes * 4 + 40)
    if embeddings is not None:
        # checked here, in the driver: a missing store fails now, not in a read task
        emb = CorpusEmbeddings(reader.corpus_dir, embeddings, decode_threads=cfg.decode_threads)
        per_batch += cfg.batch_size * cfg.set_size * 2 * emb.dim * 4
        transform = SetsWithEmbeddings(reader, cfg.set_size, emb)
    ds, src = _dataset(read, units_for, per_batch, position,
                       transform or DenseSets(reader, cfg.set_size), len(units0), board)
    return Stream(ds, list(reader.genes), plan.labels, n_batches, cfg.batch_size, world_size,
                  cfg, reader, src)


class SetsWithEmbeddings(DenseSets):
    """:class:`DenseSets` plus each cell's stored embedding: ``ctrl_emb`` and ``pert_emb``
    [S, E] float32 per set, gathered from ``CorpusEmbeddings`` (``obsm/<key>`` of the stores)
    with the cells' ``ctrl_store``/``ctrl_row`` and ``pert_store``/``pert_row``. For ST models
    in SE embedding space; the gene-space ``ctrl``/``pert`` stay (targets, decoder losses)."""

    def __init__(self, reader: CorpusReader, set_size: int, embeddings):
        super().__init__(reader, set_size)
        self.embeddings = embeddings  # vcc_dist.data.embeddings.CorpusEmbeddings

    def allocate(self, n: int) -> dict[str, np.ndarray]:
        out = super().allocate(n)
        E = self.embeddings.dim
        out["ctrl_emb"] = np.empty((n, self.S, E), np.float32)
        out["pert_emb"] = np.empty((n, self.S, E), np.float32)
        return out

    def fill(self, d: dict[str, Any], out: dict[str, np.ndarray]) -> None:
        super().fill(d, out)
        n, S, E = out["ctrl"].shape[0], self.S, self.embeddings.dim
        for name in ("ctrl", "pert"):
            self.embeddings.gather(np.asarray(d[f"{name}_store"]).reshape(-1),
                                   np.asarray(d[f"{name}_row"]).reshape(-1),
                                   out=out[f"{name}_emb"].reshape(n * S, E))
