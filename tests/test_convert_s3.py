"""Conversion into object storage (``--out s3://bucket/prefix``) and bounded corpus.json saves.

An S3 server (moto's, in this process, on 127.0.0.1; as in tests/test_storage.py) holds the
inputs and the output; the AWS variables point at it. Checked: an s3:// conversion (Ray tasks,
inputs read from s3) equals a local one of the same inputs (manifest, arrays, CorpusReader
rows); a conversion job killed midway lists no store that is not complete, and a rerun adopts
finished unrecorded stores, deletes abandoned attempt prefixes and gives an identical corpus;
clear errors for bad URIs and a missing bucket; corpus.json is saved a bounded number of times
(not once per store: that was quadratic in the store count)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from data_conversion import ConversionError, ConvertConfig, convert_corpus, validate_corpus
from data_conversion import convert as conv
from data_conversion.cli import convert_main
from data_conversion.convert import ManifestSaver, _store_is_complete
from tests.h5ad_factory import make_adata, write
from tests.s3server import moto_s3
from vcc_dist import constants as K
from vcc_dist import storage
from vcc_dist.data.corpus import CorpusManifest, load_manifest, store_path
from vcc_dist.data.reader import CorpusReader

pytest.importorskip("moto.server")
pytest.importorskip("obstore")
pytest.importorskip("s3fs")

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "vcc-convert"
#: arrays compared byte for byte between corpora
ARRAYS = ("X/data", "X/indices", "X/indptr", f"obs/{K.SOURCE_ROW_KEY}",
          f"obs/{K.TOTAL_COUNTS_KEY}", "uns/vcc_dist_pseudobulk")
#: per-store manifest fields that legitimately differ between two conversions of the same data
RUN_FIELDS = ("source", "location", "provenance")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with bucket BUCKET; the AWS variables point at it. Yields a boto3
    client."""
    import boto3

    with moto_s3(BUCKET):
        yield boto3.client("s3")


def _keys(client, prefix: str) -> list[str]:
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def _store_prefixes(client, corpus_key: str) -> set[str]:
    """``stores/<dir>`` of every store prefix under the corpus (relative to the corpus)."""
    n = len(corpus_key) + 1
    return {"/".join(k[n:].split("/")[:2]) for k in _keys(client, f"{corpus_key}/stores/")}


def _upload_inputs(client, paths: list[Path], prefix: str) -> str:
    for p in paths:
        client.upload_file(str(p), BUCKET, f"{prefix}/{p.name}")
    return f"s3://{BUCKET}/{prefix}"


def _make_inputs(root: Path, n: int, sizes: list[int], genes: int = 60,
                 density: float = 0.3) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [write(make_adata(n=c, g=genes, seed=i, density=density), root / f"in{i}.h5ad")
            for i, c in enumerate(sizes[:n])]


def _convert(inputs, out, **kw) -> CorpusManifest:
    kw.setdefault("parallel", "serial")
    kw.setdefault("progress", False)
    kw.setdefault("n_top_genes", 20)
    return convert_corpus(ConvertConfig(inputs=tuple(map(str, inputs)), out=str(out), **kw))


def _without_run_fields(m: CorpusManifest) -> dict:
    d = m.to_json()
    d["stores"] = [{k: v for k, v in s.items() if k not in RUN_FIELDS} for s in d["stores"]]
    return d


def _assert_corpora_equal(a_dir, b_dir) -> None:
    """Same manifest (apart from RUN_FIELDS; sources by file name), same arrays, same rows."""
    ma, mb = load_manifest(a_dir), load_manifest(b_dir)
    assert _without_run_fields(ma) == _without_run_fields(mb)
    assert [Path(s.source).name for s in ma.stores] == [Path(s.source).name for s in mb.stores]
    for sa, sb in zip(ma.stores, mb.stores):
        ga = zarr.open_group(storage.open_zarr_store(store_path(a_dir, sa)), mode="r")
        gb = zarr.open_group(storage.open_zarr_store(store_path(b_dir, sb)), mode="r")
        for key in ARRAYS:
            np.testing.assert_array_equal(ga[key][:], gb[key][:], err_msg=f"{sa.name} {key}")
    ra, rb = CorpusReader(a_dir), CorpusReader(b_dir)
    for i, n in enumerate(ra.n_cells.tolist()):
        rows = np.arange(n)
        for normalize in (False, True):
            x, y = ra.read(i, rows, normalize=normalize), rb.read(i, rows, normalize=normalize)
            for f in ("data", "indices", "indptr", "totals"):
                np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)
        assert ra.groups(i).equals(rb.groups(i))


# ---------------------------------------------------------------------------------------------
# s3 output equals local output


