"""Ray Tune sweep of ST on a local Ray cluster with the dashboard (integration tier): 4 trials,
ASHA early stopping, stopped trials release their resources and later trials run."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest

from vcc_dist.tune.sweep import SPACES, SweepConfig, derive_concurrency, tune_space

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_dashboard():
    import ray

    from vcc_dist.ray_utils import ensure_ray

    # ASHA's early stops release Train placement groups only with the dashboard (docs/stack_notes.md),
    # and only when Ray's state API finds it (ensure_ray pins its address for every process)
    ensure_ray(num_cpus=2, include_dashboard=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)


@pytest.fixture(scope="module")
def sweep(tiny_corpus, tmp_path_factory, ray_dashboard):
    from vcc_dist.tune.sweep import run_sweep

    sim, corpus = tiny_corpus
    run = tmp_path_factory.mktemp("tune") / "sweep"
    # every trial validates at steps 1..4; ASHA's max_t=2 stops each one after its second
    # validation (and may stop poor ones at the first): early stops are certain
    cfg = SweepConfig(corpus=str(corpus), split=str(sim.split_path), run_dir=str(run),
                      recipe="debug", space="debug", num_samples=4, trial_workers=1,
                      cpus_per_trial=0.25, data_cpus=0.5, max_steps=4, checkpoint_every=1,
                      max_t=2, grace_period=1, seed=0, wandb={"mode": "disabled"})
    t0 = time.time()
    res = run_sweep(cfg, progress=False)
    return cfg, res, time.time() - t0


def test_sweep_early_stops_release_resources_and_later_trials_run(sweep, ray_dashboard):
    cfg, res, _ = sweep
    t = res.trials
    assert len(t) == 4
    assert set(t["status"]) <= {"completed", "stopped early"}
    # ASHA stopped every trial by its second validation of four
    assert (t["validations"] <= 2).all() and (t["validations"] >= 1).all()
    assert (t["status"] == "stopped early").all()
    # 2 trials at a time on 2 CPUs: the last trials could only start once stopped ones had
    # released their workers; all four ran to a validation
    assert t["best_score"].notna().all()
    # every trial's own ST run directory, with its validations
    for rd in t["run_dir"]:
        val = pd.read_csv(f"{rd}/metrics_val.csv")
        assert len(val) >= 1
    # nothing is left reserved once the sweep is over
    deadline = time.time() + 60
    while ray_dashboard.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(1)
    assert ray_dashboard.available_resources().get("CPU", 0) == 2


def test_sweep_outputs_best_recipe_csv_and_plot(sweep, tiny_corpus, tmp_path):
    cfg, res, _ = sweep
    t = pd.read_csv(res.run_dir / "trials.csv")
    assert {"trial_id", "status", "validations", "best_score", "DES", "PDS", "MAE",
            "optim.lr", "model.hidden_dim", "run_dir", "error"} <= set(t.columns)
    assert res.best["best_score"] == pytest.approx(t["best_score"].max())
    recipe = json.loads(res.best_recipe.read_text())
    assert "run_dir" not in recipe
    best_row = t.loc[t["best_score"].idxmax()]
    assert recipe["optim"]["lr"] == pytest.approx(best_row["optim.lr"])
    assert recipe["model"]["hidden_dim"] == best_row["model.hidden_dim"]
    # jobs/train_st.py accepts it directly
    from vcc_dist.train.st import st_recipe

    c = st_recipe(str(res.best_recipe), run_dir=str(tmp_path / "st"))
    assert c.optim.lr == recipe["optim"]["lr"] and c.corpus == cfg.corpus
    assert (res.run_dir / "sweep.png").stat().st_size > 1000
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["max_concurrent"] == 2


def test_spaces_and_concurrency():
    for name in SPACES:
        assert set(tune_space(name)) == set(SPACES[name])
    cfg = SweepConfig(corpus="c", split="s", run_dir="r", trial_workers=2, cpus_per_trial=2,
                      data_cpus=1)
    assert derive_concurrency(cfg, {"CPU": 16}) == 3
    assert derive_concurrency(cfg, {"CPU": 1}) == 1
    # reservations always leave one whole CPU for Ray Data's read tasks
    q = SweepConfig(corpus="c", split="s", run_dir="r", cpus_per_trial=0.75, data_cpus=0.25)
    assert derive_concurrency(q, {"CPU": 2}) == 1      # two would leave 0.5 CPU
    half = SweepConfig(corpus="c", split="s", run_dir="r", cpus_per_trial=0.5, data_cpus=0.5)
    assert derive_concurrency(half, {"CPU": 2}) == 2
    g = SweepConfig(corpus="c", split="s", run_dir="r", gpus_per_trial=1, cpus_per_trial=1)
    assert derive_concurrency(g, {"CPU": 64, "GPU": 8}) == 8
    with pytest.raises(ValueError, match="space"):
        SweepConfig(corpus="c", split="s", run_dir="r", space="nope")
    with pytest.raises(ValueError, match="scheduler"):
        SweepConfig(corpus="c", split="s", run_dir="r", scheduler="pbt")


def test_a_crashing_trial_is_recorded_and_the_sweep_goes_on(tiny_corpus, tmp_path, ray_dashboard):
    from vcc_dist.tune.sweep import run_sweep

    sim, corpus = tiny_corpus
    # hidden_dim 18 is not divisible by the debug preset's 4 heads: that trial fails
    cfg = SweepConfig(corpus=str(corpus), split=str(sim.split_path), run_dir=str(tmp_path / "s"),
                      recipe="debug", space={"model.hidden_dim": ["grid", [18, 16]]},
                      num_samples=1, searcher="random", scheduler="fifo", cpus_per_trial=0.25,
                      max_steps=2, checkpoint_every=1, wandb={"mode": "disabled"})
    res = run_sweep(cfg, progress=False)
    t = res.trials.set_index("model.hidden_dim")
    assert t.loc[18, "status"] == "error" and "divisible" in t.loc[18, "error"]
    assert t.loc[16, "status"] == "completed" and t.loc[16, "validations"] == 2
    assert json.loads(res.best_recipe.read_text())["model"]["hidden_dim"] == 16
