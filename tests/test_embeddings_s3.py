"""Cell embeddings written into a corpus in object storage (moto S3 on loopback): S3 has no
rename, so the partial array lives in this host's scratch and is committed by an upload with
its zarr.json last, then re-consolidation; nothing half-written is ever read, a replaced key
is never mixed, a commit killed before re-consolidation is finished by the status check, and
the AnnData export reads from and writes to the bucket."""

from __future__ import annotations

import io
import shutil
import warnings

import numpy as np
import pytest
import zarr

from tests.s3server import moto_s3
from vcc_dist import storage
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
pytest.importorskip("moto.server")

BUCKET = "vcc-emb"
DIM = 8
META = {"checkpoint": "s3://vcc-emb/se/checkpoint_000001", "sha256": "abc"}


def _anndata(store: str):
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_zarr(zarr.open_group(storage.open_zarr_store(store, "r"), mode="r"))


def _write(store, key, values, meta=META, batch=41):
    w = EmbeddingWriter(store, key, None, values.shape[1], meta=meta, resume=True)
    for a in range(w.next_row, len(values), batch):
        w.write(a, values[a:a + batch])
    return w


@pytest.fixture(scope="module")
def remote(tiny_corpus, tmp_path_factory):
    """The tiny corpus uploaded to the bucket; yields (corpus uri, {store: values}, scratch)."""
    _, src = tiny_corpus
    scratch = tmp_path_factory.mktemp("scratch")
    mp = pytest.MonkeyPatch()
    mp.setenv("VCC_DIST_SCRATCH", str(scratch))
    with moto_s3(BUCKET):
        uri = f"s3://{BUCKET}/corpus"
        storage.upload_dir(src, uri)
        rng = np.random.default_rng(1)
        truth = {s.name: rng.normal(size=(s.n_cells, DIM)).astype(np.float32)
                 for s in load_manifest(uri).stores}
        try:
            yield uri, truth, scratch
        finally:
            mp.undo()


def test_write_commit_read_on_s3(remote):
    uri, truth, scratch = remote
    for name, v in truth.items():
        w = _write(store_path(uri, name), "X_se", v)
        assert str(w.partial).startswith(str(scratch))  # never in the bucket
        m = w.commit()
        assert m["written_by"]["pid"] > 0 and "node_id" in m["written_by"]
        assert not w.partial.exists()
    status = embedding_status(uri, "X_se")
    assert all(status[n]["complete"] and status[n]["checkpoint"] == META["checkpoint"]
               for n in truth)
    ce = CorpusEmbeddings(uri, "X_se")
    assert ce.dim == DIM and ce.meta["checkpoint"] == META["checkpoint"]
    name = list(truth)[1]
    rows = np.array([4, 0, 4, len(truth[name]) - 1])
    np.testing.assert_array_equal(ce.read(1, rows), truth[name][rows])
    np.testing.assert_array_equal(read_embeddings(uri, "X_se", rows, store=name), truth[name][rows])
    # anndata sees obsm["X_se"] in the bucket with no vcc-dist code (consolidated metadata)
    np.testing.assert_array_equal(_anndata(store_path(uri, name)).obsm["X_se"], truth[name])


def test_killed_writer_leaves_nothing_in_the_bucket(remote):
    uri, truth, _ = remote
    name = next(iter(truth))
    store = store_path(uri, name)
    w = _write(store, "X_kill", truth[name][:50])  # ...then the job dies: no commit
    assert not storage.exists(storage.join(E.final_path(store, "X_kill"), "zarr.json"))
    assert not storage.listdir(storage.join(store, "obsm")) or \
        "X_kill" not in [storage.basename(p) for p in storage.listdir(storage.join(store, "obsm"))]
    assert embedding_status(uri, "X_kill")[name] is None
    with pytest.raises(EmbeddingError, match="no complete cell embedding 'X_kill'"):
        CorpusEmbeddings(uri, "X_kill")
    shutil.rmtree(w.partial)


def test_replace_deletes_before_upload_and_is_never_mixed(remote, monkeypatch):
    uri, truth, _ = remote
    name = list(truth)[2]
    store = store_path(uri, name)
    v1, v2 = truth[name], truth[name] + 1
    _write(store, "X_re", v1).commit()
    w = _write(store, "X_re", v2, meta={"checkpoint": "other"})
    rows = np.arange(len(v1))
    np.testing.assert_array_equal(read_embeddings(store, "X_re", rows), v1)  # old still valid
    # a kill between deleting the old array and uploading the new one leaves the key absent
    real_upload = storage.upload_dir_last

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(storage, "upload_dir_last", killed)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    assert embedding_status(uri, "X_re")[name] is None
    assert "X_re" not in _anndata(store).obsm
    monkeypatch.setattr(storage, "upload_dir_last", real_upload)
    w = _write(store, "X_re", v2, meta={"checkpoint": "other"})  # the rerun: resumes, commits
    w.commit()
    np.testing.assert_array_equal(read_embeddings(store, "X_re", rows), v2)
    assert embedding_status(uri, "X_re")[name]["checkpoint"] == "other"


def test_commit_killed_before_reconsolidation_is_finished_by_status(remote):
    uri, truth, _ = remote
    name = list(truth)[3]
    store = store_path(uri, name)
    before = storage.read_bytes(storage.join(store, "zarr.json"))
    _write(store, "X_cons", truth[name]).commit()
    storage.write_bytes(storage.join(store, "zarr.json"), before)  # killed before consolidating
    assert "X_cons" not in _anndata(store).obsm
    assert embedding_status(uri, "X_cons")[name]["complete"] is True
    np.testing.assert_array_equal(_anndata(store).obsm["X_cons"], truth[name])


def test_export_anndata_from_and_to_the_bucket(remote):
    import anndata as ad

    uri, truth, _ = remote
    out = f"s3://{BUCKET}/exports/cells.h5ad"
    assert export_anndata(uri, "X_se", out) == out
    a = ad.read_h5ad(io.BytesIO(storage.read_bytes(out)))
    np.testing.assert_array_equal(a.obsm["X_state"], np.concatenate(list(truth.values())))
    assert [storage.basename(p) for p in storage.listdir(f"s3://{BUCKET}/exports")] == \
        ["cells.h5ad"]  # no temporary left in the bucket
