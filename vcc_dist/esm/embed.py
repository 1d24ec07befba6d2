"""Distributed ESM2 gene embeddings: isoform sequences -> per-gene protein embeddings.

For each gene, every protein isoform goes through ESM2; the chosen layer's per-residue
representations are mean-pooled over residues only (no BOS/EOS/padding), and the gene's
embedding is the mean over its isoforms (how STATE builds ``ESM2_pert_features.pt``).

How it runs (``embed_genes``):

1. The driver parses the FASTA/TSV (``vcc_dist.esm.fasta``), applies the long-sequence rule
   (truncate to 1,022 residues: ``vcc_dist.esm.model.prepare_sequence``), sorts the isoforms by
   length and cuts them into *parts* of ``isoforms_per_part``.
2. A Ray Data pipeline sends the parts to an actor pool (``ActorPoolStrategy``, one model per
   actor, a GPU each when the cluster has GPUs, spread over the cluster's nodes); every actor
   embeds its part with length-sorted token-budget batches and writes ``parts/part-NNNNN.npz``
   itself (atomically), returning only counts: isoform embeddings never travel to the driver.
   A part records who computed it (Ray node id, IP, host, pid).
3. The driver streams over the part files and reduces isoforms to genes (per-gene sums and
   counts: memory of one part plus the gene table), then writes the outputs.

Object storage: the input, the model, the corpus and ``out`` may each be ``s3://bucket/key``
(endpoint and credentials from the AWS variables, see vcc_dist.storage), and the hosts need
share no file system. Remote inputs are downloaded into the local scratch directory
(``$VCC_DIST_SCRATCH``, vcc_dist.storage.scratch_dir); each actor downloads the model (and its
``-contact-regression.pt`` beside it) on its own host, once per host (a file lock, a temporary
name renamed when complete, reused while its fingerprint matches the object's). Parts are
uploaded by the actors as whole objects (one PUT); the final outputs are written to a local
staging directory and uploaded with ``manifest.json`` last.

Resumable: a part file exists only when complete (locally a temporary name renamed; on S3 one
PUT), and a rerun with the same inputs, model and layer embeds only the missing parts (the run
key ``.run_key.json`` lives in ``out``). A rerun with a different model, layer or input is
refused unless ``overwrite``. ``manifest.json`` is written last: it is the commit point of a
finished run.

Outputs in ``out/``: ``gene_embeddings.pt`` ({gene: float32 tensor}, the format of STATE's
``ESM2_pert_features.pt``, loadable as ST perturbation features and as the SE gene table),
``gene_embeddings.npz`` (``genes``, ``embeddings`` [G, D], ``n_isoforms``), ``manifest.json``
(model, layer, dims, counts, truncated isoforms, parse report, throughput, the Ray nodes that
computed parts) and, with a corpus, ``coverage.json`` (which vocabulary genes have an
embedding).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from vcc_dist import storage
from vcc_dist.data.corpus import CorpusError, load_manifest
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
from vcc_dist.fileio import atomic_json
from vcc_dist.models.features import read_gene_table
from vcc_dist.provenance import process_provenance

OUTPUT_PT = "gene_embeddings.pt"
OUTPUT_NPZ = "gene_embeddings.npz"
MANIFEST = "manifest.json"
COVERAGE = "coverage.json"
PARTS = "parts"
RUN_KEY = ".run_key.json"
#: a complete part file's name (temporary files start with a dot)
PART_NAME = re.compile(r"^part-(\d+)\.npz$")
#: bytes read from each end of a file by the fingerprint (as vcc_dist.esm.model.file_fingerprint)
FINGERPRINT_BLOCK = 1 << 20


class EmbedError(ValueError):
    """Bad input or a run directory that does not match the request; says what to change."""


@dataclass(frozen=True)
class EmbedConfig:
    inputs: str  # protein FASTA (.gz ok) or TSV of gene, isoform, sequence; local or s3://
    model_path: str  # ESM2 release checkpoint (e.g. esm2_t33_650M_UR50D.pt); local or s3://
    out: str  # local directory or s3://bucket/prefix
    layer: int = -1  # representation layer; -1 = the last
    max_tokens: int = 4096  # tokens per forward pass (length-sorted batches)
    isoforms_per_part: int = 256  # isoforms per Ray task / part file
    num_actors: int = 0  # 0 = one per GPU, or 2 on CPU
    long_sequences: str = "truncate"  # truncate (to 1,022 residues) | error
    input_format: str = "auto"
    on_duplicate: str = "error"
    corpus: str | None = None  # coverage report against this corpus's vocabulary (or s3://)
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
    out: Path | str  # a local directory, or the s3:// prefix
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


# ------------------------------------------------------------------------- remote locations


def object_fingerprint(uri: storage.Location) -> str:
    """``file_fingerprint`` of a local file or an s3 object, the latter from two ranged reads:
    tells whether a cached local copy of a multi-GB checkpoint is still the object's."""
    if not storage.is_remote(uri):
        return file_fingerprint(uri)
    size = storage.file_size(uri)
    h = hashlib.sha256(str(size).encode())
    if size <= 2 * FINGERPRINT_BLOCK:
        h.update(storage.read_bytes(uri))
    else:
        h.update(storage.read_range(uri, 0, FINGERPRINT_BLOCK))
        h.update(storage.read_range(uri, size - FINGERPRINT_BLOCK, size))
    return h.hexdigest()


