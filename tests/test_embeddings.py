"""Cell embeddings in the corpus stores (obsm/<key>): atomic writes, resume, reads, export, and
the set stream carrying them."""

from __future__ import annotations

import pickle
import shutil
import warnings

import numpy as np
import pytest

from vcc_dist.data import embeddings as E
from vcc_dist.data.corpus import load_manifest, store_path
from vcc_dist.data.embeddings import (
    CorpusEmbeddings,
    EmbeddingError,
    EmbeddingWriter,
    embedding_status,
    export_anndata,
    read_embeddings,
)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

DIM = 8
META = {"checkpoint": "se/ckpt-1", "sha256": "abc"}


def _read_zarr(path):
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_zarr(str(path))


def _write(corpus, name, key, values, meta=META, batch=37, store=None, **kw):
    """Write ``values`` (the first rows of the store: a job killed mid-way when shorter)."""
    w = EmbeddingWriter(store or store_path(corpus, name), key, None, values.shape[1],
                        meta=meta, **kw)
    for a in range(w.next_row, len(values), batch):
        w.write(a, values[a:a + batch])
    return w


@pytest.fixture(scope="module")
def corpus(tiny_corpus, tmp_path_factory):
    """A private copy of the tiny corpus with X_se written to every store; returns
    (sim, corpus dir, {store name: values})."""
    sim, src = tiny_corpus
    dst = tmp_path_factory.mktemp("emb") / "corpus"
    shutil.copytree(src, dst)
    rng = np.random.default_rng(0)
    truth = {}
    for s in load_manifest(dst).stores:
        v = rng.normal(size=(s.n_cells, DIM)).astype(np.float32)
        _write(dst, s.name, "X_se", v, batch=int(rng.integers(1, 100))).commit()
        truth[s.name] = v
    return sim, dst, truth


def test_roundtrip_every_store_and_anndata_sees_it(corpus):
    _, c, truth = corpus
    status = embedding_status(c, "X_se")
    assert set(status) == set(truth)
    for name, v in truth.items():
        m = status[name]
        assert m["complete"] is True and m["n_rows"] == len(v) and m["dim"] == DIM
        assert m["dtype"] == "float32" and m["checkpoint"] == META["checkpoint"] and m["created_at"]
        a = _read_zarr(store_path(c, name))
        np.testing.assert_array_equal(a.obsm["X_se"], v)
        assert a.obsm["X_se"].shape == (a.n_obs, DIM)
        rows = np.array([3, 0, 3, len(v) - 1, 1])
        np.testing.assert_array_equal(read_embeddings(store_path(c, name), "X_se", rows), v[rows])
        np.testing.assert_array_equal(read_embeddings(c, "X_se", rows, store=name), v[rows])
    # no temporaries left next to the stores
    assert not [p for p in (c / "stores").iterdir() if p.name.startswith(".")]


def test_killed_writer_leaves_nothing_complete(corpus):
    _, c, truth = corpus
    name = next(iter(truth))
    v = truth[name]
    w = _write(c, name, "X_kill", v[:100])  # ...then the job dies: no commit
    assert w.next_row == 100
    assert embedding_status(c, "X_kill")[name] is None
    assert not E.final_path(store_path(c, name), "X_kill").exists()
    assert "X_kill" not in _read_zarr(store_path(c, name)).obsm
    with pytest.raises(EmbeddingError, match=r"(?s)no complete cell embedding 'X_kill'.*"
                                            r"jobs/embed_cells.py"):
        CorpusEmbeddings(c, "X_kill")
    with pytest.raises(EmbeddingError, match="has no embedding"):
        read_embeddings(store_path(c, name), "X_kill", [0])
    shutil.rmtree(E.partial_path(store_path(c, name), "X_kill"))


def test_resume_continues_after_last_flushed_shard(corpus, monkeypatch):
    _, c, truth = corpus
    monkeypatch.setattr(E, "CHUNK_BYTES", 16 * DIM * 4)  # 16-row chunks
    monkeypatch.setattr(E, "SHARD_BYTES", 64 * DIM * 4)  # 64-row shards
    name = list(truth)[1]
    v = truth[name] * 2
    store = store_path(c, name)
    w = _write(c, name, "X_res", v[:150], batch=50)  # shards [0, 64) and [64, 128) flushed
    assert (w.chunk_rows, w.shard_rows) == (16, 64)
    del w
    w = EmbeddingWriter(store, "X_res", len(v), DIM, meta=META, resume=True)
    assert w.rows_done == w.next_row == 128
    with pytest.raises(EmbeddingError, match="in order"):
        w.write(0, v[:10])
    for a in range(128, len(v), 45):
        w.write(a, v[a:a + 45])
    w.commit()
    np.testing.assert_array_equal(read_embeddings(store, "X_res", np.arange(len(v))), v)
    # a partial write of another model (meta) is not resumed
    _write(c, name, "X_res2", v[:150])
    w = EmbeddingWriter(store, "X_res2", len(v), DIM, meta={"checkpoint": "other"}, resume=True)
    assert w.rows_done == 0
    w = EmbeddingWriter(store, "X_res2", len(v), DIM, meta=META, resume=False)
    assert w.rows_done == 0
    shutil.rmtree(w.partial)


