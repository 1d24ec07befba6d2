"""ST training end to end on a local Ray cluster (integration tier): a 2-worker DeepSpeed run
with validation and checkpoints, resuming after a job restart, recovering from a killed
worker, and prediction -> submission -> evaluation from the trained checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vcc_dist.checkpoint import (
    ST_KIND,
    CheckpointMismatch,
    manifest_from_dict,
    read_manifest,
    resolve_checkpoint,
)
from vcc_dist.config import ConfigError, parse_overrides
from vcc_dist.train.st import STTrainConfig, check_resume, st_recipe, train_st

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[1]



def _cfg(tiny_corpus, run_dir, **kw) -> STTrainConfig:
    sim, corpus = tiny_corpus
    top = dict(corpus=str(corpus), split=str(sim.split_path), run_dir=str(run_dir),
               num_workers=2, cpus_per_worker=0.5, wandb={"mode": "offline"})
    top.update(kw)
    return st_recipe("debug", **top)


@pytest.fixture(scope="module")
def trained(ray_local, tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("st") / "run"
    os.environ.setdefault("WANDB_DIR", str(run.parent))
    cfg = _cfg(tiny_corpus, run, checkpoint_every=4, epochs=2)
    return cfg, train_st(cfg, progress=False)


def test_two_worker_run_validates_checkpoints_and_logs(trained):
    cfg, r = trained
    spe = r.prep.steps_per_epoch
    assert spe >= 4
    assert r.return_value["step"] == 2 * spe
    run = r.run_dir
    val = pd.read_csv(run / "metrics_val.csv")
    # a validation at every checkpoint: checkpoint_every=4 replaces the per-epoch checkpoints
    # (a checkpoint mid-epoch resumes exactly), plus the last step
    want = sorted({s for s in range(4, 2 * spe + 1, 4)} | {2 * spe})
    assert val["step"].tolist() == want
    for m in ("overlap_at_N", "discrimination_score_l1", "mae", "score"):
        assert val[m].notna().all()
    assert ((val["mae"] > 0) & (val["discrimination_score_l1"] >= 0)).all()
    train = pd.read_csv(run / "metrics_train.csv")
    assert train["step"].is_monotonic_increasing and np.isfinite(train["loss"]).all()
    # the same seed and world size give the same run: these are the losses this fixture's
    # configuration gives (tests/data/debug_losses.json), to float32 precision. Recorded once
    # the streams' preserve_order reached Ray Train's split (before, the epochs' last batches
    # followed read-task completion order); identical on one host and on two
    # (tests/test_multihost_train.py)
    golden = np.array(json.loads((ROOT / "tests" / "data" / "debug_losses.json").read_text())["st"])
    assert train["step"].tolist() == golden[:, 0].astype(int).tolist()
    np.testing.assert_allclose(train["loss"].to_numpy(), golden[:, 1], rtol=1e-5)
    assert {"lr", "grad_norm", "cells_per_s_worker"} <= set(train.columns)
    # the baselines were scored on the same validation cells
    assert set(r.prep.baselines) == {"cell-mean", "context-mean"}
    assert r.prep.baselines["cell-mean"]["score"] == 0.0
    # best (by validation score) and latest are kept; num_to_keep=2 plus the latest at most
    ckpts = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert 2 <= len(ckpts) <= 3
    assert r.latest_checkpoint == ckpts[-1] and r.best_checkpoint in ckpts
    best_score = max(val["score"])
    man = json.loads((r.best_checkpoint / "manifest.json").read_text())
    assert man["val_metrics"]["score"] == pytest.approx(best_score)
    # self-describing: config, genes, labels, features, corpus fingerprint, normalisation
    for k in ("model_config", "genes", "labels", "feature_sources", "corpus_fingerprint",
              "normalization", "train_config", "trainer_state"):
        assert man[k], k
    assert man["normalization"]["target_sum"] == "store"
    # versioned, typed: the ZeRO stage it was saved with and the ranks' Ray nodes
    typed = read_manifest(r.best_checkpoint)
    assert typed.format_version == 2 and typed.zero_stage == 2 and len(typed.node_ids) == 2
    assert [s["kind"] for s in man["feature_sources"]] == ["onehot", "transfer"]
    assert (r.best_checkpoint / "deepspeed" / "state").is_dir()
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "wandb").glob("offline-run-*"))


def test_job_restart_resumes_from_latest_checkpoint(trained, tiny_corpus):
    cfg, r = trained
    spe = r.prep.steps_per_epoch
    before = pd.read_csv(r.run_dir / "metrics_train.csv")
    r2 = train_st(_cfg(tiny_corpus, r.run_dir, checkpoint_every=4, epochs=3), progress=False)
    assert r2.return_value["step"] == 3 * spe
    after = pd.read_csv(r.run_dir / "metrics_train.csv")
    # rows of the first run kept, the new ones continue from the checkpoint's step
    assert after["step"].is_monotonic_increasing
    assert after["step"].tolist()[: len(before)] == before["step"].tolist()
    assert after["step"].iloc[-1] == 3 * spe
    # a checkpoint made with other features is refused before any worker starts, and the
    # refusal changes nothing on disk (config.json, the prep cache)
    files = {p: p.read_bytes() for p in [r.run_dir / "config.json", *(r.run_dir / "prep").iterdir()]}
    other = _cfg(tiny_corpus, r.run_dir, features=["onehot"], epochs=4)
    with pytest.raises(CheckpointMismatch, match="feature"):
        train_st(other, progress=False)
    assert {p: p.read_bytes() for p in files} == files
    assert sorted((r.run_dir / "prep").iterdir()) == sorted(p for p in files if p.parent.name == "prep")
    assert not list(r.run_dir.parent.glob(f".{r.run_dir.name}.prep-*"))  # no staging left


def test_killed_worker_recovers_and_replays_exactly_the_unconsumed_batches(
        ray_local, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_corpus, run, checkpoint_every=3, epochs=3, record_batches=True,
               max_failures=2)
    killed: dict = {}

    def killer():
        deadline = time.time() + 300
        snap = run / "checkpoint_manager_snapshot.json"
        pid_file = run / "workers" / "rank1.pid"
        while time.time() < deadline:
            # kill once the controller has registered a checkpoint (a checkpoint is registered
            # a moment after it is reported; a kill before would roll back further)
            try:
                registered = json.loads(snap.read_text())["checkpoint_results"]
            except (OSError, ValueError, KeyError):
                registered = []
            if registered and pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    r = train_st(cfg, progress=False)
    t.join(timeout=5)
    assert "pid" in killed, "the run finished before a worker could be killed"
    spe = r.prep.steps_per_epoch
    assert r.return_value["step"] == 3 * spe
    assert int((run / "workers" / "rank1.pid").read_text()) != killed["pid"]
    lines = [json.loads(x) for x in (run / "workers" / "batches.jsonl").read_text().splitlines()]
    resumes = [x for x in lines if x["event"] == "resume" and x["rank"] == 0]
    assert resumes, "the worker group did not restart from a checkpoint"
    res = resumes[-1]
    # after the restart, the resumed epoch plays exactly the batches the checkpoint had not
    # consumed, each once, split over both ranks
    new_pids = {x["pid"] for x in lines if x["event"] == "resume" and x["step"] == res["step"]}
    after = [s for x in lines[lines.index(res):] if x["event"] == "batch"
             and x["pid"] in new_pids and x["epoch"] == res["epoch"] for s in x["steps"]]
    n_batches = r.prep.batches_per_epoch
    assert sorted(after + res["consumed"]) == list(range(n_batches))
    train = pd.read_csv(run / "metrics_train.csv")
    assert train["step"].is_monotonic_increasing and train["step"].is_unique
    assert train["step"].iloc[-1] == 3 * spe
    # after the restart, old checkpoints are still pruned to keep_checkpoints (+ the latest)
    kept = [p for p in run.glob("checkpoint_*") if p.is_dir()]
    assert len(kept) <= cfg.keep_checkpoints + 1, sorted(p.name for p in kept)


def _run_job(args, **kw):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600, check=False, **kw)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_predict_submission_and_evaluation(trained, tiny_corpus, tmp_path):
    import anndata as ad

    from vcc_dist.infer.st_predict import load_st_checkpoint, predict_context
    from vcc_dist.infer.submission import validate_submission

    sim, corpus = tiny_corpus
    cfg, r = trained
    pred, real = tmp_path / "pred.h5ad", tmp_path / "real.h5ad"
    _run_job(["jobs/predict.py", "--checkpoint", str(r.run_dir), "--split", str(sim.split_path),
              "--role", "test", "--out", str(pred), "--real-out", str(real), "--no-progress",
              "--sets-per-batch", "3"])
    a, b = ad.read_h5ad(pred), ad.read_h5ad(real)
    assert list(a.var_names) == list(b.var_names)
    pc = a.obs["target_gene"].value_counts().to_dict()
    rc = b.obs["target_gene"].value_counts().to_dict()
    ctrl = "non-targeting"
    assert {k: v for k, v in pc.items() if k != ctrl} == {k: v for k, v in rc.items() if k != ctrl}
    assert pc[ctrl] >= rc[ctrl] > 0  # all the context's controls
    assert validate_submission(pred).ok
    # the model in the file is the one the checkpoint holds: same weights after reloading
    best = resolve_checkpoint(r.run_dir)  # best_checkpoint.json (updated by the resumed run)
    assert best.is_dir() and best.name.startswith("checkpoint_")
    m1, m2 = load_st_checkpoint(r.run_dir), load_st_checkpoint(best)
    for (k, v), (_, w) in zip(m1.model.state_dict().items(), m2.model.state_dict().items()):
        assert v.equal(w), k
    # predicting the checkpoint's own validation perturbations is flagged: its selection saw them
    val = m1.manifest.val
    with pytest.warns(UserWarning, match="validation perturbations of this checkpoint"):
        predict_context(m1, corpus, val["context"], {val["perts"][0]: 3}, tmp_path / "v.h5ad")
    out = tmp_path / "eval"
    _run_job(["jobs/evaluate.py", "--real", str(real), "--pred", str(pred), "--out", str(out),
              "--no-plot", "--quiet"])
    agg = json.loads((out / "agg_results.json").read_text())
    text = json.dumps(agg)
    for m in ("overlap_at_N", "discrimination_score_l1", "mae"):
        assert m in text


def test_config_errors_are_clear(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="neither a named recipe"):
        st_recipe("nope", corpus="c", run_dir="r")
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        st_recipe("debug", {"epoch": 3}, corpus="c", run_dir="r")
    with pytest.raises(ValueError, match="loss="):
        st_recipe("debug", {"loss": "l2"}, corpus="c", run_dir="r")
    with pytest.raises(ConfigError, match="unknown option 'optim.learning_rate'"):
        parse_overrides(["optim.learning_rate=1e-3"], STTrainConfig)
    with pytest.raises(ConfigError, match="unknown option 'data.sets'"):
        st_recipe("debug", parse_overrides(["data.sets=3"]), corpus="c", run_dir="r")
    with pytest.raises(ValueError, match="needs"):
        st_recipe("debug")
    assert parse_overrides(["optim.lr=3e-4", "loss=mse", "features=[\"onehot\"]"]) == {
        "optim": {"lr": 3e-4}, "loss": "mse", "features": ["onehot"]}
    # a recipe file (what Tune writes) round-trips
    c = _cfg(tiny_corpus, tmp_path / "x")
    f = tmp_path / "recipe.json"
    f.write_text(json.dumps(c.to_dict()))
    assert st_recipe(f) == c


def test_resume_check_names_the_mismatch():
    class P:
        def __init__(self, m):
            self.m = m

        def manifest(self):
            return self.m

    ck = {"feature_sources": [{"kind": "file", "dim": 3, "sha256": "aa", "source": "/a.pt"}],
          "corpus_fingerprint": "c1", "genes": ["g1", "g2"], "labels": {}, "feature_shape": [],
          "model_config": {}, "embeddings": None}
    # a version-1 manifest (no format_version, no zero_stage) still loads
    m = manifest_from_dict({"kind": ST_KIND, "train_config": {}, **ck})
    assert m.format_version == 1 and m.zero_stage == 2
    moved = [{"kind": "file", "dim": 3, "sha256": "aa", "source": "/moved.pt"}]
    check_resume(m, P({**ck, "feature_sources": moved}))  # a moved file is the same features
    with pytest.raises(CheckpointMismatch, match="perturbation features"):
        check_resume(m, P({**ck, "feature_sources": [{"kind": "file", "dim": 3, "sha256": "bb"}]}))
    with pytest.raises(CheckpointMismatch, match="corpus"):
        check_resume(m, P({**ck, "corpus_fingerprint": "c2"}))
    with pytest.raises(CheckpointMismatch, match="gene vocabulary"):
        check_resume(m, P({**ck, "genes": ["g2", "g1"]}))


def test_job_refuses_a_plan_that_starves_the_data_stream(tiny_corpus, tmp_path):
    """Two workers x 1 CPU on a 2-CPU Ray leaves the stream no CPU: the job used to wait
    forever; it is refused up front, naming the fix, and writes nothing."""
    sim, corpus = tiny_corpus
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "jobs/train_st.py", "--recipe", "debug", "--corpus",
                        str(corpus), "--split", str(sim.split_path), "--run-dir", str(run),
                        "--num-workers", "2", "--num-cpus", "2", "--no-progress",
                        "--wandb", "disabled"], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=300, check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "data stream" in p.stderr and "cpus_per_worker=0.5" in p.stderr, p.stderr[-2000:]
    assert not run.exists()
