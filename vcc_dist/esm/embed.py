"""Distributed ESM2 gene embeddings: isoform sequences -> per-gene protein embeddings.

For each gene, every protein isoform goes through ESM2; the chosen layer's per-residue
representations are mean-pooled over residues only (no BOS/EOS/padding), and the gene's
embedding is the mean over its isoforms (how STATE builds ``ESM2_pert_features.pt``).

How it runs (``embed_genes``):

1. The driver parses the FASTA/TSV (``vcc_dist.esm.fasta``), applies the long-sequence rule
   (truncate to 1,022 residues: ``vcc_dist.esm.model.prepare_sequence``), sorts the isoforms by
   length and cuts them into *parts* of ``isoforms_per_part``.
2. A Ray Data pipeline sends the parts to an actor pool (``ActorPoolStrategy``, one model per
   actor, a GPU each when the cluster has GPUs); every actor embeds its part with length-sorted
   token-budget batches and writes ``parts/part-NNNNN.npz`` itself (atomically), returning only
   counts: isoform embeddings never travel to the driver.
3. The driver streams over the part files and reduces isoforms to genes (per-gene sums and
   counts: memory of one part plus the gene table), then writes the outputs.

Resumable: a part file exists only when complete (written to a temporary name, then renamed),
and a rerun with the same inputs, model and layer embeds only the missing parts. A rerun with a
different model, layer or input is refused unless ``overwrite``.

Outputs in ``out/``: ``gene_embeddings.pt`` ({gene: float32 tensor}, the format of STATE's
``ESM2_pert_features.pt``, loadable as ST perturbation features and as the SE gene table),
``gene_embeddings.npz`` (``genes``, ``embeddings`` [G, D], ``n_isoforms``), ``manifest.json``
(model, layer, dims, counts, truncated isoforms, parse report, throughput) and, with a corpus,
``coverage.json`` (which vocabulary genes have an embedding).
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from vcc_dist.data.corpus import load_manifest
from vcc_dist.esm.fasta import read_isoforms
from vcc_dist.esm.model import (
    LONG_SEQUENCE_RULES,
    MAX_RESIDUES,
    count_tokens,
    embed_sequences,
    file_fingerprint,
    load_esm,
    model_info,
    prepare_sequence,
    resolve_layer,
)
from vcc_dist.fileio import atomic_json, atomic_write_bytes
from vcc_dist.models.features import read_gene_table

OUTPUT_PT = "gene_embeddings.pt"
OUTPUT_NPZ = "gene_embeddings.npz"
MANIFEST = "manifest.json"
COVERAGE = "coverage.json"
PARTS = "parts"


class EmbedError(ValueError):
    """Bad input or a run directory that does not match the request; says what to change."""


@dataclass(frozen=True)
class EmbedConfig:
    inputs: str  # protein FASTA (.gz ok) or TSV of gene, isoform, sequence
    model_path: str  # local ESM2 release checkpoint (e.g. esm2_t33_650M_UR50D.pt)
    out: str
    layer: int = -1  # representation layer; -1 = the last
    max_tokens: int = 4096  # tokens per forward pass (length-sorted batches)
    isoforms_per_part: int = 256  # isoforms per Ray task / part file
    num_actors: int = 0  # 0 = one per GPU, or 2 on CPU
    long_sequences: str = "truncate"  # truncate (to 1,022 residues) | error
    input_format: str = "auto"
    on_duplicate: str = "error"
    corpus: str | None = None  # coverage report against this corpus's vocabulary
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.max_tokens < 16:
            raise EmbedError(f"max_tokens={self.max_tokens} is too small (use >= 1024)")
        if self.isoforms_per_part < 1:
            raise EmbedError("isoforms_per_part must be >= 1")
        if self.long_sequences not in LONG_SEQUENCE_RULES:
            raise EmbedError(f"long_sequences={self.long_sequences!r}: use truncate or error")


@dataclass
class EmbedResult:
    out: Path
    n_genes: int
    n_isoforms: int
    embed_dim: int
    parts_total: int
    parts_computed: int  # parts embedded in this run (the rest were resumed)
    tokens: int
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class _EmbedActor:
    """Ray Data actor: one ESM model; embeds a part and writes its file."""

    def __init__(self, model_path: str, layer: int, max_tokens: int, parts_dir: str):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.alphabet = load_esm(model_path)
        self.model = self.model.to(self.device)
        self.layer = layer
        self.max_tokens = max_tokens
        self.parts_dir = Path(parts_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts, counts, tokens, secs = [], [], [], []
        for part, idx, seqs in zip(batch["part"], batch["idx"], batch["seqs"]):
            seqs = [str(s) for s in seqs]
            t = time.perf_counter()
            emb = embed_sequences(self.model, self.alphabet, seqs, layer=self.layer,
                                  max_tokens=self.max_tokens, device=self.device)
            secs.append(time.perf_counter() - t)
            buf = io.BytesIO()
            np.savez(buf, idx=np.asarray(idx, np.int64), embeddings=emb.astype(np.float32))
            atomic_write_bytes(self.parts_dir / f"part-{int(part):05d}.npz", buf.getvalue())
            parts.append(int(part))
            counts.append(len(seqs))
            tokens.append(count_tokens(seqs))
        return {"part": np.array(parts), "n": np.array(counts), "tokens": np.array(tokens),
                "seconds": np.array(secs)}


def _plan_parts(lengths: np.ndarray, per_part: int) -> list[np.ndarray]:
    """Isoform indices, longest first, cut into parts (deterministic for the same input)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + per_part] for i in range(0, order.size, per_part)]


