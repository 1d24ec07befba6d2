"""One core, two paths: the split reader, the {gene: vector} reader, the context-mean prior,
the held-out selection and the ridge's ST features are shared by the AnnData path (baselines,
vcc_dist.infer) and the corpus path (ST, vcc_dist.train). These tests run both paths on the
same data and check they agree."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from vcc_dist.constants import CONTEXT_KEY, CONTROL_LABEL, PERT_KEY
from vcc_dist.data.heldout import heldout_rows, select_heldout
from vcc_dist.data.pseudobulk import GroupMeans, build_features, context_mean_cells
from vcc_dist.data.splits import TEST, TRAIN, VAL, SplitError, SplitSpec, has_role
from vcc_dist.infer.baselines import (
    BaselineError,
    ContextMeanBaseline,
    RidgeDeltaBaseline,
    exclude_heldout,
    load_pert_features,
    read_pert_counts,
    read_split,
)
from vcc_dist.infer.heldout import heldout_real
from vcc_dist.models.features import PerturbationFeatures

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "baseline.py"


@pytest.fixture(scope="module")
def corpus(tiny_corpus):
    """(sim, corpus dir, plan, reader) of the session's tiny corpus under its split."""
    from vcc_dist.data.plans import SetStreamConfig
    from vcc_dist.data.streams import set_plan

    sim, cdir = tiny_corpus
    plan, reader = set_plan(cdir, SetStreamConfig(), sim.split_path)
    return sim, cdir, plan, reader


@pytest.fixture(scope="module")
def sim_files(corpus):
    """The simulated h5ad files (one per context) pooled, as the AnnData path reads them."""
    sim = corpus[0]
    files = [ad.read_h5ad(p) for p in sim.h5ad_paths]
    return ad.concat(files, join="inner", index_unique="-")


@pytest.fixture(scope="module")
def job():
    sys.path.insert(0, str(JOB.parent))
    try:
        spec = importlib.util.spec_from_file_location("baseline_job_cores", JOB)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if str(JOB.parent) in sys.path:
            sys.path.remove(str(JOB.parent))
    return mod


# ------------------------------------------------------------------------------------------
# one split reader
# ------------------------------------------------------------------------------------------