@pytest.mark.integration
def test_s3_conversion_with_ray_equals_local(s3, tmp_path):
    import ray

    paths = _make_inputs(tmp_path / "in", 2, [260, 150])
    inputs = _upload_inputs(s3, paths, "inputs/a")
    ref = tmp_path / "ref"
    _convert(paths, ref, max_cells_per_store=200)
    uri = f"s3://{BUCKET}/corpora/a"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        m = _convert([inputs], uri, parallel="ray", max_cells_per_store=200)
    finally:
        ray.shutdown()
    assert m.status == "complete" and len(m.stores) == 3  # 2 + 1 parts of <= 200 cells
    assert [s.name for s in m.stores] == ["in0.part000", "in0.part001", "in1"]
    for s in m.stores:
        # written under an attempt-unique prefix, recorded in corpus.json with its writer
        assert re.fullmatch(rf"stores/{re.escape(s.name)}~[0-9a-f]{{12}}\.zarr", s.location)
        assert store_path(uri, s) == f"{uri}/{s.location}"
        assert s.provenance["node_id"] and s.provenance["node_ip"]
        assert s.source.startswith(f"s3://{BUCKET}/inputs/a/")
    # nothing under stores/ but the listed stores
    assert _store_prefixes(s3, "corpora/a") == {s.location for s in m.stores}
    _assert_corpora_equal(uri, ref)
    rep = validate_corpus(uri, sample_rows=20)
    assert rep.ok, rep.text()


# ---------------------------------------------------------------------------------------------
# kill and resume


