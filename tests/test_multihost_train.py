"""ST and SE training across hosts and the jobs downstream of them (issue 16, sections 3 and
4): ``jobs/train_st.py``, ``jobs/pretrain_se.py``, ``jobs/tune_st.py``, ``jobs/embed_genes.py``,
``jobs/embed_cells.py``, ``jobs/predict.py`` and ``jobs/evaluate.py`` submitted with ``ray job submit --working-dir .`` to the shared
network-namespace cluster (tests/conftest.py's ``multihost``: a head with 2 CPUs, two workers
with 1), with the corpus, the split file, the gene table and the run directories on the
cluster's S3 server, so no path is shared by the hosts.

Every run uses the fixed-seed debug configuration whose one-host losses tests/data/
debug_losses.json records (tests/test_st_train.py, tests/test_se_train.py) and must reproduce
them: ST with its two workers on two hosts, losing one of those hosts after the first
checkpoint (Ray Train restarts the worker group on the remaining hosts from the checkpoint in
S3); ST whose head host dies, rerun after a cluster restart; SE with ZeRO-3 over gloo between
two hosts. The jobs downstream (ESM2 gene embeddings, a Tune sweep, SE cell embeddings of the
corpus in S3, a prediction of the ST run and its evaluation) each put their work on at least
two hosts, as the Ray node ids their outputs record show, and read and write only S3."""

from __future__ import annotations

import io
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cluster import netns_cluster as nc
from tests.multihost import MultiHost
from vcc_dist import storage

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = np.array(json.loads((ROOT / "tests" / "data" / "debug_losses.json").read_text())["st"])


@pytest.fixture(scope="module")
def s3opts(multihost: MultiHost) -> storage.S3Options:
    """Options for this process's S3 client: the cluster's AWS variables only."""
    return storage.S3Options.from_env(multihost.env)


@pytest.fixture(scope="module")
def inputs(multihost: MultiHost, s3opts, tiny_corpus) -> dict[str, str]:
    """The tiny corpus and its split file, uploaded to the cluster's bucket."""
    sim, corpus = tiny_corpus
    base = f"s3://{multihost.state.bucket}/train-inputs"
    storage.upload_dir(corpus, f"{base}/corpus", options=s3opts)
    storage.write_bytes(f"{base}/split.toml", Path(sim.split_path).read_bytes(), options=s3opts)
    return {"corpus": f"{base}/corpus", "split": f"{base}/split.toml"}


def _train_args(inputs: dict[str, str], run: str) -> list[str]:
    # tests/test_st_train.py's configuration (2 workers, 0.5 CPUs each, checkpoint every 4
    # steps, 2 epochs); SPREAD places the two workers on two hosts
    return ["jobs/train_st.py", "--recipe", "debug", "--corpus", inputs["corpus"],
            "--split", inputs["split"], "--run-dir", run, "--num-workers", "2",
            "--cpus-per-worker", "0.5", "--checkpoint-every", "4", "--epochs", "2",
            "--no-progress", "--set", "placement_strategy=SPREAD", "wandb.mode=disabled",
            "record_batches=true"]


def _succeeded(p, name: str) -> str:
    """The job's output; fails naming its first errors (the whole log is kept in the system's
    temporary directory, as vcc-multihost-<name>.log)."""
    out = p.stdout + p.stderr
    log = Path(tempfile.gettempdir()) / f"vcc-multihost-{name}.log"
    log.write_text(out)
    if p.returncode != 0 or "succeeded" not in out:
        errors = [ln for ln in out.splitlines() if "Error" in ln or "error:" in ln][:20]
        pytest.fail(f"job {name} failed (rc {p.returncode}; log {log}); first errors:\n"
                    + "\n".join(errors) + "\n...\n" + out[-3000:], pytrace=False)
    return out


def _losses(run: str, opts) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(f"{run}/metrics_train.csv", opts)))