def local_copy(uri: storage.Location, fingerprint: str | None = None) -> Path:
    """A local path holding ``uri``: the path itself, or for an s3 object a copy in this
    host's scratch (vcc_dist.storage.scratch_dir, keyed by the URI). The copy is made under a
    file lock (actors sharing a host download it once), to a temporary name renamed when
    complete, and reused while its fingerprint is ``fingerprint`` (default: the object's)."""
    if not storage.is_remote(uri):
        return Path(uri)
    dest = storage.scratch_dir(str(uri))
    dest.parent.mkdir(parents=True, exist_ok=True)
    want = fingerprint or object_fingerprint(uri)
    with open(dest.parent / f".{dest.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if dest.is_file() and file_fingerprint(dest) == want:
            return dest
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.download")
        try:
            storage.download_file(uri, tmp)
            got = file_fingerprint(tmp)
            if got != want:
                raise EmbedError(f"{uri} changed during the run (its fingerprint differs from "
                                 "the one the driver checked); run the command again")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _check_bucket(uri: storage.Location, what: str) -> None:
    """A clear error for a remote location whose bucket does not exist."""
    if storage.is_remote(uri) and not storage.bucket_exists(uri):
        bucket = storage.split_s3(str(uri))[0]
        raise EmbedError(f"{what} {uri}: bucket {bucket!r} does not exist "
                         f"({storage.S3Options.from_env().describe()}); create it, fix the URI, "
                         "or set AWS_ENDPOINT_URL to the object store that holds it")


def _regression_uri(model_uri: str) -> str:
    """Where fair-esm expects the contact-regression weights beside a remote checkpoint (the
    rule of vcc_dist.esm.model.regression_path)."""
    name = storage.basename(model_uri)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return str(storage.join(storage.parent(model_uri), f"{stem}-contact-regression.pt"))


def model_objects(model_uri: str) -> dict[str, str]:
    """{location: fingerprint} of the files an actor needs to load the model, checkpoint
    first: the checkpoint alone when local (load_esm checks its regression file), for an s3
    checkpoint also its ``-contact-regression.pt`` (except ESM-1v and ESM-IF, as fair-esm).
    Missing objects are an EmbedError naming the fix."""
    if not storage.is_remote(model_uri):
        return {str(Path(model_uri).expanduser().resolve()): ""}
    _check_bucket(model_uri, "--model")
    name = storage.basename(model_uri)
    reg = _regression_uri(model_uri)
    if not storage.exists(model_uri):
        raise EmbedError(f"ESM checkpoint {model_uri} does not exist. Upload the release file "
                         f"(e.g. esm2_t33_650M_UR50D.pt) and its contact-regression file (e.g. "
                         f"esm2_t33_650M_UR50D-contact-regression.pt) side by side under "
                         f"{storage.parent(model_uri)} and pass the URI of the first")
    files = [model_uri]
    if not ("esm1v" in name or "esm_if" in name):
        if not storage.exists(reg):
            raise EmbedError(f"contact-regression object {reg} is missing: fair-esm loads it "
                             f"together with {name}. Upload it beside the checkpoint (it comes "
                             "with the release)")
        files.append(reg)
    return {u: object_fingerprint(u) for u in files}


def fetch_model(objects: dict[str, str]) -> Path:
    """The local checkpoint path for ``model_objects``'s files, downloaded on this host."""
    paths = [local_copy(u, fp or None) for u, fp in reversed(objects.items())]
    return paths[-1]


def _done_parts(parts_dir: storage.Location) -> set[int]:
    """Indices of the complete part files/objects under ``parts_dir``."""
    try:
        names = storage.listdir(parts_dir)
    except FileNotFoundError:
        return set()
    return {int(m.group(1)) for m in map(PART_NAME.match, names) if m}


def _part_name(k: int) -> str:
    return f"part-{k:05d}.npz"


class _EmbedActor:
    """Ray Data actor: one ESM model; embeds a part and writes its file (or object)."""

    def __init__(self, model_objects: dict[str, str], layer: int, max_tokens: int,
                 parts_dir: str):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.alphabet = load_esm(fetch_model(model_objects))
        self.model = self.model.to(self.device)
        self.layer = layer
        self.max_tokens = max_tokens
        self.parts_dir = parts_dir
        self.provenance = process_provenance()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts, counts, tokens, secs = [], [], [], []
        for part, idx, seqs in zip(batch["part"], batch["idx"], batch["seqs"]):
            seqs = [str(s) for s in seqs]
            t = time.perf_counter()
            emb = embed_sequences(self.model, self.alphabet, seqs, layer=self.layer,
                                  max_tokens=self.max_tokens, device=self.device)
            secs.append(time.perf_counter() - t)
            buf = io.BytesIO()
            np.savez(buf, idx=np.asarray(idx, np.int64), embeddings=emb.astype(np.float32),
                     provenance=np.array(json.dumps(self.provenance)))
            # atomic: locally a temporary file renamed, on S3 one whole-object PUT
            storage.write_bytes(storage.join(self.parts_dir, _part_name(int(part))),
                                buf.getvalue())
            parts.append(int(part))
            counts.append(len(seqs))
            tokens.append(count_tokens(seqs))
        n = len(parts)
        return {"part": np.array(parts), "n": np.array(counts), "tokens": np.array(tokens),
                "seconds": np.array(secs),
                "node_id": np.array([str(self.provenance["node_id"])] * n)}


def _plan_parts(lengths: np.ndarray, per_part: int) -> list[np.ndarray]:
    """Isoform indices, longest first, cut into parts (deterministic for the same input)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + per_part] for i in range(0, order.size, per_part)]


def _actor_resources(num_actors: int, n_parts: int) -> tuple[int, int, int]:
    """(actors, GPUs, CPUs) per actor: one actor per GPU or 2 on CPU, no more than parts to
    embed (each actor loads the model), and CPUs per actor that fit the smallest node (a
    per-actor share of the whole cluster may fit no single host)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    n = num_actors or (gpus if gpus else max(1, min(2, int(res.get("CPU", 1)))))
    n = max(1, min(n, n_parts))
    if gpus:
        return n, 1, 0
    node_cpus = [int(nd["Resources"].get("CPU", 0)) for nd in ray.nodes()
                 if nd.get("Alive") and nd["Resources"].get("CPU", 0) >= 1]
    threads = max(1, int(res.get("CPU", 1)) // n)
    if node_cpus:
        threads = max(1, min(threads, min(node_cpus)))
    return n, 0, threads


def embed_genes(cfg: EmbedConfig) -> EmbedResult:
    """Run (or resume) the embedding job; see the module docstring."""
    t0 = time.perf_counter()
    remote_out = storage.is_remote(cfg.out)
    _check_bucket(cfg.out, "--out")
    _check_bucket(cfg.inputs, "input")
    if not storage.exists(cfg.inputs) or (not storage.is_remote(cfg.inputs)
                                          and not Path(cfg.inputs).is_file()):
        raise EmbedError(f"input {cfg.inputs} does not exist (a protein FASTA or a TSV of "
                         "gene, isoform, sequence)")
    vocab = _corpus_genes(cfg.corpus) if cfg.corpus else None  # fail before the work
    input_path = local_copy(cfg.inputs)
    isoforms, report = read_isoforms(input_path, fmt=cfg.input_format,
                                     on_duplicate=cfg.on_duplicate)
    report.path = str(cfg.inputs)  # the input, not its local copy
    if not isoforms:
        raise EmbedError(f"{cfg.inputs}: no isoform with a non-empty sequence")
    seqs, truncated = [], []
    for iso in isoforms:
        s, cut = prepare_sequence(iso.sequence, rule=cfg.long_sequences)
        seqs.append(s)
        if cut:
            truncated.append(iso.isoform)
    # the model is loaded once here to check it and describe it; actors load their own copy
    objects = model_objects(cfg.model_path)
    model_path = fetch_model(objects)
    model, alphabet = load_esm(model_path)
    info = model_info(model, alphabet, model_path)
    n_layers = info["num_layers"]
    try:
        layer = resolve_layer(cfg.layer, n_layers)
    except ValueError as e:
        raise EmbedError(f"layer={cfg.layer}: the model has layers 0..{n_layers} "
                         f"(-1 = last): {e}") from e
    del model
    key = {"input": file_fingerprint(input_path), "model": info["sha256"], "layer": layer,
           "long_sequences": cfg.long_sequences, "isoforms_per_part": cfg.isoforms_per_part,
           "n_isoforms": len(isoforms)}
    out: Path | str = cfg.out if remote_out else Path(cfg.out)
    parts_dir = storage.join(out, PARTS)
    run_key = storage.join(out, RUN_KEY)
    try:
        old = storage.read_json(run_key)
    except FileNotFoundError:
        old = None
    if old is not None and old != key:
        if not cfg.overwrite:
            changed = sorted(k for k in key if old.get(k) != key[k])
            raise EmbedError(f"{out} holds a run with different {changed}; use another "
                             "--out, or --overwrite to discard it")
        _discard_run(out)
    if not remote_out:
        Path(parts_dir).mkdir(parents=True, exist_ok=True)
    storage.write_json(run_key, key)

    lengths = np.array([len(s) for s in seqs])
    plan = _plan_parts(lengths, cfg.isoforms_per_part)
    done = _done_parts(parts_dir)
    todo = [k for k in range(len(plan)) if k not in done]
    tokens = int(sum(lengths[plan[k]].sum() + 2 * plan[k].size for k in todo))
    t_embed = time.perf_counter()
    if todo:
        n_actors, gpus, threads = _actor_resources(cfg.num_actors, len(todo))
        items = [{"part": k, "idx": plan[k].tolist(), "seqs": [seqs[i] for i in plan[k]]}
                 for k in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _EmbedActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
            fn_constructor_kwargs={"model_objects": objects, "layer": layer,
                                   "max_tokens": cfg.max_tokens,
                                   "parts_dir": storage.resolved(parts_dir)},
            num_gpus=gpus, num_cpus=threads, batch_format="numpy",
            # actors on every node, not packed onto one: hosts share no file system, the
            # parts go to ``out`` from wherever they were computed
            scheduling_strategy="SPREAD")
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
    computed = set(todo)
    part_prov: list[dict[str, Any]] = []
    for k in range(len(plan)):
        path = storage.join(parts_dir, _part_name(k))
        try:
            raw = storage.read_bytes(path)
        except FileNotFoundError:
            raise EmbedError(f"{path} is missing after the embedding step (deleted while the "
                             "job ran?); run the command again to recompute it") from None
        with np.load(io.BytesIO(raw)) as z:
            idx, emb = z["idx"], z["embeddings"]
            prov = json.loads(str(z["provenance"])) if "provenance" in z.files else {}
        if not np.array_equal(np.sort(idx), np.sort(plan[k])):
            raise EmbedError(f"{path} does not match this run's plan; rerun with --overwrite")
        np.add.at(sums, gene_of[idx], emb.astype(np.float64))
        np.add.at(n_iso, gene_of[idx], 1)
        seen += idx.size
        part_prov.append({"part": k, "this_run": k in computed, **prov})
    node_ids = sorted({p["node_id"] for p in part_prov
                       if p["this_run"] and p.get("node_id")})
    table = (sums / n_iso[:, None]).astype(np.float32)

    # outputs: written in place locally; for s3 into a local staging directory, then uploaded
    # with manifest.json (the commit point) last
    if remote_out:
        scratch = storage.scratch_dir(str(out))
        scratch.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".outputs-", dir=scratch))
    else:
        stage = Path(out)
    try:
        torch.save({g: torch.from_numpy(table[i].copy()) for i, g in enumerate(genes)},
                   stage / f".{OUTPUT_PT}.tmp")
        os.replace(stage / f".{OUTPUT_PT}.tmp", stage / OUTPUT_PT)
        np.savez(stage / f".{OUTPUT_NPZ}.tmp.npz", genes=np.array(genes, dtype=str),
                 embeddings=table, n_isoforms=n_iso)
        os.replace(stage / f".{OUTPUT_NPZ}.tmp.npz", stage / OUTPUT_NPZ)
        coverage = None
        if cfg.corpus:
            coverage = coverage_report(genes, cfg.corpus, vocab)
            atomic_json(stage / COVERAGE, coverage)
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
            "parts": {"total": len(plan), "computed_this_run": len(todo),
                      "provenance": part_prov},
            # the Ray nodes that computed this run's parts (empty when everything resumed)
            "node_ids": node_ids,
            "timing": {"embed_seconds": round(embed_s, 2), "tokens_this_run": tokens,
                       "tokens_per_s": round(tokens / embed_s, 1) if todo and embed_s else None,
                       "total_seconds": round(seconds, 2)},
            "coverage": None if coverage is None else {k: coverage[k] for k in
                                                       ("vocabulary", "covered", "fraction")},
            "outputs": {"pt": OUTPUT_PT, "npz": OUTPUT_NPZ},
        }
        atomic_json(stage / MANIFEST, manifest)
        if remote_out:
            storage.upload_dir_last(stage, str(out), MANIFEST)
    finally:
        if remote_out:
            shutil.rmtree(stage, ignore_errors=True)
    return EmbedResult(out, len(genes), int(seen), D, len(plan), len(todo), tokens, embed_s,
                       manifest)


