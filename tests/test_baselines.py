"""Tests of the baselines (vcc_dist.infer.baselines) and their job (jobs/baseline.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcc_dist.constants import CONTEXT_KEY, CONTROL_LABEL, PERT_KEY
from vcc_dist.data.simulate import sim_config, simulate
from vcc_dist.infer.baselines import (
    BaselineError,
    CellMeanBaseline,
    ContextMeanBaseline,
    RidgeDeltaBaseline,
    exclude_heldout,
    load_pert_features,
    make_baseline,
    pert_counts_from,
    read_pert_counts,
    read_split,
    ridge_fit,
)
from vcc_dist.metrics.normalize import prepare_expression

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "baseline.py"


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(sim_config("tiny"), tmp_path_factory.mktemp("sim_tiny_baselines"), progress=False)


@pytest.fixture(scope="module")
def train_full(sim):
    """The whole simulated file (every perturbation in every context). Do not mutate."""
    return ad.read_h5ad(sim.h5ad_paths[0])


@pytest.fixture(scope="module")
def train(sim, train_full):
    """The simulated file without the held-out context's val/test cells."""
    return exclude_heldout(train_full, read_split(sim.split_path))


@pytest.fixture(scope="module")
def job():
    """jobs/baseline.py imported in-process (its main(argv) returns the exit status)."""
    sys.path.insert(0, str(JOB.parent))
    try:
        spec = importlib.util.spec_from_file_location("baseline_job", JOB)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if str(JOB.parent) in sys.path:  # jobs/_bootstrap may have removed it
            sys.path.remove(str(JOB.parent))
    return mod