def embed_genes(cfg: EmbedConfig) -> EmbedResult:
    """Run (or resume) the embedding job; see the module docstring."""
    t0 = time.perf_counter()
    if not Path(cfg.inputs).is_file():
        raise EmbedError(f"input {cfg.inputs} does not exist (a protein FASTA or a TSV of "
                         "gene, isoform, sequence)")
    isoforms, report = read_isoforms(cfg.inputs, fmt=cfg.input_format,
                                     on_duplicate=cfg.on_duplicate)
    if not isoforms:
        raise EmbedError(f"{cfg.inputs}: no isoform with a non-empty sequence")
    seqs, truncated = [], []
    for iso in isoforms:
        s, cut = prepare_sequence(iso.sequence, rule=cfg.long_sequences)
        seqs.append(s)
        if cut:
            truncated.append(iso.isoform)
    # the model is loaded once here to check it and describe it; actors load their own copy
    model, alphabet = load_esm(cfg.model_path)
    info = model_info(model, alphabet, cfg.model_path)
    n_layers = info["num_layers"]
    try:
        layer = resolve_layer(cfg.layer, n_layers)
    except ValueError as e:
        raise EmbedError(f"layer={cfg.layer}: the model has layers 0..{n_layers} "
                         f"(-1 = last): {e}") from e
    del model
    key = {"input": file_fingerprint(cfg.inputs), "model": info["sha256"], "layer": layer,
           "long_sequences": cfg.long_sequences, "isoforms_per_part": cfg.isoforms_per_part,
           "n_isoforms": len(isoforms)}
    out = Path(cfg.out)
    parts_dir = out / PARTS
    run_key = out / ".run_key.json"
    if run_key.exists():
        old = json.loads(run_key.read_text())
        if old != key:
            if not cfg.overwrite:
                changed = sorted(k for k in key if old.get(k) != key[k])
                raise EmbedError(f"{out} holds a run with different {changed}; use another "
                                 "--out, or --overwrite to discard it")
            for f in parts_dir.glob("part-*.npz"):
                f.unlink()
    parts_dir.mkdir(parents=True, exist_ok=True)
    atomic_json(run_key, key)

    lengths = np.array([len(s) for s in seqs])
    plan = _plan_parts(lengths, cfg.isoforms_per_part)
    done = {int(f.stem.split("-")[1]) for f in parts_dir.glob("part-*.npz")}
    todo = [k for k in range(len(plan)) if k not in done]
    tokens = int(sum(lengths[plan[k]].sum() + 2 * plan[k].size for k in todo))
    t_embed = time.perf_counter()
    if todo:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        n_actors = cfg.num_actors or (gpus if gpus else max(1, min(2, int(res.get("CPU", 1)))))
        threads = max(1, int(res.get("CPU", 1)) // n_actors) if not gpus else None
        items = [{"part": k, "idx": plan[k].tolist(), "seqs": [seqs[i] for i in plan[k]]}
                 for k in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _EmbedActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
            fn_constructor_kwargs={"model_path": str(Path(cfg.model_path).resolve()),
                                   "layer": layer, "max_tokens": cfg.max_tokens,
                                   "parts_dir": str(parts_dir.resolve())},
            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else threads,
            batch_format="numpy")
        with tqdm(total=len(todo), desc="embedding parts", unit="part",
                  disable=not cfg.progress) as bar:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(len(b["part"]))
    embed_s = time.perf_counter() - t_embed

    # reduce isoforms to genes, one part file at a time
    genes: list[str] = []
    gene_pos: dict[str, int] = {}
    gene_of = np.empty(len(isoforms), np.int64)
    for i, iso in enumerate(isoforms):
        g = gene_pos.setdefault(iso.gene, len(gene_pos))
        if g == len(genes):
            genes.append(iso.gene)
        gene_of[i] = g
    D = int(info["embed_dim"])
    sums = np.zeros((len(genes), D), np.float64)
    n_iso = np.zeros(len(genes), np.int64)
    seen = 0
    for k in range(len(plan)):
        with np.load(parts_dir / f"part-{k:05d}.npz") as z:
            idx, emb = z["idx"], z["embeddings"]
        if not np.array_equal(np.sort(idx), np.sort(plan[k])):
            raise EmbedError(f"{parts_dir}/part-{k:05d}.npz does not match this run's plan; "
                             "rerun with --overwrite")
        np.add.at(sums, gene_of[idx], emb.astype(np.float64))
        np.add.at(n_iso, gene_of[idx], 1)
        seen += idx.size
    table = (sums / n_iso[:, None]).astype(np.float32)
    torch.save({g: torch.from_numpy(table[i].copy()) for i, g in enumerate(genes)},
               out / f".{OUTPUT_PT}.tmp")
    os.replace(out / f".{OUTPUT_PT}.tmp", out / OUTPUT_PT)
    np.savez(out / f".{OUTPUT_NPZ}.tmp.npz", genes=np.array(genes, dtype=str),
             embeddings=table, n_isoforms=n_iso)
    os.replace(out / f".{OUTPUT_NPZ}.tmp.npz", out / OUTPUT_NPZ)
    coverage = None
    if cfg.corpus:
        coverage = coverage_report(genes, cfg.corpus)
        atomic_json(out / COVERAGE, coverage)
    seconds = time.perf_counter() - t0
    manifest = {
        "format": "vcc-dist-gene-embeddings", "format_version": 1,
        "model": {**info, "path": str(cfg.model_path)}, "layer": layer, "embed_dim": D,
        "pooling": "mean over residues (no BOS/EOS/padding), then mean over isoforms",
        "long_sequences": cfg.long_sequences, "max_residues": MAX_RESIDUES,
        "n_genes": len(genes), "n_isoforms": int(seen),
        "isoforms_per_gene": {"min": int(n_iso.min()), "max": int(n_iso.max()),
                              "mean": float(n_iso.mean())},
        "truncated": {"count": len(truncated), "isoforms": truncated[:1000]},
        "parse_report": report.to_dict(), "input": str(cfg.inputs),
        "parts": {"total": len(plan), "computed_this_run": len(todo)},
        "timing": {"embed_seconds": round(embed_s, 2), "tokens_this_run": tokens,
                   "tokens_per_s": round(tokens / embed_s, 1) if todo and embed_s else None,
                   "total_seconds": round(seconds, 2)},
        "coverage": None if coverage is None else {k: coverage[k] for k in
                                                   ("vocabulary", "covered", "fraction")},
        "outputs": {"pt": OUTPUT_PT, "npz": OUTPUT_NPZ},
    }
    atomic_json(out / MANIFEST, manifest)
    return EmbedResult(out, len(genes), int(seen), D, len(plan), len(todo), tokens, embed_s,
                       manifest)


def coverage_report(genes: list[str], corpus_dir: str) -> dict[str, Any]:
    """Which genes of a corpus vocabulary have an embedding (and which embeddings have no
    gene in the corpus)."""
    vocab = load_manifest(corpus_dir).genes
    have = set(genes)
    missing = [g for g in vocab if g not in have]
    extra = sorted(have - set(vocab))
    return {"corpus": str(corpus_dir), "vocabulary": len(vocab),
            "covered": len(vocab) - len(missing),
            "fraction": round((len(vocab) - len(missing)) / max(len(vocab), 1), 6),
            "missing": missing, "not_in_vocabulary": extra}


def load_gene_embeddings(path: str | os.PathLike, genes: list[str] | None = None,
                         ) -> tuple[list[str], np.ndarray]:
    """(genes, [G, D] float32) from ``gene_embeddings.pt`` (or any STATE-format
    ``{gene: vector}`` file); with ``genes``, rows in that order and a clear error listing
    genes that have no embedding."""
    try:
        d = read_gene_table(path)
    except ValueError as e:
        raise EmbedError(str(e)) from e
    names = list(d) if genes is None else list(genes)
    missing = [g for g in names if g not in d]
    if missing:
        raise EmbedError(f"{len(missing)} of {len(names)} genes have no embedding in {path}, "
                         f"e.g. {missing[:10]}")
    return names, np.stack([np.asarray(d[g], np.float32) for g in names])


__all__ = [
    "EmbedConfig",
    "EmbedError",
    "EmbedResult",
    "coverage_report",
    "embed_genes",
    "load_gene_embeddings",
]
