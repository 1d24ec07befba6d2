"""Corpora read from object storage (s3://) give exactly what the local corpus gives.

An S3 server (moto's, in this process, on 127.0.0.1) holds a copy of the tiny corpus; the AWS
variables point at it. Checked: locations and JSON helpers, the manifest, CorpusReader rows
(raw and normalised, one and several stores, both zarr stores for s3), cell embeddings, the
clear errors for a missing bucket/credentials, and the Ray cell and set streams."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.s3server import moto_s3
from vcc_dist import storage
from vcc_dist.data.corpus import CorpusError, load_manifest, store_path
from vcc_dist.data.embeddings import CorpusEmbeddings, EmbeddingWriter
from vcc_dist.data.reader import CorpusReader

pytest.importorskip("moto.server")
pytest.importorskip("obstore")
pytest.importorskip("s3fs")

BUCKET = "vcc-test"
EMB_KEY = "X_test"


@pytest.fixture(scope="module")
def s3_corpus(tiny_corpus, tmp_path_factory):
    """(local corpus dir, its s3:// copy). The local copy gets a cell embedding first."""

    _, corpus = tiny_corpus
    local = tmp_path_factory.mktemp("s3src") / "corpus"
    shutil.copytree(corpus, local)
    m = load_manifest(local)
    for s in m.stores:
        rows = int(s.n_cells)
        vals = np.arange(rows * 6, dtype=np.float32).reshape(rows, 6) / 7
        w = EmbeddingWriter(store_path(local, s.name), EMB_KEY, rows, 6, meta={"model": "t"})
        w.write(0, vals)
        w.commit()
    with moto_s3(BUCKET):
        uri = f"s3://{BUCKET}/corpora/tiny"
        storage.upload_dir(local, uri)
        yield local, uri


def test_locations_and_json(s3_corpus, tmp_path):
    local, uri = s3_corpus
    assert storage.is_remote(uri) and not storage.is_remote(str(local))
    assert not storage.is_remote(local)
    assert storage.join(uri + "/", "stores", "a.zarr") == uri + "/stores/a.zarr"
    assert storage.join(str(local), "stores") == Path(local) / "stores"
    assert store_path(uri, "s0") == uri + "/stores/s0.zarr"
    assert isinstance(store_path(local, "s0"), Path)
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.location("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.location("s3:///x")
    obj = {"a": [1, 2], "b": np.float32(0.5)}
    for where in (f"{uri}/extra/x.json", tmp_path / "x.json"):
        storage.write_json(where, obj)
        assert storage.read_json(where) == {"a": [1, 2], "b": 0.5}
        assert storage.exists(where)
    assert not storage.exists(f"{uri}/extra/nothing.json")
    assert "corpus.json" in storage.listdir(uri) and "stores" in storage.listdir(uri)
    assert storage.listdir(f"{uri}/stores") == storage.listdir(local / "stores")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{uri}/nothing.json")


def test_manifest_equal(s3_corpus):
    local, uri = s3_corpus
    assert load_manifest(uri).to_json() == load_manifest(local).to_json()
    with pytest.raises(CorpusError, match="is not a corpus"):
        load_manifest(f"s3://{BUCKET}/no/such/corpus")


def _assert_blocks_equal(a, b):
    assert a.normalized == b.normalized
    for f in ("data", "indices", "indptr", "totals"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        np.testing.assert_array_equal(x, y, err_msg=f)


@pytest.mark.parametrize("backend", storage.BACKENDS)
def test_reader_rows_equal(s3_corpus, backend, monkeypatch):
    local, uri = s3_corpus
    monkeypatch.setenv("VCC_DIST_S3_BACKEND", backend)
    loc = CorpusReader(local, genes="hvg")
    rem = CorpusReader(uri, genes="hvg")
    assert rem.target_sum == loc.target_sum and rem.genes == loc.genes
    assert rem.store(0).remote and not loc.store(0).remote
    np.testing.assert_array_equal(rem.store(1).indptr, loc.store(1).indptr)
    rng = np.random.default_rng(7)
    n_st = len(loc.store_names)
    assert n_st > 2
    cases = [
        (np.zeros(5, np.int32), np.array([4, 0, 3, 3, 9])),  # one store, order and repeats
        (np.full(40, 1, np.int32), np.arange(20, 60)),  # one run of rows
    ]
    sid = rng.integers(0, n_st, 120).astype(np.int32)  # many stores, scattered rows
    cases.append((sid, np.array([rng.integers(0, loc.n_cells[s]) for s in sid])))
    for sid, rows in cases:
        for normalize in (False, True):
            a = loc.read_many(sid, rows, normalize=normalize)
            b = rem.read_many(sid, rows, normalize=normalize)
            _assert_blocks_equal(a, b)
            if normalize:
                np.testing.assert_array_equal(loc.dense(a), rem.dense(b))
    _assert_blocks_equal(loc.read(2, np.arange(7)), rem.read(2, np.arange(7)))
    assert loc.groups(0).equals(rem.groups(0))
    # store-median targets (cache read/written through storage) agree too
    ls, rs = CorpusReader(local, target_sum="store"), CorpusReader(uri, target_sum="store")
    np.testing.assert_array_equal(ls.store_targets, rs.store_targets)
    _assert_blocks_equal(ls.read_many(sid, cases[-1][1], normalize=True),
                         rs.read_many(sid, cases[-1][1], normalize=True))


def test_reader_pickles_its_s3_settings(s3_corpus, monkeypatch):
    import pickle

    local, uri = s3_corpus
    rem = CorpusReader(uri)
    clone = pickle.loads(pickle.dumps(rem))
    # a Ray worker without AWS variables still reads: the settings travel with the reader
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    assert clone.s3 == rem.s3 and clone.s3.endpoint_url.startswith("http://127.0.0.1")
    rows = np.arange(3)
    _assert_blocks_equal(clone.read(0, rows), CorpusReader(local).read(0, rows))


def test_embeddings_equal(s3_corpus):
    local, uri = s3_corpus
    le, re_ = CorpusEmbeddings(local, EMB_KEY), CorpusEmbeddings(uri, EMB_KEY)
    assert re_.dim == le.dim == 6 and re_.meta == le.meta
    sid = np.array([0, 2, 1, 0, 2], np.int32)
    rows = np.array([3, 0, 5, 3, 1])
    np.testing.assert_array_equal(re_.gather(sid, rows), le.gather(sid, rows))
    np.testing.assert_array_equal(re_.read(1, np.array([2, 2, 0])), le.read(1, np.array([2, 2, 0])))


def test_missing_bucket_is_a_clear_error(s3_corpus):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        load_manifest("s3://no-such-bucket/corpus")
    with pytest.raises(storage.StorageError, match="AWS_ENDPOINT_URL"):
        CorpusReader("s3://no-such-bucket/corpus")


def test_missing_credentials_are_a_clear_error(s3_corpus, monkeypatch):
    _, uri = s3_corpus
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(storage.StorageError, match="AWS_SECRET_ACCESS_KEY is not set"):
        load_manifest(uri)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(storage.StorageError, match="set AWS_ACCESS_KEY_ID and "
                                                    "AWS_SECRET_ACCESS_KEY"):
        load_manifest(uri)


def test_bad_settings_are_clear_errors(monkeypatch):
    monkeypatch.setenv("VCC_DIST_S3_BACKEND", "gcsfs")
    with pytest.raises(storage.StorageError, match="VCC_DIST_S3_BACKEND='gcsfs'"):
        storage.backend()
    monkeypatch.setenv("VCC_DIST_S3_CONCURRENCY", "0")
    with pytest.raises(storage.StorageError, match="positive integer"):
        storage.concurrency()


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_streams_from_s3_equal_local(s3_corpus, tiny_corpus):
    """The Ray cell and set streams over the s3:// corpus yield the local corpus's batches."""
    import ray

    from vcc_dist.data.plans import CellStreamConfig, SetStreamConfig
    from vcc_dist.data.streams import cell_stream, set_stream

    sim, _ = tiny_corpus
    local, uri = s3_corpus
    cells = CellStreamConfig(batch_size=32, block_rows=8, buffer_blocks=8, seed=4, genes="hvg")
    sets = SetStreamConfig(set_size=16, batch_size=4, seed=4)

    def batches(stream, keys):
        return [{k: b[k].copy() for k in keys} for b in stream.dataset.iter_batches(
            batch_size=stream.batch_size, batch_format="numpy")]

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        for make, cfg, kw, keys in (
                (cell_stream, cells, {}, ("row", "store", "X")),
                (set_stream, sets, {"split": sim.split_path}, ("pert_row", "ctrl_row", "pert",
                                                                "ctrl"))):
            a = batches(make(local, cfg, **kw), keys)
            b = batches(make(uri, cfg, **kw), keys)
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                for k in keys:
                    np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    finally:
        ray.shutdown()


def test_recipe_split_and_gene_table_files_from_s3(s3_corpus, tiny_corpus, tmp_path):
    """Input files other than the corpus are read from s3:// too: a recipe file (e.g. a
    sweep's best_recipe.json), a split file and a {gene: vector} table."""
    import torch

    from vcc_dist.data.gene_tables import read_gene_table
    from vcc_dist.data.splits import SplitError, SplitSpec
    from vcc_dist.train.st import st_recipe

    sim, _ = tiny_corpus
    local, uri = s3_corpus
    recipe = st_recipe("debug", corpus=uri, run_dir="r", seed=7).to_dict()
    recipe.pop("run_dir")
    storage.write_json(f"s3://{BUCKET}/corpora/recipes/best.json", recipe)
    cfg = st_recipe(f"s3://{BUCKET}/corpora/recipes/best.json", run_dir=f"s3://{BUCKET}/runs/x")
    assert cfg.seed == 7 and cfg.corpus == uri and cfg.run_dir == f"s3://{BUCKET}/runs/x"
    storage.write_bytes(f"{uri}/split.toml", Path(sim.split_path).read_bytes())
    a, b = SplitSpec.from_toml(f"{uri}/split.toml"), SplitSpec.from_toml(sim.split_path)
    assert a.to_toml() == b.to_toml()
    with pytest.raises(SplitError, match="does not exist"):
        SplitSpec.from_toml(f"{uri}/no-split.toml")
    table = {"G1": torch.ones(3), "G2": torch.zeros(3)}
    torch.save(table, tmp_path / "t.pt")
    storage.write_bytes(f"{uri}/t.pt", (tmp_path / "t.pt").read_bytes())
    got = read_gene_table(f"{uri}/t.pt")
    assert set(got) == {"G1", "G2"} and torch.equal(got["G1"], table["G1"])
    assert storage.sha256(f"{uri}/t.pt") == storage.sha256(tmp_path / "t.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_gene_table(f"{uri}/missing.pt")