def _discard_run(out: Path | str) -> None:
    """Remove a previous run's parts and its manifest (the commit point of its outputs)."""
    if storage.is_remote(out):
        storage.delete_tree(storage.join(out, PARTS))
        storage.delete_tree(storage.join(out, MANIFEST))
        return
    for f in (Path(out) / PARTS).glob("part-*.npz"):
        f.unlink()
    (Path(out) / MANIFEST).unlink(missing_ok=True)


def _corpus_genes(corpus_dir: str) -> list[str]:
    """The vocabulary of a corpus (local or s3), as an EmbedError naming the fix when it
    cannot be read."""
    _check_bucket(corpus_dir, "--corpus")
    try:
        return load_manifest(corpus_dir).genes
    except CorpusError as e:
        raise EmbedError(f"--corpus {corpus_dir}: {e}") from e


def coverage_report(genes: list[str], corpus_dir: str, vocab: list[str] | None = None,
                    ) -> dict[str, Any]:
    """Which genes of a corpus vocabulary have an embedding (and which embeddings have no
    gene in the corpus). ``corpus_dir``: local or s3://; ``vocab``: its genes, when already
    read."""
    vocab = _corpus_genes(corpus_dir) if vocab is None else vocab
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
    "fetch_model",
    "load_gene_embeddings",
    "local_copy",
    "model_objects",
    "object_fingerprint",
]
