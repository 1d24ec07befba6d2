"""Statistics report on a simulated corpus: CSV, plots, summary agree with the data."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data_conversion import ConvertConfig, convert_corpus
from vcc_dist import constants as K
from vcc_dist.data.corpus import load_manifest, store_path
from vcc_dist.data.simulate import sim_config, simulate
from vcc_dist.report.statistics import condition_tables, write_statistics_report

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    sim = simulate(sim_config("tiny", split_files_by="cell_type"), d / "sim", progress=False)
    convert_corpus(ConvertConfig(inputs=tuple(map(str, sim.h5ad_paths)), out=str(d / "corpus"),
                                 parallel="serial", progress=False, n_top_genes=50))
    return d / "corpus", sim


def test_report_files_and_summary(corpus, tmp_path):
    c, sim = corpus
    o = write_statistics_report(c, tmp_path / "report")
    genes = pd.read_csv(o.gene_csv, index_col=0)
    assert list(genes.columns[:8]) == [K.GENE_ID_KEY, "mean", "max", "min", "nonzero_fraction",
                                       "dispersion", "dispersions_norm", "highly_variable"]
    assert len(genes) == sim.n_genes and genes["highly_variable"].sum() >= 50
    for png in (o.gene_mean_png, o.delta_png, o.cells_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    s = json.loads(o.summary_json.read_text())
    assert s["cells"] == sim.n_cells and s["genes"] == sim.n_genes
    assert s["perturbations"] == sim.n_perturbations and s["contexts"] == sim.n_contexts
    # controls and cells per perturbation against the raw simulated files
    obs = pd.concat([ad.read_h5ad(p, backed="r").obs for p in sim.h5ad_paths])
    assert s["controls"] == int((obs[K.PERT_KEY] == K.CONTROL_LABEL).sum())
    per = obs[obs[K.PERT_KEY] != K.CONTROL_LABEL].groupby(K.PERT_KEY, observed=True).size()
    assert s["cells_per_perturbation"]["min"] == per.min()
    assert s["cells_per_perturbation"]["max"] == per.max()
    assert "| context | cells |" in o.summary_md.read_text()


def test_gene_statistics_equal_direct_computation(corpus):
    c, sim = corpus
    m = load_manifest(c)
    xs = [ad.read_zarr(store_path(c, s.name)) for s in m.stores]
    x = np.vstack([a.X.toarray() for a in xs]).astype(np.float64)
    tot = np.concatenate([a.obs[K.TOTAL_COUNTS_KEY].to_numpy() for a in xs])
    lg = np.log1p(x / tot[:, None] * 1e4)
    t = m.gene_table()
    np.testing.assert_allclose(t["mean"], lg.mean(0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(t["max"], lg.max(0), rtol=1e-6)
    np.testing.assert_allclose(t["nonzero_fraction"], (x > 0).mean(0))


def test_condition_pseudobulks_and_knockdown_visible(corpus):
    c, sim = corpus
    conds, pb = condition_tables(c)
    m = load_manifest(c)
    col = {g: j for j, g in enumerate(m.genes)}
    # the knocked-down target is lower than in its context's controls for most perturbations
    lower = []
    for _, r in conds[conds[K.PERT_KEY] != K.CONTROL_LABEL].iterrows():
        ctrl = conds[(conds[K.CONTEXT_KEY] == r[K.CONTEXT_KEY])
                     & (conds[K.PERT_KEY] == K.CONTROL_LABEL)].index[0]
        j = col[r[K.PERT_KEY]]
        lower.append(pb[r.name, j] < pb[ctrl, j])
    assert np.mean(lower) > 0.8
    assert conds["n_cells"].sum() == sim.n_cells
