"""Store reader: exact rows in any order, scanpy-identical normalisation, gene subsets."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from vcc_dist import constants as K
from vcc_dist.data.corpus import CorpusError, load_manifest, store_path
from vcc_dist.data.reader import CorpusReader, CSRBlock, densify, merge_runs, take_rows

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="indices array has non-integer dtype")


def _store_matrix(corpus, name):
    a = ad.read_zarr(store_path(corpus, name))
    return a


def test_rows_in_requested_order_equal_anndata(tiny_corpus):
    _, corpus = tiny_corpus
    r = CorpusReader(corpus, normalize=False)
    rng = np.random.default_rng(0)
    for i, name in enumerate(r.store_names):
        a = _store_matrix(corpus, name)
        x = sp.csr_matrix(a.X)
        rows = rng.integers(0, a.n_obs, 60)  # unsorted, with repeats
        blk = r.read(i, rows)
        assert blk.n_rows == rows.size
        np.testing.assert_array_equal(blk.to_scipy().toarray(), x[rows].toarray())
        np.testing.assert_array_equal(blk.totals, a.obs[K.TOTAL_COUNTS_KEY].to_numpy()[rows])
        # raw counts stay in the store's integer dtype until normalised
        assert blk.data.dtype.kind == "u"


def test_read_many_across_stores_keeps_order(tiny_corpus):
    _, corpus = tiny_corpus
    r = CorpusReader(corpus, normalize=False)
    mats = [sp.csr_matrix(_store_matrix(corpus, n).X) for n in r.store_names]
    rng = np.random.default_rng(1)
    st = rng.integers(0, len(mats), 80)
    rows = np.array([rng.integers(0, mats[s].shape[0]) for s in st])
    blk = r.read_many(st, rows)
    want = np.vstack([mats[s][row].toarray() for s, row in zip(st, rows)])
    np.testing.assert_array_equal(blk.to_scipy().toarray(), want)


def test_normalisation_matches_scanpy(tiny_corpus):
    """normalize_total (median target, scanpy's float32 arithmetic) + log1p, bit for bit."""
    _, corpus = tiny_corpus
    r = CorpusReader(corpus)
    stores = [_store_matrix(corpus, n) for n in r.store_names]
    full = ad.concat(stores)
    full.X = sp.csr_matrix(full.X).astype(np.float32)
    # the simulator's totals are the row sums over the whole vocabulary, as scanpy computes
    np.testing.assert_array_equal(np.asarray(full.X.sum(1)).ravel(),
                                  full.obs[K.TOTAL_COUNTS_KEY].to_numpy())
    sc.pp.normalize_total(full)
    sc.pp.log1p(full)
    want = full.X.toarray()
    got = np.vstack([r.dense(r.normalize(r.read(i, np.arange(s.n_obs))))
                     for i, s in enumerate(stores)])
    assert r.target_sum == float(np.median(full.obs[K.TOTAL_COUNTS_KEY]))
    np.testing.assert_array_equal(got, want)


def test_per_source_normalisation_matches_scanpy_per_file(tiny_corpus):
    """target_sum="store": every store normalised to the median total of its source file, as
    cell-eval (and scanpy on that file alone) normalise one file; read_many mixes stores."""
    sim, corpus = tiny_corpus
    r = CorpusReader(corpus, target_sum="store")
    m = load_manifest(corpus)
    assert len(m.stores) > len(sim.h5ad_paths)  # files span several stores here
    for path in sim.h5ad_paths:
        a = ad.read_h5ad(path)
        file_median = np.float32(np.median(np.asarray(a.X.sum(1)).ravel()))
        ids = [i for i, s in enumerate(m.stores) if s.source == str(path)]
        assert ids and all(r.store_targets[i] == file_median for i in ids)
    assert len({float(t) for t in r.store_targets}) > 1  # the files really differ
    # values: x / (total / file median), log1p, in scanpy's float32 arithmetic
    ids = np.repeat(np.arange(len(m.stores)), 5)
    rows = np.tile(np.arange(5), len(m.stores))
    order = np.random.default_rng(1).permutation(ids.size)
    ids, rows = ids[order], rows[order]
    raw = CorpusReader(corpus, normalize=False).read_many(ids, rows).to_scipy().toarray()
    tot = raw.sum(1).astype(np.float32)
    want = np.log1p(raw.astype(np.float32) / (tot / r.store_targets[ids])[:, None])
    got = r.dense(r.read_many(ids, rows, normalize=True))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="store ids"):
        r.normalize(r.read(0, np.arange(3)))
    with pytest.raises(ValueError, match="'store'"):
        CorpusReader(corpus, target_sum="median")


