"""Seeded epoch plans for the two training streams, and the code that reads one plan unit.

Both streams are deterministic functions of (seed, epoch): the driver draws a compact plan
(blocks or sets, grouped into *units*), Ray Data read tasks read whole units, and every random
choice inside a unit comes from a generator keyed by (seed, epoch, purpose, unit). Hence the
same seed gives the same batches whatever the Ray parallelism, and a stream resumes from
(epoch, batches already consumed) by skipping those batch ids.

SE cell stream (block sampling, as every fast single-cell loader does): the cells of each store
are cut into blocks of ``block_rows`` consecutive rows; each epoch the blocks are permuted, a
unit gathers ``buffer_blocks`` of them (a buffer of cells from random places of random
stores), shuffles its cells and cuts them into batches. Every batch has exactly
``batch_size`` cells; the remainder of a unit (fewer than ``batch_size`` cells, only where a
store's last short block falls) is skipped that epoch.

ST set stream: a set is ``set_size`` perturbed cells of one group (context and perturbation; and
batch with ``control_strategy="batch"`` or ``group_by="context_pert_batch"``, as cell-load groups)
with ``set_size`` control cells of the same context
(``control_strategy="random"``) or of the same context and batch, cell by cell, falling back to
the context where that batch has no controls (``"batch"``). Each epoch, the cells of every group
are ordered and cut into sets (a last short set is topped up with repeats of its own cells, so
every set is full); sets are shuffled, grouped into units, and batches are ``batch_size``
consecutive sets. A set's cells are ``block_rows``-row runs of its group in a seeded block order
(block sampling, so that a set reads a few runs instead of S scattered rows; ``block_rows=1`` draws
cells uniformly, as cell-load). With ``control_sets`` (STATE's ``should_yield_control_cells``,
on by default) the control cells of every context also form training sets, their controls
matched the same way. Controls are drawn from a per-unit *control reservoir*: random blocks of
``block_rows`` consecutive control rows of the matching pool, 1/``control_reuse`` as many cells
as the unit draws; each set draws its controls uniformly from it. Control cells are reused
anyway (the VCC data have ~7 perturbed cells per control cell); the reservoir only makes a
control read serve several draws of the same unit. A per-cell uniform draw from the
whole pool (``block_rows=1``) decodes a whole inner chunk for every control cell; the
reservoir reads whole chunks and uses what it reads (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from vcc_dist import constants as K
from vcc_dist.data.labels import CorpusLabels
from vcc_dist.data.reader import CorpusReader, CSRBlock
from vcc_dist.data.splits import TEST, TRAIN, VAL, has_role

# purposes of the generators (never reuse a number for a new purpose: it changes old streams)
_P_BLOCKS, _P_UNIT, _P_VAL, _P_SETS, _P_GROUP, _P_FILL, _P_CTRL_BLOCKS, _P_CTRL_DRAW = range(1, 9)


def rng_for(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def _positive(name: str, v: int) -> None:
    if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive integer")


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream (re)starts: the epoch, and the batch ids of that epoch already
    consumed (by any worker) before a restart. ``consumed`` may also be given as an int n,
    meaning batches 0..n-1."""

    epoch: int = 0
    consumed: tuple[int, ...] | int = ()

    def skip_set(self) -> frozenset[int]:
        if isinstance(self.consumed, (int, np.integer)):
            return frozenset(range(int(self.consumed)))
        return frozenset(int(x) for x in self.consumed)