def _assert_golden(df: pd.DataFrame) -> None:
    assert df["step"].is_unique and df["step"].is_monotonic_increasing, df["step"].tolist()
    assert df["step"].tolist() == GOLDEN[:, 0].astype(int).tolist()
    np.testing.assert_allclose(df["loss"].to_numpy(), GOLDEN[:, 1], rtol=1e-5)


def _checkpoints(run: str, opts) -> list[str]:
    try:
        names = storage.listdir(run, opts)
    except (FileNotFoundError, storage.StorageError):
        return []
    return [f"{run}/{n}" for n in names if n.startswith("checkpoint_")
            and storage.exists(f"{run}/{n}/manifest.json", opts)]


def _manifest(ck: str, opts) -> dict:
    return storage.read_json(f"{ck}/manifest.json", opts)


def _start_until_checkpoint(multihost: MultiHost, inputs, run: str, opts):
    """Submit train_st in a thread; return (thread, result dict, first checkpoint's manifest)
    once its first checkpoint is complete in object storage."""
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault(
        "p", multihost.submit(*_train_args(inputs, run), timeout=1200)), daemon=True)
    job.start()
    deadline = time.monotonic() + 600
    while True:
        assert job.is_alive() or "p" in result, "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        found = _checkpoints(run, opts)
        if found:
            return job, result, _manifest(found[0], opts)
        time.sleep(1.0)


def _records(run: str, opts) -> list[dict]:
    """Every process's batch records (record_batches=true), read back from the bucket."""
    recs = []
    for n in storage.listdir(f"{run}/workers", opts):
        data = storage.read_bytes(f"{run}/workers/{n}", opts).decode()
        recs += [json.loads(x) for x in data.splitlines() if x.strip()]
    return recs


def _resumed_step(run: str, opts) -> int:
    """The step the run resumed from (the workers' "resume" records; the job's printed log is
    not a reliable witness: Ray's log streaming may drop a restarted worker's first lines)."""
    steps = [r["step"] for r in _records(run, opts) if r["event"] == "resume"]
    assert steps, "the run was not interrupted and resumed"
    return min(steps)


def test_train_st_on_two_hosts_survives_losing_a_worker_host(multihost: MultiHost, inputs,
                                                              s3opts):
    """Two workers on two hosts; the host of one is killed after the first checkpoint; the
    worker group restarts from the latest checkpoint in S3 on the remaining hosts and the run
    finishes with the one-host losses."""
    state = multihost.state
    run = f"s3://{state.bucket}/runs/st-host-loss"
    t0 = time.monotonic()
    job, result, man = _start_until_checkpoint(multihost, inputs, run, s3opts)
    by_node = {n["node_id"]: n["node_ip"] for n in nc.alive_nodes(state)}
    # before the loss: the two ranks on two different hosts of the cluster
    assert len(man["node_ids"]) == 2 and set(man["node_ids"]) <= set(by_node), man["node_ids"]
    hosts = {by_node[n] for n in man["node_ids"]}
    assert len(hosts) == 2, man["node_ids"]
    victim = [h for h in state.hosts[1:] if h.ip in hosts][0]  # two hosts: one is not the head
    nc.kill_host(state, victim.name)
    killed_at = man["trainer_state"]["step"]
    try:
        job.join(timeout=1200)
        _succeeded(result["p"], "train_st-host-loss")
    finally:
        nc.restart_host(state, victim.name, timeout=180)  # later tests get three hosts again
    print(f"\ntrain_st across hosts with a host lost: {time.monotonic() - t0:.0f} s")
    # resumed from a checkpoint at or after the one seen before the kill: at most one
    # checkpoint interval lost; finished on hosts that are not the lost one
    assert _resumed_step(run, s3opts) >= killed_at
    last = _manifest(_checkpoints(run, s3opts)[-1], s3opts)
    assert last["trainer_state"]["step"] == int(GOLDEN[-1, 0])
    assert victim.ip not in {by_node.get(n) for n in last["node_ids"]}, (last["node_ids"], victim)
    # every output came through object storage
    names = storage.listdir(run, s3opts)
    for want in ("config.json", "prep", "metrics_train.csv", "metrics_val.csv",
                 "best_checkpoint.json", "latest_checkpoint.json", "workers"):
        assert want in names, (want, names)
    # no step counted twice, and the one-host losses (tests/test_st_train.py's run)
    _assert_golden(_losses(run, s3opts))
    # every batch of the last epoch consumed exactly once, by the two ranks together
    recs = _records(run, s3opts)
    last_epoch = [b for r in recs if r["event"] == "batch" and r["epoch"] == 1 for b in r["steps"]]
    assert sorted(last_epoch) == list(range(int(last["batches_per_epoch"]))), sorted(last_epoch)


