"""The shared-reference Wilcoxon rank-sum equals scipy's mannwhitneyu, ties and zeros included."""

import numpy as np
import pytest
from scipy import stats

from vcc_dist.metrics.wilcoxon import SortedReference, mannwhitney_pvalue, ranksum_vs_reference


def _sparse_like(rng, n, g, zero_frac=0.5, discrete=False):
    v = rng.poisson(2.0, (n, g)).astype(float) if discrete else rng.gamma(2.0, 1.0, (n, g))
    v[rng.random((n, g)) < zero_frac] = 0.0
    return np.log1p(v)


@pytest.mark.parametrize("discrete", [False, True])
def test_matches_scipy_mannwhitneyu(discrete):
    rng = np.random.default_rng(0)
    ctrl = _sparse_like(rng, 60, 25, discrete=discrete)
    ref = SortedReference.build(ctrl, value_range=(0.0, 10.0))
    for n_x, shift in ((15, 0.0), (40, 0.4), (3, 1.0)):
        x = _sparse_like(rng, n_x, 25, zero_frac=0.3, discrete=discrete) + shift * (rng.random((n_x, 25)) > 0.5)
        u, tie = ranksum_vs_reference(ref, x)
        p = mannwhitney_pvalue(u, n_x, 60, tie)
        for j in range(25):
            r = stats.mannwhitneyu(x[:, j], ctrl[:, j], alternative="two-sided",
                                   method="asymptotic", use_continuity=True)
            assert u[j] == pytest.approx(r.statistic, abs=1e-9)
            assert p[j] == pytest.approx(r.pvalue, rel=1e-9, abs=1e-15)


def test_all_tied_gene_gives_p_one_like_scipy():
    ctrl = np.zeros((10, 2))
    ctrl[:, 1] = np.arange(10)
    ref = SortedReference.build(ctrl, value_range=(0.0, 20.0))
    x = np.zeros((4, 2))
    x[:, 1] = [15, 16, 17, 18]
    u, tie = ranksum_vs_reference(ref, x)
    p = mannwhitney_pvalue(u, 4, 10, tie)
    assert p[0] == 1.0 == stats.mannwhitneyu(x[:, 0], ctrl[:, 0]).pvalue
    assert p[1] == pytest.approx(stats.mannwhitneyu(x[:, 1], ctrl[:, 1], method="asymptotic").pvalue)


def test_values_outside_range_are_refused():
    ref = SortedReference.build(np.zeros((5, 3)), value_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="outside the reference's value_range"):
        ranksum_vs_reference(ref, np.full((2, 3), 5.0))
