"""A Ray Tune sweep whose run directory is on object storage (``run_dir=s3://...``), on a local
Ray cluster with the dashboard and an S3 server (moto) on loopback: Tune's experiment state,
every trial's ST run (checkpoints included) and the sweep's outputs are written there and
nowhere else; the credentials are not; running the same sweep again restores it from object
storage instead of starting over."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from vcc_dist import storage
from vcc_dist.checkpoint import checkpoints
from tests.s3server import moto_s3

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
pytest.importorskip("moto.server")

BUCKET = "vcc-sweeps"
#: credentials no object in the bucket may contain (moto accepts any)
KEY_ID, SECRET = "AKIATUNESWEEPTEST", "tune-sweep-secret-9f3c1e"


@pytest.fixture(scope="module")
def s3_ray_dashboard(tmp_path_factory):
    """moto + the AWS variables (distinctive credentials), then a local Ray cluster with the
    dashboard (as tests/test_tune.py: ASHA's early stops need it) whose workers inherit them."""
    import ray

    from vcc_dist.ray_utils import ensure_ray

    scratch = tmp_path_factory.mktemp("scratch")
    with moto_s3(BUCKET):
        mp = pytest.MonkeyPatch()
        mp.setenv("VCC_DIST_SCRATCH", str(scratch))
        mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        ensure_ray(num_cpus=2, include_dashboard=True, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield scratch
        finally:
            ray.shutdown()
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            mp.undo()


def _cfg(tiny_corpus, run_dir):
    from vcc_dist.tune.sweep import SweepConfig

    sim, corpus = tiny_corpus
    # two trials at once, each validating at steps 1 and 2 and running to its end (FIFO): the
    # trials finish, so their TRIAL_DONE markers are on object storage
    return SweepConfig(corpus=str(corpus), split=str(sim.split_path), run_dir=run_dir,
                       recipe="debug", space="debug", num_samples=2, trial_workers=1,
                       cpus_per_trial=0.25, data_cpus=0.5, max_steps=2, checkpoint_every=1,
                       scheduler="fifo", seed=0, wandb={"mode": "disabled"})


def _csv(uri) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(uri)))


def _objects(prefix: str) -> dict[str, int]:
    """Every object under ``prefix``: key -> size."""
    fs = storage.filesystem(prefix)
    return {k: v["size"] for k, v in fs.find(str(storage.location(prefix)), detail=True,
                                               withdirs=False).items()}


@pytest.fixture(scope="module")
def remote_sweep(s3_ray_dashboard, tiny_corpus, tmp_path_factory):
    from vcc_dist.tune.sweep import run_sweep

    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)  # a sweep directory made from the URI by pathlib would appear here
    try:
        run = f"s3://{BUCKET}/sweeps/tune-s3-{os.getpid()}"
        t0 = time.time()
        res = run_sweep(_cfg(tiny_corpus, run), progress=False)
        wall = time.time() - t0
    finally:
        os.chdir(old)
    return run, res, cwd, wall


def test_sweep_lives_in_object_storage(remote_sweep, tiny_corpus, tmp_path):
    run, res, cwd, _ = remote_sweep
    assert res.run_dir == run and isinstance(res.run_dir, str)
    names = storage.listdir(run)
    for want in ("sweep_config.json", "trials.csv", "best_recipe.json", "summary.json",
                 "sweep.png", "trials", "tuner.pkl"):
        assert want in names, (want, names)
    t = _csv(f"{run}/trials.csv")
    assert len(t) == 2 and (t["status"] == "completed").all(), t
    assert (t["validations"] == 2).all() and t["best_score"].notna().all()
    assert res.best["best_score"] == pytest.approx(t["best_score"].max())
    # every trial's ST run, checkpoints included, is <sweep>/trials/<trial id> in the bucket
    for tid, rd in zip(t["trial_id"], t["run_dir"]):
        assert rd == f"{run}/trials/{tid}"
        own = storage.listdir(rd)
        assert {"config.json", "metrics_val.csv", "trial_done.json"} <= set(own), own
        assert any(n.startswith("checkpoint_") for n in own), own
        cks = checkpoints(rd)
        assert cks and all(str(c).startswith(f"{rd}/checkpoint_") for c in cks), cks
        assert len(_csv(f"{rd}/metrics_val.csv")) == 2
    # the best recipe: the best trial's config without its run directory, for train_st
    recipe = storage.read_json(f"{run}/best_recipe.json")
    assert "run_dir" not in recipe and "group" not in recipe.get("wandb", {})
    best_row = t.loc[t["best_score"].idxmax()]
    assert recipe["optim"]["lr"] == pytest.approx(best_row["optim.lr"])
    local = tmp_path / "best_recipe.json"
    local.write_bytes(storage.read_bytes(f"{run}/best_recipe.json"))
    from vcc_dist.train.st import st_recipe

    assert st_recipe(str(local), run_dir=f"{run}-best").optim.lr == recipe["optim"]["lr"]
    summary = storage.read_json(f"{run}/summary.json")
    assert summary["trials"] == 2 and summary["best_recipe"] == f"{run}/best_recipe.json"
    assert storage.filesystem(run).size(str(storage.location(f"{run}/sweep.png"))) > 1000
    assert str(res.plot) == f"{run}/sweep.png"
    # nothing was written to a local sweep directory (nor to Tune's default ~/ray_results)
    assert list(cwd.iterdir()) == []
    assert not (Path.home() / "ray_results" / storage.basename(run)).exists()


def test_credentials_are_not_stored_in_the_bucket(remote_sweep):
    run, *_ = remote_sweep
    fs = storage.filesystem(run)
    objs = _objects(run)
    assert len(objs) > 10
    leaked = [k for k in objs if SECRET.encode() in fs.cat_file(k)]
    assert not leaked, leaked


def test_rerun_restores_the_sweep_from_object_storage(remote_sweep, tiny_corpus, capsys):
    from vcc_dist.tune.sweep import can_restore, run_sweep

    run, res, cwd, wall = remote_sweep
    assert can_restore(run)
    before = _csv(f"{run}/trials.csv")
    trial_objs = _objects(f"{run}/trials")
    capsys.readouterr()
    t0 = time.time()
    res2 = run_sweep(_cfg(tiny_corpus, run), progress=True)
    again = time.time() - t0
    out = capsys.readouterr().out
    assert f"[tune] restoring the sweep in {run}" in out
    # the same two finished trials, not two new ones; none trained again
    after = res2.trials
    assert sorted(after["trial_id"]) == sorted(before["trial_id"])
    assert (after["status"] == "completed").all() and (after["validations"] == 2).all()
    assert (after.set_index("trial_id")["best_score"].sort_index().tolist()
            == pytest.approx(before.set_index("trial_id")["best_score"].sort_index().tolist()))
    assert _objects(f"{run}/trials") == trial_objs
    assert storage.read_json(f"{run}/summary.json")["trials"] == 2
    assert list(cwd.iterdir()) == []
    assert again < wall, (again, wall)
