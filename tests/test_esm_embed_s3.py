"""The gene-embedding job with its input, model, corpus and outputs on object storage (an S3
server, moto, on loopback) and a local Ray cluster whose workers inherit the AWS variables: the
same embeddings as a local run, outputs only in the bucket, resume from the parts in the bucket,
the Ray nodes that computed the parts recorded, clear errors for missing buckets and objects;
the per-host model cache (integration tier)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.s3server import moto_s3
from vcc_dist import storage
from vcc_dist.data.corpus import CorpusManifest
from vcc_dist.esm.embed import (
    EmbedConfig,
    EmbedError,
    embed_genes,
    local_copy,
    object_fingerprint,
)
from vcc_dist.esm.model import file_fingerprint, save_tiny_esm2

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "vcc-esm"
RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
CORPUS_GENES = [f"G{i}" for i in range(0, 12, 2)] + ["NOT_EMBEDDED"]


@pytest.fixture(scope="module")
def s3_ray(tmp_path_factory):
    """moto + the AWS variables, then a local Ray cluster whose workers inherit them; the
    scratch directory (local copies of remote inputs, the model cache) in a temp directory."""
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
def inputs(s3_ray, tmp_path_factory):
    """A FASTA of 12 genes with 1-3 isoforms, a tiny ESM2 and a corpus manifest, locally and
    uploaded to the bucket; returns (local dict, s3 dict)."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    lines = []
    for g in range(12):
        for i in range(1 + g % 3):
            seq = "".join(rng.choice(list(RESIDUES), size=int(rng.integers(15, 90))))
            lines += [f">G{g}|G{g}-{i}", seq]
    fasta = root / "proteins.fa"
    fasta.write_text("\n".join(lines) + "\n")
    model = save_tiny_esm2(root / "esm", num_layers=2, embed_dim=32, attention_heads=4, seed=0)
    corpus = CorpusManifest(genes=CORPUS_GENES, gene_ids=[None] * len(CORPUS_GENES), stores=[],
                            options={}, status="complete")
    corpus.save(root)
    base = f"s3://{BUCKET}/in"
    storage.write_bytes(f"{base}/proteins.fa", fasta.read_bytes())
    storage.upload_dir(root / "esm", f"{base}/esm")
    corpus.save(f"{base}/corpus")
    local = {"fasta": str(fasta), "model": str(model), "corpus": str(root)}
    remote = {"fasta": f"{base}/proteins.fa", "model": f"{base}/esm/{model.name}",
              "corpus": f"{base}/corpus"}
    return local, remote


