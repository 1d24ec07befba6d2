"""Agreement with cell-eval 0.8.2 itself (a test dependency): DES and PDS equal per
perturbation, MAE within 1e-6, the overall score equal, on generated real/pred pairs of
several shapes; and the DE tables (p-values, fold changes) equal to pdex's bit for bit."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from tests.eval_pairs import (
    CONTROL,
    cell_eval_score,
    log1p_normalise,
    make_pred,
    make_real,
    run_cell_eval,
)
from vcc_dist.metrics import vcc

SHAPES = {
    # name: make_real kwargs
    "default": dict(seed=0),
    "deep_many_perts": dict(seed=1, n_perts=14, n_cells=40, n_ctrl=90, n_genes=150, depth=8.0),
    "shallow_sparse": dict(seed=2, n_perts=6, n_cells=80, n_ctrl=200, n_genes=100, depth=0.3),
    "no_zero_genes_some_no_de": dict(seed=3, n_perts=7, n_cells=30, n_ctrl=60, n_genes=90,
                                     no_de_perts=3, weak_perts=3, zero_genes=False),
    "tiny_groups": dict(seed=4, n_perts=5, n_cells=6, n_ctrl=25, n_genes=80, depth=4.0),
}
PRED_KINDS = ["noisy_csr", "noisy_dense", "counts", "constant", "copy", "shuffled_labels",
              "sparse_noisy"]


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("cell_eval").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _assert_agree(ours, ce_res):
    res = ours.results.set_index("perturbation")
    assert sorted(res.index) == sorted(ce_res.index)
    ce_res = ce_res.loc[res.index]
    np.testing.assert_array_equal(res[vcc.DES].to_numpy(), ce_res[vcc.DES].to_numpy())
    np.testing.assert_array_equal(res[vcc.PDS].to_numpy(), ce_res[vcc.PDS].to_numpy())
    np.testing.assert_allclose(res[vcc.MAE].to_numpy(), ce_res[vcc.MAE].to_numpy(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_metrics_equal_cell_eval(shape, tmp_path):
    real = make_real(**SHAPES[shape])
    real_summary = vcc.summarize(real.copy(), what="real")
    n_de = []
    for i, kind in enumerate(PRED_KINDS):
        pred = make_pred(real, kind, seed=10 + i)
        ce_res, ce_agg, _ = run_cell_eval(real, pred, tmp_path / kind)
        ours = vcc.evaluate(real_summary, pred.copy())
        _assert_agree(ours, ce_res)
        for m in vcc.METRICS:
            assert ours.agg[m] == pytest.approx(ce_agg[m], abs=1e-6)
        n_de.append(ours.results["n_real_de"].to_numpy())
    # the shapes really exercise what they claim
    if not SHAPES[shape].get("zero_genes", True):
        assert (n_de[0] == 0).any(), "expected perturbations without DE genes"
    assert (n_de[0] > 0).any()


def test_overall_score_equals_cell_eval_score(tmp_path):
    real = make_real(seed=5, n_perts=9)
    base = make_pred(real, "constant", seed=3)
    _, _, ce_base_agg = run_cell_eval(real, base, tmp_path / "base")
    for kind in ["noisy_csr", "copy", "shuffled_labels", "counts"]:
        pred = make_pred(real, kind, seed=4)
        _, _, ce_agg = run_cell_eval(real, pred, tmp_path / kind)
        expected = cell_eval_score(ce_agg, ce_base_agg)
        ours = vcc.evaluate(real.copy(), pred.copy(), base.copy())
        for k in ("mae", vcc.DES, vcc.PDS, "avg_score"):
            assert ours.scores[k] == pytest.approx(expected[k], abs=1e-6), (kind, k)


def test_log1p_real_input_equals_cell_eval(tmp_path):
    """A real file already log1p-normalised (floats) is taken as is by both."""
    real = make_real(seed=6)
    real.X = log1p_normalise(real)
    import scipy.sparse as sp
    real.X = sp.csr_matrix(real.X)
    pred = make_pred(make_real(seed=6), "noisy_csr", seed=7)
    ce_res, _, _ = run_cell_eval(real, pred, tmp_path / "ce")
    _assert_agree(vcc.evaluate(real.copy(), pred.copy()), ce_res)


def test_de_tables_bit_identical_to_pdex():
    """p-values, fold changes (incl. ±inf and 0/0) and FDR equal pdex's own output exactly,
    for CSR and dense storage."""
    import pdex

    from vcc_dist.metrics.normalize import prepare_expression

    real = make_real(seed=7, n_perts=6, depth=1.0)
    for dense in (False, True):
        a = real.copy()
        x, _ = prepare_expression(a.X)
        a.X = x.toarray() if dense else x
        table = pdex.pdex(a, groupby="target_gene", mode="ref", reference=CONTROL,
                          is_log1p=True, epsilon=0.0, threads=1).to_pandas()
        s = vcc.summarize(a, what="real")
        de = s.de()
        genes = list(a.var_names)
        for i, p in enumerate(s.perts):
            t = table[table["target"] == p].set_index("feature").loc[genes]
            np.testing.assert_array_equal(de.pvalue[i], t["p_value"].to_numpy())
            np.testing.assert_array_equal(de.lfc[i], t["log2_fold_change"].to_numpy())
            np.testing.assert_array_equal(de.fdr[i], t["fdr"].to_numpy())
        assert np.isinf(de.lfc).any() and (de.lfc == 0).any()


def test_explicit_zeros_are_dropped_not_fatal(tmp_path):
    """cell-eval's DE step crashes on stored zeros; we drop them (result-neutral)."""
    real = make_real(seed=8, n_perts=4)
    pred = make_pred(real, "sparse_noisy", seed=2)
    clean = vcc.evaluate(real.copy(), pred.copy()).results
    x = pred.X.tocoo()
    empty = np.flatnonzero(pred.X.toarray().ravel() == 0)[:7]
    r, c = np.unravel_index(empty, x.shape)
    import scipy.sparse as sp
    pred.X = sp.coo_matrix((np.r_[x.data, np.zeros(len(r), np.float32)],
                            (np.r_[x.row, r], np.r_[x.col, c])), shape=x.shape).tocsr()
    assert (pred.X.data == 0).sum() == 7
    dirty = vcc.evaluate(real.copy(), pred.copy()).results
    for m in vcc.METRICS:
        np.testing.assert_array_equal(clean[m].to_numpy(), dirty[m].to_numpy())