BAD_SPLITS = [
    ("[zeroshot]\n'sim.jurkat' = 'test'\n", r"\[datasets\] is missing"),
    ("[datasets]\nsim = '/x'\n[zeroshot]\n'sim.jurkat' = 'holdout'\n", '"val", "test" or "train"'),
    ("[datasets]\nsim = '/x'\n[zeroshot]\njurkat = 'test'\n", "<dataset>.<context>"),
    ("[datasets]\nsim = '/x'\n[fewshot.'sim.jurkat']\nvalidation = ['X']\n", "unknown keys"),
    ("[datasets]\nsim = '/x'\n[extra]\n", "unknown section"),
    ("[datasets\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,match", BAD_SPLITS)
def test_both_paths_reject_the_same_split_files(tmp_path, corpus, job, capsys, text, match):
    """The lenient AnnData reader accepted all of these (a typo'd key held out nothing)."""
    from vcc_dist.data.streams import set_plan
    from vcc_dist.data.plans import SetStreamConfig

    sim, cdir = corpus[0], corpus[1]
    path = tmp_path / "split.toml"
    path.write_text(text)
    with pytest.raises(SplitError, match=match):
        read_split(path)  # the AnnData path's entry
    with pytest.raises(SplitError, match=match):
        set_plan(cdir, SetStreamConfig(), path)  # the corpus path's entry
    rc = job.main(["--train", str(sim.h5ad_paths[0]), "--kind", "context-mean", "--split",
                   str(path), "--context", "k562", "--out", str(tmp_path / "x.h5ad"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: split file") and "Traceback" not in err


def test_split_naming_some_roles_only_is_accepted_on_both_paths(tmp_path, corpus, sim_files):
    """A few-shot entry with only ``test`` (no ``val``) and no [training]: legitimate."""
    from vcc_dist.data.plans import SetStreamConfig
    from vcc_dist.data.streams import set_plan

    sim, cdir = corpus[0], corpus[1]
    spec = SplitSpec.from_toml(sim.split_path)
    (key, entry), = spec.fewshot.items()
    text = (f"[datasets]\nsim = {str(Path(sim.split_path).parent)!r}\n\n[fewshot]\n"
            f"[fewshot.{key!r}]\ntest = {entry['test']!r}\n").replace("'", '"')
    path = tmp_path / "test_only.toml"
    path.write_text(text)
    plan, _ = set_plan(cdir, SetStreamConfig(), path)
    assert not any(has_role(r, VAL) for r in plan.table["role"])
    corpus_test = {plan.labels.perturbations[p] for r, p in zip(plan.table["role"],
                                                                 plan.table["pert"])
                   if has_role(r, TEST)}
    split = read_split(path)
    roles = split.cell_roles(sim_files.obs[CONTEXT_KEY], sim_files.obs[PERT_KEY], CONTROL_LABEL)
    anndata_test = set(sim_files.obs[PERT_KEY].astype(str)[roles == TEST])
    assert corpus_test == anndata_test == set(entry["test"])
    assert set(roles) == {TRAIN, TEST}


def test_cell_roles_equal_group_roles():
    spec = SplitSpec.loads("""
[datasets]
a = "/data/a/"
[zeroshot]
"a.jurkat" = "val"
[fewshot]
[fewshot."a.rpe1"]
val = ["P1", "P2"]
test = ["P2", "P3"]
""")
    contexts = ["jurkat", "k562", "rpe1"]
    perts = [CONTROL_LABEL, "P1", "P2", "P3", "P4"]
    groups = pd.DataFrame([(0, c, p) for c in range(3) for p in range(5)],
                          columns=["store", "context", "pert"])
    by_group = spec.group_roles(groups, ["/data/a/x.h5ad"], contexts, perts, 0)
    by_cell = spec.cell_roles([contexts[c] for c in groups["context"]],
                              [perts[p] for p in groups["pert"]], CONTROL_LABEL)
    assert list(by_group) == list(by_cell)
    assert "val,test" in set(by_cell) and by_cell[0] == TRAIN  # controls never held out
    ambiguous = SplitSpec.loads('[datasets]\na = "/a"\nb = "/b"\n[zeroshot]\n"a.k" = "test"\n'
                                '"b.k" = "val"\n')
    with pytest.raises(SplitError, match="named by both"):
        ambiguous.cell_roles(["k"], ["P"], CONTROL_LABEL)


def test_baseline_job_rejects_a_split_context_absent_from_training(job, corpus, tmp_path, capsys):
    sim = corpus[0]
    text = Path(sim.split_path).read_text().replace(f'.{sim.heldout_context}"', '.Jurkat"')
    path = tmp_path / "typo.toml"
    path.write_text(text)
    rc = job.main(["--train", *map(str, sim.h5ad_paths[:1]), "--train", str(sim.h5ad_paths[2]),
                   "--kind", "context-mean", "--split", str(path), "--context", "k562",
                   "--out", str(tmp_path / "x.h5ad"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "names context(s) ['Jurkat'] that no --train file has" in err


# ------------------------------------------------------------------------------------------
# one {gene: vector} reader
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,match", [
    (b"not a torch file", "cannot load it with torch.load"),
    ("list", "expected a non-empty dict"),
    ("ragged", "1-D of one length"),
])
def test_both_feature_paths_reject_the_same_gene_tables(tmp_path, content, match):
    path = tmp_path / "feats.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "list":
        torch.save([torch.zeros(3)], path)
    else:
        torch.save({"A": torch.zeros(3), "B": torch.zeros(4)}, path)
    with pytest.raises(BaselineError, match=match):
        load_pert_features(path)  # the ridge baseline
    with pytest.raises(ValueError, match=match):
        PerturbationFeatures.from_file(path, ["A", "B"])  # ST
    good = tmp_path / "good.pt"
    torch.save({"A": torch.arange(3.0), "B": torch.ones(3)}, good)
    np.testing.assert_array_equal(load_pert_features(good)["A"],
                                  PerturbationFeatures.from_file(good, ["A", "B"]).matrix[0])


# ------------------------------------------------------------------------------------------
# one context-mean prior
# ------------------------------------------------------------------------------------------


def _corpus_training_adata(plan, reader) -> ad.AnnData:
    """Every training cell of the corpus, normalised log1p, with its labels."""
    t = plan.table
    xs, ctx, pert = [], [], []
    for i, r in enumerate(t["role"]):
        if not has_role(r, TRAIN):
            continue
        g = plan.groups[i]
        st, rw = g.locate(np.arange(g.n))
        xs.append(reader.dense(reader.read_many(st, rw, normalize=True)))
        ctx += [plan.labels.contexts[int(t["context"].iat[i])]] * g.n
        pert += [plan.labels.perturbations[int(t["pert"].iat[i])]] * g.n
    obs = pd.DataFrame({PERT_KEY: pert, CONTEXT_KEY: ctx},
                       index=[f"c{i}" for i in range(len(pert))])
    return ad.AnnData(X=sp.csr_matrix(np.vstack(xs)), obs=obs,
                      var=pd.DataFrame(index=list(reader.genes)))


def test_context_mean_corpus_path_equals_anndata_path(corpus):
    from vcc_dist.train.st_data import group_means

    sim, _, plan, reader = corpus
    means = group_means(plan, reader, max_cells=10**6)
    transfer = means.transfer()  # ST's "transfer" features and _val_baselines' prior
    adata = _corpus_training_adata(plan, reader)
    cm = ContextMeanBaseline().fit(adata)
    labels = plan.labels
    perts = labels.perturbations[1:]
    for c, ctx in enumerate(labels.contexts):
        np.testing.assert_allclose(transfer[c, 1:], cm.effects(perts, ctx), rtol=1e-5,
                                   atol=1e-6)
    # the prior's predicted cells: the same function, the same draws
    ctrl = adata[(adata.obs[PERT_KEY] == CONTROL_LABEL).to_numpy()
                 & (adata.obs[CONTEXT_KEY] == sim.heldout_context).to_numpy()].X
    hc = labels.contexts.index(sim.heldout_context)
    got = cm.predict({perts[0]: 5, perts[1]: 3}, context=sim.heldout_context, seed=2)
    blocks = list(context_mean_cells(ctrl, transfer[hc, 1:3], [5, 3],
                                     np.random.default_rng(2)))
    np.testing.assert_allclose(got.X[:8].toarray(), np.vstack(blocks), rtol=1e-6, atol=1e-6)


def test_context_mean_average_perturbation_and_target():
    """P0 is seen in contexts 0 and 1, P1 only in context 0: for target 0, P1 has no other
    context and gets the mean of the others' effects; for target None every context votes."""
    g = 2
    means = np.full((2, 3, g), np.nan)
    means[:, 0] = 1.0                      # controls
    means[0, 1], means[1, 1] = [2.0, 1.0], [1.0, 3.0]
    means[0, 2] = [1.0, 0.0]
    gm = GroupMeans(means, np.where(np.isnan(means[..., 0]), 0, 10), 0)
    t0 = gm.context_mean(0)
    np.testing.assert_allclose(t0.effect[1], [0.0, 2.0])
    assert t0.seen.tolist() == [False, True, False]
    np.testing.assert_allclose(t0.effect[2], t0.average)
    every = gm.context_mean(None)
    np.testing.assert_allclose(every.effect[1], [0.5, 1.0])
    np.testing.assert_allclose(gm.transfer()[1, 2], [0.0, -1.0])
    assert (gm.transfer()[:, 0] == 0).all()


# ------------------------------------------------------------------------------------------
# one held-out selection
# ------------------------------------------------------------------------------------------


def test_select_heldout_rule():
    a = select_heldout({"B": 10, "A": 3}, 20, "ctx", max_cells=4, max_controls=5, seed=1)
    assert a.perts == ["A", "B"]
    assert a.cells[0].tolist() == [0, 1, 2] and a.cells[1].size == 4
    assert (np.diff(a.cells[1]) > 0).all() and a.controls.size == 5
    b = select_heldout({"A": 3, "B": 10}, 20, "ctx", max_cells=4, max_controls=5, seed=1)
    assert all((x == y).all() for x, y in zip(a.cells + [a.controls], b.cells + [b.controls]))
    c = select_heldout({"A": 3, "B": 10}, 20, "ctx", max_cells=4, max_controls=5, seed=2)
    assert any((x != y).any() for x, y in zip(a.cells[1:] + [a.controls],
                                               c.cells[1:] + [c.controls]))
    with pytest.raises(ValueError, match="has no control cells"):
        select_heldout({"A": 3}, 0, "ctx")


def _raw(reader, st, rw):
    return reader.dense(reader.read_many(st, rw, normalize=False))


def _rowset(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


def test_heldout_selection_identical_on_both_paths_uncapped(corpus, sim_files):
    """The same split and role pick the same cells from the corpus and from the simulator's
    h5ad files (compared by raw counts; the corpus stores cells in its own order)."""
    from vcc_dist.train.st_data import heldout_groups

    sim, _, plan, reader = corpus
    held = heldout_groups(plan, TEST, seed=5)
    rows = heldout_rows(sim_files.obs[CONTEXT_KEY], sim_files.obs[PERT_KEY],
                        read_split(sim.split_path), TEST, control_label=CONTROL_LABEL, seed=5)
    assert rows.context == held.context == sim.heldout_context
    assert rows.perts == held.perts and rows.counts() == held.counts()
    x = sim_files[:, list(reader.genes)].X
    for (st, rw), r in zip(held.cells, rows.rows):
        np.testing.assert_array_equal(_rowset(_raw(reader, st, rw)), _rowset(x[r].toarray()))
    np.testing.assert_array_equal(_rowset(_raw(reader, *held.control)),
                                  _rowset(x[rows.control_rows].toarray()))


@pytest.mark.parametrize("seed", [5, 6])
def test_heldout_selection_identical_on_both_paths_capped(corpus, seed):
    """With caps, the same seed draws the same positions in each perturbation's candidates:
    on an AnnData holding the corpus's cells in the corpus's order, the same cells."""
    from vcc_dist.train.st_data import heldout_groups

    sim, _, plan, reader = corpus
    full = heldout_groups(plan, TEST)
    parts, ctx, pert = [], [], []
    for p, (st, rw) in zip(full.perts, full.cells):
        parts.append(_raw(reader, st, rw))
        pert += [p] * rw.size
    parts.append(_raw(reader, *full.control))
    pert += [CONTROL_LABEL] * full.control[1].size
    x = np.vstack(parts)
    ctx = [full.context] * x.shape[0]
    held = heldout_groups(plan, TEST, max_cells=7, max_controls=11, seed=seed)
    rows = heldout_rows(ctx, pert, read_split(sim.split_path), TEST, control_label=CONTROL_LABEL,
                        max_cells=7, max_controls=11, seed=seed)
    assert rows.perts == held.perts and rows.counts() == held.counts()
    assert set(rows.counts().values()) <= set(range(1, 8)) and rows.control_rows.size == 11
    for (st, rw), r in zip(held.cells, rows.rows):
        np.testing.assert_array_equal(_raw(reader, st, rw), x[r])
    np.testing.assert_array_equal(_raw(reader, *held.control), x[rows.control_rows])


def test_heldout_real_is_the_rule_uncapped(sim_files, corpus):
    sim = corpus[0]
    spec = read_split(sim.split_path)
    ctx, real = heldout_real(sim_files, spec)
    (entry,) = spec.fewshot.values()
    c = sim_files.obs[CONTEXT_KEY].astype(str).to_numpy()
    p = sim_files.obs[PERT_KEY].astype(str).to_numpy()
    want = (c == ctx) & (np.isin(p, entry["val"] + entry["test"]) | (p == CONTROL_LABEL))
    assert list(real.obs_names) == list(sim_files.obs_names[want])
    with pytest.raises(ValueError, match="has no 'val/test' perturbations"):
        heldout_real(sim_files, spec, context="k562")


# ------------------------------------------------------------------------------------------
# the ridge on ST's features
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train(sim_files, corpus):
    return exclude_heldout(sim_files, read_split(corpus[0].split_path))


def test_ridge_with_st_features_runs_and_differs_from_simulator_features(train, corpus):
    sim = corpus[0]
    ctx = sim.heldout_context
    counts = read_pert_counts(sim.pert_counts_path)
    perts = list(counts)
    st = RidgeDeltaBaseline(alpha=10.0, features=("transfer", "onehot")).fit(train)
    fs = RidgeDeltaBaseline(alpha=10.0, features=sim.features_path).fit(train)
    assert st.fewshot_perts(ctx) == fs.fewshot_perts(ctx) and len(st.fewshot_perts(ctx)) >= 2
    e_st, e_fs = st.effects(perts, ctx), fs.effects(perts, ctx)
    assert np.isfinite(e_st).all() and np.abs(e_st - e_fs).max() > 1e-3
    pred = st.predict(counts, context=ctx, seed=0)
    assert pred.n_obs > sum(counts.values()) and np.isfinite(pred.X.data).all()
    # its inputs are ST's table: transfer (the context-mean effect) then one-hot
    means, plist = st.pseudobulks
    table = build_features(("transfer", "onehot"), st.contexts, plist, means).table
    np.testing.assert_array_equal(st.feature_table, table)
    assert fs.feature_table is None
    c = st.contexts.index(ctx)
    cm = ContextMeanBaseline().fit(train).effects(plist[1:], ctx)
    np.testing.assert_allclose(table[c, 1:, :train.n_vars], cm, rtol=1e-5, atol=1e-6)
    assert table.shape[2] == train.n_vars + len(plist)
    with pytest.raises(BaselineError, match="neither 'onehot', 'transfer'"):
        RidgeDeltaBaseline(features=["transfer", "nope.pt"]).fit(train)


def test_baseline_job_ridge_with_st_features(job, corpus, tmp_path, capsys):
    sim = corpus[0]
    args = ["--train", *[a for p in sim.h5ad_paths for a in ("--train", str(p))][1:],
            "--split", str(sim.split_path), "--kind", "ridge", "--counts",
            str(sim.pert_counts_path), "--no-progress"]
    assert job.main([*args, "--features", "transfer", "onehot", "--out",
                     str(tmp_path / "st.h5ad")]) == 0, capsys.readouterr().err
    assert job.main([*args, "--features", str(sim.features_path), "--out",
                     str(tmp_path / "sim.h5ad")]) == 0, capsys.readouterr().err
    a, b = ad.read_h5ad(tmp_path / "st.h5ad"), ad.read_h5ad(tmp_path / "sim.h5ad")
    assert a.shape == b.shape and (a.X != b.X).nnz > 0
    assert "--features SRC" in job._parser().format_help()