# ---------------------------------------------------------------------------------------------
# SE: cells
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellStreamConfig:
    """Options of the SE cell stream (see the module docstring)."""

    batch_size: int = 256
    block_rows: int = 64  # consecutive rows per block (~ one inner chunk of the corpus layout)
    buffer_blocks: int = 64  # blocks pooled and shuffled together (4,096 cells by default)
    seed: int = 0
    val_fraction: float = 0.0  # blocks held out (fixed by the seed) for the "val" stream
    genes: str | tuple[str, ...] = "all"  # "all", "hvg" or gene symbols
    target_sum: float | str | None = None  # None: corpus median total; "store": each store's median
    log1p: bool = True
    decode_threads: int = 1  # zarrs threads per read task (each task holds one Ray CPU)
    normalize: bool = True  # False: raw counts (as float32), e.g. for SE sentences

    def __post_init__(self):
        for k in ("batch_size", "block_rows", "buffer_blocks", "decode_threads"):
            _positive(k, getattr(self, k))
        if (self.block_rows * self.buffer_blocks) % self.batch_size:
            raise ValueError(f"the buffer ({self.buffer_blocks} blocks x {self.block_rows} rows) "
                             f"must be a multiple of batch_size={self.batch_size}; change "
                             "buffer_blocks or batch_size")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if isinstance(self.genes, list):
            object.__setattr__(self, "genes", tuple(self.genes))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Unit:
    """One read unit of an epoch: what to read, and which global batch ids it yields."""

    index: int
    first_batch: int
    n_batches: int
    payload: Any  # block ids (cells) or set table rows (sets)


