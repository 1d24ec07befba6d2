"""The checkpoint contract (one module): layout, a versioned typed manifest per model kind,
resolution of a run directory to a checkpoint, and fp32 loading without Ray.

A checkpoint is one directory, merged by Ray Train from every rank's files::

    deepspeed/state/...     DeepSpeed's sharded model/optimizer/scheduler state (any ZeRO stage)
    manifest.json           the manifest below (kind, format_version, ...)
    features.npy            ST only: the perturbation feature table [C, P, D]

The manifest (JSON) carries what a reader needs to use the weights without the training
config: the model config, the ZeRO stage the state was saved with, the data identity (genes,
labels, corpus fingerprint, normalisation, feature sources, gene table checksum), the trainer
state (epoch, consumed batches, step, best score), the validation metrics and the full
training config. :func:`read_manifest` returns a :class:`STManifest` or :class:`SEManifest`.

Versions: ``format_version`` 2 (this one) adds ``format_version`` and ``zero_stage``;
manifests without them (version 1) still load: their ZeRO stage is read from the training
config as version 1 wrote it (an ST config without ``engine.zero_stage`` used stage 2; an SE
config stage 3 with several workers, else 0).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vcc_dist import storage
from vcc_dist.data.embeddings import CorpusEmbeddings
from vcc_dist.train.engine import fp32_state_dict

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DS_DIR, DS_TAG = "deepspeed", "state"
FEATURES = "features.npy"
ST_KIND = "vcc-dist/st-checkpoint"
SE_KIND = "vcc-dist/se-checkpoint"


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the data, features or config it is used with."""


class CheckpointError(ValueError):
    """A path is not a readable checkpoint (no manifest, unknown kind, newer format)."""


@dataclass(frozen=True)
class TrainerState:
    """Where training stood when the checkpoint was saved (the loop resumes from it)."""

    epoch: int = 0
    consumed: tuple[int, ...] = ()      # batch ids of ``epoch`` already consumed (all ranks)
    step: int = 0                       # optimizer steps done
    best_score: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "consumed", tuple(int(x) for x in self.consumed))

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": list(self.consumed), "step": self.step,
                "best_score": self.best_score}


@dataclass(frozen=True)
class Manifest:
    """What every checkpoint's manifest holds."""

    kind: str
    model_config: dict
    zero_stage: int
    corpus_fingerprint: str
    train_config: dict
    optim: dict = field(default_factory=dict)
    trainer_state: TrainerState = field(default_factory=TrainerState)
    val_metrics: dict = field(default_factory=dict)
    saved_at: float = 0.0
    steps_per_epoch: int = 0
    batches_per_epoch: int = 0
    node_ids: tuple[str, ...] = ()      # the Ray nodes of the ranks that saved it
    format_version: int = FORMAT_VERSION

    @property
    def step(self) -> int:
        return self.trainer_state.step

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if isinstance(v, TrainerState) else (
                list(v) if isinstance(v, tuple) else v)
        return d


@dataclass(frozen=True)
class STManifest(Manifest):
    genes: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)      # contexts, perturbations, batches
    feature_sources: list = field(default_factory=list)
    feature_shape: list = field(default_factory=list)
    normalization: dict = field(default_factory=dict)
    val: dict | None = None
    baselines: dict = field(default_factory=dict)
    embeddings: dict | None = None                  # ST on SE: key, dim, SE model identity

    @property
    def contexts(self) -> list[str]:
        return list(self.labels["contexts"])

    @property
    def perturbations(self) -> list[str]:
        return list(self.labels["perturbations"])


@dataclass(frozen=True)
class SEManifest(Manifest):
    table_genes: list = field(default_factory=list)
    missing_genes: list = field(default_factory=list)
    gene_table_sha256: str = ""
    stores: list = field(default_factory=list)
    n_val_cells: int = 0


KINDS: dict[str, type[Manifest]] = {ST_KIND: STManifest, SE_KIND: SEManifest}