def test_head_restart_then_the_same_command_resumes(multihost: MultiHost, inputs, s3opts):
    """The head host dies (the driver, GCS and job server with it) after the first checkpoint;
    the cluster is restarted and the same command, submitted again, resumes from the
    checkpoint in S3 and finishes with the one-host losses."""
    state = multihost.state
    run = f"s3://{state.bucket}/runs/st-head-restart"
    job, result, man = _start_until_checkpoint(multihost, inputs, run, s3opts)
    killed_at = man["trainer_state"]["step"]
    nc.kill_host(state, "head")
    job.join(timeout=300)
    nc.restart_host(state, "head", timeout=240)  # a new head: every worker host restarts too
    assert len(nc.alive_nodes(state)) == 3
    _succeeded(multihost.submit(*_train_args(inputs, run), timeout=900), "train_st-head-restart")
    assert _resumed_step(run, s3opts) >= killed_at
    assert _manifest(_checkpoints(run, s3opts)[-1], s3opts)["trainer_state"]["step"] == \
        int(GOLDEN[-1, 0])
    _assert_golden(_losses(run, s3opts))


@pytest.fixture(scope="module")
def se_run(multihost: MultiHost, inputs, s3opts, tiny_corpus, tmp_path_factory) -> str:
    """SE pretraining, ZeRO-3 over gloo between two hosts (jobs/pretrain_se.py submitted to the
    cluster); its run directory in the bucket."""
    import torch

    from vcc_dist.data.corpus import load_manifest

    tmp_path = tmp_path_factory.mktemp("se")
    _, corpus = tiny_corpus
    state = multihost.state
    genes = list(load_manifest(corpus).genes)
    g = torch.Generator().manual_seed(0)  # tests/test_se_train.py's table: 5 genes dropped
    torch.save({name: torch.randn(24, generator=g) for name in genes[5:]}, tmp_path / "g.pt")
    table = f"s3://{state.bucket}/train-inputs/genes.pt"
    storage.write_bytes(table, (tmp_path / "g.pt").read_bytes(), options=s3opts)
    run = f"s3://{state.bucket}/runs/se-two-hosts"
    p = multihost.submit("jobs/pretrain_se.py", "--recipe", "debug", "--corpus", inputs["corpus"],
                         "--gene-table", table, "--run-dir", run, "--num-workers", "2",
                         "--cpus-per-worker", "0.5", "--max-steps", "6", "--checkpoint-every",
                         "3", "--no-progress", "--set", "engine.zero_stage=3",
                         "placement_strategy=SPREAD", "wandb.mode=disabled", timeout=900)
    _succeeded(p, "pretrain_se")
    return run


