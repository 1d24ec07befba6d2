"""cell-eval's per-file normalisation, reproduced bit for bit against scanpy (which cell-eval
calls), and the input checks that replace its crashes with clear errors."""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from vcc_dist.metrics.normalize import (
    ExpressionError,
    as_float_matrix,
    inspect_matrix,
    prepare_expression,
)


def _counts(seed=0, n=300, g=80, zero_rows=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.lognormal(0, 1.3, g), size=(n, g)).astype(dtype)
    x[:zero_rows] = 0  # cells without counts: median over all vs over positive totals
    return x


def _scanpy(x):
    a = ad.AnnData(x.copy() if not sp.issparse(x) else x.copy())
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    return a.X


@pytest.mark.parametrize("storage", ["csr", "dense", "csc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_log_normalize_bit_identical_to_scanpy(storage, dtype):
    x = _counts(dtype=dtype)
    m = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[storage](x)
    expected = _scanpy(m)
    ours, check = prepare_expression(m)
    assert check.is_counts
    e = expected.toarray() if sp.issparse(expected) else expected
    o = ours.toarray() if sp.issparse(ours) else ours
    assert o.dtype == e.dtype
    np.testing.assert_array_equal(o, e)


def test_prepare_does_not_touch_input_unless_asked():
    x = sp.csr_matrix(_counts())
    before = x.data.copy()
    prepare_expression(x)
    np.testing.assert_array_equal(x.data, before)
    y, _ = prepare_expression(x, copy=False)
    assert np.shares_memory(y.data, x.data) and not np.array_equal(x.data, before)


def test_integer_rule_matches_cell_eval_guess():
    from cell_eval.utils import guess_is_lognorm

    rng = np.random.default_rng(1)
    base = rng.poisson(2.0, (50, 20)).astype(np.float32)
    cases = [base, base + np.float32(5e-4), base + np.float32(2e-3),
             np.log1p(base), base * 0]
    for x in cases:
        m = sp.csr_matrix(x)
        assert inspect_matrix(as_float_matrix(m)).is_counts == (
            not guess_is_lognorm(ad.AnnData(m)))


@pytest.mark.parametrize("bad,match", [
    (np.nan, "NaN"), (np.inf, "infinite"), (-0.5, "negative"), (20.5, "neither integer"),
])
def test_bad_values_named(bad, match):
    x = np.log1p(_counts()[:20]).astype(np.float32)
    x[3, 4] = bad
    with pytest.raises(ExpressionError, match=match):
        prepare_expression(sp.csr_matrix(x), what="pred.h5ad")


def test_explicit_zeros_dropped_and_counted():
    x = sp.csr_matrix(np.log1p(_counts()[:20]).astype(np.float32))
    x.data[:5] = 0
    y, check = prepare_expression(x)
    assert check.n_explicit_zeros == 5 and (y.data != 0).all()


def test_mixed_index_dtypes_and_float16():
    y, check = prepare_expression(_counts().astype(np.float16))
    assert y.dtype == np.float32 and check.is_counts
    x = sp.csr_matrix(_counts())
    x.indptr = x.indptr.astype(np.int64)  # as some h5ad writers store it
    x.data[:3] = 0
    y, _ = prepare_expression(x)  # no dtype clash in scipy's kernels
    assert y.indptr.dtype == y.indices.dtype
