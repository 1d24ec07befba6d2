"""README command one: the main job end to end on an embedded local Ray (every stage, with the
debug recipes: --quick), then a rerun that skips every completed stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *extra: str) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "main.py"), "--out", str(out),
                        "--preset", "tiny", "--num-cpus", "2", "--no-progress", "--quick",
                        *extra], capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-6000:]
    return p.stdout


@pytest.mark.integration
def test_main_job_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "run"
    log = _run(out)
    assert "[2/12] convert: 3 h5ad file(s)" in log and "[3/12] validate: OK" in log
    summary = json.loads((out / "statistics" / "summary.json").read_text())
    manifest = json.loads((out / "corpus" / "corpus.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["stores"]) == 3
    assert summary["cells"] == manifest["summary"]["n_cells"] == 1500
    report = (out / "report.md").read_text()
    assert "statistics/gene_means.png" in report and (out / "statistics" / "gene_means.png").exists()
    scores = json.loads((out / "baselines" / "scores.json").read_text())
    assert [r["baseline"] for r in scores["scores"]] == ["cell-mean", "context-mean", "ridge"]
    assert "## Baselines on the held-out context" in report
    # the later stages: gene embeddings, SE, cell embeddings, ST (genes, SE), Tune, predictions
    assert (out / "esm" / "gene_embeddings.pt").is_file()
    assert (out / "se" / "best_checkpoint.json").is_file() and (out / "se" / "curves.png").is_file()
    assert (out / "se" / "cells_state.h5ad").is_file()
    for name in ("st", "st_se"):
        assert (out / name / "best_checkpoint.json").is_file()
    assert (out / "tune" / "trials.csv").is_file() and (out / "tune" / "best_recipe.json").is_file()
    pred = json.loads((out / "predictions" / "scores.json").read_text())
    models = {r["model"] for r in pred["rows"]}
    assert {"cell-mean", "context-mean", "ridge", "ST (genes)", "ST on SE",
            "ST, best Tune trial"} <= models
    assert "## Models and baselines on the held-out context" in report
    assert "![SE pretraining](se/curves.png)" in report and "tune/sweep.png" in report
    # defect 11: one Tune figure, named: the best trial by validation score (its best over its
    # validations), then its test score; Tune's own last-result ranking is not printed
    assert "Current best trial" not in log
    best = [ln for ln in log.splitlines() if "best trial" in ln]
    assert len(best) == 2 and all("by validation score (its best over" in ln for ln in best), best
    assert "its test score: the predict stage" in best[0] and "Tune: best trial" in best[1]
    assert "by validation score (its best over" in report and "its test score:" in report
    log2 = _run(out)
    for stage in ("simulate: up to date, skipped", "convert: corpus complete, skipped",
                  "baselines: up to date, skipped", "esm: up to date, skipped",
                  "se: up to date, skipped", "embed: up to date, skipped",
                  "st: up to date, skipped", "st_se: up to date, skipped",
                  "tune: up to date, skipped"):
        assert stage in log2, (stage, log2[-3000:])
    assert "[12/12] predict:" in log2 and (out / "report.md").read_text() == report


def test_until_rejects_an_unknown_stage_listing_the_stages(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "main.py"), "--out",
                        str(tmp_path / "run"), "--until", "train"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "--until: unknown stage 'train'" in p.stderr
    assert "simulate, convert, validate, statistics, baselines, esm, se, embed, st, st_se, " \
           "tune, predict" in p.stderr
    assert not (tmp_path / "run").exists()