def test_pretrain_se_zero3_over_gloo_on_two_hosts(multihost: MultiHost, se_run: str, s3opts):
    """SE pretraining, ZeRO-3 sharded over gloo between two hosts, gives the losses
    tests/test_se_train.py's one-host run of the same configuration records."""
    state, run = multihost.state, se_run
    golden = np.array(json.loads((ROOT / "tests" / "data" / "debug_losses.json").read_text())["se"])
    df = _losses(run, s3opts)
    assert df["step"].tolist() == golden[:, 0].astype(int).tolist()
    np.testing.assert_allclose(df["loss"].to_numpy(), golden[:, 1], rtol=1e-5)
    alive = {n["node_id"]: n["node_ip"] for n in nc.alive_nodes(state)}
    cks = _checkpoints(run, s3opts)
    assert cks
    for ck in cks:
        man = _manifest(ck, s3opts)
        assert man["zero_stage"] == 3
        assert len({alive[n] for n in man["node_ids"]}) == 2, man["node_ids"]
        # both ranks' ZeRO-3 partitions reached object storage
        shards = [n for n in storage.listdir(f"{ck}/deepspeed/state", s3opts)
                  if n.endswith("optim_states.pt")]
        assert len(shards) == 2, shards


# ---------------------------------------------------------------------------------------------
# the other jobs across hosts: each records the Ray nodes that did its work
# ---------------------------------------------------------------------------------------------


def _hosts(multihost: MultiHost, node_ids) -> set[str]:
    """The host addresses of Ray node ids (each must be a node of the cluster now)."""
    alive = {n["node_id"]: n["node_ip"] for n in nc.alive_nodes(multihost.state)}
    assert set(node_ids) <= set(alive), (node_ids, alive)
    return {alive[n] for n in node_ids}


def test_embed_genes_on_two_hosts(multihost: MultiHost, s3opts, tiny_corpus, tmp_path):
    """ESM2 gene embeddings: the FASTA and the model (a tiny random ESM2 in the release format)
    in S3, two model replicas on two hosts, the outputs in S3 equal to a one-process run."""
    from vcc_dist.esm.embed import load_gene_embeddings
    from vcc_dist.esm.fasta import read_isoforms
    from vcc_dist.esm.model import save_tiny_esm2

    sim, _ = tiny_corpus
    base = f"s3://{multihost.state.bucket}/esm"
    model = save_tiny_esm2(tmp_path / "esm", num_layers=2, embed_dim=32)
    for f in model.parent.iterdir():
        storage.upload_file(f, f"{base}/model/{f.name}", options=s3opts)
    storage.upload_file(sim.fasta_path, f"{base}/proteins.fasta", options=s3opts)
    out = f"{base}/out"
    p = multihost.submit("jobs/embed_genes.py", "--fasta", f"{base}/proteins.fasta", "--model",
                         f"{base}/model/{model.name}", "--out", out, "--num-actors", "2",
                         "--isoforms-per-part", "8", "--no-progress", timeout=600)
    _succeeded(p, "embed_genes")
    man = storage.read_json(f"{out}/manifest.json", s3opts)
    assert len(_hosts(multihost, man["node_ids"])) == 2, man["node_ids"]
    # every gene of the FASTA embedded, with the model's width (tests/test_esm_embed_s3.py
    # checks the values against a local run)
    storage.download_file(f"{out}/gene_embeddings.pt", tmp_path / "g.pt", s3opts)
    genes, emb = load_gene_embeddings(tmp_path / "g.pt")
    isoforms, _ = read_isoforms(sim.fasta_path)
    assert set(genes) == {i.gene for i in isoforms}
    assert emb.shape == (len(genes), 32) and np.isfinite(emb).all()


def test_embed_cells_on_two_hosts(multihost: MultiHost, se_run: str, inputs, s3opts):
    """SE cell embeddings of the corpus in S3: one task per store, spread over the hosts; each
    store's embedding manifest names the node that wrote it."""
    from vcc_dist.data.embeddings import CorpusEmbeddings, embedding_status

    key = "X_se_hosts"
    p = multihost.submit("jobs/embed_cells.py", "--checkpoint", se_run, "--corpus",
                         inputs["corpus"], "--key", key, "--no-progress", timeout=600)
    out = _succeeded(p, "embed_cells")
    status = embedding_status(inputs["corpus"], key, s3opts)
    assert status and all(m is not None and m["complete"] for m in status.values()), status
    nodes = {m["written_by"]["node_id"] for m in status.values()}
    assert len(_hosts(multihost, nodes)) >= 2, nodes
    summary = json.loads(next(ln for ln in out.splitlines() if ln.startswith('{"checkpoint"')))
    assert set(summary["node_ids"]) == nodes
    ce = CorpusEmbeddings(inputs["corpus"], key, s3=s3opts)
    assert ce.meta["checkpoint"].startswith(se_run)
    v = ce.read(0, np.arange(5))
    assert v.shape == (5, ce.dim) and np.isfinite(v).all()


