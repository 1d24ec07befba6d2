"""Training runs whose run directory is on object storage (``run_dir=s3://...``), on a local
Ray cluster with an S3 server (moto) on loopback: the prep, config, checkpoints (Ray Train's
storage through a pyarrow S3 filesystem), pointers and logs are written there and nowhere
else; the run is the same run as with a local run directory (the fixed-seed golden losses);
rerunning the command resumes from the checkpoints in object storage; inference loads the
checkpoint from there."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.s3server import moto_s3
from vcc_dist import storage
from vcc_dist.checkpoint import (
    MANIFEST,
    ST_KIND,
    checkpoints,
    latest_checkpoint,
    local_checkpoint,
    open_checkpoint,
    read_manifest,
    resolve_checkpoint,
)
from vcc_dist.train.st import st_recipe, train_st

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "vcc-runs"


@pytest.fixture(scope="module")
def s3_ray(tmp_path_factory):
    """moto + the AWS variables, then a local Ray cluster whose workers inherit them; the
    scratch directory (local working copies of remote runs) in a temporary directory."""
    import ray

    scratch = tmp_path_factory.mktemp("scratch")
    mp = pytest.MonkeyPatch()
    mp.setenv("VCC_DIST_SCRATCH", str(scratch))
    with moto_s3(BUCKET):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield scratch
        finally:
            ray.shutdown()
            mp.undo()


def _cfg(tiny_corpus, run_dir, **kw):
    sim, corpus = tiny_corpus
    top = dict(corpus=str(corpus), split=str(sim.split_path), run_dir=run_dir,
               num_workers=2, cpus_per_worker=0.5, wandb={"mode": "disabled"})
    top.update(kw)
    return st_recipe("debug", **top)


def _csv(uri: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(uri)))


@pytest.fixture(scope="module")
def remote_run(s3_ray, tiny_corpus, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)  # a relative local run directory would appear here
    try:
        run = f"s3://{BUCKET}/runs/st-debug"
        # the configuration of tests/test_st_train.py's run, whose losses are recorded
        r = train_st(_cfg(tiny_corpus, run, checkpoint_every=4, epochs=2), progress=False)
    finally:
        os.chdir(old)
    return run, r, cwd


def test_run_lives_in_object_storage_and_is_the_same_run(remote_run, s3_ray):
    run, r, cwd = remote_run
    spe = r.prep.steps_per_epoch
    assert r.run_dir == run and r.return_value["step"] == 2 * spe
    names = storage.listdir(run)
    for want in ("config.json", "prep", "metrics_train.csv", "metrics_val.csv", "summary.json",
                 "curves.png", "best_checkpoint.json", "latest_checkpoint.json"):
        assert want in names, (want, names)
    assert storage.exists(f"{run}/prep/key.json") and storage.exists(f"{run}/prep/prep.json")
    # nothing was written to a local run directory
    assert list(cwd.iterdir()) == []
    # the same seed and world size give the same losses as a local run directory
    train = _csv(f"{run}/metrics_train.csv")
    golden = np.array(json.loads((ROOT / "tests" / "data" / "debug_losses.json").read_text())["st"])
    assert train["step"].tolist() == golden[:, 0].astype(int).tolist()
    np.testing.assert_allclose(train["loss"].to_numpy(), golden[:, 1], rtol=1e-5)
    # checkpoints: complete (manifest), every rank's DeepSpeed shards, ranked and pointed to
    cks = checkpoints(run)
    assert cks and all(isinstance(c, str) and c.startswith(run + "/checkpoint_") for c in cks)
    assert len(cks) <= 3  # keep_checkpoints=2 best + the latest
    latest = latest_checkpoint(run)
    man = read_manifest(latest)
    assert man.kind == ST_KIND and man.trainer_state.step == 2 * spe
    assert len(man.node_ids) == 2
    assert str(r.latest_checkpoint) == storage.read_json(f"{run}/latest_checkpoint.json")["path"]
    assert str(resolve_checkpoint(run, "best")).startswith(run + "/checkpoint_")
    # every rank's ZeRO-2 optimizer shard reached object storage
    ds = storage.listdir(f"{latest}/deepspeed/state")
    assert any("zero_pp_rank_0" in n for n in ds) and any("zero_pp_rank_1" in n for n in ds), ds


def test_rerun_resumes_from_object_storage(remote_run, tiny_corpus):
    run, r, _ = remote_run
    spe = r.prep.steps_per_epoch
    before = _csv(f"{run}/metrics_train.csv")
    prep_json = storage.read_bytes(f"{run}/prep/prep.json")
    r2 = train_st(_cfg(tiny_corpus, run, checkpoint_every=4, epochs=3), progress=False)
    assert r2.return_value["step"] == 3 * spe
    after = _csv(f"{run}/metrics_train.csv")
    # the first run's rows are kept (pulled from object storage by the resumed rank 0) and
    # the new ones continue from the checkpoint's step: no step counted twice
    assert after["step"].is_monotonic_increasing and after["step"].is_unique
    assert after["step"].tolist()[: len(before)] == before["step"].tolist()
    assert after["step"].iloc[-1] == 3 * spe
    assert read_manifest(latest_checkpoint(run)).trainer_state.step == 3 * spe
    # the prep was reused from object storage, not remade
    assert storage.read_bytes(f"{run}/prep/prep.json") == prep_json


def test_inference_loads_the_checkpoint_from_object_storage(remote_run, tiny_corpus, s3_ray):
    from vcc_dist.infer.st_predict import load_st_checkpoint, predict_context

    sim, corpus = tiny_corpus
    run, r, _ = remote_run
    ck, man = open_checkpoint(run, "latest", ST_KIND)
    assert isinstance(ck, str) and ck.startswith("s3://")
    local = local_checkpoint(ck)
    assert local.is_relative_to(s3_ray) and (local / MANIFEST).is_file()
    stamp = (local / MANIFEST).stat().st_mtime_ns
    assert local_checkpoint(ck) == local and (local / MANIFEST).stat().st_mtime_ns == stamp
    assert not [p for p in local.parent.iterdir() if ".dl-" in p.name]  # no partial copies
    loaded = load_st_checkpoint(run, "latest")
    assert loaded.manifest.trainer_state.step == man.trainer_state.step
    ctx = loaded.contexts[0]
    pert = [p for p in loaded.perturbations if p != "non-targeting"][0]
    out = predict_context(loaded, corpus, ctx, {pert: 4}, local.parent / "pred.h5ad")
    import anndata as ad

    a = ad.read_h5ad(out)
    assert (a.obs["target_gene"] == pert).sum() == 4 and np.isfinite(a.X.toarray()
                                                                     if hasattr(a.X, "toarray")
                                                                     else a.X).all()
