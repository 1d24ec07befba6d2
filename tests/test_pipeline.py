"""The main job's stage table (vcc_dist/pipeline.py): the table, done() semantics, stages run
alone on tiny data, the report, and defect 11 (one Tune figure, and which it is)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from data_conversion import ConvertConfig, convert_corpus, validate_corpus
from vcc_dist import pipeline as pl
from vcc_dist.pipeline import Conversion, Pipeline, RunContext, Stage, main_pipeline

PIPELINE = main_pipeline(Conversion(ConvertConfig, convert_corpus, validate_corpus))
NAMES = ("simulate", "convert", "validate", "statistics", "baselines", "esm", "se", "embed",
         "st", "st_se", "tune", "predict")


def _ctx(out, lines=None, **kw) -> RunContext:
    say = lines.append if lines is not None else (lambda msg: None)
    return RunContext(out=out, preset="tiny", progress=False, say=say, **kw)


# -- the table ------------------------------------------------------------------------------


def test_the_table_names_the_stages_in_order_and_rejects_unknown_names():
    assert PIPELINE.names == NAMES
    assert [s.name for s in PIPELINE.until("baselines")] == list(NAMES[:5])
    assert PIPELINE.until(None) == PIPELINE.stages
    with pytest.raises(ValueError, match="unknown stage 'sim'.*simulate, convert, validate"):
        PIPELINE.until("sim")
    with pytest.raises(ValueError, match="unique"):
        Pipeline((PIPELINE["st"], PIPELINE["st"]))
    # only the sweep needs Ray's dashboard, and simulating needs no Ray
    assert [s.name for s in PIPELINE.stages if s.needs_dashboard] == ["tune"]
    assert not PIPELINE["simulate"].uses_ray


def _fake(name, calls, done=False):
    return Stage(name, f"fake {name}", (), lambda ctx: done,
                 lambda ctx: calls.append((name, ctx.label)), uses_ray=False)


def test_run_skips_done_stages_stops_after_until_and_labels_each_stage(tmp_path):
    calls, lines = [], []
    p = Pipeline((_fake("a", calls), _fake("b", calls, done=True), _fake("c", calls),
                  _fake("d", calls)))
    ran = p.run(_ctx(tmp_path, lines), until="c", report=False)
    assert ran == ["a", "c"]
    assert calls == [("a", "[1/4] a"), ("c", "[3/4] c")]
    assert lines == ["[2/4] b: up to date, skipped"]
    assert not (tmp_path / "report.md").exists()


# -- simulate alone, and done() ------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A run directory with only the simulate stage run (tiny preset)."""
    out = tmp_path_factory.mktemp("pipeline_run")
    lines: list[str] = []
    PIPELINE["simulate"].run(_ctx(out, lines))
    assert any("1,500 cells x 200 genes" in ln for ln in lines), lines
    return out


def test_simulate_alone_is_done_after_and_not_when_an_output_is_missing_or_stale(simulated,
                                                                                 tmp_path):
    stage = PIPELINE["simulate"]
    assert stage.done(_ctx(simulated))
    assert not stage.done(_ctx(simulated, seed=1))  # other settings: not this stage's output
    assert not stage.done(_ctx(tmp_path))           # nothing there
    copy = tmp_path / "run"
    shutil.copytree(simulated / "sim", copy / "sim")
    assert stage.done(_ctx(copy))
    (copy / "sim" / "split.toml").unlink()          # incomplete outputs are not done
    assert not stage.done(_ctx(copy))
    shutil.copy(simulated / "sim" / "split.toml", copy / "sim" / "split.toml")
    for h in copy.glob("sim/perturbseq*.h5ad"):
        h.unlink()
    assert not stage.done(_ctx(copy))
    shutil.copytree(simulated / "sim", copy / "sim", dirs_exist_ok=True)
    (copy / "sim" / "sim_config.json").write_text("{not json")
    assert not stage.done(_ctx(copy))


def test_convert_is_not_done_before_it_runs_and_needs_the_simulated_data(simulated, tmp_path):
    assert not PIPELINE["convert"].done(_ctx(simulated))
    with pytest.raises(ValueError, match="run the simulate stage first"):
        PIPELINE["convert"].run(_ctx(tmp_path))


# -- baselines alone ------------------------------------------------------------------------


def test_baselines_alone_on_the_simulated_data(simulated, tmp_path):
    stage, lines = PIPELINE["baselines"], []
    ctx = _ctx(simulated, lines)
    assert not stage.done(ctx)
    stage.run(ctx)
    assert stage.done(ctx)
    scores = json.loads((simulated / "baselines" / "scores.json").read_text())
    assert [r["baseline"] for r in scores["scores"]] == ["cell-mean", "context-mean", "ridge"]
    assert any("held-out perturbations; best" in ln for ln in lines), lines
    # a missing prediction file makes the stage incomplete (the predict stage reads it)
    copy = tmp_path / "run"
    shutil.copytree(simulated / "baselines", copy / "baselines")
    assert stage.done(_ctx(copy))
    (copy / "baselines" / "ridge.h5ad").unlink()
    assert not stage.done(_ctx(copy))