def test_predict_and_evaluate_on_two_hosts(multihost: MultiHost, inputs, s3opts, tmp_path):
    """A prediction of the ST run trained across hosts (the host-loss test's run) for the
    split's test perturbations, in two tasks on two hosts, and its evaluation, in two tasks on
    two hosts; every input and output in S3."""
    import anndata as ad

    st_run = f"s3://{multihost.state.bucket}/runs/st-host-loss"
    assert storage.exists(f"{st_run}/best_checkpoint.json", s3opts), \
        "the ST run of test_train_st_on_two_hosts_survives_losing_a_worker_host is missing"
    out = f"s3://{multihost.state.bucket}/predict"
    p = multihost.submit("jobs/predict.py", "--checkpoint", st_run, "--split", inputs["split"],
                         "--role", "test", "--out", f"{out}/pred.h5ad", "--real-out",
                         f"{out}/real.h5ad", "--num-workers", "2", "--no-progress", timeout=600)
    _succeeded(p, "predict")
    storage.download_file(f"{out}/pred.h5ad", tmp_path / "pred.h5ad", s3opts)
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    prov = dict(pred.uns["vcc_dist"])
    assert len(_hosts(multihost, list(prov["node_ids"]))) == 2, prov
    p = multihost.submit("jobs/evaluate.py", "--real", f"{out}/real.h5ad", "--pred",
                         f"{out}/pred.h5ad", "--out", f"{out}/eval", "--num-workers", "2",
                         "--quiet", timeout=600)
    _succeeded(p, "evaluate")
    agg = storage.read_json(f"{out}/eval/agg_results.json", s3opts)
    assert len(_hosts(multihost, agg["node_ids"])) == 2, agg.get("node_ids")
    names = storage.listdir(f"{out}/eval", s3opts)
    assert {"results.csv", "agg_results.json"} <= set(names), names


def test_tune_st_trials_on_different_hosts(multihost: MultiHost, inputs, s3opts):
    """A Tune sweep of three concurrent one-worker trials: 0.75 CPU each, so the head (2 CPUs)
    holds two and the third runs on a worker host; every trial's run and Tune's state in S3."""
    run = f"s3://{multihost.state.bucket}/sweeps/hosts"
    p = multihost.submit("jobs/tune_st.py", "--space", "debug", "--recipe", "debug", "--corpus",
                         inputs["corpus"], "--split", inputs["split"], "--run-dir", run,
                         "--num-samples", "3", "--max-concurrent", "3", "--trial-workers", "1",
                         "--cpus-per-trial", "0.75", "--max-steps", "2", "--checkpoint-every",
                         "1", "--scheduler", "fifo", "--wandb", "disabled", "--no-progress",
                         timeout=900)
    _succeeded(p, "tune_st")
    trials = pd.read_csv(io.BytesIO(storage.read_bytes(f"{run}/trials.csv", s3opts)))
    assert len(trials) == 3 and (trials["status"] == "completed").all(), trials
    nodes = set()
    for rd in trials["run_dir"]:
        cks = _checkpoints(str(rd), s3opts)
        assert cks, rd
        nodes |= set(_manifest(cks[-1], s3opts)["node_ids"])
    assert len(_hosts(multihost, nodes)) >= 2, nodes
    assert storage.exists(f"{run}/best_recipe.json", s3opts)
