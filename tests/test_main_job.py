"""README command one: the main job end to end on an embedded local Ray, then a rerun that
skips every completed stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "main.py"), "--out", str(out),
                        "--preset", "tiny", "--num-cpus", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.integration
def test_main_job_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "run"
    log = _run(out)
    assert "[2/5] convert: 3 h5ad file(s)" in log and "[3/5] validate: OK" in log
    summary = json.loads((out / "statistics" / "summary.json").read_text())
    manifest = json.loads((out / "corpus" / "corpus.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["stores"]) == 3
    assert summary["cells"] == manifest["summary"]["n_cells"] == 1500
    report = (out / "report.md").read_text()
    assert "statistics/gene_means.png" in report and (out / "statistics" / "gene_means.png").exists()
    scores = json.loads((out / "baselines" / "scores.json").read_text())
    assert [r["baseline"] for r in scores["scores"]] == ["cell-mean", "context-mean", "ridge"]
    assert "## Baselines on the held-out context" in report
    log2 = _run(out)
    assert "simulate: up to date, skipped" in log2 and "convert: corpus complete, skipped" in log2
    assert "baselines: up to date, skipped" in log2