def test_target_sum_option_and_no_log(tiny_corpus):
    _, corpus = tiny_corpus
    r = CorpusReader(corpus, target_sum=1e4, log1p=False)
    a = _store_matrix(corpus, r.store_names[0])
    x = sp.csr_matrix(a.X).astype(np.float32)[:20]
    tot = a.obs[K.TOTAL_COUNTS_KEY].to_numpy()[:20].astype(np.float32)
    want = x.toarray() / (tot / np.float32(1e4))[:, None]
    got = r.dense(r.normalize(r.read(0, np.arange(20))))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="target_sum"):
        CorpusReader(corpus, target_sum=0)


def test_gene_subsets(tiny_corpus):
    _, corpus = tiny_corpus
    m = load_manifest(corpus)
    full = CorpusReader(corpus)
    hvg = CorpusReader(corpus, genes="hvg")
    assert hvg.n_genes == int(m.highly_variable.sum()) == 50
    blk = full.normalize(full.read(0, np.arange(30)))
    np.testing.assert_array_equal(hvg.dense(blk), full.dense(blk)[:, m.highly_variable])
    pick = [m.genes[7], m.genes[3]]
    sub = CorpusReader(corpus, genes=pick)
    np.testing.assert_array_equal(sub.dense(blk), full.dense(blk)[:, [7, 3]])
    with pytest.raises(CorpusError, match="not in the corpus vocabulary"):
        CorpusReader(corpus, genes=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="expected 'all', 'hvg'"):
        CorpusReader(corpus, genes="some")


def test_out_of_range_rows_and_missing_corpus(tiny_corpus, tmp_path):
    _, corpus = tiny_corpus
    r = CorpusReader(corpus)
    with pytest.raises(IndexError, match="outside"):
        r.read(0, np.array([10**7]))
    with pytest.raises(CorpusError, match="corpus.json is missing"):
        CorpusReader(tmp_path)


def test_merge_runs_coalesces_close_rows():
    indptr = np.arange(0, 101 * 10, 10)  # 100 rows of 10 values
    rows = np.array([0, 1, 2, 5, 6, 50, 51, 99])
    # gaps below 30 values (3 rows) merge, larger ones do not
    runs = merge_runs(rows, indptr, max_gap=30)
    assert runs.tolist() == [[0, 7], [50, 52], [99, 100]]
    assert merge_runs(rows, indptr, max_gap=0).tolist() == [[0, 3], [5, 7], [50, 52], [99, 100]]
    assert merge_runs(np.array([], np.int64), indptr, 10).shape == (0, 2)


def test_take_rows_and_densify_shapes():
    x = sp.random(7, 5, density=0.5, format="csr", random_state=0, dtype=np.float32)
    blk = CSRBlock(x.data, x.indices, x.indptr.astype(np.int64), np.ones(7, np.int64), 5)
    sub = take_rows(blk, np.array([6, 0, 6]))
    np.testing.assert_array_equal(sub.to_scipy().toarray(), x[[6, 0, 6]].toarray())
    colmap = np.array([-1, 0, -1, 1, 2])
    np.testing.assert_array_equal(densify(blk, colmap, 3), x.toarray()[:, [1, 3, 4]])
    with pytest.raises(ValueError, match="expected C-ordered"):
        densify(blk, colmap, 3, out=np.zeros((7, 4), np.float32))
