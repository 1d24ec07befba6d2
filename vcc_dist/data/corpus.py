"""The corpus: on-disk contract between conversion and everything downstream (docs/design.md §3).

A corpus is a directory, local or in object storage (``s3://bucket/prefix``, see
vcc_dist/storage.py)::

    corpus.json            manifest: format version, gene vocabulary + hash, stores, gene statistics
    stores/<name>.zarr     one AnnData-encoded Zarr v3 store per input (or input part)

Each store opens with plain ``anndata.read_zarr``. Inside it, vcc-dist keeps its own metadata
under ``uns`` (anndata refuses unknown top-level keys):

- ``uns["vcc_dist"]``: the store manifest (format version, source fingerprint, vocabulary hash,
  dtypes, layout, ``complete``) plus the per-gene accumulators of the statistics;
- ``uns["vcc_dist_groups"]``: one row per (context, perturbation, batch) group with its
  contiguous row range ``[start, stop)``;
- ``uns["vcc_dist_conditions"]`` + ``uns["vcc_dist_pseudobulk"]``: one row per
  (context, perturbation) and its mean log1p-CP10k expression (for reports and baselines).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vcc_dist import constants as K
from vcc_dist import storage


class CorpusError(ValueError):
    """A corpus on disk is missing, incomplete, or incompatible with what was asked."""


# ---------------------------------------------------------------------------------------------
# gene vocabulary
# ---------------------------------------------------------------------------------------------


def vocabulary_hash(symbols: list[str], gene_ids: list[str | None]) -> str:
    """Order-sensitive hash of the vocabulary: two corpora with equal hashes share column order."""
    h = hashlib.sha256()
    for s, g in zip(symbols, gene_ids, strict=True):
        h.update(s.encode())
        h.update(b"\t")
        h.update((g or "").encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# streaming per-gene statistics
# ---------------------------------------------------------------------------------------------

_ACC_FIELDS = ("nnz", "sum_log", "sumsq_log", "sum_norm", "sumsq_norm", "max_log", "min_nz_log")


@dataclass
class GeneAccumulator:
    """Per-gene sums over cells, mergeable across blocks and stores.

    Values are counts normalised to ``target_sum`` per cell (``normalize_total``) using the
    cell's own total, and their natural ``log1p``. Sums are float64 so that merging many stores
    loses nothing measurable.
    """

    n_genes: int
    target_sum: float = K.STATS_TARGET_SUM
    n_cells: int = 0
    nnz: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_log: np.ndarray = field(default=None)  # type: ignore[assignment]
    sumsq_log: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_norm: np.ndarray = field(default=None)  # type: ignore[assignment]
    sumsq_norm: np.ndarray = field(default=None)  # type: ignore[assignment]
    max_log: np.ndarray = field(default=None)  # type: ignore[assignment]
    min_nz_log: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        g = self.n_genes
        if self.nnz is None:
            self.nnz = np.zeros(g, np.int64)
            for name in ("sum_log", "sumsq_log", "sum_norm", "sumsq_norm", "max_log"):
                setattr(self, name, np.zeros(g, np.float64))
            self.min_nz_log = np.full(g, np.inf, np.float64)

    def update(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
               totals: np.ndarray) -> np.ndarray:
        """Add a CSR block (raw counts, vocabulary columns); returns per-entry log values.

        Values are computed in float32 and summed in float64 (``bincount`` accumulates in
        float64); per-gene max/min use ``ufunc.at``, which numpy >= 2 runs at bincount speed.
        """
        n = len(indptr) - 1
        self.n_cells += n
        if data.size == 0:
            return np.zeros(0, np.float32)
        scale = np.where(totals > 0, self.target_sum / np.maximum(totals, 1), 0.0)
        norm = data.astype(np.float32) * np.repeat(scale.astype(np.float32), np.diff(indptr))
        lg = np.log1p(norm)
        g = self.n_genes
        idx = indices.astype(np.intp)
        self.nnz += np.bincount(idx, minlength=g)
        self.sum_norm += np.bincount(idx, weights=norm, minlength=g)
        self.sumsq_norm += np.bincount(idx, weights=np.square(norm, dtype=np.float64), minlength=g)
        self.sum_log += np.bincount(idx, weights=lg, minlength=g)
        self.sumsq_log += np.bincount(idx, weights=np.square(lg, dtype=np.float64), minlength=g)
        lg64 = lg.astype(np.float64)  # same dtype as the target: mixed dtypes lose the fast path
        np.maximum.at(self.max_log, idx, lg64)
        np.minimum.at(self.min_nz_log, idx, lg64)
        return lg

    def merge(self, other: GeneAccumulator) -> None:
        if other.n_genes != self.n_genes or other.target_sum != self.target_sum:
            raise CorpusError("cannot merge gene statistics of different vocabularies/targets")
        self.n_cells += other.n_cells
        for name in ("nnz", "sum_log", "sumsq_log", "sum_norm", "sumsq_norm"):
            getattr(self, name).__iadd__(getattr(other, name))
        np.maximum(self.max_log, other.max_log, out=self.max_log)
        np.minimum(self.min_nz_log, other.min_nz_log, out=self.min_nz_log)

    def to_arrays(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in _ACC_FIELDS}
        out["n_cells"] = int(self.n_cells)
        out["target_sum"] = float(self.target_sum)
        return out

    @classmethod
    def from_arrays(cls, d: dict[str, Any]) -> GeneAccumulator:
        arrays = {name: np.asarray(d[name]) for name in _ACC_FIELDS}
        return cls(n_genes=len(arrays["nnz"]), target_sum=float(d["target_sum"]),
                   n_cells=int(d["n_cells"]), **arrays)

    def gene_table(self, n_top_genes: int = 2000, n_bins: int = 20) -> pd.DataFrame:
        """Per-gene statistics plus a seurat-flavour HVG selection (see `seurat_hvg`)."""
        n = max(self.n_cells, 1)
        ddof = n / (n - 1) if n > 1 else 1.0
        mean_log = self.sum_log / n
        var_log = np.maximum(self.sumsq_log / n - mean_log**2, 0) * ddof
        mean_norm = self.sum_norm / n
        var_norm = np.maximum(self.sumsq_norm / n - mean_norm**2, 0) * ddof
        hvg = seurat_hvg(mean_norm, var_norm, n_top_genes=n_top_genes, n_bins=n_bins)
        min_log = np.where(self.nnz < self.n_cells, 0.0, self.min_nz_log)
        min_log = np.where(np.isfinite(min_log), min_log, 0.0)
        return pd.DataFrame({
            "n_cells_expressing": self.nnz,
            "nonzero_fraction": self.nnz / n,
            "mean": mean_log,
            "variance": var_log,
            "max": self.max_log,
            "min": min_log,
            "mean_cp10k": mean_norm,
            "dispersion": hvg["dispersions_raw"],
            "dispersions_norm": hvg["dispersions_norm"],
            "highly_variable": hvg["highly_variable"],
        })


def seurat_hvg(mean: np.ndarray, var: np.ndarray, n_top_genes: int = 2000,
               n_bins: int = 20) -> pd.DataFrame:
    """Highly variable genes, flavour "seurat", from per-gene mean and variance.

    ``mean``/``var`` are of normalised (not log) expression, i.e. of ``expm1`` of the
    log1p-normalised matrix, with the unbiased variance, exactly what
    ``scanpy.pp.highly_variable_genes(flavor="seurat", n_top_genes=...)`` computes from the
    whole matrix. We re-implement the selection (a few lines) because scanpy needs the matrix in
    memory while the corpus only ever has streamed sums; `tests/test_gene_stats.py` checks
    agreement with scanpy.
    """
    mean = np.asarray(mean, np.float64).copy()
    var = np.asarray(var, np.float64)
    mean[mean == 0] = 1e-12
    disp_raw = var / mean
    disp = disp_raw.copy()
    disp[disp == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(disp)
    logmean = np.log1p(mean)
    df = pd.DataFrame({"means": logmean, "dispersions": disp})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    stats = grouped.agg(avg="mean", dev="std")
    # a bin holding a single gene has no std: scanpy gives it avg 0 and dev = its dispersion,
    # i.e. a normalised dispersion of 1.
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    disp_norm = ((df["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy()
    n_top = min(n_top_genes, len(mean))
    valid = disp_norm[~np.isnan(disp_norm)]
    if valid.size == 0:
        hv = np.zeros(len(mean), bool)
    else:
        cutoff = np.sort(valid)[::-1][min(n_top, valid.size) - 1]
        hv = np.nan_to_num(disp_norm, nan=-np.inf) >= cutoff
    return pd.DataFrame({"means": logmean, "dispersions": disp, "dispersions_raw": disp_raw,
                         "dispersions_norm": disp_norm, "highly_variable": hv})


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------


@dataclass
class StoreEntry:
    name: str
    source: str
    source_rows: list[int]  # [start, stop) rows of the source file in this store
    source_size: int
    source_checksum: str
    status: str = "pending"  # pending | complete
    n_cells: int | None = None
    nnz: int | None = None
    coverage: dict[str, Any] | None = None  # gene-space mapping report
    #: where the store lives, relative to the corpus root, when not at ``relpath``'s default
    #: ``stores/<name>.zarr``: a store converted into object storage keeps the attempt-unique
    #: prefix it was written under (``stores/<name>~<attempt>.zarr``; S3 has no rename)
    location: str | None = None
    #: who wrote the store: Ray node id and IP, host, seconds (None: not recorded)
    provenance: dict[str, Any] | None = None

    @property
    def relpath(self) -> str:
        return self.location or f"{K.CORPUS_STORES_DIR}/{self.name}.zarr"


@dataclass
class CorpusManifest:
    genes: list[str]
    gene_ids: list[str | None]
    stores: list[StoreEntry]
    options: dict[str, Any]  # conversion options that change the stored data
    status: str = "converting"  # converting | complete
    format: str = K.CORPUS_FORMAT
    format_version: int = K.CORPUS_FORMAT_VERSION
    vocab_hash: str = ""
    stats_target_sum: float = K.STATS_TARGET_SUM
    gene_stats: dict[str, list] | None = None
    summary: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.vocab_hash:
            self.vocab_hash = vocabulary_hash(self.genes, self.gene_ids)

    # -- io --
    def to_json(self) -> dict[str, Any]:
        # shallow: dataclasses.asdict deep-copies the (long) gene lists on every save
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["stores"] = [asdict(s) for s in self.stores]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CorpusManifest:
        if d.get("format") != K.CORPUS_FORMAT:
            raise CorpusError(f"not a vcc-dist corpus manifest (format={d.get('format')!r})")
        v = d.get("format_version")
        if v != K.CORPUS_FORMAT_VERSION:
            raise CorpusError(
                f"corpus format version {v} is not supported by this vcc-dist (reads version "
                f"{K.CORPUS_FORMAT_VERSION}); re-convert the inputs with this version")
        d = dict(d)
        d["stores"] = [StoreEntry(**s) for s in d["stores"]]
        return cls(**d)

    def save(self, corpus_dir: str | os.PathLike) -> None:
        """Atomic write: a reader never sees a half-written manifest (locally a temporary file
        renamed over it; in object storage one PUT)."""
        if storage.is_remote(corpus_dir):
            storage.write_bytes(storage.join(corpus_dir, K.CORPUS_MANIFEST),
                                json.dumps(self.to_json(), indent=1).encode())
            return
        path = Path(corpus_dir) / K.CORPUS_MANIFEST
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".corpus.json.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def gene_table(self) -> pd.DataFrame:
        if self.gene_stats is None:
            raise CorpusError("the corpus has no gene statistics yet (conversion unfinished)")
        df = pd.DataFrame(self.gene_stats, index=pd.Index(self.genes, name="gene"))
        df.insert(0, K.GENE_ID_KEY, self.gene_ids)
        return df

    @property
    def highly_variable(self) -> np.ndarray:
        return np.asarray(self.gene_table()["highly_variable"], bool)


def load_manifest(corpus_dir: str | os.PathLike, require_complete: bool = True,
                  options: storage.S3Options | None = None) -> CorpusManifest:
    """The corpus manifest of ``corpus_dir`` (a local directory or ``s3://bucket/prefix``;
    ``options``: object-storage settings, default the AWS variables)."""
    path = storage.join(corpus_dir, K.CORPUS_MANIFEST)
    try:
        raw = storage.read_bytes(path, options)
    except FileNotFoundError:
        raise CorpusError(f"{corpus_dir} is not a corpus: {K.CORPUS_MANIFEST} is missing. "
                          "Create one with `python jobs/convert.py`.") from None
    m = CorpusManifest.from_json(json.loads(raw))
    if require_complete and m.status != "complete":
        pending = [s.name for s in m.stores if s.status != "complete"]
        raise CorpusError(
            f"corpus {corpus_dir} is incomplete (status={m.status!r}; pending stores: "
            f"{pending[:5]}{'...' if len(pending) > 5 else ''}). Re-run the same conversion "
            "command to resume it.")
    return m


def store_path(corpus_dir: str | os.PathLike, store: str | StoreEntry) -> Path | str:
    """Where a store of a corpus lives: a ``Path`` for a local corpus, an ``s3://`` URI (a
    string) for one in object storage (open it with ``storage.open_zarr_store``).

    ``store``: the store's manifest entry (the one mapping from an entry to its location: an
    entry's ``location`` when it has one, see ``StoreEntry.location``) or a store name, which
    means the default location ``stores/<name>.zarr`` (every local corpus's layout)."""
    rel = store.relpath if isinstance(store, StoreEntry) else f"{K.CORPUS_STORES_DIR}/{store}.zarr"
    return storage.join(corpus_dir, *rel.split("/"))