def _job(inputs: str, out: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "jobs" / "convert.py"), inputs, "--out", out,
           "--num-cpus", "1", "--read-budget-mb", "1", "--n-top-genes", "20", "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the moto server's AWS variables
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _recorded(client, corpus_key: str) -> dict | None:
    try:
        body = client.get_object(Bucket=BUCKET, Key=f"{corpus_key}/corpus.json")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def _kill_after_first_store(proc: subprocess.Popen, client, corpus_key: str,
                            timeout: float = 180) -> int:
    """SIGKILL the job's process group once corpus.json records a complete store."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"conversion ended before it could be killed:\n"
                        f"{proc.stdout.read().decode()[-3000:]}")
        m = _recorded(client, corpus_key)
        done = sum(s["status"] == "complete" for s in m["stores"]) if m else 0
        if done >= 1:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return done
        time.sleep(0.05)
    pytest.fail("timed out waiting for the kill point")


@pytest.mark.integration
def test_killed_s3_conversion_lists_only_complete_stores_and_resumes(s3, tmp_path):
    paths = _make_inputs(tmp_path / "in", 4, [6000] * 4, genes=400)
    inputs = _upload_inputs(s3, paths, "inputs/k")
    ref = tmp_path / "ref"
    # the job's read budget: the statistics' float sums follow the read blocks
    _convert(paths, ref, read_budget_mb=1)
    key = "corpora/k"
    uri = f"s3://{BUCKET}/{key}"
    done = _kill_after_first_store(_job(inputs, uri), s3, key)
    m = load_manifest(uri, require_complete=False)
    assert m.status == "converting" and done < len(m.stores)
    for s in m.stores:  # a listed store is complete; an unlisted one has no location
        if s.status == "complete":
            assert _store_is_complete(store_path(uri, s), s, m.vocab_hash)
        else:
            assert s.location is None
    # what a kill can leave besides: a finished store not yet recorded (here: the first
    # recorded one, unrecorded again) and the partial upload of another attempt
    adopt = next(s for s in m.stores if s.status == "complete")
    adopt_loc = adopt.location
    d = json.loads(storage.read_bytes(f"{uri}/corpus.json"))
    for e in d["stores"]:
        if e["name"] == adopt.name:
            e.update(status="pending", n_cells=None, nnz=None, location=None, provenance=None)
    storage.write_json(f"{uri}/corpus.json", d)
    abandoned = f"stores/{m.stores[-1].name}~{'0' * 12}.zarr"
    s3.put_object(Bucket=BUCKET, Key=f"{key}/{abandoned}/X/data/c/0", Body=b"partial")
    before = load_manifest(uri, require_complete=False)
    assert not any(s.status == "complete" and s.location == abandoned for s in before.stores)
    # the rerun: adopts the finished store, deletes the abandoned prefix, converts the rest
    m2 = _convert([inputs], uri, read_budget_mb=1)
    assert m2.status == "complete"
    by_name = {s.name: s for s in m2.stores}
    assert by_name[adopt.name].location == adopt_loc
    assert by_name[adopt.name].provenance == {"adopted": True}
    assert _store_prefixes(s3, key) == {s.location for s in m2.stores}
    _assert_corpora_equal(uri, ref)


# ---------------------------------------------------------------------------------------------
# errors


def test_bad_output_uris_are_clear_errors(s3, tmp_path, capsys):
    paths = _make_inputs(tmp_path / "in", 1, [50])
    with pytest.raises(ConversionError, match="unsupported URI scheme"):
        ConvertConfig(inputs=(str(paths[0]),), out="gs://bucket/corpus")
    with pytest.raises(ConversionError, match="names no bucket"):
        ConvertConfig(inputs=(str(paths[0]),), out="s3:///corpus")
    with pytest.raises(ConversionError, match="bucket 'no-such-bucket' does not exist.*"
                                              "AWS_ENDPOINT_URL"):
        _convert(paths, "s3://no-such-bucket/corpus")
    assert convert_main([str(paths[0]), "--out", "s3://no-such-bucket/c", "--serial",
                         "--no-progress"]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="does not exist"):
        _convert([f"s3://{BUCKET}/nothing/here.h5ad"], tmp_path / "c")
    with pytest.raises(ConversionError, match="neither an .h5ad object nor a prefix"):
        _convert([f"s3://{BUCKET}/nothing/here"], tmp_path / "c")
    with pytest.raises(ConversionError, match="patterns are not supported"):
        _convert([f"s3://{BUCKET}/x/*.h5ad"], tmp_path / "c")


def test_s3_output_without_manifest_but_stores_is_refused(s3, tmp_path):
    paths = _make_inputs(tmp_path / "in", 1, [50])
    s3.put_object(Bucket=BUCKET, Key="corpora/foreign/stores/x.zarr/zarr.json", Body=b"{}")
    with pytest.raises(ConversionError, match="holds stores but no corpus.json"):
        _convert(paths, f"s3://{BUCKET}/corpora/foreign")


# ---------------------------------------------------------------------------------------------
# bounded corpus.json saves


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Manifest:
    """Stands in for CorpusManifest: a save of S stores costs ``per_store_s * S`` seconds."""

    def __init__(self, clock: _Clock, n_stores: int, per_store_s: float):
        self.clock, self.cost = clock, per_store_s * n_stores
        self.saves = 0

    def save(self, corpus) -> None:
        self.saves += 1
        self.clock.t += self.cost


def test_manifest_saves_are_bounded_at_60000_stores():
    """60,000 stores finishing 10 ms apart, a save costing 6 s (benchmarks/results/scale.md):
    one save per store would spend 100 h saving; the saver spends at most ~5% of the run."""
    n = 60_000
    clock = _Clock()
    m = _Manifest(clock, n, per_store_s=1e-4)
    saver = ManifestSaver(m, "corpus", interval_s=1.0, fraction=0.05, clock=clock)
    work = 0.0
    for _ in range(n):
        clock.t += 0.01
        work += 0.01
        saver.store_done()
    saver.flush()
    assert saver.unsaved == 0 and m.saves == saver.saves
    save_time = m.saves * m.cost
    assert m.saves < n / 100, m.saves
    assert save_time <= 0.06 * (work + save_time) + m.cost, (m.saves, save_time, work)
    # small manifests: at most one save per interval, and the last stores are recorded by flush
    clock2 = _Clock()
    m2 = _Manifest(clock2, 10, per_store_s=1e-4)
    saver2 = ManifestSaver(m2, "corpus", interval_s=1.0, fraction=0.05, clock=clock2)
    for _ in range(100):
        clock2.t += 0.05
        saver2.store_done()
    assert m2.saves <= 5 + 1 and saver2.unsaved > 0
    saver2.flush()
    assert saver2.unsaved == 0


def test_conversion_saves_manifest_a_bounded_number_of_times(tmp_path, monkeypatch):
    """30 tiny stores: corpus.json is saved 3 times (plan, end of tasks, final statistics),
    not once per store; stores finished but never recorded are adopted on resume."""
    paths = _make_inputs(tmp_path / "in", 30, [20] * 30, genes=12)
    saves: list[int] = []
    save = CorpusManifest.save

    def counting_save(self, corpus_dir):
        saves.append(sum(s.status == "complete" for s in self.stores))
        save(self, corpus_dir)

    monkeypatch.setattr(CorpusManifest, "save", counting_save)
    out = tmp_path / "c"
    m = _convert(paths, out, manifest_save_interval_s=3600)
    assert len(m.stores) == 30 and m.status == "complete"
    assert saves == [0, 30, 30], saves
    # a kill after the stores finished but before corpus.json recorded them: on resume they
    # are adopted (they carry their completion mark), not converted again
    d = json.loads((out / K.CORPUS_MANIFEST).read_text())
    for e in d["stores"][10:]:
        e.update(status="pending", n_cells=None, nnz=None)
    d["status"] = "converting"
    (out / K.CORPUS_MANIFEST).write_text(json.dumps(d))
    converted: list[str] = []
    real = conv.convert_store
    monkeypatch.setattr(conv, "convert_store",
                        lambda t, *a, **kw: converted.append(t.entry.name) or real(t, *a, **kw))
    m2 = _convert(paths, out, manifest_save_interval_s=3600)
    assert converted == [] and m2.status == "complete"
    assert [s.n_cells for s in m2.stores] == [s.n_cells for s in m.stores]