def test_rewrite_replaces_only_at_commit(corpus):
    _, c, truth = corpus
    name = list(truth)[2]
    store = store_path(c, name)
    v1, v2 = truth[name], truth[name] + 1
    _write(c, name, "X_re", v1).commit()
    w = _write(c, name, "X_re", v2, meta={"checkpoint": "se/ckpt-2"})
    rows = np.arange(len(v1))
    np.testing.assert_array_equal(read_embeddings(store, "X_re", rows), v1)  # old still valid
    assert embedding_status(c, "X_re")[name]["checkpoint"] == META["checkpoint"]
    w.commit()
    np.testing.assert_array_equal(read_embeddings(store, "X_re", rows), v2)
    assert embedding_status(c, "X_re")[name]["checkpoint"] == "se/ckpt-2"
    np.testing.assert_array_equal(_read_zarr(store).obsm["X_re"], v2)
    assert not [p for p in (c / "stores").iterdir() if p.name.startswith(".")]


def test_commit_killed_before_reconsolidation_is_finished_by_status(corpus):
    _, c, truth = corpus
    name = list(truth)[3]
    store = store_path(c, name)
    before = (store / "zarr.json").read_bytes()
    _write(c, name, "X_cons", truth[name]).commit()
    (store / "zarr.json").write_bytes(before)  # as if killed right after the rename
    assert "X_cons" not in _read_zarr(store).obsm
    assert embedding_status(c, "X_cons")[name]["complete"] is True
    np.testing.assert_array_equal(_read_zarr(store).obsm["X_cons"], truth[name])


def test_write_errors(corpus):
    _, c, truth = corpus
    name = next(iter(truth))
    store = store_path(c, name)
    n = len(truth[name])
    with pytest.raises(EmbeddingError, match="rows"):
        EmbeddingWriter(store, "X_err", n + 1, DIM)
    with pytest.raises(EmbeddingError, match="reserved"):
        EmbeddingWriter(store, "X_err", n, DIM, meta={"complete": True})
    with pytest.raises(EmbeddingError, match="plain name"):
        EmbeddingWriter(store, "../X", n, DIM)
    w = EmbeddingWriter(store, "X_err", n, DIM)
    with pytest.raises(EmbeddingError, match="shape"):
        w.write(0, np.zeros((4, DIM + 1), np.float32))
    with pytest.raises(EmbeddingError, match="in order"):
        w.write(5, np.zeros((4, DIM), np.float32))
    with pytest.raises(EmbeddingError, match="exceed"):
        w.write(0, np.zeros((n + 1, DIM), np.float32))
    with pytest.raises(EmbeddingError, match="non-finite"):
        w.write(0, np.full((2, DIM), np.nan, np.float32))
    w.write(0, np.zeros((4, DIM), np.float32))
    with pytest.raises(EmbeddingError, match="cannot commit"):
        w.commit()
    shutil.rmtree(w.partial)
    with pytest.raises(EmbeddingError, match="pass store="):
        read_embeddings(c, "X_se", [0])


def test_gather_repeated_unsorted_rows(corpus, monkeypatch):
    _, c, truth = corpus
    emb = CorpusEmbeddings(c, "X_se")
    assert emb.dim == DIM and emb.meta["checkpoint"] == META["checkpoint"]
    emb = pickle.loads(pickle.dumps(emb))  # as shipped to a Ray task
    names = emb.store_names
    rng = np.random.default_rng(1)
    sid = rng.integers(0, len(names), 400).astype(np.int32)
    rows = np.array([rng.integers(0, len(truth[names[s]])) for s in sid])
    sid, rows = np.r_[sid, sid[:50]], np.r_[rows, rows[:50]]  # repeats
    want = np.stack([truth[names[s]][r] for s, r in zip(sid, rows)])
    np.testing.assert_array_equal(emb.gather(sid, rows), want)
    # one store, short runs over several chunks, decoded at most a few chunks per read
    monkeypatch.setattr(E, "CHUNK_BYTES", 16 * DIM * 4)
    monkeypatch.setattr(E, "MAX_CHUNKS_PER_READ", 2)
    name = names[0]
    v = truth[name]
    _write(c, name, "X_small", v).commit()
    rows = np.r_[np.arange(200, 210), np.arange(3, 8), [100, 100, 0], np.arange(40, 90)]
    got = read_embeddings(store_path(c, name), "X_small", rows)
    np.testing.assert_array_equal(got, v[rows])
    with pytest.raises(IndexError):
        read_embeddings(store_path(c, name), "X_small", [len(v)])