# -- validate and statistics alone, on a converted corpus ----------------------------------------


def test_validate_and_statistics_alone_on_a_corpus(tiny_corpus, tmp_path):
    sim, corpus = tiny_corpus
    run = tmp_path / "run"
    shutil.copytree(corpus, run / "corpus")  # the manifest's sources still point at sim's h5ads
    lines: list[str] = []
    ctx = _ctx(run, lines)
    PIPELINE["validate"].run(ctx)
    assert lines[-1].startswith("OK (")
    PIPELINE["statistics"].run(ctx)
    for rel in PIPELINE["statistics"].outputs:
        assert (run / rel).is_file(), rel
    summary = json.loads((run / "statistics" / "summary.json").read_text())
    assert summary["cells"] == sim.n_cells
    # the report from these stages alone: the corpus line and the statistics, nothing else
    report = pl.write_report(ctx, ["validate", "statistics"]).read_text()
    assert f"({sim.n_cells:,} cells x {sim.n_genes:,} genes)" in report
    assert "](statistics/gene_means.png)" in report
    assert "## Baselines" not in report and "## Training" not in report


def test_validate_raises_naming_the_fix_when_the_corpus_is_invalid(tmp_path):
    class Invalid:
        ok, checks = False, 3

        def text(self):
            return "store x: 2 rows differ"

    stage = main_pipeline(Conversion(ConvertConfig, convert_corpus,
                                     lambda corpus, sample_rows: Invalid()))["validate"]
    with pytest.raises(ValueError, match="delete it and rerun(.|\n)*store x: 2 rows differ"):
        stage.run(_ctx(tmp_path))


# -- defect 11: one Tune figure, and which it is ------------------------------------------------

SUMMARY = {"trials": 2, "by_status": {"completed": 1, "stopped early": 1},
           "best": {"trial_id": "abc_00001", "best_score": 0.415, "validations": 3,
                    "run_dir": "trials/abc_00001"},
           "best_recipe": "best_recipe.json", "max_concurrent": 1, "wall_s": 1.0}


def test_tune_stage_prints_one_best_figure_by_validation_score(tmp_path, monkeypatch):
    """Before: Tune's status output (ranked by last result) and the summary's best-over-
    validations were both printed as the best score. Now Tune's output is off and one line
    names the figure."""
    seen = {}

    def fake_sweep(cfg, *, progress=True, resume=True):
        seen["progress"] = progress
        run = tmp_path / "tune"
        run.mkdir(parents=True, exist_ok=True)
        (run / "summary.json").write_text(json.dumps(SUMMARY))
        trials = pd.DataFrame([
            {"trial_id": "abc_00000", "status": "stopped early", "validations": 1,
             "best_score": 0.12},
            {"trial_id": "abc_00001", "status": "completed", "validations": 3,
             "best_score": 0.415}])
        trials.to_csv(run / "trials.csv", index=False)
        return type("R", (), {"trials": trials})()

    monkeypatch.setattr(pl, "run_sweep", fake_sweep)
    lines: list[str] = []
    ctx = _ctx(tmp_path, lines, quick=True)
    PIPELINE["tune"].run(ctx)
    assert seen["progress"] is False  # Tune's last-result ranking is not printed
    best = [ln for ln in lines if "best trial" in ln]
    assert len(best) == 1, lines
    assert ("best trial abc_00001 by validation score (its best over 3 validations, x 100): 41.5"
            in best[0])
    assert "test score" in best[0]
    assert "trial abc_00000: stopped early, 1 validations, validation score 12.0" in "\n".join(lines)
    assert PIPELINE["tune"].done(ctx)
    (tmp_path / "tune" / "trials.csv").unlink()
    assert not PIPELINE["tune"].done(ctx)


def test_report_names_the_tune_figure_and_its_test_score(tmp_path):
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "summary.json").write_text(json.dumps(SUMMARY))
    (tmp_path / "predictions").mkdir()
    rows = [{"model": m, "DES": 0.1, "PDS": 0.5, "MAE": 0.01, "score": s}
            for m, s in (("cell-mean", 0.0), ("ST (genes)", 20.0), (pl.TUNE_MODEL, 17.3))]
    (tmp_path / "predictions" / "scores.json").write_text(json.dumps(
        {"context": "c0", "perturbations": ["g1", "g2"], "rows": rows}))
    report = pl.write_report(_ctx(tmp_path), ["se", "tune", "predict"]).read_text()
    assert "## Models and baselines on the held-out context `c0`: 2 test perturbations" in report
    assert ("best trial abc_00001 by validation score (its best over 3 validations, x 100): "
            "41.5; its test score: 17.3") in report
    assert report.count("41.5") == 1
