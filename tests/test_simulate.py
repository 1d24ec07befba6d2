"""Tests of the Perturb-seq simulator (vcc_dist.data.simulate) and its job (jobs/simulate.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcc_dist.constants import (
    BATCH_KEY,
    CONTEXT_KEY,
    CONTROL_LABEL,
    GENE_ID_KEY,
    GUIDE_KEY,
    PERT_KEY,
)
from vcc_dist.data import simulate as S
from vcc_dist.data.simulate import (
    FIELD_DOCS,
    SIM_PRESETS,
    SimConfig,
    build_model,
    load_sim_config,
    load_truth,
    parse_overrides,
    plan_cells,
    sim_config,
    simulate,
    truth_effects,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_tiny")
    res = simulate(sim_config("tiny"), out, progress=False)
    return res


@pytest.fixture(scope="module")
def tiny_adata(tiny):
    return ad.read_h5ad(tiny.h5ad_paths[0])


@pytest.fixture(scope="module")
def pseudobulk(tiny_adata, tiny):
    """Per (context, perturbation) mean log1p-normalised expression and deltas to own controls."""
    a = tiny_adata
    X = a.X.tocsr().astype(np.float64)
    tot = np.asarray(X.sum(1)).ravel()
    Xn = sp.diags(np.median(tot) / tot) @ X
    Xn.data = np.log1p(Xn.data)
    truth = load_truth(tiny.out_dir)
    ctx = a.obs[CONTEXT_KEY].astype(str).to_numpy()
    pert = a.obs[PERT_KEY].astype(str).to_numpy()
    contexts = list(truth["contexts"])
    perts = list(truth["perturbations"])
    pb = {}
    for c in contexts:
        for p in perts + [CONTROL_LABEL]:
            sel = (ctx == c) & (pert == p)
            pb[c, p] = np.asarray(Xn[sel].mean(0)).ravel()
    delta = {(c, p): pb[c, p] - pb[c, CONTROL_LABEL] for c in contexts for p in perts}
    return dict(pb=pb, delta=delta, contexts=contexts, perts=perts, truth=truth,
                gene_index={g: i for i, g in enumerate(a.var_names)})


def _x_arrays(path):
    with h5py.File(path, "r") as f:
        return {k: f["X"][k][...] for k in ("data", "indices", "indptr")}


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


def test_presets_and_docs():
    assert set(SIM_PRESETS) >= {"tiny", "small", "medium", "vcc"}
    for name in SIM_PRESETS:
        cfg = sim_config(name)
        assert cfg.name == name
    vcc = sim_config("vcc")
    assert (vcc.n_cells, vcc.n_genes, vcc.n_contexts) == (221_273, 18_080, 4)
    assert vcc.n_perturbations >= 140
    assert {f.name for f in dataclasses.fields(SimConfig)} == set(FIELD_DOCS)


def test_config_roundtrip(tmp_path):
    cfg = sim_config("tiny", context_names=("a", "b", "c"), heldout_context="b", seed=7)
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert SimConfig.from_dict(d) == cfg
    (tmp_path / "sim_config.json").write_text(json.dumps(d))
    assert load_sim_config(tmp_path) == cfg


@pytest.mark.parametrize(
    "key,value",
    [
        ("n_cells", 10),
        ("n_cells", 2.5),
        ("n_genes", 5),
        ("control_fraction", 1.5),
        ("guide_efficiency_min", 0.0),
        ("x_dtype", "float16"),
        ("order", "sorted"),
        ("split_files_by", "guide"),
        ("heldout_context", "nope"),
        ("n_fewshot", 20),
        ("context_names", ("a", "b")),
        ("context_names", ("a", "b", "c/d")),
        ("block_rows", 0),
        ("compression", "zstd"),
    ],
)
def test_config_validation(key, value):
    with pytest.raises(ValueError, match=re.escape(f"SimConfig.{key}=")):
        sim_config("tiny", **{key: value})


def test_config_unknown_preset_and_key():
    with pytest.raises(ValueError, match="tiny"):
        sim_config("huge")
    with pytest.raises(ValueError, match="n_cells"):
        sim_config("tiny", n_cellz=10)


def test_parse_overrides():
    got = parse_overrides(["n_cells=1_000", "control_fraction=0.2", "order=grouped", "context_names=x,y,z"])
    assert got == dict(n_cells=1000, control_fraction=0.2, order="grouped", context_names=("x", "y", "z"))
    assert isinstance(got["n_cells"], int)
    with pytest.raises(ValueError, match="bogus"):
        parse_overrides(["bogus=1"])
    with pytest.raises(ValueError, match="n_cells"):
        parse_overrides(["n_cells=many"])


# ------------------------------------------------------------------------------------------------
# the count model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu,theta", [(0.05, 0.8), (0.7, 2.0), (3.0, 5.0), (10.0, 0.5), (40.0, 3.0)])
def test_nb_sampler_moments(mu, theta):
    rng = np.random.default_rng(0)
    m = np.full((100, 2000), mu, np.float32)
    x = S._nb_sample(rng, m, np.full(2000, theta, np.float32))
    assert x.dtype == np.int32 and x.min() >= 0
    var = mu + mu * mu / theta
    se = np.sqrt(var / x.size)
    assert abs(x.mean() - mu) < 5 * se
    assert abs(x.var() / var - 1) < 0.08
    p0 = (theta / (theta + mu)) ** theta
    assert abs((x == 0).mean() - p0) < 0.01


def test_exact_cell_counts():
    cfg = sim_config("tiny", n_cells=1234)
    plan = plan_cells(cfg, build_model(cfg))
    assert plan.n_cells == 1234
    # every perturbation in every context, controls in every context
    for c in range(cfg.n_contexts):
        present = set(plan.pert[plan.context == c].tolist())
        assert present == set(range(-1, cfg.n_perturbations))


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def test_outputs_exist(tiny):
    for p in (*tiny.h5ad_paths, tiny.fasta_path, tiny.features_path, tiny.split_path,
              tiny.pert_counts_path, tiny.truth_path, tiny.config_path):
        assert Path(p).is_file(), p
    assert [p.name for p in tiny.h5ad_paths] == ["perturbseq.h5ad"]
    assert not list(Path(tiny.out_dir).glob("*.partial"))
    assert 0.2 < tiny.density < 0.95


def test_h5ad_schema(tiny, tiny_adata):
    a = tiny_adata
    cfg = sim_config("tiny")
    assert a.shape == (cfg.n_cells, cfg.n_genes)
    assert list(a.obs.columns) == [PERT_KEY, GUIDE_KEY, BATCH_KEY, CONTEXT_KEY]
    for col in a.obs.columns:
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype), col
    assert CONTROL_LABEL in a.obs[PERT_KEY].cat.categories
    assert a.obs_names.is_unique and a.var_names.is_unique
    assert all(re.fullmatch(r"[ACGT]{16}-1", b) for b in a.obs_names[:50])
    assert list(a.var.columns) == [GENE_ID_KEY]
    assert a.var[GENE_ID_KEY].str.fullmatch(r"ENSG\d{11}").all()
    assert a.var[GENE_ID_KEY].is_unique
    assert sp.issparse(a.X) and a.X.format == "csr"
    assert a.X.dtype == np.float32
    assert np.array_equal(a.X.data, np.round(a.X.data)) and a.X.data.min() >= 1
    # controls carry non-targeting guides, perturbed cells guides of their own target
    ctrl = a.obs[PERT_KEY] == CONTROL_LABEL
    assert a.obs.loc[ctrl, GUIDE_KEY].astype(str).str.startswith(CONTROL_LABEL).all()
    pert = a.obs.loc[~ctrl]
    assert all(g.startswith(t + "_") for g, t in zip(pert[GUIDE_KEY].astype(str), pert[PERT_KEY].astype(str)))
    # batches nested in contexts
    assert all(b.startswith(c + "_") for b, c in zip(a.obs[BATCH_KEY].astype(str), a.obs[CONTEXT_KEY].astype(str)))
    # rows are shuffled by default: contexts interleave
    ctx = a.obs[CONTEXT_KEY].cat.codes.to_numpy()
    assert (np.diff(ctx) != 0).sum() > len(ctx) // 4
    with h5py.File(tiny.h5ad_paths[0], "r") as f:
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
        assert f["X/indptr"].dtype == np.int64
        assert f.attrs["encoding-type"] == "anndata"


def test_backed_mode(tiny, tiny_adata):
    b = ad.read_h5ad(tiny.h5ad_paths[0], backed="r")
    try:
        assert b.shape == tiny_adata.shape
        rows = b.X[100:140]
        assert (rows != tiny_adata.X[100:140]).nnz == 0
    finally:
        b.file.close()


def test_determinism_and_block_size(tmp_path, tiny):
    # same config, different block size (write granularity) -> identical bytes
    other = simulate(sim_config("tiny", block_rows=128), tmp_path / "a", progress=False)
    x1, x2 = _x_arrays(tiny.h5ad_paths[0]), _x_arrays(other.h5ad_paths[0])
    for k in x1:
        assert x1[k].dtype == x2[k].dtype and np.array_equal(x1[k], x2[k]), k
    o1 = ad.read_h5ad(tiny.h5ad_paths[0]).obs
    o2 = ad.read_h5ad(other.h5ad_paths[0]).obs
    pd.testing.assert_frame_equal(o1, o2)
    for name in ("proteins.fasta", "pert_counts.csv", "sim_config.json"):
        c1 = (Path(tiny.out_dir) / name).read_bytes()
        c2 = (tmp_path / "a" / name).read_bytes()
        if name == "sim_config.json":
            c1, c2 = json.loads(c1), json.loads(c2)
            c1.pop("block_rows"), c2.pop("block_rows")
        assert c1 == c2, name
    # another seed -> other data
    third = simulate(sim_config("tiny", seed=1), tmp_path / "b", progress=False)
    x3 = _x_arrays(third.h5ad_paths[0])
    assert x3["data"].shape != x1["data"].shape or not np.array_equal(x3["data"], x1["data"])


def test_split_files_by_cell_type(tmp_path, tiny_adata):
    res = simulate(sim_config("tiny", split_files_by="cell_type", order="grouped"), tmp_path, progress=False)
    cfg = sim_config("tiny")
    assert sorted(p.name for p in res.h5ad_paths) == sorted(f"perturbseq_{c}.h5ad" for c in cfg.contexts())
    assert not (tmp_path / "perturbseq.h5ad").exists()
    parts = [ad.read_h5ad(p) for p in res.h5ad_paths]
    assert sum(p.n_obs for p in parts) == cfg.n_cells
    for p, path in zip(parts, res.h5ad_paths):
        assert p.obs[CONTEXT_KEY].nunique() == 1
        assert path.name == f"perturbseq_{p.obs[CONTEXT_KEY].iloc[0]}.h5ad"
        assert (p.var_names == tiny_adata.var_names).all()
        # grouped order: perturbation labels come in contiguous runs
        codes = p.obs[PERT_KEY].astype(str).to_numpy()
        runs = 1 + (codes[1:] != codes[:-1]).sum()
        assert runs == p.obs[PERT_KEY].nunique()
    merged = ad.concat(parts)
    assert merged.obs_names.is_unique
    # same composition as the single shuffled file (counts differ: rows draw from row streams)
    key = [CONTEXT_KEY, PERT_KEY]
    assert merged.obs.groupby(key, observed=True).size().equals(
        tiny_adata.obs.groupby(key, observed=True).size())


def test_split_files_by_batch(tmp_path):
    res = simulate(sim_config("tiny", split_files_by="batch", n_cells=800), tmp_path, progress=False)
    assert len(res.h5ad_paths) == 3 * 2
    n = 0
    for p in res.h5ad_paths:
        a = ad.read_h5ad(p)
        assert a.obs[BATCH_KEY].nunique() == 1
        n += a.n_obs
    assert n == 800


def test_int_dtype_and_compression(tmp_path):
    res = simulate(sim_config("tiny", x_dtype="int32", compression="gzip", n_cells=700), tmp_path, progress=False)
    a = ad.read_h5ad(res.h5ad_paths[0])
    assert a.X.dtype == np.int32
    with h5py.File(res.h5ad_paths[0], "r") as f:
        assert f["X/data"].compression == "gzip"


def test_split_toml(tiny):
    cfg = sim_config("tiny")
    split = tomllib.loads(Path(tiny.split_path).read_text())
    assert split["datasets"] == {"sim": str(Path(tiny.out_dir).resolve())}
    assert split["training"] == {"sim": "train"}
    assert split["zeroshot"] == {}
    key = f"sim.{cfg.heldout()}"
    assert list(split["fewshot"]) == [key]
    val, test = split["fewshot"][key]["val"], split["fewshot"][key]["test"]
    assert len(val) == cfg.n_val and len(set(val)) == len(val)
    assert not set(val) & set(test)
    truth = load_truth(tiny.out_dir)
    perts = set(truth["perturbations"].tolist())
    assert set(val) | set(test) < perts
    assert len(perts - set(val) - set(test)) == cfg.n_fewshot
    assert set(truth["split_test"].tolist()) == set(test)


def test_pert_counts_csv(tiny, tiny_adata):
    df = pd.read_csv(tiny.pert_counts_path)
    assert list(df.columns) == [PERT_KEY, "n_cells", "median_umi_per_cell"]
    split = tomllib.loads(Path(tiny.split_path).read_text())
    test = split["fewshot"][f"sim.{tiny.heldout_context}"]["test"]
    assert sorted(df[PERT_KEY]) == sorted(test)
    a = tiny_adata
    tot = np.asarray(a.X.sum(1)).ravel()
    for row in df.itertuples():
        sel = ((a.obs[PERT_KEY] == row.target_gene) & (a.obs[CONTEXT_KEY] == tiny.heldout_context)).to_numpy()
        assert sel.sum() == row.n_cells
        assert np.median(tot[sel]) == pytest.approx(row.median_umi_per_cell)


def test_fasta(tiny, tiny_adata):
    header = re.compile(
        r">(ENSP\d{11}\.\d+) pep chromosome:SIM:\d+:\d+:\d+:1 gene:(ENSG\d{11})\.\d+ "
        r"transcript:(ENST\d{11})\.\d+ gene_biotype:protein_coding "
        r"transcript_biotype:protein_coding gene_symbol:(\S+)$"
    )
    seqs: dict[str, list[str]] = {}
    cur = None
    lengths = []
    for line in Path(tiny.fasta_path).read_text().splitlines():
        if line.startswith(">"):
            m = header.match(line)
            assert m, line
            cur = m.group(4)
            seqs.setdefault(cur, []).append("")
        else:
            assert len(line) <= 60 and re.fullmatch(r"[ACDEFGHIKLMNPQRSTVWY]+", line)
            seqs[cur][-1] += line
    assert set(seqs) == set(tiny_adata.var_names)
    assert all(1 <= len(v) <= 4 for v in seqs.values())
    lengths = [len(s) for v in seqs.values() for s in v]
    assert min(lengths) >= 30 and max(lengths) <= 1500 and any(n > 1022 for n in lengths)
    assert sum(len(v) > 1 for v in seqs.values()) > len(seqs) // 3
    assert all(v[0].startswith("M") for v in seqs.values())
    # isoforms of a gene share most of their sequence (prefix)
    multi = [v for v in seqs.values() if len(v) > 1]
    shared = [len(os.path.commonprefix([v[0], s])) / len(v[0]) for v in multi for s in v[1:]]
    assert np.median(shared) > 0.2
    # amino-acid composition is protein-like (leucine most common, tryptophan rare)
    allseq = "".join(s for v in seqs.values() for s in v)
    assert allseq.count("L") > allseq.count("W") * 4


def test_pert_features(tiny, tiny_adata):
    import torch

    feats = torch.load(tiny.features_path)
    assert isinstance(feats, dict)
    assert set(feats) == set(tiny_adata.var_names)
    truth = load_truth(tiny.out_dir)
    for p in truth["perturbations"]:
        t = feats[str(p)]
        assert t.dtype == torch.float32 and t.shape == (64,)
    # features carry signal: similar gene function -> similar features
    model = build_model(sim_config("tiny"))
    F = np.stack([feats[g].numpy() for g in model.gene_symbols])
    Z = model.gene_module_weights
    has = np.flatnonzero(np.abs(Z).sum(1) > 0)[:120]
    fz = np.corrcoef(Z[has])[np.triu_indices(len(has), 1)]
    ff = np.corrcoef(F[has])[np.triu_indices(len(has), 1)]
    ok = np.isfinite(fz)
    assert np.corrcoef(fz[ok], ff[ok])[0, 1] > 0.3


def test_truth(tiny):
    truth = load_truth(tiny.out_dir)
    cfg = sim_config("tiny")
    E = truth_effects(truth)
    assert E.shape == (cfg.n_perturbations, cfg.n_contexts, cfg.n_genes)
    assert truth["n_cells"].sum() + truth["n_cells_control"].sum() == cfg.n_cells
    assert truth["n_cells"].min() >= cfg.min_cells_per_group
    eff = truth["guide_efficiency"][truth["guide_pert"] >= 0]
    assert eff.min() >= 0.6 and eff.max() <= 0.95
    assert 1 <= truth["near_null"].sum() <= 4
    g = np.bincount(truth["guide_pert"][truth["guide_pert"] >= 0])
    assert g.min() >= 2 and g.max() <= 4


# ------------------------------------------------------------------------------------------------
# biology
# ------------------------------------------------------------------------------------------------


def test_knockdown_visible(pseudobulk):
    pb = pseudobulk
    drops = []
    for c in pb["contexts"]:
        for p in pb["perts"]:
            gi = pb["gene_index"][p]
            ctrl, kd = pb["pb"][c, CONTROL_LABEL][gi], pb["pb"][c, p][gi]
            drops.append(kd < ctrl - 0.2 * max(ctrl, 0.1))
    assert np.mean(drops) >= 0.85


def test_near_null_smaller_than_strong(pseudobulk):
    pb = pseudobulk
    truth = pb["truth"]
    E = truth_effects(truth)
    norms = np.sqrt((E ** 2).sum(-1)).mean(1)
    nn = truth["near_null"]
    assert truth["strength"][nn].max() < truth["strength"][~nn].min()
    strong = np.argsort(-norms)[:3]
    assert norms[nn].max() < 0.25 * norms[strong].min()
    assert norms[nn].max() < 0.5 * np.median(norms[~nn])
    # observed: the strong perturbations' deltas carry far more than sampling noise (whose sum of
    # squares scales as 1 / n_cells), the near-null ones' hardly any
    def ss(i):
        p = pb["perts"][i]
        gi = pb["gene_index"][p]
        return np.mean([np.sum(np.delete(pb["delta"][c, p], gi) ** 2) * truth["n_cells"][j, i]
                        for j, c in enumerate(pb["contexts"])])

    assert np.mean([ss(i) for i in strong]) > 2 * np.mean([ss(i) for i in np.flatnonzero(nn)])
    # and the observed deltas of strong perturbations follow the true effects
    for i in strong:
        p = pb["perts"][i]
        r = [np.corrcoef(pb["delta"][c, p], E[i, j])[0, 1] for j, c in enumerate(pb["contexts"])]
        assert np.mean(r) > 0.3


def test_contexts_differ_in_basal_expression(tiny_adata):
    a = tiny_adata
    X = a.X.toarray().astype(np.float64)
    X = np.log1p(X / X.sum(1, keepdims=True) * 2000)
    ctx = a.obs[CONTEXT_KEY].astype(str).to_numpy()
    cs = sorted(set(ctx))
    means = {c: X[ctx == c].mean(0) for c in cs}
    between = np.mean([np.abs(means[a_] - means[b_]).mean() for i, a_ in enumerate(cs) for b_ in cs[i + 1:]])
    # two random halves of one context differ much less (same perturbation mix)
    sel = np.random.default_rng(0).permutation(np.flatnonzero(ctx == cs[0]))
    within = np.abs(X[sel[::2]].mean(0) - X[sel[1::2]].mean(0)).mean()
    assert between > 2 * within


def test_effects_correlated_across_contexts_not_identical(pseudobulk):
    truth = pseudobulk["truth"]
    E = truth_effects(truth)
    active = np.flatnonzero(~truth["near_null"])
    r = []
    for i in active:
        for a in range(E.shape[1]):
            for b in range(a + 1, E.shape[1]):
                if E[i, a].any() and E[i, b].any():
                    r.append(np.corrcoef(E[i, a], E[i, b])[0, 1])
    r = np.array(r)
    assert 0.5 < np.median(r) < 0.995
    # not identical: contexts differ in scale (shared per-module gains) and in which genes respond
    rel = np.array([np.linalg.norm(E[i, a] - E[i, b]) / np.linalg.norm(E[i, a])
                    for i in active for a in range(E.shape[1]) for b in range(E.shape[1])
                    if a != b and E[i, a].any()])
    assert rel.min() > 0.01 and np.median(rel) > 0.15
    # the context-mean shift baseline is good but not perfect on the held-out context (truth level)
    h = list(truth["contexts"]).index(str(truth["heldout_context"]))
    others = [j for j in range(E.shape[1]) if j != h]
    base = {i: E[i, others].mean(0) for i in active if E[i, h].any()}
    corr = [np.corrcoef(E[i, h], b)[0, 1] for i, b in base.items()]
    err = [np.abs(E[i, h] - b).sum() / np.abs(E[i, h]).sum() for i, b in base.items()]
    assert np.median(corr) > 0.6
    assert np.median(err) > 0.1


# ------------------------------------------------------------------------------------------------
# job
# ------------------------------------------------------------------------------------------------


def test_job_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "jobs" / "simulate.py"), "--preset", "tiny", "--out", str(out),
           "--seed", "3", "--set", "n_cells=600", "--split-files-by", "cell_type", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["n_cells"] == 600 and len(summary["h5ad"]) == 3
    cfg = load_sim_config(out)
    assert cfg.seed == 3 and cfg.n_cells == 600 and cfg.split_files_by == "cell_type"
    bad = subprocess.run([*cmd[:2], "--preset", "tiny", "--out", str(out), "--set", "n_cells=-5"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "n_cells" in bad.stderr


def test_job_help_documents_every_key():
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "simulate.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for f in dataclasses.fields(SimConfig):
        assert f"  {f.name} (default" in res.stdout, f.name
