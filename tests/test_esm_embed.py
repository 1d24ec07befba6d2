"""The distributed gene-embedding job on a local Ray cluster with 2 actors, against a plain
single-process fair-esm loop on the same tiny model; resume; outputs (integration tier)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vcc_dist.esm.embed import (
    EmbedConfig,
    EmbedError,
    embed_genes,
    load_gene_embeddings,
)
from vcc_dist.esm.fasta import read_isoforms
from vcc_dist.esm.model import MAX_RESIDUES, load_esm, save_tiny_esm2

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_esm2(tmp_path_factory.mktemp("esm"), num_layers=2, embed_dim=32,
                          attention_heads=4, seed=0)


def _plain_loop(model_path, fasta, layer):
    """Reference: fair-esm one isoform at a time, mean over residues, mean over isoforms."""
    model, alphabet = load_esm(model_path)
    conv = alphabet.get_batch_converter()
    isos, _ = read_isoforms(fasta)
    per_gene: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for iso in isos:
            seq = iso.sequence[:MAX_RESIDUES]
            _, _, toks = conv([(iso.isoform, seq)])
            rep = model(toks, repr_layers=[layer])["representations"][layer]
            per_gene.setdefault(iso.gene, []).append(rep[0, 1:len(seq) + 1].mean(0).numpy())
    return {g: np.mean(v, axis=0) for g, v in per_gene.items()}


def test_job_equals_plain_fair_esm_loop_and_resumes(ray_local, tiny_corpus, tiny_model,
                                                    tmp_path):
    sim, corpus = tiny_corpus
    out = tmp_path / "emb"
    cfg = EmbedConfig(inputs=str(sim.fasta_path), model_path=str(tiny_model), out=str(out),
                      isoforms_per_part=40, num_actors=2, max_tokens=2048,
                      corpus=str(corpus), progress=False)
    r = embed_genes(cfg)
    assert r.parts_computed == r.parts_total > 2
    ref = _plain_loop(tiny_model, sim.fasta_path, 2)
    genes, table = load_gene_embeddings(out / "gene_embeddings.pt")
    assert sorted(genes) == sorted(ref)
    for g, row in zip(genes, table):
        np.testing.assert_allclose(row, ref[g], rtol=1e-4, atol=1e-5)
    z = np.load(out / "gene_embeddings.npz")
    assert list(z["genes"]) == genes and z["embeddings"].shape == (len(genes), 32)
    isos, _ = read_isoforms(sim.fasta_path)
    assert int(z["n_isoforms"].sum()) == len(isos) == r.n_isoforms
    # the file is STATE's pert-features format: the ridge baseline's loader reads it as is
    from vcc_dist.infer.baselines import load_pert_features

    feats = load_pert_features(out / "gene_embeddings.pt")
    assert set(feats) == set(genes) and next(iter(feats.values())).shape == (32,)
    man = json.loads((out / "manifest.json").read_text())
    assert man["embed_dim"] == 32 and man["layer"] == 2 and man["model"]["num_layers"] == 2
    cov = json.loads((out / "coverage.json").read_text())
    assert cov["vocabulary"] == 200 and cov["covered"] == len(set(genes) & set(
        json.loads((Path(corpus) / "corpus.json").read_text())["genes"]))

    # a killed run: two parts missing and a half-written temp file left behind
    parts = sorted((out / "parts").glob("part-*.npz"))
    for p in parts[:2]:
        p.unlink()
    (out / "parts" / ".part-00000.npz.123.tmp").write_bytes(b"partial")
    r2 = embed_genes(cfg)
    assert r2.parts_computed == 2
    genes2, table2 = load_gene_embeddings(out / "gene_embeddings.pt")
    assert genes2 == genes
    np.testing.assert_allclose(table2, table, rtol=1e-6)
    # a rerun with nothing missing embeds nothing
    assert embed_genes(cfg).parts_computed == 0

    # another layer in the same directory is refused, unless --overwrite
    other = EmbedConfig(**{**cfg.__dict__, "layer": 1})
    with pytest.raises(EmbedError, match="different"):
        embed_genes(other)
    r3 = embed_genes(EmbedConfig(**{**other.__dict__, "overwrite": True}))
    assert r3.parts_computed == r3.parts_total and r3.manifest["layer"] == 1


def test_gene_table_lookup_errors(tmp_path):
    torch.save({"A": torch.ones(3), "B": torch.zeros(3)}, tmp_path / "e.pt")
    names, t = load_gene_embeddings(tmp_path / "e.pt", ["B", "A"])
    assert names == ["B", "A"] and t[1].tolist() == [1, 1, 1]
    with pytest.raises(EmbedError, match="1 of 3 genes have no embedding"):
        load_gene_embeddings(tmp_path / "e.pt", ["A", "B", "C"])


def test_job_cli(tiny_corpus, tmp_path):
    sim, corpus = tiny_corpus
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "embed_genes.py"),
                        "--fasta", str(sim.fasta_path), "--tiny-model", str(tmp_path / "m"),
                        "--out", str(tmp_path / "o"), "--num-cpus", "2", "--no-progress",
                        "--corpus", str(corpus)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "genes from" in p.stdout and "coverage:" in p.stdout
    assert (tmp_path / "o" / "gene_embeddings.pt").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "embed_genes.py"),
                          "--fasta", str(tmp_path / "nope.fa"), "--model", str(tmp_path / "x.pt"),
                          "--out", str(tmp_path / "o2")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
