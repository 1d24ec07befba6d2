"""Conversion on a multi-host Ray cluster into object storage (cluster/netns_cluster.py).

Three hosts (head with 2 CPUs, two workers with 1), no shared file system: the inputs are
objects in the cluster's S3 (moto), ``jobs/convert.py`` is submitted with ``ray job submit
--working-dir .`` and writes ``s3://<bucket>/<prefix>/corpus``. Checked: the stores were written
on at least two Ray nodes (each store's writer node id is recorded in corpus.json), and the
corpus equals a one-host local conversion of the same files (manifest apart from sources,
locations and provenance; arrays byte for byte); a worker host killed mid-conversion is
survived through Ray's task retries with an identical corpus. These tests need root and
iproute2 and fail, never skip, without them (tests/multihost.py)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from cluster import netns_cluster as nc
from data_conversion import ConvertConfig, convert_corpus
from tests.h5ad_factory import make_adata, write
from tests.multihost import MultiHost
from vcc_dist import constants as K
from vcc_dist import storage
from vcc_dist.data.corpus import CorpusManifest, load_manifest, store_path
from vcc_dist.data.reader import CorpusReader

pytestmark = [pytest.mark.integration]

# ``multihost``: the session's shared cluster (tests/conftest.py)

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

ARRAYS = ("X/data", "X/indices", "X/indptr", f"obs/{K.SOURCE_ROW_KEY}",
          f"obs/{K.TOTAL_COUNTS_KEY}", "uns/vcc_dist_pseudobulk")
RUN_FIELDS = ("source", "location", "provenance")
JOB_ARGS = ("--n-top-genes", "20", "--no-progress")


def _inputs(root: Path, n: int, cells: int, genes: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [write(make_adata(n=cells, g=genes, seed=i, density=0.3), root / f"in{i}.h5ad")
            for i in range(n)]


def _upload(mh: MultiHost, paths: list[Path], prefix: str) -> str:
    s3 = mh.s3()
    for p in paths:
        s3.upload_file(str(p), mh.state.bucket, f"{prefix}/inputs/{p.name}")
    return f"s3://{mh.state.bucket}/{prefix}/inputs"


def _reference(paths: list[Path], out: Path) -> CorpusManifest:
    """The one-host local conversion of the same files."""
    return convert_corpus(ConvertConfig(inputs=tuple(map(str, paths)), out=str(out),
                                        parallel="serial", progress=False, n_top_genes=20))


def _assert_equals_reference(uri: str, ref: Path, opts: storage.S3Options) -> CorpusManifest:
    m, mref = load_manifest(uri, options=opts), load_manifest(ref)

    def plain(x: CorpusManifest) -> dict:
        d = x.to_json()
        d["stores"] = [{k: v for k, v in s.items() if k not in RUN_FIELDS} for s in d["stores"]]
        return d

    assert plain(m) == plain(mref)
    assert [Path(s.source).name for s in m.stores] == [Path(s.source).name for s in mref.stores]
    for s, r in zip(m.stores, mref.stores):
        a = zarr.open_group(storage.open_zarr_store(store_path(uri, s), "r", opts), mode="r")
        b = zarr.open_group(str(store_path(ref, r)), mode="r")
        for key in ARRAYS:
            np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=f"{s.name} {key}")
    rr, rl = CorpusReader(uri, s3=opts), CorpusReader(ref)
    for i, n in enumerate(rl.n_cells.tolist()):
        x, y = rr.read(i, np.arange(n), normalize=True), rl.read(i, np.arange(n), normalize=True)
        for f in ("data", "indices", "indptr", "totals"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)
    # nothing under stores/ but the listed stores
    listed = {s.location.split("/")[1] for s in m.stores}
    assert set(storage.listdir(f"{uri}/{K.CORPUS_STORES_DIR}", opts)) == listed
    return m


def test_convert_to_s3_on_several_hosts_equals_local(multihost: MultiHost, tmp_path):
    state = multihost.state
    opts = storage.S3Options.from_env(multihost.env)
    paths = _inputs(tmp_path / "in", 6, cells=400, genes=80)
    prefix = "convert-" + os.urandom(4).hex()
    inputs = _upload(multihost, paths, prefix)
    uri = f"s3://{state.bucket}/{prefix}/corpus"
    t0 = time.monotonic()
    p = multihost.submit("jobs/convert.py", inputs, "--out", uri, *JOB_ARGS, timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "succeeded" in out, out[-4000:]
    print(f"\nconversion job: {time.monotonic() - t0:.1f}s")
    ref = tmp_path / "ref"
    _reference(paths, ref)
    m = _assert_equals_reference(uri, ref, opts)
    alive = {n["node_id"]: n["node_ip"] for n in nc.alive_nodes(state)}
    writers = {s.provenance["node_id"] for s in m.stores}
    assert len(writers) >= 2, [s.provenance for s in m.stores]
    assert writers <= set(alive), (writers, alive)
    assert all(alive[s.provenance["node_id"]] == s.provenance["node_ip"] for s in m.stores)


def _running_store_tasks(state: nc.ClusterState) -> list[dict]:
    """Conversion tasks running now (Ray's state API on the head, with the cluster's token)."""
    token = Path(state.token_path).read_text().strip()
    req = urllib.request.Request(f"{state.dashboard_url}/api/v0/tasks?limit=1000&detail=false",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        tasks = json.load(r)["data"]["result"]["result"]
    return [t for t in tasks if t.get("state") == "RUNNING" and "convert" in t.get("name", "")]


def test_worker_host_killed_mid_conversion_is_survived(multihost: MultiHost, tmp_path):
    """w2 is killed while it runs a conversion task; Ray retries that task on the other hosts
    (or a rerun finishes the corpus); either way the corpus equals the local conversion. w2 is
    restarted afterwards so later tests have three hosts."""
    state = multihost.state
    opts = storage.S3Options.from_env(multihost.env)
    paths = _inputs(tmp_path / "in", 6, cells=4000, genes=300)
    prefix = "convert-kill-" + os.urandom(4).hex()
    inputs = _upload(multihost, paths, prefix)
    uri = f"s3://{state.bucket}/{prefix}/corpus"
    w2 = next(n["node_id"] for n in nc.alive_nodes(state) if n["node_ip"] == state.host("w2").ip)
    results: list = []
    job = threading.Thread(target=lambda: results.append(multihost.submit(
        "jobs/convert.py", inputs, "--out", uri, *JOB_ARGS, timeout=400)))
    job.start()
    killed = False
    try:
        deadline = time.monotonic() + 300
        while job.is_alive() and time.monotonic() < deadline:
            if any(t.get("node_id") == w2 for t in _running_store_tasks(state)):
                nc.kill_host(state, "w2")
                killed = True
                break
            time.sleep(0.1)
        job.join(timeout=420)
        assert killed, "the conversion finished before w2 could be killed"
        (p,) = results
        out = p.stdout + p.stderr
        if p.returncode != 0:  # retries exhausted: the rerun must finish the same corpus
            print(f"\nconversion failed after the kill; rerunning:\n{out[-2000:]}")
            p = multihost.submit("jobs/convert.py", inputs, "--out", uri, *JOB_ARGS,
                                 timeout=400)
            out = p.stdout + p.stderr
        assert p.returncode == 0 and "succeeded" in out, out[-4000:]
    finally:
        job.join(timeout=60)
        if killed:
            nc.restart_host(state, "w2", timeout=180)
    ref = tmp_path / "ref"
    _reference(paths, ref)
    m = _assert_equals_reference(uri, ref, opts)
    writers = [s.provenance.get("node_id") for s in m.stores]
    print(f"\nstores by writer node: {writers} (killed w2 = {w2})")
    assert len(nc.alive_nodes(state)) == 3
