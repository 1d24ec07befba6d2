"""jobs/predict.py and jobs/evaluate.py against object storage (moto on loopback) and over Ray
tasks: checkpoint, corpus, split and outputs on s3 give the same submission as local paths;
--num-workers 2 gives the same submission as 1 and records the nodes that predicted; evaluate
with s3 inputs and outputs (and --num-workers 2) gives the same aggregates as locally; a
missing s3 object is an error naming it."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pytest

from tests.s3server import moto_s3
from vcc_dist import storage
from vcc_dist.train.st import st_recipe, train_st

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "vcc-pred"
S3 = f"s3://{BUCKET}"


def _job(name: str) -> ModuleType:
    """A job file as a module, as `python jobs/<name>.py` would load it (its Ray task
    functions then travel to the workers by value, as from a script's __main__)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        spec = importlib.util.spec_from_file_location(f"job_{name}_s3",
                                                      ROOT / "jobs" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if str(ROOT / "jobs") in sys.path:
            sys.path.remove(str(ROOT / "jobs"))
    return mod


@pytest.fixture(scope="module")
def s3_ray(tmp_path_factory):
    """moto + the AWS variables, then a local Ray cluster whose workers inherit them; the
    scratch directory in a temporary directory."""
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


@pytest.fixture(scope="module")
def inputs(s3_ray, tiny_corpus, tmp_path_factory):
    """A minimal ST run (one worker, two steps) and its checkpoint, corpus and split both
    local and copied to s3."""
    sim, corpus = tiny_corpus
    run = tmp_path_factory.mktemp("st") / "run"
    cfg = st_recipe("debug", corpus=str(corpus), split=str(sim.split_path), run_dir=str(run),
                    num_workers=1, cpus_per_worker=1, max_steps=2, wandb={"mode": "disabled"})
    ck = Path(train_st(cfg, progress=False).latest_checkpoint)
    remote = {"checkpoint": f"{S3}/runs/st/{ck.name}", "corpus": f"{S3}/corpus",
              "split": f"{S3}/split.toml"}
    storage.upload_dir(ck, remote["checkpoint"])
    storage.upload_dir(corpus, remote["corpus"])
    storage.write_bytes(remote["split"], Path(sim.split_path).read_bytes())
    local = {"checkpoint": str(ck), "corpus": str(corpus), "split": str(sim.split_path)}
    return local, remote


def _predict_args(src: dict, out: str, real: str, workers: int) -> list[str]:
    return ["--checkpoint", src["checkpoint"], "--corpus", src["corpus"], "--split",
            src["split"], "--role", "test", "--out", out, "--real-out", real,
            "--sets-per-batch", "2", "--num-workers", str(workers), "--no-progress"]


def _read(loc: str | Path) -> ad.AnnData:
    data = storage.read_bytes(loc)
    return ad.read_h5ad(io.BytesIO(data))


def _assert_same_cells(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.shape == b.shape
    for k in ("data", "indices", "indptr"):
        x, y = getattr(a.X, k), getattr(b.X, k)
        assert x.dtype == y.dtype and np.array_equal(x, y), k
    assert a.obs.equals(b.obs) and a.obs.index.equals(b.obs.index)
    assert a.var.index.equals(b.var.index)


@pytest.fixture(scope="module")
def predictions(inputs, tmp_path_factory):
    """The same prediction four ways: local in and out; s3 in and out with 1 and 2 Ray
    tasks."""
    local, remote = inputs
    d = tmp_path_factory.mktemp("pred")
    job = _job("predict")
    runs = {"local": (str(d / "pred.h5ad"), str(d / "real.h5ad"), local, 1),
            "s3": (f"{S3}/out/w1/pred.h5ad", f"{S3}/out/w1/real.h5ad", remote, 1),
            "s3_w2": (f"{S3}/out/w2/pred.h5ad", f"{S3}/out/w2/real.h5ad", remote, 2)}
    for name, (out, real, src, n) in runs.items():
        assert job.main(_predict_args(src, out, real, n)) == 0, name
    return {k: (v[0], v[1]) for k, v in runs.items()}


def test_predict_from_and_to_object_storage(predictions, inputs, s3_ray):
    import ray

    _, remote = inputs
    pred_local, real_local = predictions["local"]
    pred_s3, real_s3 = predictions["s3"]
    # one whole object each, and nothing partial left beside them
    assert storage.listdir(f"{S3}/out/w1") == ["pred.h5ad", "real.h5ad"]
    assert not [p for p in s3_ray.rglob("*") if ".predict-" in p.name or ".tmp" in p.name]
    a, b = _read(pred_local), _read(pred_s3)
    _assert_same_cells(a, b)
    _assert_same_cells(_read(real_local), _read(real_s3))
    assert a.n_obs > 0 and (a.obs["target_gene"] == "non-targeting").any()
    prov = b.uns["vcc_dist"]
    assert prov["checkpoint"] == remote["checkpoint"] and prov["corpus"] == remote["corpus"]
    # Ray was running: the driver's node is the one that predicted
    assert list(prov["node_ids"]) == [ray.get_runtime_context().get_node_id()]


def test_predict_over_ray_tasks_is_identical(predictions):
    import ray

    one, two = _read(predictions["s3"][0]), _read(predictions["s3_w2"][0])
    _assert_same_cells(one, two)
    _assert_same_cells(_read(predictions["s3"][1]), _read(predictions["s3_w2"][1]))
    prov = two.uns["vcc_dist"]
    assert int(prov["num_workers"]) == 2
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    ids = list(prov["node_ids"])
    assert ids == sorted(set(ids)) and ids and set(ids) <= alive


def test_set_ranges_cut_between_forward_passes():
    from vcc_dist.infer.st_predict import set_ranges

    assert set_ranges(10, 3, 2) == [(0, 6), (6, 10)]  # passes [0,3) [3,6) | [6,9) [9,10)
    assert set_ranges(10, 3, 8) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert set_ranges(5, 32, 4) == [(0, 5)]
    assert set_ranges(0, 32, 4) == []


def test_evaluate_from_and_to_object_storage(predictions, tmp_path, capsys):
    import ray

    job = _job("evaluate")
    pred_local, real_local = predictions["local"]
    pred_s3, real_s3 = predictions["s3"]
    assert job.main(["--real", real_local, "--pred", pred_local, "--out", str(tmp_path / "e"),
                     "--no-plot", "--quiet"]) == 0
    want = json.loads((tmp_path / "e" / "agg_results.json").read_text())
    out = f"{S3}/eval/w2"
    assert job.main(["--real", real_s3, "--pred", pred_s3, "--out", out, "--num-workers", "2",
                     "--save-summaries", f"{S3}/eval/summaries", "--quiet"]) == 0
    assert storage.listdir(out) == ["agg_results.json", "per_perturbation.png", "results.csv"]
    got = storage.read_json(f"{out}/agg_results.json")
    assert got["agg"] == want["agg"]  # the same numbers, to the bit
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert got["node_ids"] and got["node_ids"] == sorted(set(got["node_ids"]))
    assert set(got["node_ids"]) <= alive and want["node_ids"] == [
        ray.get_runtime_context().get_node_id()]
    # the saved real summary (s3) and the scored aggregates (s3) replace the files
    assert storage.listdir(f"{S3}/eval/summaries") == ["pred.summary.npz", "real.summary.npz"]
    out2 = f"{S3}/eval/again"
    assert job.main(["--real", f"{S3}/eval/summaries/real.summary.npz", "--pred", pred_s3,
                     "--baseline-agg", f"{out}/agg_results.json", "--out", out2, "--no-plot",
                     "--quiet"]) == 0
    again = storage.read_json(f"{out2}/agg_results.json")
    assert again["agg"] == want["agg"] and again["score"]["avg_score"] == 0.0
    assert "baseline_diff.csv" in storage.listdir(out2)
    capsys.readouterr()


def test_missing_objects_are_named(inputs, tmp_path, capsys):
    _, remote = inputs
    missing = f"{S3}/nowhere/real.h5ad"
    assert _job("evaluate").main(["--real", missing, "--pred", missing, "--out",
                                  str(tmp_path / "e"), "--quiet"]) == 2
    # the last line is the error (an in-process job may log above it to an earlier test's
    # closed capture stream)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and missing in last and "does not exist" in last
    ck = f"{S3}/runs/none"
    assert _job("predict").main(["--checkpoint", ck, "--corpus", remote["corpus"], "--split",
                                 remote["split"], "--out", str(tmp_path / "p.h5ad"),
                                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert ck in err and "checkpoint" in err
    counts = f"{S3}/nowhere/counts.csv"
    assert _job("predict").main(["--checkpoint", remote["checkpoint"], "--corpus",
                                 remote["corpus"], "--context", "x", "--counts", counts,
                                 "--out", str(tmp_path / "p.h5ad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert counts in err and "does not exist" in err
    assert _job("predict").main(["--checkpoint", remote["checkpoint"], "--split",
                                 remote["split"], "--out", "s3://no-such-bucket/p.h5ad",
                                 "--no-progress"]) == 2
    assert "no-such-bucket" in capsys.readouterr().err
