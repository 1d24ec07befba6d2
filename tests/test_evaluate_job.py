"""jobs/evaluate.py and the evaluation API around the metrics: outputs, summaries cache,
baseline aggregates from cell-eval's CSV, Ray parallelism, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.eval_pairs import make_pred, make_real
from vcc_dist.metrics import vcc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    real = make_real(seed=11, n_perts=6)
    real.write_h5ad(d / "real.h5ad")
    make_pred(real, "noisy_csr", seed=1).write_h5ad(d / "pred.h5ad")
    make_pred(real, "constant", seed=2).write_h5ad(d / "base.h5ad")
    bad = make_pred(real, "noisy_csr", seed=3)
    drop = sorted(set(bad.obs["target_gene"]) - {"non-targeting"})[0]
    bad = bad[bad.obs["target_gene"] != drop].copy()
    bad.write_h5ad(d / "missing_pert.h5ad")
    return d


def _job(*args):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_job_outputs_and_cached_summary(files, tmp_path):
    out = tmp_path / "o"
    p = _job("--real", files / "real.h5ad", "--pred", files / "pred.h5ad", "--baseline",
             files / "base.h5ad", "--out", out, "--save-summaries", tmp_path / "s", "--quiet")
    assert p.returncode == 0, p.stderr
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 6 and {"overlap_at_N", "mae", "discrimination_score_l1",
                              "baseline_overlap_at_N", "n_real_de"} <= set(res.columns)
    agg = json.loads((out / "agg_results.json").read_text())
    assert 0 <= agg["score"]["avg_score"] and (out / "per_perturbation.png").stat().st_size > 0
    assert "node_ids" not in agg  # one process, no Ray: nothing to record
    diff = pd.read_csv(out / "baseline_diff.csv")
    assert list(diff["metric"]) == ["mae", "overlap_at_N", "discrimination_score_l1",
                                    "avg_score"]
    # the real file's summary replaces the real file; the baseline scored once replaces the
    # baseline file
    p = _job("--real", tmp_path / "s" / "real.summary.npz", "--pred", files / "base.h5ad",
             "--out", tmp_path / "b", "--no-plot", "--quiet")
    assert p.returncode == 0, p.stderr
    out2 = tmp_path / "o2"
    p = _job("--real", tmp_path / "s" / "real.summary.npz", "--pred", files / "pred.h5ad",
             "--baseline-agg", tmp_path / "b" / "agg_results.json", "--out", out2, "--no-plot",
             "--quiet")
    assert p.returncode == 0, p.stderr
    agg2 = json.loads((out2 / "agg_results.json").read_text())
    assert agg2["score"]["avg_score"] == pytest.approx(agg["score"]["avg_score"], abs=1e-12)
    assert not (out2 / "per_perturbation.png").exists()


def test_job_reports_mismatch_cleanly(files, tmp_path):
    p = _job("--real", files / "real.h5ad", "--pred", files / "missing_pert.h5ad",
             "--out", tmp_path / "o", "--quiet")
    assert p.returncode == 2
    assert "perturbation mismatch" in p.stderr and "Traceback" not in p.stderr


def test_summary_roundtrip_and_global_fdr(files, tmp_path):
    s = vcc.summarize(files / "real.h5ad", what="real")
    s2 = vcc.FileSummary.load(s.save(tmp_path / "r.npz"))
    np.testing.assert_array_equal(s.pvalue, s2.pvalue)
    np.testing.assert_array_equal(s.bulk, s2.bulk)
    pred = vcc.summarize(files / "pred.h5ad", what="pred")
    per = vcc.compare(s2, pred)
    glob = vcc.compare(s2, pred, fdr_scope="global")
    # one BH family over the file: DE calls change (the exact values are unit-tested)
    assert (glob["n_real_de"] != per["n_real_de"]).any()


def test_agg_from_cell_eval_csv(tmp_path):
    df = pd.DataFrame({"statistic": ["count", "mean"], "overlap_at_N": [3, 0.5],
                       "mae": [3, 0.2], "discrimination_score_l1": [3, 0.7]})
    df.to_csv(tmp_path / "agg.csv", index=False)
    assert vcc.load_agg(tmp_path / "agg.csv") == {"overlap_at_N": 0.5, "mae": 0.2,
                                                  "discrimination_score_l1": 0.7}
    df.drop(columns="mae").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(vcc.EvaluationError, match="mae"):
        vcc.load_agg(tmp_path / "bad.csv")


def test_score_formula_edge_cases():
    base = {"overlap_at_N": 0.2, "mae": 0.1, "discrimination_score_l1": 0.5}
    same = vcc.score(base, base)
    assert same == {"mae": 0.0, "overlap_at_N": 0.0, "discrimination_score_l1": 0.0,
                    "avg_score": 0.0}
    worse = vcc.score({"overlap_at_N": 0.1, "mae": 0.3, "discrimination_score_l1": 0.4}, base)
    assert worse["avg_score"] == 0.0  # clipped at 0
    perfect = vcc.score({"overlap_at_N": 1.0, "mae": 0.0, "discrimination_score_l1": 1.0}, base)
    assert perfect["avg_score"] == pytest.approx(1.0)
    nan = vcc.score(base, {"overlap_at_N": 1.0, "mae": 0.0, "discrimination_score_l1": 1.0})
    assert nan["overlap_at_N"] == 0.0 and nan["mae"] == 0.0  # 0/0 and x/0: NaN/-inf -> 0


def test_agg_results_is_written_last(files, tmp_path):
    """agg_results.json marks a complete evaluation (an s3 upload follows this order)."""
    ev = vcc.evaluate(files / "real.h5ad", files / "pred.h5ad", files / "base.h5ad")
    ev.node_ids = ["n2", "n1"]
    paths = vcc.write_evaluation(ev, tmp_path, plot=False)
    assert list(paths) == ["results.csv", "baseline_diff.csv", "agg_results.json"]
    assert json.loads(paths["agg_results.json"].read_text())["node_ids"] == ["n2", "n1"]


@pytest.mark.integration
def test_ray_workers_give_identical_results(files):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        a = vcc.summarize(files / "real.h5ad", num_workers=3)
    finally:
        ray.shutdown()
    b = vcc.summarize(files / "real.h5ad")
    np.testing.assert_array_equal(a.pvalue, b.pvalue)
    np.testing.assert_array_equal(a.lfc, b.lfc)
    np.testing.assert_array_equal(a.bulk, b.bulk)