class CellPlan:
    """Blocks of a corpus and their per-epoch order (driver side, O(n_blocks) memory)."""

    def __init__(self, n_cells: np.ndarray, cfg: CellStreamConfig):
        self.cfg = cfg
        R = cfg.block_rows
        stores, starts, stops = [], [], []
        for s, n in enumerate(np.asarray(n_cells, np.int64)):
            b = np.arange(0, n, R, dtype=np.int64)
            stores.append(np.full(b.size, s, np.int32))
            starts.append(b)
            stops.append(np.minimum(b + R, n))
        self.store = np.concatenate(stores) if stores else np.zeros(0, np.int32)
        self.start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.stop = np.concatenate(stops) if stops else np.zeros(0, np.int64)
        n_blocks = self.store.size
        is_val = np.zeros(n_blocks, bool)
        if cfg.val_fraction > 0 and n_blocks:
            k = max(1, int(round(cfg.val_fraction * n_blocks)))
            is_val[rng_for(cfg.seed, 0, _P_VAL).choice(n_blocks, k, replace=False)] = True
        self.is_val = is_val

    def blocks(self, split: str) -> np.ndarray:
        if split == TRAIN:
            return np.flatnonzero(~self.is_val)
        if split == VAL:
            if not self.is_val.any():
                raise ValueError("the cell stream has no validation cells: set val_fraction > 0")
            return np.flatnonzero(self.is_val)
        raise ValueError(f"split={split!r}: the cell stream has 'train' and 'val'")

    def n_cells(self, split: str) -> int:
        b = self.blocks(split)
        return int((self.stop[b] - self.start[b]).sum())

    def batches_per_epoch(self, split: str, world_size: int = 1) -> int:
        """The same every epoch: every unit of whole blocks yields buffer/batch_size batches; a
        unit holding a store's short last block, and the epoch's last unit, lose less than one
        batch each."""
        ids = self.blocks(split)
        n_short = int(((self.stop[ids] - self.start[ids]) < self.cfg.block_rows).sum())
        n = max(0, self.n_cells(split) // self.cfg.batch_size - n_short - 1)
        return n - n % max(world_size, 1)

    def epoch_units(self, split: str, epoch: int, world_size: int = 1) -> list[Unit]:
        cfg = self.cfg
        ids = self.blocks(split)
        # validation reads the same cells in the same order every epoch
        e = epoch if split == TRAIN else 0
        ids = ids[rng_for(cfg.seed, e, _P_BLOCKS).permutation(ids.size)]
        K, B = cfg.buffer_blocks, cfg.batch_size
        units, first = [], 0
        for u in range(math.ceil(ids.size / K)):
            blk = ids[u * K:(u + 1) * K]
            nb = int((self.stop[blk] - self.start[blk]).sum()) // B
            if nb:
                # the payload is self-contained: a read task needs no plan-wide arrays
                units.append(Unit(u, first, nb, (self.store[blk], self.start[blk],
                                                  self.stop[blk])))
                first += nb
        return _trim_units(units, self.batches_per_epoch(split, world_size))


def read_cell_unit(reader: CorpusReader, cfg: CellStreamConfig, split: str, epoch: int,
                   unit: Unit) -> tuple[CSRBlock, np.ndarray, np.ndarray, np.ndarray]:
    """(normalised rows in batch order, store id, row, batch id) of a unit's batches."""
    store, start, stop = unit.payload
    st = np.repeat(store, stop - start)
    rows = np.concatenate([np.arange(a, b) for a, b in zip(start, stop)])
    e = epoch if split == TRAIN else 0
    perm = rng_for(cfg.seed, e, _P_UNIT, unit.index).permutation(rows.size)
    take = perm[: unit.n_batches * cfg.batch_size]
    # each store read once in sorted runs; values normalised on the way
    block = reader.read_many(st[take], rows[take], normalize=True)
    batch_ids = unit.first_batch + np.arange(take.size) // cfg.batch_size
    return block, st[take], rows[take], batch_ids


def _trim_units(units: list[Unit], n_keep: int) -> list[Unit]:
    """Keep the first ``n_keep`` batches (a multiple of the world size: equal shards)."""
    out = []
    for u in units:
        if u.first_batch >= n_keep:
            break
        u.n_batches = min(u.n_batches, n_keep - u.first_batch)
        out.append(u)
    return out


# ---------------------------------------------------------------------------------------------
# ST: sets
# ---------------------------------------------------------------------------------------------

GROUP_BY = ("auto", "context_pert_batch", "context_pert")
CONTROL_STRATEGIES = ("random", "batch")


@dataclass(frozen=True)
class SetStreamConfig:
    """Options of the ST set stream (see the module docstring)."""

    set_size: int = 128  # S: cells per set (STATE's cell_set_len / cell_sentence_len)
    batch_size: int = 16  # sets per batch
    group_by: str = "auto"  # auto = by batch too with control_strategy "batch" (as cell-load)
    control_strategy: str = "random"
    control_sets: bool = True  # training sets of control cells (as STATE; targets = controls)
    block_rows: int = 32  # consecutive rows per block (sets and control reservoirs; 1 = per cell)
    control_reuse: float = 4.0  # control draws per reservoir cell within a unit
    sets_per_unit: int = 0  # sets read together (0 = one batch)
    min_group_cells: int = 1  # groups with fewer cells give no sets
    seed: int = 0
    genes: str | tuple[str, ...] = "all"
    target_sum: float | str | None = None  # None: corpus median total; "store": per store
    log1p: bool = True
    decode_threads: int = 1  # zarrs threads per read task (each task holds one Ray CPU)

    def __post_init__(self):
        for k in ("set_size", "batch_size", "block_rows", "min_group_cells", "decode_threads"):
            _positive(k, getattr(self, k))
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by={self.group_by!r}: expected one of {GROUP_BY}")
        if self.control_strategy not in CONTROL_STRATEGIES:
            raise ValueError(f"control_strategy={self.control_strategy!r}: expected one of "
                             f"{CONTROL_STRATEGIES}")
        if not self.control_reuse > 0:
            raise ValueError(f"control_reuse={self.control_reuse} must be > 0")
        if self.sets_per_unit < 0 or (self.sets_per_unit and self.sets_per_unit % self.batch_size):
            raise ValueError(f"sets_per_unit={self.sets_per_unit} must be 0 or a multiple of "
                             f"batch_size={self.batch_size}")
        if isinstance(self.genes, list):
            object.__setattr__(self, "genes", tuple(self.genes))

    @property
    def groups_by_batch(self) -> bool:
        if self.group_by == "auto":
            return self.control_strategy == "batch"
        return self.group_by == "context_pert_batch"

    @property
    def unit_sets(self) -> int:
        return self.sets_per_unit or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Ranges:
    """Cells of a group or pool: row ranges in stores, addressed by a running index."""

    store: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    cum: np.ndarray = field(init=False)

    def __post_init__(self):
        self.cum = np.r_[0, np.cumsum(self.stop - self.start)].astype(np.int64)

    @property
    def n(self) -> int:
        return int(self.cum[-1])

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Running indices -> (store, row)."""
        j = np.searchsorted(self.cum, k, side="right") - 1
        return self.store[j], self.start[j] + (k - self.cum[j])


class SetPlan:
    """Groups, control pools and per-epoch set order of a corpus under a split."""

    def __init__(self, groups: pd.DataFrame, roles: np.ndarray, labels: CorpusLabels,
                 cfg: SetStreamConfig):
        self.cfg = cfg
        self.labels = labels
        ctrl = labels.control_index
        g = groups.assign(role=roles)
        g = g[g["role"] != ""]
        keys = ["role", "context", "pert"] + (["batch"] if cfg.groups_by_batch else [])
        self.groups: list[_Ranges] = []
        rows = []
        for key, sub in g.groupby(keys, sort=True):
            sub = sub.sort_values(["store", "start"])
            r = _Ranges(sub["store"].to_numpy(np.int32), sub["start"].to_numpy(np.int64),
                        sub["stop"].to_numpy(np.int64))
            if r.n == 0:
                continue
            d = dict(zip(keys, key))
            rows.append((d["role"], int(d["context"]), int(d["pert"]),
                         int(d.get("batch", -1)), r.n))
            self.groups.append(r)
        self.table = pd.DataFrame(rows, columns=["role", "context", "pert", "batch", "n_cells"])
        # control pools: every control group of a used dataset, by context and (context, batch)
        c = g[g["pert"] == ctrl]
        self.pools: dict[tuple[int, int], _Ranges] = {}
        for (cx,), sub in c.groupby(["context"]):
            self.pools[(int(cx), -1)] = _ranges_of(sub)
        for (cx, b), sub in c.groupby(["context", "batch"]):
            self.pools[(int(cx), int(b))] = _ranges_of(sub)
        nb = len(labels.batches) + 1
        self._pool_codes = np.array([c * nb + (b + 1) for c, b in self.pools], np.int64)
        self.is_control_group = self.table["pert"].to_numpy() == ctrl

    def group_ids(self, split: str) -> np.ndarray:
        t = self.table
        sel = (np.array([has_role(r, split) for r in t["role"]], bool)
               & (t["n_cells"] >= self.cfg.min_group_cells).to_numpy())
        if not (split == TRAIN and self.cfg.control_sets):
            sel &= ~self.is_control_group
        return np.flatnonzero(sel)

    def n_sets(self, split: str) -> int:
        n = self.table["n_cells"].to_numpy()[self.group_ids(split)]
        return int(np.ceil(n / self.cfg.set_size).sum())

    def epoch_units(self, split: str, epoch: int, world_size: int = 1) -> list[Unit]:
        """Units of (group, k-th set of that group) rows. Training sets are reshuffled every
        epoch and trimmed to a multiple of batch_size x world_size sets; val/test sets keep one
        order and the last batch is padded with repeats (flagged ``is_padding``)."""
        if split not in (TRAIN, VAL, TEST):
            raise ValueError(f"split={split!r}: expected train, val or test")
        cfg = self.cfg
        gids = self.group_ids(split)
        if gids.size == 0:
            raise ValueError(f"the split has no {split} sets (no groups with role {split!r} and "
                             f">= {cfg.min_group_cells} cells)")
        n = self.table["n_cells"].to_numpy()[gids]
        per = np.ceil(n / cfg.set_size).astype(np.int64)
        sets_g = np.repeat(gids, per)
        sets_k = np.concatenate([np.arange(p) for p in per])
        e = epoch if split == TRAIN else 0
        order = rng_for(cfg.seed, e, _P_SETS).permutation(sets_g.size)
        sets_g, sets_k = sets_g[order], sets_k[order]
        pad = np.zeros(sets_g.size, bool)
        quantum = cfg.batch_size * max(world_size, 1)
        if split == TRAIN:
            keep = sets_g.size - sets_g.size % quantum
            if keep == 0:
                raise ValueError(f"{sets_g.size} training sets cannot fill one batch of "
                                 f"{cfg.batch_size} sets per worker x {world_size} workers; "
                                 "lower batch_size or set_size")
            sets_g, sets_k, pad = sets_g[:keep], sets_k[:keep], pad[:keep]
        else:
            extra = (-sets_g.size) % quantum
            if extra:
                rep = np.arange(extra) % sets_g.size
                sets_g = np.r_[sets_g, sets_g[rep]]
                sets_k = np.r_[sets_k, sets_k[rep]]
                pad = np.r_[pad, np.ones(extra, bool)]
        U, B = cfg.unit_sets, cfg.batch_size
        units = []
        for u in range(math.ceil(sets_g.size / U)):
            sl = slice(u * U, (u + 1) * U)
            # the unit's own set ids only (an arange of every set per unit made the plan
            # quadratic in the corpus: 2.9 GB at 10^7 cells, benchmarks/results/scale.md)
            ids = np.arange(u * U, min((u + 1) * U, sets_g.size))
            units.append(Unit(u, u * U // B, math.ceil(ids.size / B),
                              (ids, sets_g[sl], sets_k[sl], pad[sl])))
        return units

    # -- reading -------------------------------------------------------------------------------
    def _set_cells(self, epoch: int, g: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(store, row) of the k-th set of group g in this epoch: the group's cells in blocks of
        ``block_rows`` consecutive rows, blocks in a seeded order, cut into sets of S; a last
        short set is topped up with repeats of its own cells (as cell-load pads)."""
        S, R = self.cfg.set_size, self.cfg.block_rows
        r = self.groups[g]
        n_blocks = -(-r.n // R)
        border = rng_for(self.cfg.seed, epoch, _P_GROUP, g).permutation(n_blocks)
        # running indices of the cells in block order, restricted to the k-th set's slice
        first, last = k * S, min((k + 1) * S, r.n)
        bstart = border * R
        blen = np.minimum(bstart + R, r.n) - bstart
        cum = np.r_[0, np.cumsum(blen)]
        i0 = np.searchsorted(cum, first, side="right") - 1
        i1 = np.searchsorted(cum, last, side="left")
        idx = np.concatenate([np.arange(bstart[i], bstart[i] + blen[i]) for i in range(i0, i1)])
        idx = idx[first - cum[i0]: first - cum[i0] + (last - first)]
        if idx.size < S:
            fill = rng_for(self.cfg.seed, epoch, _P_FILL, g, k).integers(0, idx.size, S - idx.size)
            idx = np.r_[idx, idx[fill]]
        return r.locate(idx)

    def read_unit(self, reader: CorpusReader, split: str, epoch: int,
                  unit: Unit) -> dict[str, Any]:
        """Normalised perturbed and control rows of a unit's sets, plus their labels."""
        cfg = self.cfg
        S = cfg.set_size
        e = epoch if split == TRAIN else 0
        set_ids, gids, ks, pad = unit.payload
        n_sets = gids.size
        p_store = np.empty(n_sets * S, np.int32)
        p_row = np.empty(n_sets * S, np.int64)
        for j, (g, k) in enumerate(zip(gids, ks)):
            sl = slice(j * S, (j + 1) * S)
            p_store[sl], p_row[sl] = self._set_cells(e, int(g), int(k))
        ctx = self.table["context"].to_numpy()[gids]
        pert_block = reader.read_many(p_store, p_row, normalize=True)
        p_batch = self._cell_batches(reader, p_store, p_row)
        # controls: per cell, the pool of its context (random) or of its context and batch
        cell_ctx = np.repeat(ctx, S).astype(np.int64)
        nb = len(self.labels.batches) + 1
        if cfg.control_strategy == "batch":
            code = cell_ctx * nb + (p_batch.astype(np.int64) + 1)
            has = np.isin(code, self._pool_codes)
            code = np.where(has, code, cell_ctx * nb)  # fall back to the context's pool
        else:
            code = cell_ctx * nb
        c_store = np.empty(n_sets * S, np.int32)
        c_row = np.empty(n_sets * S, np.int64)
        for ki, kc in enumerate(np.unique(code)):
            key = (int(kc // nb), int(kc % nb) - 1)
            if key not in self.pools:
                raise ValueError(f"context {self.labels.contexts[key[0]]!r} has no control cells "
                                 f"({self.labels.control_label!r}); its sets cannot be matched")
            pool = self.pools[key]
            where = np.flatnonzero(code == kc)
            res = self._reservoir(pool, where.size, e, unit.index, int(kc))
            draw = rng_for(cfg.seed, e, _P_CTRL_DRAW, unit.index, int(kc))
            picks = np.empty(where.size, np.int64)
            # per set: uniform without replacement from the reservoir when it is large enough
            set_of = where // S
            bounds = np.flatnonzero(np.r_[True, set_of[1:] != set_of[:-1], True])
            for a, b in zip(bounds[:-1], bounds[1:]):
                m = int(b - a)
                picks[a:b] = draw.choice(res.size, m, replace=m > res.size)
            c_store[where], c_row[where] = pool.locate(res[picks])
        ctrl_block = reader.read_many(c_store, c_row, normalize=True)
        c_batch = self._cell_batches(reader, c_store, c_row)
        t = self.table
        return {
            "pert_cells": pert_block, "ctrl_cells": ctrl_block,
            "pert_index": t["pert"].to_numpy()[gids].astype(np.int32),
            "context_index": ctx.astype(np.int32),
            "batch_index": t["batch"].to_numpy()[gids].astype(np.int32),
            "pert_cell_batch": p_batch.reshape(n_sets, S),
            "ctrl_cell_batch": c_batch.reshape(n_sets, S),
            "set_id": set_ids.astype(np.int64), "is_padding": pad,
            "step": (unit.first_batch + np.arange(n_sets) // cfg.batch_size).astype(np.int64),
            "pert_store": p_store.reshape(n_sets, S), "pert_row": p_row.reshape(n_sets, S),
            "ctrl_store": c_store.reshape(n_sets, S), "ctrl_row": c_row.reshape(n_sets, S),
        }

    def _reservoir(self, pool: _Ranges, demand: int, epoch: int, unit: int,
                   key_i: int) -> np.ndarray:
        """Running indices (into ``pool``) of this unit's control reservoir."""
        cfg = self.cfg
        want = min(pool.n, max(cfg.set_size, math.ceil(demand / cfg.control_reuse)))
        if want >= pool.n:
            return np.arange(pool.n)
        R = cfg.block_rows
        n_blocks = math.ceil(pool.n / R)
        pick = rng_for(cfg.seed, epoch, _P_CTRL_BLOCKS, unit, key_i).choice(
            n_blocks, min(n_blocks, math.ceil(want / R)), replace=False)
        pick.sort()
        return np.concatenate([np.arange(b * R, min((b + 1) * R, pool.n)) for b in pick])

    def _cell_batches(self, reader: CorpusReader, store: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Corpus-wide batch code of each (store, row) cell."""
        out = np.empty(row.size, np.int32)
        maps = self.labels.store_maps[K.BATCH_KEY]
        for s in np.unique(store):
            m = store == s
            out[m] = maps[int(s)][reader.store(int(s)).codes[K.BATCH_KEY][row[m]]]
        return out


def _ranges_of(sub: pd.DataFrame) -> _Ranges:
    sub = sub.sort_values(["store", "start"])
    return _Ranges(sub["store"].to_numpy(np.int32), sub["start"].to_numpy(np.int64),
                   sub["stop"].to_numpy(np.int64))


__all__ = [
    "CellPlan",
    "CellStreamConfig",
    "SetPlan",
    "SetStreamConfig",
    "StreamPosition",
    "Unit",
    "read_cell_unit",
    "rng_for",
]
