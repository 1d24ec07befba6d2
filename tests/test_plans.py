"""Epoch plans of the two streams (no Ray): coverage, purity, control matching, sharding,
determinism and resumption."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

from vcc_dist import constants as K
from vcc_dist.data.corpus import store_path
from vcc_dist.data.plans import (
    CellPlan,
    CellStreamConfig,
    SetStreamConfig,
    StreamPosition,
    read_cell_unit,
)
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.splits import SplitSpec
from vcc_dist.data.streams import set_plan

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def obs(tiny_corpus):
    """Per store: obs labels as numpy string arrays."""
    _, corpus = tiny_corpus
    r = CorpusReader(corpus)
    out = []
    for name in r.store_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = ad.read_zarr(store_path(corpus, name)).obs
        out.append({k: o[k].astype(str).to_numpy() for k in (K.CONTEXT_KEY, K.PERT_KEY,
                                                              K.BATCH_KEY)})
    return out


def _cell_epoch(reader, cfg, epoch, world=1, split="train"):
    plan = CellPlan(reader.n_cells, cfg)
    units = plan.epoch_units(split, epoch, world)
    cells, steps = [], []
    for u in units:
        _, st, rows, ids = read_cell_unit(reader, cfg, split, epoch, u)
        cells += list(zip(st.tolist(), rows.tolist()))
        steps.append(ids)
    return plan, units, cells, np.concatenate(steps)


def test_cell_epoch_covers_cells_once_in_full_batches(tiny_corpus):
    _, corpus = tiny_corpus
    r = CorpusReader(corpus)
    cfg = CellStreamConfig(batch_size=32, block_rows=8, buffer_blocks=8)
    plan, units, cells, steps = _cell_epoch(r, cfg, 0)
    n_total = int(r.n_cells.sum())
    assert len(cells) == len(set(cells)), "a cell was served twice in one epoch"
    assert len(cells) % cfg.batch_size == 0
    # only unit remainders are skipped: < one batch per store's short last block, + 1
    n_short = int(((plan.stop - plan.start) < cfg.block_rows).sum())
    assert n_total - len(cells) < cfg.batch_size * (n_short + 2)
    # the same number of batches every epoch (a fixed length for schedulers and sharding)
    assert len(cells) // cfg.batch_size == plan.batches_per_epoch("train")
    for e in (1, 2, 3):
        assert sum(u.n_batches for u in plan.epoch_units("train", e)) == len(cells) // 32
    # batch ids are consecutive and each batch has batch_size cells
    assert np.array_equal(np.unique(steps, return_counts=True)[1],
                          np.full(len(cells) // 32, 32))
    # blocks: runs of consecutive rows of one store (block sampling)
    u = units[0]
    assert np.all(u.payload[2] - u.payload[1] <= cfg.block_rows)


def test_cell_epochs_are_seeded(tiny_corpus):
    _, corpus = tiny_corpus
    r = CorpusReader(corpus)
    cfg = CellStreamConfig(batch_size=32, block_rows=8, buffer_blocks=8, seed=5)
    a = _cell_epoch(r, cfg, 0)[2]
    assert a == _cell_epoch(r, cfg, 0)[2]
    assert a != _cell_epoch(r, cfg, 1)[2]
    assert a != _cell_epoch(r, CellStreamConfig(batch_size=32, block_rows=8, buffer_blocks=8,
                                                seed=6), 0)[2]


def test_cell_validation_blocks_fixed_and_disjoint(tiny_corpus):
    _, corpus = tiny_corpus
    r = CorpusReader(corpus)
    cfg = CellStreamConfig(batch_size=16, block_rows=8, buffer_blocks=8, val_fraction=0.2)
    tr0 = set(_cell_epoch(r, cfg, 0)[2])
    va0 = _cell_epoch(r, cfg, 0, split="val")[2]
    va3 = _cell_epoch(r, cfg, 3, split="val")[2]
    assert va0 == va3 and not tr0 & set(va0)
    with pytest.raises(ValueError, match="val_fraction > 0"):
        CellPlan(r.n_cells, CellStreamConfig()).blocks("val")


def test_cell_even_sharding(tiny_corpus):
    _, corpus = tiny_corpus
    r = CorpusReader(corpus)
    for world in (2, 3):
        plan = CellPlan(r.n_cells, CellStreamConfig(batch_size=32, block_rows=8, buffer_blocks=8))
        n = sum(u.n_batches for u in plan.epoch_units("train", 0, world))
        assert n % world == 0 and n > 0


def test_stream_position_skip_set():
    assert StreamPosition(2, 3).skip_set() == {0, 1, 2}
    assert StreamPosition(0, (5, 1)).skip_set() == {1, 5}


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(block_rows=-1),
                                 dict(batch_size=512, block_rows=4, buffer_blocks=4),
                                 dict(batch_size=48, block_rows=8, buffer_blocks=8),
                                 dict(val_fraction=1.0)])
def test_cell_config_validation(bad):
    with pytest.raises(ValueError):
        CellStreamConfig(**bad)


# ---------------------------------------------------------------------------------------------
# sets
# ---------------------------------------------------------------------------------------------


def _read_all_sets(plan, reader, split, epoch, world=1):
    out = []
    for u in plan.epoch_units(split, epoch, world):
        out.append(plan.read_unit(reader, split, epoch, u))
    return out


@pytest.mark.parametrize("strategy", ["random", "batch"])
def test_sets_pure_groups_and_matched_controls(tiny_corpus, obs, strategy):
    sim, corpus = tiny_corpus
    cfg = SetStreamConfig(set_size=16, batch_size=4, control_strategy=strategy, seed=1)
    plan, reader = set_plan(corpus, cfg, sim.split_path)
    ctrl = K.CONTROL_LABEL
    n_fallback = n_ctrl_cells = 0
    for d in _read_all_sets(plan, reader, "train", 0):
        for j in range(d["set_id"].size):
            ps, pr = d["pert_store"][j], d["pert_row"][j]
            cs, cr = d["ctrl_store"][j], d["ctrl_row"][j]
            pctx = {obs[s][K.CONTEXT_KEY][r] for s, r in zip(ps, pr)}
            ppert = {obs[s][K.PERT_KEY][r] for s, r in zip(ps, pr)}
            assert len(pctx) == 1 and len(ppert) == 1, "a set mixes groups"
            assert plan.labels.perturbations[d["pert_index"][j]] == ppert.pop()
            assert plan.labels.contexts[d["context_index"][j]] == next(iter(pctx))
            cctx = {obs[s][K.CONTEXT_KEY][r] for s, r in zip(cs, cr)}
            assert cctx == pctx, "controls from another context"
            assert all(obs[s][K.PERT_KEY][r] == ctrl for s, r in zip(cs, cr))
            pb = [obs[s][K.BATCH_KEY][r] for s, r in zip(ps, pr)]
            cb = [obs[s][K.BATCH_KEY][r] for s, r in zip(cs, cr)]
            if strategy == "batch":
                assert len(set(pb)) == 1, "batch strategy groups sets by batch"
                n_fallback += sum(a != b for a, b in zip(pb, cb))
                assert plan.labels.batches[d["batch_index"][j]] == pb[0]
            else:
                assert d["batch_index"][j] == -1
            # per-cell batch labels agree with the store
            assert [plan.labels.batches[b] for b in d["pert_cell_batch"][j]] == pb
            assert [plan.labels.batches[b] for b in d["ctrl_cell_batch"][j]] == cb
            n_ctrl_cells += len(cr)
    if strategy == "batch":
        # every (context, batch) of the simulator has controls: no fallback was needed
        assert n_fallback == 0 and n_ctrl_cells > 0


def test_batch_strategy_falls_back_to_context(tiny_corpus, obs):
    """Remove one (context, batch) control pool: its cells take controls of their context."""
    sim, corpus = tiny_corpus
    cfg = SetStreamConfig(set_size=16, batch_size=4, control_strategy="batch", seed=1)
    plan, reader = set_plan(corpus, cfg, sim.split_path)
    (c, b) = next(k for k in plan.pools if k[1] >= 0)
    del plan.pools[(c, b)]
    nb = len(plan.labels.batches) + 1
    plan._pool_codes = np.array([x * nb + (y + 1) for x, y in plan.pools], np.int64)
    seen = 0
    for d in _read_all_sets(plan, reader, "train", 0):
        for j in np.flatnonzero((d["context_index"] == c) & (d["batch_index"] == b)):
            cs, cr = d["ctrl_store"][j], d["ctrl_row"][j]
            assert {obs[s][K.CONTEXT_KEY][r] for s, r in zip(cs, cr)} == \
                {plan.labels.contexts[c]}
            assert all(obs[s][K.PERT_KEY][r] == K.CONTROL_LABEL for s, r in zip(cs, cr))
            seen += 1
    assert seen > 0


def test_set_epoch_covers_every_training_cell(tiny_corpus, obs):
    sim, corpus = tiny_corpus
    cfg = SetStreamConfig(set_size=16, batch_size=2, seed=2)
    plan, reader = set_plan(corpus, cfg, sim.split_path)
    got = set()
    n_rows = 0
    for d in _read_all_sets(plan, reader, "train", 0):
        got |= set(zip(d["pert_store"].ravel().tolist(), d["pert_row"].ravel().tolist()))
        n_rows += d["pert_row"].size
    split = SplitSpec.from_toml(sim.split_path)
    (key, entry), = split.fewshot.items()
    held_ctx = key.split(".", 1)[1]
    held = set(entry["val"]) | set(entry["test"])
    want = {(s, r) for s, o in enumerate(obs) for r in range(len(o[K.PERT_KEY]))
            if not (o[K.CONTEXT_KEY][r] == held_ctx and o[K.PERT_KEY][r] in held)}
    # all training cells (controls too: control sets are on by default) minus the sets that
    # were trimmed to fill whole batches (< one batch of sets)
    missing = want - got
    assert got <= want and len(missing) <= cfg.batch_size * cfg.set_size
    assert n_rows == plan.epoch_units("train", 0)[-1].first_batch * 0 + n_rows  # sanity
    # without control sets, no control cell is a target
    plan2, _ = set_plan(corpus, SetStreamConfig(set_size=16, batch_size=2, control_sets=False),
                        sim.split_path)
    for d in _read_all_sets(plan2, reader, "train", 0):
        assert (d["pert_index"] != plan2.labels.control_index).all()


def test_val_test_sets_hold_the_heldout_perturbations(tiny_corpus, obs):
    sim, corpus = tiny_corpus
    cfg = SetStreamConfig(set_size=8, batch_size=3)
    plan, reader = set_plan(corpus, cfg, sim.split_path)
    split = SplitSpec.from_toml(sim.split_path)
    (key, entry), = split.fewshot.items()
    for role in ("val", "test"):
        perts = set()
        for world in (1, 2):
            units = plan.epoch_units(role, 0, world)
            assert sum(u.n_batches for u in units) % world == 0
        for d in _read_all_sets(plan, reader, role, 7):
            for j in range(d["set_id"].size):
                ctx = plan.labels.contexts[d["context_index"][j]]
                assert f"sim.{ctx}" == key
                perts.add(plan.labels.perturbations[d["pert_index"][j]])
            # eval batches are padded with repeats, flagged
            pad = d["is_padding"]
            assert set(d["set_id"][pad]) <= set(d["set_id"])
        assert perts == set(entry[role])
        # evaluation sets do not change between epochs
        a = _read_all_sets(plan, reader, role, 0)
        b = _read_all_sets(plan, reader, role, 5)
        assert all(np.array_equal(x["pert_row"], y["pert_row"]) for x, y in zip(a, b))


def test_sets_are_seeded_and_epochs_differ(tiny_corpus):
    sim, corpus = tiny_corpus
    cfg = SetStreamConfig(set_size=16, batch_size=2, seed=9)
    plan, reader = set_plan(corpus, cfg, sim.split_path)
    a = _read_all_sets(plan, reader, "train", 0)
    b = _read_all_sets(plan, reader, "train", 0)
    c = _read_all_sets(plan, reader, "train", 1)
    for k in ("pert_row", "ctrl_row", "set_id", "pert_index"):
        assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b))
    assert not np.array_equal(np.concatenate([x["pert_row"].ravel() for x in a]),
                              np.concatenate([x["pert_row"].ravel() for x in c]))


def test_set_sharding_and_errors(tiny_corpus):
    sim, corpus = tiny_corpus
    plan, _ = set_plan(corpus, SetStreamConfig(set_size=16, batch_size=4), sim.split_path)
    for world in (1, 2, 3):
        n = sum(u.n_batches for u in plan.epoch_units("train", 0, world))
        assert n % world == 0
    with pytest.raises(ValueError, match="cannot fill one batch"):
        set_plan(corpus, SetStreamConfig(set_size=512, batch_size=64),
                 sim.split_path)[0].epoch_units("train", 0, 8)
    with pytest.raises(ValueError, match="control_strategy"):
        SetStreamConfig(control_strategy="nearest")
    with pytest.raises(ValueError, match="multiple of"):
        SetStreamConfig(batch_size=4, sets_per_unit=6)


def test_set_epoch_units_hold_only_their_own_sets(tiny_corpus):
    """Each unit carries its own set ids: an id array of every set per unit made epoch planning
    quadratic in the corpus (2.9 GB of driver memory at 10^7 cells, benchmarks/scale.py)."""
    sim, corpus = tiny_corpus
    cfg = SetStreamConfig(set_size=4, batch_size=2, seed=1)
    plan, _ = set_plan(corpus, cfg, sim.split_path)
    units = plan.epoch_units("train", 0)
    assert len(units) > 2
    seen = []
    for u in units:
        ids = u.payload[0]
        assert ids.size <= cfg.unit_sets and ids.base is None  # owns exactly its ids
        seen.extend(ids.tolist())
    assert seen == list(range(len(seen)))  # every set once, in order