def _job(name: str):
    """A job script as a module (jobs/ on sys.path for its _bootstrap import)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if str(ROOT / "jobs") in sys.path:
            sys.path.remove(str(ROOT / "jobs"))
    return mod


def _cfg(fasta: str, model: str, out: str, **kw) -> EmbedConfig:
    return EmbedConfig(inputs=fasta, model_path=model, out=out, isoforms_per_part=6,
                       num_actors=2, max_tokens=512, progress=False, **kw)


def _table(out: str) -> dict[str, np.ndarray]:
    d = torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "gene_embeddings.pt"))))
    return {g: t.numpy() for g, t in d.items()}


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory):
    local, _ = inputs
    out = tmp_path_factory.mktemp("local") / "emb"
    embed_genes(_cfg(local["fasta"], local["model"], str(out), corpus=local["corpus"]))
    return out


@pytest.fixture(scope="module")
def s3_run(s3_ray, inputs, tmp_path_factory):
    _, remote = inputs
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)  # a local directory named after the URI would appear here
    try:
        out = f"s3://{BUCKET}/runs/esm"
        cfg = _cfg(remote["fasta"], remote["model"], out, corpus=remote["corpus"])
        r = embed_genes(cfg)
    finally:
        os.chdir(old)
    return cfg, r, cwd


def test_s3_run_equals_local_run_and_writes_only_to_the_bucket(s3_ray, inputs, local_run,
                                                               s3_run):
    import ray

    _, remote = inputs
    cfg, r, cwd = s3_run
    out = cfg.out
    assert r.out == out and r.parts_computed == r.parts_total >= 3
    ref = _table(str(local_run))
    got = _table(out)
    assert list(got) == list(ref)
    for g in ref:
        np.testing.assert_array_equal(got[g], ref[g])
    z = np.load(io.BytesIO(storage.read_bytes(storage.join(out, "gene_embeddings.npz"))))
    assert list(z["genes"]) == list(ref) and z["embeddings"].shape == (12, 32)

    names = storage.listdir(out)
    assert {"gene_embeddings.pt", "gene_embeddings.npz", "manifest.json", "coverage.json",
            ".run_key.json", "parts"} <= set(names)
    parts = storage.listdir(storage.join(out, "parts"))
    assert parts == [f"part-{k:05d}.npz" for k in range(r.parts_total)]
    # nothing of the outputs stays on local disk: not in the working directory, not in scratch
    assert list(cwd.iterdir()) == []
    local_files = [p.name for p in s3_ray.rglob("*") if p.is_file()]
    assert not [n for n in local_files if n.startswith(("part-", "gene_embeddings", "manifest"))]
    # the model and the FASTA were downloaded into the scratch cache, keyed by their URIs
    assert storage.scratch_dir(remote["model"]).is_file()
    assert storage.scratch_dir(remote["fasta"]).is_file()

    man = storage.read_json(storage.join(out, "manifest.json"))
    assert man["node_ids"] == [ray.get_runtime_context().get_node_id()]
    prov = man["parts"]["provenance"]
    assert [p["part"] for p in prov] == list(range(r.parts_total))
    assert all(p["this_run"] and p["node_id"] and p["host"] and p["pid"] for p in prov)
    assert man["input"] == remote["fasta"] and man["model"]["path"] == remote["model"]
    assert man["parse_report"]["path"] == remote["fasta"]
    local_man = json.loads((local_run / "manifest.json").read_text())
    assert man["model"]["sha256"] == local_man["model"]["sha256"]
    cov = storage.read_json(storage.join(out, "coverage.json"))
    assert cov["vocabulary"] == len(CORPUS_GENES) and cov["covered"] == len(CORPUS_GENES) - 1
    assert cov["missing"] == ["NOT_EMBEDDED"] and cov["corpus"] == remote["corpus"]


def test_s3_rerun_resumes_from_the_parts_in_the_bucket(s3_run):
    cfg, first, _ = s3_run
    before = _table(cfg.out)
    r = embed_genes(cfg)
    assert r.parts_computed == 0 and r.manifest["node_ids"] == []
    # a killed run: the commit point (manifest.json) and one part never made it
    storage.delete_tree(storage.join(cfg.out, "manifest.json"))
    storage.delete_tree(storage.join(cfg.out, "parts", "part-00001.npz"))
    assert not storage.exists(storage.join(cfg.out, "manifest.json"))
    r2 = embed_genes(cfg)
    assert r2.parts_computed == 1 and r2.parts_total == first.parts_total
    man = storage.read_json(storage.join(cfg.out, "manifest.json"))
    assert [p["part"] for p in man["parts"]["provenance"] if p["this_run"]] == [1]
    assert len(man["node_ids"]) == 1
    after = _table(cfg.out)
    assert list(after) == list(before)
    for g in before:
        np.testing.assert_allclose(after[g], before[g], rtol=1e-6, atol=1e-7)
    # another layer in the same prefix is refused, unless overwrite (parts discarded)
    other = EmbedConfig(**{**cfg.__dict__, "layer": 1})
    with pytest.raises(EmbedError, match="different"):
        embed_genes(other)


def test_missing_buckets_and_objects_are_clear_errors(s3_ray, inputs, tmp_path, capsys):
    local, remote = inputs
    out = str(tmp_path / "o")
    with pytest.raises(EmbedError, match="bucket 'no-such-bucket' does not exist.*create it"):
        embed_genes(_cfg(remote["fasta"], remote["model"], "s3://no-such-bucket/emb"))
    with pytest.raises(EmbedError, match="input s3://no-such-bucket/p.fa: bucket"):
        embed_genes(_cfg("s3://no-such-bucket/p.fa", remote["model"], out))
    with pytest.raises(EmbedError, match="input .*missing.fa does not exist"):
        embed_genes(_cfg(f"s3://{BUCKET}/in/missing.fa", remote["model"], out))
    missing = f"s3://{BUCKET}/in/esm/esm2_t6_8M_UR50D.pt"
    with pytest.raises(EmbedError, match=f"ESM checkpoint {missing} does not exist. Upload"):
        embed_genes(_cfg(remote["fasta"], missing, out))
    # a checkpoint without its contact-regression object beside it
    lone = f"s3://{BUCKET}/lone/{Path(local['model']).name}"
    storage.write_bytes(lone, Path(local["model"]).read_bytes())
    with pytest.raises(EmbedError, match="contact-regression object .* is missing"):
        embed_genes(_cfg(remote["fasta"], lone, out))
    with pytest.raises(EmbedError, match="--corpus s3://no-such-bucket/c: bucket"):
        embed_genes(_cfg(remote["fasta"], remote["model"], out,
                         corpus="s3://no-such-bucket/c"))
    with pytest.raises(EmbedError, match="is not a corpus"):
        embed_genes(_cfg(remote["fasta"], remote["model"], out, corpus=f"s3://{BUCKET}/nope"))
    # the job prints the message, no traceback
    job = _job("embed_genes")
    assert job.main(["--fasta", remote["fasta"], "--model", remote["model"], "--out",
                     "s3://no-such-bucket/emb", "--no-progress"]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err


def test_model_cache_downloads_once_per_host_and_refreshes_stale_copies(s3_ray, monkeypatch,
                                                                        tmp_path):
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)  # > 2 MiB: ranged fingerprint
    (tmp_path / "big.pt").write_bytes(data)
    uri = f"s3://{BUCKET}/cache/big.pt"
    storage.write_bytes(uri, data)
    want = file_fingerprint(tmp_path / "big.pt")
    assert object_fingerprint(uri) == want
    calls = []
    download = storage.download_file

    def counting(src, dst, options=None):
        calls.append(src)
        download(src, dst, options)

    monkeypatch.setattr(storage, "download_file", counting)
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(local_copy(uri, want)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(got)) == 1 and got[0].read_bytes() == data
    assert got[0] == storage.scratch_dir(uri)
    assert not [p for p in got[0].parent.iterdir() if p.name.endswith(".download")]
    got[0].write_bytes(b"stale")  # another object once at this URI
    assert local_copy(uri).read_bytes() == data and len(calls) == 2
    with pytest.raises(EmbedError, match="changed during the run"):
        local_copy(f"s3://{BUCKET}/cache/big.pt", "0" * 64)