def _legacy_zero_stage(kind: str, train_config: dict) -> int:
    """The ZeRO stage of a version-1 manifest, as version 1's trainers chose it."""
    eng = train_config.get("engine") or {}
    if "zero_stage" in eng:
        return int(eng["zero_stage"])
    if kind == SE_KIND:
        return 3 if int(train_config.get("num_workers", 1)) > 1 else 0
    return 2


def manifest_from_dict(d: dict[str, Any], where: str = "manifest") -> Manifest:
    """A typed manifest from its JSON form (any supported format version)."""
    kind = d.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{where}: unknown checkpoint kind {kind!r}; expected one of "
                              f"{tuple(KINDS)}")
    version = int(d.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {version} was written by a newer "
                              f"vcc-dist (this one reads <= {FORMAT_VERSION}); upgrade vcc-dist")
    cls = KINDS[kind]
    kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    kw["format_version"] = version
    if "zero_stage" not in kw:
        kw["zero_stage"] = _legacy_zero_stage(kind, d.get("train_config") or {})
    kw["trainer_state"] = TrainerState(**(d.get("trainer_state") or {}))
    kw["node_ids"] = tuple(d.get("node_ids") or ())
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CheckpointError(f"{where}: the manifest lacks {missing}; it is incomplete or not "
                              "a vcc-dist checkpoint")
    return cls(**kw)


def read_manifest(checkpoint: storage.Location) -> Manifest:
    """The typed manifest of a checkpoint directory (local or ``s3://``)."""
    p = storage.join(checkpoint, MANIFEST)
    try:
        raw = storage.read_bytes(p)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{checkpoint} is not a checkpoint (no {MANIFEST})") from None
    return manifest_from_dict(json.loads(raw), str(p))


def is_checkpoint(path: storage.Location) -> bool:
    if storage.is_remote(path):
        return storage.exists(storage.join(path, MANIFEST))
    return (Path(path) / MANIFEST).is_file()


def checkpoints(run_dir: storage.Location) -> list[Path | str]:
    """A run directory's complete checkpoints (a manifest is written last), oldest first:
    Paths for a local run directory, ``s3://`` URIs for a remote one."""
    if storage.is_remote(run_dir):
        try:
            names = [n for n in storage.listdir(run_dir) if n.startswith("checkpoint_")]
        except FileNotFoundError:
            return []
        found: list[Path | str] = [storage.join(run_dir, n) for n in names]
        return [c for c in found if is_checkpoint(c)]
    return sorted((p for p in Path(run_dir).glob("checkpoint_*") if is_checkpoint(p)),
                  key=lambda p: p.name)


def latest_checkpoint(run_dir: storage.Location) -> Path | str | None:
    """The newest complete checkpoint of a run directory (None if there is none)."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def ranking_score(m: Manifest) -> float:
    """How checkpoints of one run rank (higher is better): the validation score (ST), minus
    the validation loss (SE), -inf without validation."""
    v = m.val_metrics or {}
    if v.get("score") is not None:
        return float(v["score"])
    if v.get("loss") is not None:
        return -float(v["loss"])
    return float("-inf")


WHICH = ("best", "latest")


def resolve_checkpoint(path: storage.Location, which: str = "best") -> Path | str:
    """A checkpoint directory, or a run directory's ``best`` or ``latest`` checkpoint (local
    or ``s3://``; a remote run gives a remote checkpoint)."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: choose one of {WHICH}")
    p = storage.location(path)
    if is_checkpoint(p):
        return p
    ref = storage.join(p, f"{which}_checkpoint.json")
    try:
        return storage.location(storage.read_json(ref)["path"])
    except FileNotFoundError:
        pass
    # a run stopped before it finished (a killed job, a trial stopped early by Tune) has no
    # pointer files: pick from its complete checkpoints by their manifests
    found = checkpoints(p)
    if found:
        if which == "latest":
            return found[-1]
        return max(found, key=lambda c: (ranking_score(read_manifest(c)), storage.basename(c)))
    raise FileNotFoundError(f"{p} is neither a checkpoint (no {MANIFEST}) nor a run directory "
                            f"with checkpoints (no {storage.basename(ref)}, no checkpoint_*); "
                            "pass a checkpoint_* directory or a run directory")


