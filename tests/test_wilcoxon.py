"""The shared-control Wilcoxon rank-sum (vcc_dist.metrics.de) equals scipy's mannwhitneyu and
numba-mwu's (pdex's kernel), ties, zeros and both merge strategies included."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from vcc_dist.metrics.de import ControlIndex, bh_fdr, wilcoxon_vs_control


def _sparse_like(rng, n, g, zero_frac=0.5, discrete=False):
    v = rng.poisson(2.0, (n, g)).astype(float) if discrete else rng.gamma(2.0, 1.0, (n, g))
    v[rng.random((n, g)) < zero_frac] = 0.0
    return np.log1p(v).astype(np.float32)


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_matches_scipy_mannwhitneyu(discrete, storage):
    rng = np.random.default_rng(0)
    ctrl = _sparse_like(rng, 300, 25, discrete=discrete)
    index = ControlIndex.build(sp.csr_matrix(ctrl) if storage == "csr" else ctrl)
    # group sizes on both sides of the binary-search switch (nnz_a * 8 < nnz_b)
    for n_x, shift in ((15, 0.0), (40, 0.4), (3, 1.0), (600, 0.2)):
        x = _sparse_like(rng, n_x, 25, zero_frac=0.3, discrete=discrete)
        x = x + np.float32(shift) * (x > 0) * (rng.random((n_x, 25)) > 0.5)
        u, p = wilcoxon_vs_control(index, sp.csr_matrix(x) if storage == "csr" else x)
        for j in range(25):
            r = stats.mannwhitneyu(x[:, j].astype(float), ctrl[:, j].astype(float),
                                   alternative="two-sided", method="asymptotic",
                                   use_continuity=True)
            assert u[j] == r.statistic
            assert p[j] == pytest.approx(r.pvalue, rel=1e-12, abs=1e-300)


def test_bit_identical_to_numba_mwu():
    import numba_mwu as mwu
    rng = np.random.default_rng(1)
    ctrl = _sparse_like(rng, 200, 40, discrete=True)
    grp = _sparse_like(rng, 30, 40, zero_frac=0.2, discrete=True)
    u, p = wilcoxon_vs_control(ControlIndex.build(sp.csr_matrix(ctrl)), sp.csr_matrix(grp))
    ref = mwu.mannwhitneyu_sparse(sp.csr_matrix(grp), sp.csr_matrix(ctrl))
    np.testing.assert_array_equal(u, np.asarray(ref.statistic))
    np.testing.assert_array_equal(p, np.asarray(ref.pvalue))


def test_all_tied_and_all_zero_genes_give_p_one():
    ctrl = np.zeros((10, 3), np.float32)
    ctrl[:, 1] = np.arange(1, 11)
    ctrl[:, 2] = 2.0
    x = np.zeros((4, 3), np.float32)
    x[:, 1] = [15, 16, 17, 18]
    x[:, 2] = 2.0
    u, p = wilcoxon_vs_control(ControlIndex.build(sp.csr_matrix(ctrl)), sp.csr_matrix(x))
    assert p[0] == 1.0 and u[0] == 20.0
    assert p[2] == 1.0
    assert p[1] == pytest.approx(stats.mannwhitneyu(x[:, 1], ctrl[:, 1],
                                                    method="asymptotic").pvalue)


def test_bh_scopes():
    rng = np.random.default_rng(2)
    p = rng.random((4, 50)) ** 3
    p[1, :10] = 1.0  # ties
    p[3, 5:9] = p[3, 4]
    per = bh_fdr(p, "perturbation")
    np.testing.assert_array_equal(per[2], stats.false_discovery_control(p[2]))
    glob = bh_fdr(p, "global")
    np.testing.assert_array_equal(glob.ravel(), stats.false_discovery_control(p.ravel()))
    assert (glob >= per - 1e-15).mean() > 0.5  # a larger family: FDRs mostly grow
    with pytest.raises(ValueError, match="fdr_scope"):
        bh_fdr(p, "everything")
