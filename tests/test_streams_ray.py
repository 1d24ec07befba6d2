"""Both streams through Ray Data: determinism, epochs, resumption, and a 2-worker Ray Train loop
consuming them (integration tier: starts a local Ray cluster)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vcc_dist.data.plans import CellStreamConfig, SetStreamConfig, StreamPosition
from vcc_dist.data.streams import cell_stream, set_stream

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CELLS = CellStreamConfig(batch_size=32, block_rows=8, buffer_blocks=8, seed=4, genes="hvg")
SETS = SetStreamConfig(set_size=16, batch_size=4, seed=4)



def _epoch(ds, batch_size, key):
    out = []
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out.append((int(b["epoch"][0]), int(b["step"][0]), b[key].copy()))
    return out


def test_cell_stream_epochs_seed_and_resume(ray_local, tiny_corpus):
    _, corpus = tiny_corpus
    s = cell_stream(corpus, CELLS)
    e0 = _epoch(s.dataset, s.batch_size, "row")
    e1 = _epoch(s.dataset, s.batch_size, "row")  # the dataset plays the next epoch
    assert {e for e, _, _ in e0} == {0} and {e for e, _, _ in e1} == {1}
    assert [st for _, st, _ in e0] == list(range(s.batches_per_epoch))
    assert all(r.size == CELLS.batch_size for _, _, r in e0)
    assert not all(np.array_equal(a[2], b[2]) for a, b in zip(e0, e1))
    # the same seed gives the same batches; a fresh stream starts at epoch 0 again
    again = _epoch(cell_stream(corpus, CELLS).dataset, s.batch_size, "row")
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(e0, again))
    # resume inside epoch 1 after batches 0..4 were consumed: the rest of epoch 1, then epoch 2
    r = cell_stream(corpus, CELLS, position=StreamPosition(1, 5))
    rest = _epoch(r.dataset, r.batch_size, "row")
    assert [st for _, st, _ in rest] == list(range(5, s.batches_per_epoch))
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(e1[5:], rest))
    assert {e for e, _, _ in _epoch(r.dataset, r.batch_size, "row")} == {2}
    # dense X: HVG columns, log1p values
    b = next(iter(s.dataset.iter_batches(batch_size=s.batch_size, batch_format="numpy")))
    assert b["X"].shape == (32, len(s.genes)) and b["X"].dtype == np.float32
    rd = s.reader
    np.testing.assert_array_equal(b["X"], rd.dense(rd.normalize(rd.read_many(b["store"], b["row"]))))


def test_set_stream_resume_by_consumed_ids(ray_local, tiny_corpus):
    sim, corpus = tiny_corpus
    s = set_stream(corpus, SETS, split=sim.split_path)
    full = _epoch(s.dataset, s.batch_size, "pert_row")
    assert [st for _, st, _ in full] == list(range(s.batches_per_epoch))
    b = next(iter(s.dataset.iter_batches(batch_size=s.batch_size, batch_format="numpy")))
    G = len(s.genes)
    assert b["ctrl"].shape == b["pert"].shape == (4, 16, G)
    assert b["pert_index"].shape == b["batch_index"].shape == b["context_index"].shape == (4,)
    # two workers consumed steps {0, 1, 3}: a restart skips exactly those
    r = set_stream(corpus, SETS, split=sim.split_path, position=StreamPosition(0, (0, 1, 3)))
    rest = _epoch(r.dataset, r.batch_size, "pert_row")
    assert [st for _, st, _ in rest] == [i for i in range(s.batches_per_epoch) if i not in (0, 1, 3)]
    want = {st: rows for _, st, rows in full}
    assert all(np.array_equal(want[st], rows) for _, st, rows in rest)
    # the tensors are the normalised rows of the cells the batch names
    rd = s.reader
    for name in ("ctrl", "pert"):
        for j in (0, 3):
            want = rd.dense(rd.normalize(rd.read_many(b[f"{name}_store"][j], b[f"{name}_row"][j])))
            np.testing.assert_array_equal(b[name][j], want)
    v = set_stream(corpus, SETS, split=sim.split_path, role="val")
    vb = _epoch(v.dataset, v.batch_size, "is_padding")
    assert len(vb) == v.batches_per_epoch > 0


def _train_loop(config):
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    seen = {}
    for name, bs in (("cells", config["cells_bs"]), ("sets", config["sets_bs"])):
        shard = ray.train.get_dataset_shard(name)
        epochs = []
        for _ in range(2):
            steps = []
            for b in shard.iter_torch_batches(batch_size=bs):
                key = "X" if name == "cells" else "pert"
                assert b[key].dtype.is_floating_point and b[key].shape[0] == bs
                if name == "sets":
                    assert tuple(b["ctrl"].shape) == tuple(b["pert"].shape)
                    assert b["ctrl"].shape[1] == config["set_size"]
                steps.append([int(b["epoch"][0]), int(b["step"][0])])
            epochs.append(steps)
        seen[name] = epochs
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(seen, f)


def test_two_worker_train_loop_consumes_both_streams(ray_local, tiny_corpus, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sim, corpus = tiny_corpus
    cells = cell_stream(corpus, CELLS, world_size=2)
    sets = set_stream(corpus, SETS, split=sim.split_path, world_size=2)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"out": str(tmp_path), "cells_bs": cells.batch_size,
                           "sets_bs": sets.batch_size, "set_size": SETS.set_size},
        # half a CPU per worker leaves a CPU for the Ray Data read tasks
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"cells": cells.dataset, "sets": sets.dataset},
        run_config=RunConfig(name="streams", storage_path=str(tmp_path / "ray")))
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name, stream in (("cells", cells), ("sets", sets)):
        for epoch in range(2):
            got = [[tuple(x) for x in rk[name][epoch]] for rk in ranks]
            # even shards, every batch of the epoch exactly once, all from this epoch
            assert len(got[0]) == len(got[1]) == stream.batches_per_worker
            steps = sorted(st for g in got for e, st in g)
            assert steps == list(range(stream.batches_per_epoch))
            assert {e for g in got for e, _ in g} == {epoch}


def test_read_tasks_carry_a_reference_to_the_plan_not_the_plan(ray_local, tiny_corpus):
    """The driver puts the set plan (and the cell stream's label maps) into the object store
    once; a read task carries only the reference: before, every task of every epoch serialised
    the whole plan (~30 bytes per group row: 1.2 GB at Tahoe scale, x 1,024 tasks)."""
    import pickle

    from vcc_dist.data.streams import set_plan

    sim, corpus = tiny_corpus
    s = set_stream(corpus, SETS, split=sim.split_path)
    plan, _ = set_plan(corpus, SETS, sim.split_path)
    tasks = s.source.get_read_tasks(4)
    assert len(tasks) == 4
    plan_bytes = len(pickle.dumps(plan, protocol=5))
    task_bytes = [len(pickle.dumps(t, protocol=5)) for t in tasks]
    # what a task holds besides the plan (its units, the reader's settings) stays; the plan,
    # several times that, is gone from every task
    with_plan = len(pickle.dumps((tasks[0], plan), protocol=5))
    assert max(task_bytes) < plan_bytes and with_plan - task_bytes[0] > 0.9 * plan_bytes, (
        task_bytes, plan_bytes)
    # and the tasks still read every batch of the epoch
    n = sum(1 for t in tasks for _ in t.read_fn())
    assert n == s.batches_per_epoch