def open_checkpoint(path: storage.Location, which: str, kind: str) -> tuple[Path | str, Manifest]:
    """Resolve ``path`` and read its manifest, which must be of ``kind``."""
    ck = resolve_checkpoint(path, which)
    man = read_manifest(ck)
    if man.kind != kind:
        what = {ST_KIND: "an ST (jobs/train_st.py)", SE_KIND: "an SE (jobs/pretrain_se.py)"}[kind]
        raise CheckpointError(f"{ck} is a {man.kind!r} checkpoint, not {what} checkpoint; pass "
                              "the run directory or a checkpoint_* directory of that job")
    return ck, man


def local_checkpoint(ck: storage.Location) -> Path:
    """A local directory holding checkpoint ``ck``: ``ck`` itself, or for an ``s3://``
    checkpoint a copy in this host's cache (``$VCC_DIST_SCRATCH``, see
    vcc_dist.storage.scratch_dir), downloaded once and reused while its manifest is the same.
    The copy is made in a temporary directory and renamed, so a half-downloaded checkpoint is
    never taken for a complete one."""
    if not storage.is_remote(ck):
        return Path(ck)
    dest = storage.scratch_dir(str(ck))
    want = storage.read_bytes(storage.join(ck, MANIFEST))
    if (dest / MANIFEST).is_file() and (dest / MANIFEST).read_bytes() == want:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.dl-", dir=dest.parent))
    try:
        storage.download_dir(str(ck), tmp)
        if not (tmp / MANIFEST).is_file():
            raise CheckpointError(f"{ck} is not a checkpoint (no {MANIFEST})")
        if (dest / MANIFEST).is_file() and (dest / MANIFEST).read_bytes() == want:
            return dest  # another process on this host finished the same copy first
        if dest.exists():  # a stale copy (another checkpoint once at this location)
            shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:  # another process on this host won the race: use its copy
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fp32_weights(ck: storage.Location, manifest: Manifest) -> dict:
    """The full fp32 model state of a checkpoint (any ZeRO stage, any precision it was
    trained in, any number of ranks; local or ``s3://``), on CPU and without a process group."""
    return fp32_state_dict(local_checkpoint(ck) / DS_DIR, DS_TAG, manifest.zero_stage)


def st_features(ck: storage.Location) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(storage.join(ck, FEATURES))))


def gather_checked_embeddings(corpus: str | os.PathLike, emb: dict, st: np.ndarray,
                              rows: np.ndarray) -> np.ndarray:
    """Cell embeddings of (store, row) pairs from the corpus, checked to be the ones an ST
    model on SE embeddings was trained on (``emb``: its manifest's ``embeddings``)."""
    ce = CorpusEmbeddings(corpus, emb["key"])
    if ce.dim != emb["dim"] or ce.meta != emb["model"]:
        raise CheckpointMismatch(
            f"the corpus's {emb['key']!r} embeddings were made by another SE model "
            f"({ce.meta.get('checkpoint')}) than the ST model was trained on "
            f"({emb['model'].get('checkpoint')}); re-run jobs/embed_cells.py with that checkpoint")
    return ce.gather(np.asarray(st), np.asarray(rows))


__all__ = ["DS_DIR", "DS_TAG", "FEATURES", "FORMAT_VERSION", "KINDS", "MANIFEST", "SE_KIND",
           "ST_KIND", "CheckpointError", "CheckpointMismatch", "Manifest", "SEManifest",
           "STManifest", "TrainerState", "checkpoints", "fp32_weights",
           "gather_checked_embeddings", "is_checkpoint", "latest_checkpoint", "local_checkpoint",
           "manifest_from_dict", "open_checkpoint", "ranking_score", "read_manifest",
           "resolve_checkpoint", "st_features"]