def _hand_adata(rows, n_genes):
    """rows: (context, perturbation, log1p vector) -> AnnData with float32 CSR log1p X."""
    x = np.array([r[2] for r in rows], np.float32).reshape(len(rows), n_genes)
    obs = pd.DataFrame({
        PERT_KEY: pd.Categorical([r[1] for r in rows]),
        CONTEXT_KEY: pd.Categorical([r[0] for r in rows]),
    }, index=[f"c{i}" for i in range(len(rows))])
    var = pd.DataFrame({"gene_id": [f"ENSG{i:05d}" for i in range(n_genes)]},
                       index=[f"G{i}" for i in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)


def _check_output(pred, counts, train_var, n_controls, control_label=CONTROL_LABEL):
    """The submission contract: float32 CSR, canonical, no explicit zeros, no negatives, rows per
    perturbation in counts order, controls last, labels categorical strings, training var."""
    assert sp.issparse(pred.X) and pred.X.format == "csr"
    assert pred.X.dtype == np.float32
    assert pred.X.has_canonical_format
    assert (pred.X.data != 0).all(), "explicit zeros"
    assert (pred.X.data > 0).all(), "negative values"
    assert np.isfinite(pred.X.data).all()
    assert list(pred.obs.columns) == [PERT_KEY]
    lab = pred.obs[PERT_KEY]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert all(isinstance(c, str) for c in lab.cat.categories)
    n_pert = sum(counts.values())
    expected = np.concatenate([np.repeat(list(counts), list(counts.values())),
                               np.full(n_controls, control_label)])
    np.testing.assert_array_equal(lab.astype(str).to_numpy(), expected)
    assert pred.n_obs == n_pert + n_controls
    assert pred.obs_names.is_unique
    assert list(pred.obs_names[:n_pert]) == [f"p.{i}" for i in range(n_pert)]
    pd.testing.assert_frame_equal(pred.var, train_var)


def _rows_of(m, sel):
    return np.asarray(m[sel].todense()) if sp.issparse(m) else np.asarray(m[sel])


# ------------------------------------------------------------------------------------------------
# cell-mean == cell-eval baseline
# ------------------------------------------------------------------------------------------------


def test_cell_mean_matches_cell_eval_baseline(sim, train_full):
    from cell_eval._baseline import build_base_mean_adata

    counts = read_pert_counts(sim.pert_counts_path)
    ref = build_base_mean_adata(train_full.copy(), counts_df=str(sim.pert_counts_path),
                                output_path=None, output_de_path=None)  # no DE
    x_before = train_full.X.copy()
    pred = CellMeanBaseline().fit(train_full).predict(sim.pert_counts_path)
    assert (train_full.X != x_before).nnz == 0  # the training data is not modified
    n_ctrl = int((train_full.obs[PERT_KEY] == CONTROL_LABEL).sum())
    _check_output(pred, counts, train_full.var, n_ctrl)
    assert list(pred.obs_names) == list(ref.obs_names)
    np.testing.assert_array_equal(pred.obs[PERT_KEY].astype(str), ref.obs[PERT_KEY].astype(str))
    n = sum(counts.values())
    a, b = _rows_of(pred.X, slice(0, n)), _rows_of(ref.X, slice(0, n))
    assert a.dtype == b.dtype == np.float32
    # cell-eval's polars group order is arbitrary and its float32 mean over groups depends on it
    # (here by up to 4 ulp over random orders of the 13 groups; the next test pins the order)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    assert np.abs(a.view(np.int32) - b.view(np.int32)).max() <= 8
    assert (a == a[0]).all()
    # control rows: the normalised training controls, bit for bit, in file order
    np.testing.assert_array_equal(_rows_of(pred.X, slice(n, None)), _rows_of(ref.X, slice(n, None)))


def test_cell_mean_vector_is_polars_group_means_in_sorted_order(train_full):
    """Bit-exact: float32 polars group means (control group included) averaged in sorted
    group order with numpy, i.e. cell-eval's arithmetic with a fixed group order."""
    import polars as pl
    x, _ = prepare_expression(train_full.X)
    means = (pl.DataFrame(x.toarray())
             .with_columns(pl.Series(PERT_KEY, train_full.obs[PERT_KEY].astype(str)))
             .group_by(PERT_KEY).mean().sort(PERT_KEY))
    names = means.drop_in_place(PERT_KEY).to_numpy()
    assert CONTROL_LABEL in names
    expected = means.to_numpy().mean(axis=0)
    got = CellMeanBaseline().fit(train_full).vector_
    np.testing.assert_array_equal(got, expected)
    # it is not the mean over perturbations only
    m_pert = means.to_numpy()[names != CONTROL_LABEL].mean(axis=0)
    assert np.abs(got - m_pert).max() > 1e-3


def test_cell_mean_counts_from_training_obs_like_cell_eval(train_full):
    from cell_eval._baseline import build_base_mean_adata

    ref = build_base_mean_adata(train_full.copy(), counts_df=None)
    counts = pert_counts_from(train_full)
    pred = CellMeanBaseline().fit(train_full).predict(counts)
    assert pred.n_obs == ref.n_obs
    assert (pred.obs[PERT_KEY].astype(str).value_counts().sort_index()
            .equals(ref.obs[PERT_KEY].astype(str).value_counts().sort_index()))


def test_cell_mean_log1p_input_and_context_controls():
    g = 3
    rows = [("A", CONTROL_LABEL, [1.5, 0.0, 2.25]), ("A", CONTROL_LABEL, [0.5, 1.0, 0.25]),
            ("B", CONTROL_LABEL, [0.75, 0.5, 0.0]),
            ("A", "P", [3.5, 0.0, 0.25]), ("B", "Q", [0.0, 2.5, 1.0]), ("B", "Q", [0.0, 0.5, 1.0])]
    a = _hand_adata(rows, g)
    m = CellMeanBaseline().fit(a)
    ctrl = np.mean([[1.5, 0.0, 2.25], [0.5, 1.0, 0.25], [0.75, 0.5, 0.0]], axis=0)
    expected = np.mean([ctrl, [3.5, 0.0, 0.25], [0.0, 1.5, 1.0]], axis=0)
    np.testing.assert_allclose(m.vector_, expected, rtol=1e-6)
    pred = m.predict({"P": 2, "X": 1})  # any name gets the vector
    _check_output(pred, {"P": 2, "X": 1}, a.var, 3)
    np.testing.assert_allclose(pred.X[:3].toarray(), np.tile(expected, (3, 1)), rtol=1e-6)
    pred_b = m.predict({"P": 2}, context="B")  # only B's controls appended
    _check_output(pred_b, {"P": 2}, a.var, 1)
    np.testing.assert_array_equal(pred_b.X[2].toarray()[0], np.float32([0.75, 0.5, 0.0]))
    assert list(pred_b.obs_names[2:]) == ["c2"]


# ------------------------------------------------------------------------------------------------
# context-mean
# ------------------------------------------------------------------------------------------------

B_CTRL = np.array([[0.5, 1.25, 0.25], [0.0, 0.75, 1.5], [2.0, 0.0, 0.0]])


@pytest.fixture()
def two_contexts():
    """Context A: P = controls +1 on G0, Q = controls -0.5 on G2. Context B: P = controls +1 on
    G1 (few-shot), Q and U unseen. U unseen everywhere."""
    a0 = [1.5, 2.25, 0.75]
    rows = [("A", CONTROL_LABEL, a0)] * 2
    rows += [("A", "P", [2.5, 2.25, 0.75])] * 2 + [("A", "Q", [1.5, 2.25, 0.25])] * 2
    rows += [("B", CONTROL_LABEL, r) for r in B_CTRL]
    rows += [("B", "P", r + [0.0, 1.0, 0.0]) for r in B_CTRL]
    return _hand_adata(rows, 3)


def _from_some_control(pred_rows, effect, ctrl=B_CTRL):
    """Every predicted row is max(control row + effect, 0) for some control row."""
    cand = np.maximum(ctrl + effect, 0)
    d = np.abs(pred_rows[:, None, :] - cand[None, :, :]).max(axis=2)
    return bool((d.min(axis=1) < 1e-6).all())


def test_context_mean_known_answer(two_contexts):
    m = ContextMeanBaseline().fit(two_contexts)
    eP, eQ = np.array([1.0, 0, 0]), np.array([0, 0, -0.5])
    eff = m.effects(["P", "Q", "U"], "B")
    np.testing.assert_allclose(eff, [eP, eQ, (eP + eQ) / 2], atol=1e-6)
    counts = {"P": 6, "Q": 5, "U": 4}
    pred = m.predict(counts, context="B", seed=3)
    _check_output(pred, counts, two_contexts.var, 3)
    x = pred.X.toarray()
    assert _from_some_control(x[:6], eP)
    assert _from_some_control(x[6:11], eQ)
    assert _from_some_control(x[11:15], (eP + eQ) / 2)
    assert len({tuple(r) for r in x[:6]}) > 1  # controls are sampled, not one row repeated
    assert (x[6:11, 2] >= 0).all() and (x[6:11, 2] == 0).any()  # clipped at 0
    np.testing.assert_array_equal(x[15:], B_CTRL.astype(np.float32))  # B's controls appended
    # the other direction: B's P effect (+1 on G1) transferred to A
    np.testing.assert_allclose(m.effects(["P"], "A"), [[0, 1.0, 0]], atol=1e-6)


def test_context_mean_target_context_options(two_contexts):
    own, other = np.array([0, 1.0, 0]), np.array([1.0, 0, 0])
    m = ContextMeanBaseline(use_target_context=True).fit(two_contexts)
    np.testing.assert_allclose(m.effects(["P", "Q"], "B"), [(own + other) / 2, [0, 0, -0.5]], atol=1e-6)
    m = ContextMeanBaseline(fewshot_weight=0.25).fit(two_contexts)
    np.testing.assert_allclose(m.effects(["P"], "B"), [0.25 * own + 0.75 * other], atol=1e-6)
    with pytest.raises(BaselineError, match="fewshot_weight"):
        ContextMeanBaseline(fewshot_weight=1.5)


def test_context_mean_seeded(two_contexts):
    m = ContextMeanBaseline().fit(two_contexts)
    a = m.predict({"P": 20}, context="B", seed=1).X
    b = m.predict({"P": 20}, context="B", seed=1).X
    c = m.predict({"P": 20}, context="B", seed=2).X
    assert (a != b).nnz == 0
    assert (a != c).nnz > 0


def test_context_mean_explicit_controls_and_new_context(two_contexts):
    m = ContextMeanBaseline().fit(two_contexts)
    # raw counts of a new context: normalised on their own, then shifted
    counts_x = np.array([[4, 0, 2], [1, 3, 0], [2, 2, 2]], np.float32)
    ctrl = ad.AnnData(X=sp.csr_matrix(counts_x), var=two_contexts.var.copy(),
                      obs=pd.DataFrame(index=["n0", "n1", "n2"]))
    pred = m.predict({"Q": 4}, context="C", controls=ctrl, seed=0)
    _check_output(pred, {"Q": 4}, two_contexts.var, 3)
    norm = prepare_expression(counts_x)[0]
    np.testing.assert_allclose(pred.X[4:].toarray(), norm, rtol=1e-6)
    assert list(pred.obs_names[4:]) == ["n0", "n1", "n2"]
    # Q's effect averaged over A and B (both are "other" for C); Q unseen in B -> A only
    assert _from_some_control(pred.X[:4].toarray(), [0, 0, -0.5], ctrl=norm)
    # controls with a pert column: only its control cells are used
    ctrl.obs[PERT_KEY] = [CONTROL_LABEL, "P", CONTROL_LABEL]
    pred = m.predict({"Q": 1}, context="C", controls=ctrl)
    assert list(pred.obs_names[1:]) == ["n0", "n2"]
    with pytest.raises(BaselineError, match="lack 1 training genes"):
        m.predict({"Q": 1}, context="C", controls=ctrl[:, :2])


# ------------------------------------------------------------------------------------------------
# ridge
# ------------------------------------------------------------------------------------------------


def test_ridge_fit_recovers_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    m = rng.normal(size=(3, 5))
    c = rng.normal(size=5)
    w, b = ridge_fit(x, x @ m + c, alpha=1e-10)
    np.testing.assert_allclose(w, m, atol=1e-8)
    np.testing.assert_allclose(b, c, atol=1e-8)
    # wide features (dual form): interpolates the training targets for tiny alpha
    xw = rng.normal(size=(6, 20))
    y = rng.normal(size=(6, 4))
    w, b = ridge_fit(xw, y, alpha=1e-10)
    np.testing.assert_allclose(xw @ w + b, y, atol=1e-6)
    # dual == primal
    w1, b1 = ridge_fit(xw, y, alpha=2.0)
    xc = xw - xw.mean(0)
    w2 = np.linalg.solve(xc.T @ xc + 2.0 * np.eye(20), xc.T @ (y - y.mean(0)))
    np.testing.assert_allclose(w1, w2, atol=1e-10)
    # huge alpha: the mean
    w, b = ridge_fit(x, x @ m + c, alpha=1e12)
    assert np.abs(w).max() < 1e-6
    with pytest.raises(BaselineError):
        ridge_fit(x, np.zeros((3, 2)), 1.0)


def _linear_world(n_fewshot, seed=0):
    """Context B's deltas are features @ M; context A has every perturbation with no effect."""
    rng = np.random.default_rng(seed)
    g, d = 4, 2
    perts = [f"p{i}" for i in range(8)]
    feats = {p: rng.normal(size=d) for p in perts}
    feats["G_unused"] = rng.normal(size=d)
    m = rng.uniform(-0.4, 0.4, size=(d, g))
    a0, b0 = np.full(g, 2.5), np.full(g, 3.25)
    rows = [("A", CONTROL_LABEL, a0)] * 2 + [("B", CONTROL_LABEL, b0)] * 2
    rows += [("A", p, a0) for p in perts]
    rows += [("B", p, b0 + feats[p] @ m) for p in perts[:n_fewshot] for _ in range(2)]
    return _hand_adata(rows, g), feats, m


def test_ridge_recovers_linear_map_from_features(tmp_path):
    adata, feats, m = _linear_world(n_fewshot=6)
    want = ["p6", "p7", "p0"]
    truth = np.stack([feats[p] @ m for p in want])
    for residual in (True, False):
        r = RidgeDeltaBaseline(alpha=1e-9, features=feats, residual=residual).fit(adata)
        assert r.fewshot_perts("B") == [f"p{i}" for i in range(6)]
        np.testing.assert_allclose(r.effects(want, "B"), truth, atol=1e-4)
    # the same through a STATE-style .pt file
    import torch
    pt = tmp_path / "feats.pt"
    torch.save({k: torch.tensor(v, dtype=torch.float32) for k, v in feats.items()}, pt)
    r = RidgeDeltaBaseline(alpha=1e-9, features=pt).fit(adata)
    np.testing.assert_allclose(r.effects(want, "B"), truth, atol=1e-4)
    pred = r.predict({"p6": 3, "p7": 2}, context="B")
    _check_output(pred, {"p6": 3, "p7": 2}, adata.var, 2)
    np.testing.assert_allclose(pred.X[:3].toarray(), np.tile(3.25 + truth[0], (3, 1)), atol=1e-4)


def test_ridge_falls_back_to_context_mean_with_a_warning():
    adata, feats, _ = _linear_world(n_fewshot=1)
    for kw in ({}, {"features": feats}):
        r = RidgeDeltaBaseline(**kw).fit(adata)
        with pytest.warns(UserWarning, match="fewer than 2.*context-mean"):
            pred = r.predict({"p3": 4, "p0": 2}, context="B", seed=5)
        ref = ContextMeanBaseline().fit(adata).predict({"p3": 4, "p0": 2}, context="B", seed=5)
        assert (pred.X != ref.X).nnz == 0
        pd.testing.assert_frame_equal(pred.obs, ref.obs)
        assert r.fewshot_perts("B") == []


def test_shift_baselines_on_simulated_heldout_context(sim, train, train_full):
    """Default features (PCA of other-context deltas) on the tiny simulation: the ridge is fitted
    on the split's few-shot perturbations, and both baselines' effects track the held-out truth."""
    import tomllib

    ctx = sim.heldout_context
    counts = read_pert_counts(sim.pert_counts_path)
    perts = list(counts)
    assert not set(perts) & set(ContextMeanBaseline().fit(train).deltas(ctx))  # really held out
    real = ContextMeanBaseline().fit(train_full).deltas(ctx)
    real = np.stack([real[p] for p in perts])
    split = tomllib.loads(Path(sim.split_path).read_text())
    fewshot = sorted(set(train.obs.loc[train.obs[CONTEXT_KEY] == ctx, PERT_KEY]) - {CONTROL_LABEL})
    assert len(fewshot) == 3 and not set(fewshot) & set(split["fewshot"][f"sim.{ctx}"]["test"])
    cm = ContextMeanBaseline().fit(train)
    rd = RidgeDeltaBaseline(alpha=1.0, n_components=5).fit(train)
    assert rd.fewshot_perts(ctx) == fewshot
    for model in (cm, rd):
        eff = model.effects(perts, ctx)
        assert np.isfinite(eff).all()
        assert np.corrcoef(eff.ravel(), real.ravel())[0, 1] > 0.3


@pytest.mark.parametrize("kind", ["cell-mean", "context-mean", "ridge"])
def test_output_format_on_simulated_data(kind, sim, train):
    ctx = sim.heldout_context
    counts = read_pert_counts(sim.pert_counts_path)
    pred = make_baseline(kind).fit(train).predict(counts, context=ctx, seed=0)
    is_ctrl = (train.obs[PERT_KEY] == CONTROL_LABEL) & (train.obs[CONTEXT_KEY] == ctx)
    _check_output(pred, counts, train.var, int(is_ctrl.sum()))
    assert list(pred.obs_names[sum(counts.values()):]) == list(train.obs_names[is_ctrl.to_numpy()])
    # control rows are the training file's normalised controls of the context
    x, _ = prepare_expression(train.X)
    np.testing.assert_array_equal(pred.X[sum(counts.values()):].toarray(),
                                  x[np.flatnonzero(is_ctrl.to_numpy())].toarray())
    assert pred.X.max() < 15


def test_fit_several_files_and_log1p_input(sim, train_full):
    ctx = train_full.obs[CONTEXT_KEY].astype(str)
    parts = [train_full[(ctx == c).to_numpy()].copy() for c in sorted(set(ctx))]
    m = ContextMeanBaseline().fit(parts)
    assert m.contexts == sorted(set(ctx))
    # per-file normalisation: context A's deltas equal those of A's file fitted alone
    alone = ContextMeanBaseline().fit([parts[1]])
    for p, d in alone.deltas(m.contexts[1]).items():
        np.testing.assert_allclose(m.deltas(m.contexts[1])[p], d)
    # log1p input is used as is: fitting on the normalised file gives the same effects
    lg = train_full.copy()
    lg.X = prepare_expression(train_full.X)[0]
    e1 = ContextMeanBaseline().fit(train_full).effects(["GENE00004"], sim.heldout_context)
    e2 = ContextMeanBaseline().fit(lg).effects(["GENE00004"], sim.heldout_context)
    np.testing.assert_allclose(e1, e2, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# counts, split, features, errors
# ------------------------------------------------------------------------------------------------


def test_read_pert_counts_sources_and_errors(tmp_path):
    want = {"B": 3, "A": 2}
    df = pd.DataFrame({PERT_KEY: ["B", CONTROL_LABEL, "A", "Z"], "n_cells": [3, 50, 2, 0],
                       "median_umi_per_cell": [1.0, 2.0, 3.0, 4.0]})
    assert read_pert_counts(df) == want  # controls and zero counts dropped, order kept
    csv = tmp_path / "c.csv"
    df.to_csv(csv, index=False)
    assert list(read_pert_counts(csv).items()) == list(want.items())
    assert read_pert_counts(str(csv)) == want
    assert read_pert_counts({"B": 3, "A": 2.0}) == want
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"gene": ["A"], "count": [3]}).to_csv(bad, index=False)
    with pytest.raises(BaselineError, match=r"lacks \['target_gene', 'n_cells'\]"):
        read_pert_counts(bad)
    for n in (-1, 2.5, "x"):
        with pytest.raises(BaselineError, match="non-negative integers"):
            read_pert_counts(pd.DataFrame({PERT_KEY: ["A"], "n_cells": [n]}))
    with pytest.raises(BaselineError, match="more than once"):
        read_pert_counts(pd.DataFrame({PERT_KEY: ["A", "A"], "n_cells": [1, 2]}))
    with pytest.raises(BaselineError, match="does not exist"):
        read_pert_counts(tmp_path / "missing.csv")
    with pytest.raises(BaselineError, match="no perturbation"):
        read_pert_counts({CONTROL_LABEL: 10})


