"""The rank-0 metrics logger: CSVs, resume truncation, wandb offline/failing, curves PNG."""
import json
import math
import struct
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from vcc_dist.train.runlog import (
    CURVES_FILE,
    WANDB_ID_FILE,
    RunLogger,
    WandbConfig,
    plot_curves,
    read_metrics,
    resolve_wandb_mode,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OFF = WandbConfig(mode="disabled")


@pytest.fixture(scope="module")
def wandb_home(tmp_path_factory):
    return tmp_path_factory.mktemp("wandb_home")


@pytest.fixture(autouse=True)
def wandb_env(wandb_home, monkeypatch):
    """Keep wandb (and anything reading $HOME) inside tmp dirs, offline, with no credentials."""
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts"), ("HOME", "home")):
        (wandb_home / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(wandb_home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DISABLED", "NETRC"):
        monkeypatch.delenv(var, raising=False)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_csv_round_trip_with_late_metric_and_scalar_types(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    lg = RunLogger(run, run_name="r", config={"lr": 1e-3}, wandb=OFF)
    lg.log(1, {"loss": 1.5, "lr": np.float32(0.25)})
    # flushed per call: the row is on disk before the next call
    assert (run / "metrics_train.csv").read_text().splitlines()[0] == "step,time,loss,lr"
    assert len((run / "metrics_train.csv").read_text().splitlines()) == 2
    lg.log(np.int64(2), {"loss": torch.tensor(0.5), "lr": 0.2, "loss/mse": np.float64(0.125)})
    lg.log(2, {"mae": 0.1}, kind="val")

    header = (run / "metrics_train.csv").read_text().splitlines()[0]
    assert header == "step,time,loss,lr,loss/mse"
    df = read_metrics(run)
    assert df["step"].tolist() == [1, 2]
    assert df["loss"].tolist() == [1.5, 0.5]
    assert df["lr"].tolist() == [0.25, 0.2]
    assert math.isnan(df["loss/mse"].iloc[0]) and df["loss/mse"].iloc[1] == 0.125
    assert (df["time"] >= t0 - 1).all() and (df["time"] <= time.time() + 1).all()
    assert read_metrics(run, "val")["mae"].tolist() == [0.1]
    # wandb disabled: no id file, no wandb folder; atomic rewrites leave no tmp files behind
    assert sorted(p.name for p in run.iterdir()) == ["metrics_train.csv", "metrics_val.csv"]

    with pytest.raises(ValueError, match="reserved"):
        lg.log(3, {"step": 1.0})
    with pytest.raises(TypeError, match="shape"):
        lg.log(3, {"loss": np.ones(2)})
    with pytest.raises(ValueError, match="kind"):
        lg.log(3, {"loss": 1.0}, kind="../x")

    lg.summary(best_mae=np.float32(0.5), note="ok")
    lg.summary(final_step=3)
    assert json.loads((run / "summary.json").read_text()) == {
        "best_mae": 0.5, "note": "ok", "final_step": 3.0}


def test_resume_step_drops_rolled_back_rows(tmp_path):
    run = tmp_path / "run"
    lg = RunLogger(run, run_name="r", config={}, wandb=OFF)
    for s in range(1, 6):
        lg.log(s, {"loss": float(s)})
        if s % 2 == 0:
            lg.log(s, {"mae": s / 10}, kind="val")
    lg.finish()

    lg = RunLogger(run, run_name="r", config={}, wandb=OFF, resume_step=3)
    assert read_metrics(run)["step"].tolist() == [1, 2, 3]
    assert read_metrics(run, "val")["step"].tolist() == [2]
    lg.log(4, {"loss": 40.0})
    assert read_metrics(run)["loss"].tolist() == [1.0, 2.0, 3.0, 40.0]

    # without resume_step existing rows are kept and appended to
    lg = RunLogger(run, run_name="r", config={}, wandb=OFF)
    lg.log(5, {"loss": 50.0})
    assert read_metrics(run)["step"].tolist() == [1, 2, 3, 4, 5]


def test_disabled_logger_writes_nothing_and_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing wandb would now raise
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lg = RunLogger(run, run_name="r", config={}, wandb=WandbConfig(mode="offline"), enabled=False)
        lg.log(1, {"loss": 1.0})
        lg.log(1, {"mae": 1.0}, kind="val")
        lg.summary(x=1.0)
        assert lg.finish() is None
    assert not run.exists()


def test_offline_wandb_run_dir_and_restart_reuses_id(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = WandbConfig(mode="offline", tags=("test",))
    lg = RunLogger(run, run_name="r", config={"seed": 0}, wandb=cfg)
    assert lg.wandb_mode == "offline"
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert run_id
    lg.log(1, {"loss": 1.0})
    lg.log(2, {"loss": 0.5})
    lg.summary(best=0.5)
    lg.finish()
    assert "wandb sync" in capsys.readouterr().err

    lg = RunLogger(run, run_name="r", config={"seed": 0}, wandb=cfg, resume_step=1)
    lg.log(2, {"loss": 0.4})  # below wandb's step after the rollback: CSV only, no error
    lg.finish()
    assert (run / WANDB_ID_FILE).read_text().strip() == run_id
    # one folder per (re)start, same id; a start within the same second gets a "-1" suffix
    offline = sorted((run / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(offline) == 2
    assert all((d / f"run-{run_id}.wandb").stat().st_size > 0 for d in offline)
    assert read_metrics(run)["loss"].tolist() == [1.0, 0.4]


def test_broken_wandb_only_warns(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="wandb init failed.*no network"):
        lg = RunLogger(run, run_name="r", config={}, wandb=WandbConfig(mode="online"))
    lg.log(1, {"loss": 1.0})
    assert lg.finish() == run / CURVES_FILE
    assert read_metrics(run)["loss"].tolist() == [1.0]

    class FlakyRun:
        step = 0
        calls = 0

        def log(self, *a, **k):
            FlakyRun.calls += 1
            raise OSError("disk full")

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    lg = RunLogger(tmp_path / "run2", run_name="r", config={}, wandb=WandbConfig(mode="offline"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        lg.log(1, {"loss": 1.0})
        lg.log(2, {"loss": 0.5})
    assert [str(w.message)[:16] for w in rec] == ["wandb log failed"]  # warned once
    assert FlakyRun.calls == 1  # then wandb is left alone
    assert read_metrics(tmp_path / "run2")["step"].tolist() == [1, 2]
    lg.finish()


def test_finish_writes_png_with_and_without_baselines(tmp_path):
    run = tmp_path / "run"
    lg = RunLogger(run, run_name="r", config={}, wandb=OFF)
    for s in range(1, 31):
        lg.log(s, {"loss": 1.0 / s, "loss/mse": 0.5 / s, "lr": 1e-3 * min(1, s / 10)})
        if s % 10 == 0:
            lg.log(s, {"overall_score": s / 100, "overlap_at_N": 0.1, "discrimination_score_l1": 0.5,
                       "mae": 0.1 - s / 1000}, kind="val")
    baselines = {"context-mean": {"mae": 0.08, "overlap_at_N": 0.05}, "zero": {"overall_score": 0.0}}
    png = lg.finish(baselines=baselines)
    assert png == run / CURVES_FILE
    # 6 panels (loss, lr, score, DES, PDS, MAE) -> 3 columns x 2 rows of 500x360 px
    assert png_size(png) == (1500, 720)
    mtime = png.stat().st_mtime_ns
    assert lg.finish() == png and png.stat().st_mtime_ns == mtime  # idempotent
    with pytest.raises(RuntimeError, match="after finish"):
        lg.log(31, {"loss": 0.1})

    plain = plot_curves(run, tmp_path / "plain.png")
    assert png_size(plain) == (1500, 720)
    assert plain.read_bytes() != png.read_bytes()  # baselines change the picture
    with pytest.raises(TypeError, match="baselines"):
        plot_curves(run, tmp_path / "bad.png", baselines={"x": 0.1})

    empty = RunLogger(tmp_path / "empty", run_name="e", config={}, wandb=OFF).finish()
    assert png_size(empty) == (500, 360)  # one "no metrics logged" panel


def test_wandb_config_validation_and_mode_resolution(tmp_path, monkeypatch):
    cfg = WandbConfig.from_dict({"project": "p", "mode": "offline", "tags": ["a", "b"]})
    assert cfg.tags == ("a", "b")
    assert WandbConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown WandbConfig key\(s\) \['projet'\].*'project'"):
        WandbConfig.from_dict({"projet": "p"})
    with pytest.raises(ValueError, match="WandbConfig.mode"):
        WandbConfig(mode="on")
    with pytest.raises(ValueError, match="WandbConfig.project"):
        WandbConfig(project=" ")
    with pytest.raises(TypeError, match="WandbConfig.tags"):
        WandbConfig(tags="abc")
    with pytest.raises(ValueError, match="WandbConfig.tags"):
        WandbConfig(tags=("x" * 65,))
    with pytest.raises(ValueError, match="WandbConfig.entity"):
        WandbConfig(entity="")
    with pytest.raises(TypeError, match="WandbConfig"):
        RunLogger(tmp_path / "r", run_name="r", config={}, wandb={"mode": "offline"})

    # "auto": WANDB_MODE wins, then credentials decide between online and offline
    assert resolve_wandb_mode("auto") == "offline"  # WANDB_MODE=offline from the fixture
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode("auto") == "offline"  # no key, no .netrc
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.delenv("NETRC")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbConfig().resolved_mode == "disabled"
