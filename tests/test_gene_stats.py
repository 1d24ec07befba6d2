"""Streamed per-gene statistics and HVG selection against scanpy on the same data."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from vcc_dist.data.corpus import GeneAccumulator


def _counts(n=600, g=400, seed=0):
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.normal(-0.5, 1.6, g))
    lib = rng.lognormal(0, 0.4, n)[:, None]
    theta = rng.lognormal(1.0, 0.7, g)
    lam = rng.gamma(theta, mu * lib / theta)
    x = rng.poisson(lam).astype(np.float32)
    x[:, :3] = 0  # genes never expressed
    x[:, 3] = 5  # constant gene: zero variance
    return sp.csr_matrix(x)


def _stream(x, block=97):
    acc = GeneAccumulator(n_genes=x.shape[1])
    totals = np.asarray(x.sum(1, dtype=np.float64)).ravel()
    for a in range(0, x.shape[0], block):
        b = x[a:a + block]
        acc.update(b.data, b.indices, b.indptr, totals[a:a + block])
    return acc


@pytest.mark.parametrize("n_top", [50, 120])
def test_hvg_matches_scanpy_seurat(n_top):
    import anndata as ad
    import scanpy as sc

    x = _counts()
    adata = ad.AnnData(x.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        ref = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top, inplace=False)
    ours = _stream(x).gene_table(n_top_genes=n_top)
    np.testing.assert_allclose(ours["dispersions_norm"], ref["dispersions_norm"], rtol=1e-4,
                               atol=1e-5, equal_nan=True)
    assert ours["highly_variable"].sum() == ref["highly_variable"].sum()
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())


def test_stats_match_dense_computation_and_merge():
    x = _counts(n=300, g=120, seed=3)
    dense = x.toarray().astype(np.float64)
    tot = dense.sum(1, keepdims=True)
    lg = np.log1p(dense / tot * 1e4)
    a = _stream(x[:100])
    b = _stream(x[100:])
    a.merge(b)
    t = a.gene_table(n_top_genes=10)
    np.testing.assert_allclose(t["mean"], lg.mean(0), rtol=1e-6)
    np.testing.assert_allclose(t["variance"], lg.var(0, ddof=1), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(t["max"], lg.max(0), rtol=1e-6)
    np.testing.assert_allclose(t["min"], lg.min(0), rtol=1e-6)
    np.testing.assert_array_equal(t["n_cells_expressing"], (dense > 0).sum(0))
    # round trip through plain arrays (how stores keep them)
    c = GeneAccumulator.from_arrays(a.to_arrays())
    np.testing.assert_array_equal(c.sum_log, a.sum_log)
    assert c.n_cells == 300