def test_pert_counts_from_and_split(sim, train_full, train):
    ctx = sim.heldout_context
    full = pert_counts_from(train_full, context=ctx)
    assert CONTROL_LABEL not in full and list(full) == sorted(full)
    csv = read_pert_counts(sim.pert_counts_path)
    assert {p: full[p] for p in csv} == csv
    split = read_split(sim.split_path)
    assert split.heldout_contexts() == [ctx]
    (entry,) = split.fewshot.values()
    held = set(entry["val"]) | set(entry["test"])
    assert set(csv) <= held
    n_held = sum(full[p] for p in held)
    assert train.n_obs == train_full.n_obs - n_held
    assert set(pert_counts_from(train, context=ctx)) == set(full) - held
    with pytest.raises(BaselineError, match="no cells of context 'nope'"):
        pert_counts_from(train_full, context="nope")


def test_load_pert_features_errors(tmp_path, sim):
    f = load_pert_features(sim.features_path)
    assert len(f) == 200 and len({v.size for v in f.values()}) == 1
    with pytest.raises(BaselineError, match="length"):
        load_pert_features({"A": [1.0, 2.0], "B": [1.0]})
    with pytest.raises(BaselineError, match="does not exist"):
        load_pert_features(tmp_path / "none.pt")


def test_clear_errors(two_contexts):
    m = ContextMeanBaseline().fit(two_contexts)
    with pytest.raises(BaselineError, match=r"unknown context 'C'; training contexts: \['A', 'B'\]"):
        m.predict({"P": 1}, context="C")
    with pytest.raises(BaselineError, match="needs the target context"):
        m.predict({"P": 1})
    with pytest.raises(BaselineError, match="obs has no column 'perturbation'"):
        ContextMeanBaseline().fit(two_contexts, pert_col="perturbation")
    with pytest.raises(BaselineError, match="obs has no column 'cell_line'"):
        RidgeDeltaBaseline().fit(two_contexts, context_key="cell_line")
    with pytest.raises(BaselineError, match="not fitted"):
        CellMeanBaseline().predict({"P": 1})
    with pytest.raises(BaselineError, match="unknown baseline 'mean'"):
        make_baseline("mean")
    with pytest.raises(BaselineError, match="unexpected keyword"):
        make_baseline("cell-mean", alpha=1.0)
    no_ctx = two_contexts.copy()
    del no_ctx.obs[CONTEXT_KEY]
    cm = CellMeanBaseline().fit(no_ctx)  # cell-mean needs no context column
    with pytest.raises(BaselineError, match="no obs\\['cell_type'\\] column"):
        cm.predict({"P": 1}, context="A")
    neg = two_contexts.copy()
    neg.X = neg.X.copy()
    neg.X.data[0] = -1.0
    with pytest.raises(BaselineError, match="negative values"):
        CellMeanBaseline().fit(neg)