def test_inconsistent_models_are_refused(corpus):
    _, c, truth = corpus
    names = list(truth)
    for i, name in enumerate(names):
        _write(c, name, "X_mix", truth[name], meta={"checkpoint": f"m{i % 2}"}).commit()
    with pytest.raises(EmbeddingError, match="other meta"):
        CorpusEmbeddings(c, "X_mix")


def test_export_anndata_roundtrip(corpus, tmp_path):
    import anndata as ad

    _, c, truth = corpus
    out = export_anndata(c, "X_se", tmp_path / "cells.h5ad")
    a = ad.read_h5ad(out)
    names = list(truth)
    assert a.shape == (sum(len(v) for v in truth.values()), 0)
    np.testing.assert_array_equal(a.obsm["X_state"], np.concatenate([truth[n] for n in names]))
    stores = [_read_zarr(store_path(c, n)) for n in names]
    want_names = np.concatenate([s.obs_names.to_numpy() for s in stores])
    if len(set(want_names)) == len(want_names):
        assert list(a.obs_names) == list(want_names)
    assert list(a.obs["store"].astype(str)) == [n for n in names for _ in range(len(truth[n]))]
    assert list(a.obs["target_gene"].astype(str)) == \
        list(np.concatenate([s.obs["target_gene"].astype(str) for s in stores]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a subset of stores, with the counts
    out = export_anndata(c, "X_se", tmp_path / "sub.h5ad", obsm_key="X_se", with_X=True,
                         stores=names[1:3])
    a = ad.read_h5ad(out)
    np.testing.assert_array_equal(a.obsm["X_se"], np.concatenate([truth[n] for n in names[1:3]]))
    assert a.n_vars == stores[1].n_vars
    np.testing.assert_array_equal(a.X[:stores[1].n_obs].toarray(), stores[1].X.toarray())


def test_store_without_obsm_gets_anndata_dict_group(corpus, tmp_path):
    import zarr

    _, c, truth = corpus
    name = next(iter(truth))
    store = tmp_path / "one.zarr"
    shutil.copytree(store_path(c, name), store)
    shutil.rmtree(store / "obsm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store))
    _write(tmp_path, None, "X_se", truth[name], store=store).commit()
    attrs = zarr.open_group(str(store / "obsm"), mode="r").attrs
    assert (attrs["encoding-type"], attrs["encoding-version"]) == ("dict", "0.1.0")
    np.testing.assert_array_equal(_read_zarr(store).obsm["X_se"], truth[name])


def test_export_needs_only_the_chosen_stores(corpus, tmp_path):
    import anndata as ad

    _, c, truth = corpus
    names = list(truth)
    _write(c, names[0], "X_part", truth[names[0]]).commit()
    with pytest.raises(EmbeddingError, match="no complete cell embedding 'X_part'"):
        export_anndata(c, "X_part", tmp_path / "all.h5ad")
    assert not list(tmp_path.iterdir())
    a = ad.read_h5ad(export_anndata(c, "X_part", tmp_path / "one.h5ad", stores=names[:1]))
    np.testing.assert_array_equal(a.obsm["X_state"], truth[names[0]])


@pytest.mark.integration
def test_set_stream_carries_embeddings(ray_local, corpus):
    from vcc_dist.data.plans import SetStreamConfig
    from vcc_dist.data.streams import set_stream

    sim, c, truth = corpus
    cfg = SetStreamConfig(set_size=16, batch_size=4, seed=4)
    s = set_stream(c, cfg, split=sim.split_path, embeddings="X_se")
    b = next(iter(s.dataset.iter_batches(batch_size=s.batch_size, batch_format="numpy")))
    assert b["ctrl_emb"].shape == b["pert_emb"].shape == (4, 16, DIM)
    assert b["ctrl_emb"].dtype == np.float32
    names = s.reader.store_names
    for name in ("ctrl", "pert"):
        want = np.stack([[truth[names[st]][r] for st, r in zip(srow, rrow)]
                         for srow, rrow in zip(b[f"{name}_store"], b[f"{name}_row"])])
        np.testing.assert_array_equal(b[f"{name}_emb"], want)
    with pytest.raises(EmbeddingError, match="jobs/embed_cells.py"):
        set_stream(c, cfg, split=sim.split_path, embeddings="X_none")