# ------------------------------------------------------------------------------------------------
# jobs/baseline.py
# ------------------------------------------------------------------------------------------------


def test_cli_end_to_end(sim, tmp_path):
    out = tmp_path / "sub" / "ridge.h5ad"
    r = subprocess.run(
        [sys.executable, str(JOB), "--train", str(sim.h5ad_paths[0]), "--split", str(sim.split_path),
         "--kind", "ridge", "--features", str(sim.features_path), "--alpha", "10",
         "--counts", str(sim.pert_counts_path), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"context": "' + sim.heldout_context in r.stdout
    assert [p.name for p in out.parent.iterdir()] == ["ridge.h5ad"]  # no temporary left over
    pred = ad.read_h5ad(out)
    counts = read_pert_counts(sim.pert_counts_path)
    full = ad.read_h5ad(sim.h5ad_paths[0])
    is_ctrl = (full.obs[PERT_KEY] == CONTROL_LABEL) & (full.obs[CONTEXT_KEY] == sim.heldout_context)
    _check_output(pred, counts, full.var, int(is_ctrl.sum()))


def test_cli_in_process_matches_library(job, sim, train, tmp_path, capsys):
    out = tmp_path / "cm.h5ad"
    rc = job.main(["--train", str(sim.h5ad_paths[0]), "--split", str(sim.split_path),
                   "--kind", "context-mean", "--counts-from", str(sim.h5ad_paths[0]),
                   "--seed", "4", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    got = ad.read_h5ad(out)
    ctx = sim.heldout_context
    want = ContextMeanBaseline().fit(train).predict(
        pert_counts_from(sim.h5ad_paths[0], context=ctx), context=ctx, seed=4)
    assert (got.X != want.X).nnz == 0
    pd.testing.assert_frame_equal(got.obs, want.obs)


@pytest.mark.parametrize("args, message", [
    (["--kind", "ridge", "--context", "nope"], "unknown context 'nope'"),
    (["--kind", "context-mean", "--context", "k562", "--pert-col", "perturbation"],
     "obs has no column 'perturbation'"),
    (["--kind", "cell-mean", "--counts", "BADCSV"], "lacks ['n_cells']"),
    (["--kind", "context-mean"], "needs the target context"),
    (["--kind", "cell-mean", "--train", "MISSING"], "none.h5ad does not exist"),
    (["--kind", "context-mean", "--context", "k562", "--counts-from", "MISSING"], "does not exist"),
])
def test_cli_clear_errors(job, sim, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({PERT_KEY: ["GENE00004"], "cells": [3]}).to_csv(bad, index=False)
    subst = {"BADCSV": str(bad), "MISSING": str(tmp_path / "none.h5ad")}
    args = [subst.get(a, a) for a in args]
    out = tmp_path / "x.h5ad"
    rc = job.main(["--train", str(sim.h5ad_paths[0]), *args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_cli_rejects_options_of_other_kinds(job, sim, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        job.main(["--train", str(sim.h5ad_paths[0]), "--kind", "cell-mean", "--alpha", "3",
                  "--out", str(tmp_path / "x.h5ad")])
    assert e.value.code == 2
    assert "only apply to --kind ridge" in capsys.readouterr().err
