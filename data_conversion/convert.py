"""h5ad -> corpus conversion (docs/design.md §3).

On the driver, planning reads every input's metadata and perturbation column: an input
without control cells (usually a wrong ``--control-label``) is an error, and each input's gene
coverage of the vocabulary is printed, warned about below ``--min-gene-coverage`` and recorded
per store in corpus.json. Many inputs are scanned in batches in Ray tasks spread over the
cluster when the conversion runs under Ray (threads for s3:// inputs otherwise), with the same
result and the same first error as a serial scan; inputs with identical gene spaces share one
copy of its genes and one gene map, so the driver's memory grows with the distinct gene spaces
(scBaseCount: a handful), not the files (``plan_corpus``; benchmarks/results/scale.md).

Per store (one input file, or a row range of a large one), in a Ray task:

1. Labels: read the obs columns, map them onto the corpus names, compute the output order
   (context, perturbation with controls first, batch; stable, so source order within a group).
2. Pass 1, sequential over the source in byte-budgeted row blocks: validate values (finite,
   non-negative, integer), per-cell total counts, per-cell non-zeros after gene mapping, the
   maximum value (for the smallest exact dtype). When the source is not already in output order
   (real files rarely are), each row is also appended to the bucket file of its output row
   range: a distribution sort, so the source is read once, sequentially, and every later read is
   sequential too. (Gathering rows at random from a 15 GB file that does not fit the page cache
   was several times slower.) CSC and dense sources are first copied into a CSR scratch.
3. Pass 2, in output order: each bucket is read, its rows ordered in memory, genes mapped onto
   the vocabulary, and the rows written to sharded Zarr arrays whole shards at a time, while
   per-gene statistics and per-condition pseudobulks accumulate.
4. Everything is written under a hidden temporary name and renamed when complete; the store
   carries ``uns["vcc_dist"]["complete"]``. The driver records completed stores in corpus.json,
   so a killed conversion resumes where it stopped and never shows a half-written store.
   Into object storage (``--out s3://bucket/prefix``; S3 has no rename) the store is written
   to a local staging directory, then uploaded under an attempt-unique prefix
   ``stores/<name>~<attempt>.zarr``, its root ``zarr.json`` (the consolidated metadata) last;
   corpus.json, one atomic PUT, is the commit point and records that location
   (docs/design.md §3, "Commit protocol on object storage"). Inputs may be ``s3://`` objects
   too: planning reads their metadata through s3fs, a task downloads its input first.

The driver saves corpus.json at most once every ``manifest_save_interval_s`` seconds and never
spends more than ``manifest_save_fraction`` of its time saving (``ManifestSaver``): a save
writes the whole manifest, so saving after every one of S stores was O(S^2) (benchmarks/
results/scale.md). A store finished but not yet recorded when a run is killed is adopted on
resume when it carries its completion mark, else converted again.

Memory per task: the read budget, one shard per array, and O(cells in the store) for labels
and indptr (~60 bytes a cell; capped by ``max_cells_per_store``). It does not grow with the
input file's size. Scratch disk: about 4 bytes per non-zero of the store, deleted as it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pickle
import re
import resource
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcc_dist import constants as K
from vcc_dist import storage
from vcc_dist.data.corpus import (CorpusManifest, GeneAccumulator, StoreEntry, load_manifest,
                                  store_path)
from vcc_dist.provenance import process_provenance

from .source import (ConversionError, ConversionWarning, H5adSource, file_fingerprint,
                     gather_rows)
from .store_writer import CSRStoreWriter, choose_layout
from .vocab import GeneSpace, build_vocabulary, gene_space_key

#: obs columns of a corpus store and whether an input must have them (after --obs-map/--obs-fill)
OBS_KEYS = K.CORPUS_OBS_KEYS
#: the attempt part of a store written into object storage: ``stores/<name>~<attempt>.zarr``
#: (store names never contain "~": ``_store_names`` keeps [A-Za-z0-9_.-])
ATTEMPT_SEP = "~"
ATTEMPT_RE = re.compile(r"[0-9a-f]{12}\.zarr")


@dataclass(frozen=True)
class ConvertConfig:
    """Options of one conversion. Fields that change stored bytes are recorded in corpus.json;
    resuming with different values is refused."""

    inputs: tuple[str, ...]
    out: str
    #: corpus obs name -> column name in the inputs, e.g. {"target_gene": "gene"}
    obs_map: dict[str, str] = field(default_factory=dict)
    #: corpus obs name -> constant for inputs lacking the column, e.g. {"guide_id": "none"}
    obs_fill: dict[str, str] = field(default_factory=dict)
    control_label: str = K.CONTROL_LABEL  # label of control cells in the inputs
    matrix: str = "X"  # X | raw/X | layers/<name>
    symbol_column: str | None = None  # var column with gene symbols (default: var index)
    gene_id_column: str | None = "auto"  # var column with gene ids; "auto" finds gene_id(s)
    genes_file: str | None = None  # fixed vocabulary; default: union of the inputs' genes
    gene_conflicts: str = "error"  # error | prefer-id
    #: larger inputs become several stores, converted in parallel (one Ray task each)
    max_cells_per_store: int = 131_072
    read_budget_mb: int = 128
    chunk_rows: int = 8
    shard_mb: int = 64
    compressor: str = "lz4"
    clevel: int = 5
    n_top_genes: int = 2000
    #: an input whose genes cover less than this fraction of the corpus vocabulary is warned
    #: about (its cells hold zeros for the genes it lacks, indistinguishable from no expression)
    min_gene_coverage: float = 0.5
    strict_gene_coverage: bool = False  # below min_gene_coverage: an error, not a warning
    #: an input without control cells is an error (usually a wrong --control-label); True
    #: makes it a warning (e.g. perturbed-only files whose controls are in another input)
    allow_missing_controls: bool = False
    full_checksum: bool = False
    parallel: str = "ray"  # ray | serial
    num_cpus_per_task: float = 1.0
    #: Ray retries of a store task whose worker or node died (a ConversionError is not retried)
    task_retries: int = 2
    #: corpus.json is saved at most this often while converting (and when the tasks end) ...
    manifest_save_interval_s: float = 1.0
    #: ... and at most this fraction of the driver's time goes to saving it (a save costs
    #: O(stores)): saves stay linear in the number of stores overall
    manifest_save_fraction: float = 0.05
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConversionError("no inputs: pass one or more .h5ad files or directories")
        bad = set(self.obs_map) - set(OBS_KEYS)
        if bad:
            raise ConversionError(f"obs_map keys {sorted(bad)} unknown; valid: {list(OBS_KEYS)}")
        bad = set(self.obs_fill) - set(OBS_KEYS)
        if bad:
            raise ConversionError(f"obs_fill keys {sorted(bad)} unknown; valid: {list(OBS_KEYS)}")
        checks = {
            "gene_conflicts": self.gene_conflicts in ("error", "prefer-id"),
            "compressor": self.compressor in ("lz4", "zstd", "blosclz", "lz4hc", "zlib"),
            "clevel": 0 <= self.clevel <= 9,
            "parallel": self.parallel in ("ray", "serial"),
            "max_cells_per_store": self.max_cells_per_store >= 1,
            "read_budget_mb": self.read_budget_mb >= 1,
            "chunk_rows": self.chunk_rows >= 1,
            "shard_mb": self.shard_mb >= 1,
            "n_top_genes": self.n_top_genes >= 1,
            "min_gene_coverage": 0.0 <= self.min_gene_coverage <= 1.0,
            "task_retries": self.task_retries >= 0,
            "manifest_save_interval_s": self.manifest_save_interval_s >= 0,
            "manifest_save_fraction": 0 < self.manifest_save_fraction <= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConversionError(f"invalid conversion option {key}={getattr(self, key)!r}")
        try:
            storage.location(self.out)
        except storage.StorageError as e:
            raise ConversionError(f"output {self.out!r}: {e}") from None

    def stored_options(self) -> dict[str, Any]:
        keys = ("obs_map", "obs_fill", "control_label", "matrix", "symbol_column",
                "gene_id_column", "gene_conflicts", "max_cells_per_store", "chunk_rows",
                "shard_mb", "compressor", "clevel", "n_top_genes")
        d = {k: getattr(self, k) for k in keys}
        if self.genes_file:
            d["genes_file_checksum"] = file_fingerprint(self.genes_file, full=True)[1]
        return d


# ---------------------------------------------------------------------------------------------
# driver side: planning
# ---------------------------------------------------------------------------------------------


def _expand_remote(item: str) -> list[str]:
    """An ``s3://`` input: one ``.h5ad`` object, or a prefix whose ``.h5ad`` objects are taken."""
    try:
        uri = str(storage.location(item))
    except storage.StorageError as e:
        raise ConversionError(f"input {item!r}: {e}") from None
    if any(c in uri for c in "*?["):
        raise ConversionError(f"input pattern {item!r}: patterns are not supported for s3:// "
                              "inputs; name the objects, or a prefix holding them")
    if uri.endswith(".h5ad"):
        if not storage.exists(uri):
            raise ConversionError(f"input {item} does not exist")
        return [uri]
    try:
        found = [f"{uri}/{n}" for n in storage.listdir(uri) if n.endswith(".h5ad")]
    except FileNotFoundError:
        found = []
    if not found:
        raise ConversionError(f"input {item} is neither an .h5ad object nor a prefix holding "
                              ".h5ad objects")
    return found


def expand_inputs(inputs: tuple[str, ...] | list[str]) -> list[str]:
    """Files, directories (their *.h5ad), globs and ``s3://`` objects or prefixes -> sorted
    unique absolute paths (URIs as they are)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if storage.is_remote(item):
            out += _expand_remote(item)
        elif p.is_dir():
            found = sorted(str(q) for q in p.glob("*.h5ad"))
            if not found:
                raise ConversionError(f"input directory {item} contains no .h5ad files")
            out += found
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise ConversionError(f"input pattern {item!r} matches no files")
            out += found
        else:
            if not p.exists():
                raise ConversionError(f"input {item} does not exist")
            out.append(str(p))
    out = [x if storage.is_remote(x) else os.path.abspath(x) for x in out]
    return list(dict.fromkeys(out))


def _store_names(paths: list[str]) -> list[str]:
    stems = [re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(p).name.removesuffix(".h5ad")) for p in paths]
    # Counters, not list.count in the loop: that was quadratic in the number of inputs (4.7 s
    # at 10,000 paths, benchmarks/results/scale.md)
    stem_n = Counter(stems)
    names = []
    for p, s in zip(paths, stems):
        if stem_n[s] > 1:
            s = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(p).parent.name) + "__" + s
        names.append(s)
    dup = {n for n, c in Counter(names).items() if c > 1}
    if dup:
        raise ConversionError(f"inputs would give duplicate store names {sorted(dup)}; rename them")
    return names


def _resolve_obs_columns(src: H5adSource, cfg: ConvertConfig) -> dict[str, str | None]:
    """corpus obs name -> source column (None = filled with a constant). Errors name the fix."""
    res: dict[str, str | None] = {}
    for key in OBS_KEYS:
        col = cfg.obs_map.get(key, key)
        if col in src.obs_columns:
            res[key] = col
        elif key in cfg.obs_fill:
            res[key] = None
        else:
            raise ConversionError(
                f"{src.path}: obs has no column {col!r} (needed for the corpus column {key!r}). "
                f"Its obs columns are {src.obs_columns}. Fix: map another column with "
                f"--obs-map {key}=<column>, or fill a constant with --obs-fill {key}=<value>.")
    return res


#: perturbation labels that usually mean "control" (to suggest a --control-label)
_CONTROL_LIKE = re.compile(
    r"non[-_ ]?target|^ntc|^nt$|^nt[-_]|control|ctrl|scrambl|safe[-_ ]?harbou?r|intergenic|"
    r"negative|^mock|^untreated|^unperturbed|^dmso|^vehicle|^none$|^empty|^wt$|wild[-_ ]?type",
    re.IGNORECASE)


def _perturbation_counts(src: H5adSource, obs_columns: dict[str, str | None],
                         cfg: ConvertConfig) -> pd.Series:
    """Cells per perturbation label of a whole input, most frequent first."""
    col = obs_columns[K.PERT_KEY]
    if col is None:
        return pd.Series({str(cfg.obs_fill[K.PERT_KEY]): src.n_obs}, dtype=np.int64)
    cat = src.obs_column_categorical(col, 0, src.n_obs)
    return pd.Series(cat).value_counts(dropna=True).astype(np.int64)


def _control_hint(counts: pd.Series) -> tuple[str, str | None]:
    """(text naming the labels that look like controls and the most frequent labels, the
    first label that looks like a control or None)."""
    like = [str(k) for k in counts.index if _CONTROL_LIKE.search(str(k))]
    parts = []
    if like:
        parts.append("labels that look like controls: " + ", ".join(
            f"{k!r} ({int(counts[k]):,} cells)" for k in like[:5]))
    else:
        parts.append("no label looks like a control")
    parts.append("most frequent labels: " + ", ".join(
        f"{str(k)!r} ({int(v):,})" for k, v in counts.head(5).items()))
    return "; ".join(parts), (like[0] if like else None)


@dataclass(frozen=True)
class ControlSummary:
    """What ``check_controls`` needs of an input's perturbation counts (computed where the
    input is scanned, so the driver keeps a few fields per input, not its label counts)."""

    n_controls: int  # cells labelled cfg.control_label
    hint: str = ""  # _control_hint's text, for an input without control cells
    guess: str | None = None  # its first label that looks like a control


def control_summary(counts: pd.Series, cfg: ConvertConfig) -> ControlSummary:
    n = int(counts.get(cfg.control_label, 0))
    if n > 0:
        return ControlSummary(n)
    hint, guess = _control_hint(counts)
    return ControlSummary(n, hint, guess)


def check_controls(paths: list[str], pert_counts: list[pd.Series],
                   obs_cols: list[dict[str, str | None]], cfg: ConvertConfig) -> None:
    """An input without cells labelled ``cfg.control_label`` is an error (or, with
    ``allow_missing_controls``, a warning), naming --control-label and the labels it has that
    look like controls; a label found in no input at all is a warning."""
    check_control_summaries(paths, [control_summary(c, cfg) for c in pert_counts], obs_cols,
                            cfg)


def check_control_summaries(paths: list[str], summaries: list[ControlSummary],
                            obs_cols: list[dict[str, str | None]], cfg: ConvertConfig) -> None:
    """``check_controls`` from each input's ``ControlSummary``."""
    lines, guess = [], None
    for p, c, oc in zip(paths, summaries, obs_cols):
        if c.n_controls > 0:
            continue
        hint, g = c.hint, c.guess
        guess = guess or g
        col = oc[K.PERT_KEY] or f"--obs-fill {K.PERT_KEY}"
        lines.append(f"  {p} (column {col!r}): {hint}")
    if not lines:
        return
    which = ("no input has" if len(lines) == len(paths) else
             f"{len(lines)} of {len(paths)} input(s) have no")
    head = (f"{which} control cells: no cell of the perturbation column is labelled "
            f"{cfg.control_label!r} (--control-label)")
    fix = (f"Fix: pass the inputs' control label with --control-label"
           f"{f' (e.g. --control-label {guess})' if guess else ''}")
    if not cfg.allow_missing_controls:
        raise ConversionError("\n".join([head + ":"] + lines + [
            fix + "; if an input really has no control cells, pass --allow-missing-controls "
            "(training an ST model needs control cells in every context)."]))
    if len(lines) == len(paths):
        warnings.warn(ConversionWarning(
            "\n".join([f"control label {cfg.control_label!r} (--control-label) is found in no "
                       "input: the corpus will have no control cells and ST training will "
                       "fail (its contexts need controls):"] + lines + [fix + "."])),
            stacklevel=3)
    else:
        warnings.warn(ConversionWarning("\n".join([head + " (allowed by "
                                                   "--allow-missing-controls):"] + lines)),
                      stacklevel=3)


def check_gene_coverage(paths: list[str], reports: list[dict], n_vocab: int,
                        cfg: ConvertConfig) -> None:
    """Warn (or, with ``strict_gene_coverage``, raise) when an input covers less than
    ``min_gene_coverage`` of the vocabulary."""
    low = [(p, r) for p, r in zip(paths, reports)
           if r["vocabulary_coverage"] < cfg.min_gene_coverage]
    if not low:
        return
    lines = [f"  {p}: {r['vocabulary_genes_present']:,} of {n_vocab:,} genes "
             f"({100 * r['vocabulary_coverage']:.1f}%)" for p, r in low]
    text = "\n".join(
        [f"{len(low)} input(s) cover less than {100 * cfg.min_gene_coverage:g}% of the corpus "
         "gene vocabulary (--min-gene-coverage); their cells get zeros for the genes they lack, "
         "indistinguishable from no expression:"] + lines
        + ["Fix: convert inputs with different gene panels into separate corpora, or give a "
           "common vocabulary with --genes; lower --min-gene-coverage if this is intended."])
    if cfg.strict_gene_coverage:
        raise ConversionError(text + " (--strict-gene-coverage makes this an error)")
    warnings.warn(ConversionWarning(text), stacklevel=3)


def gene_coverage_lines(manifest: CorpusManifest) -> list[str]:
    """The per-input gene coverage report (one line per input file)."""
    G = len(manifest.genes)
    out, seen = [f"gene coverage per input (corpus vocabulary: {G:,} genes):"], set()
    for s in manifest.stores:
        if s.source in seen or not s.coverage:
            continue
        seen.add(s.source)
        r = s.coverage
        present = r.get("vocabulary_genes_present",
                        int(round(r.get("vocabulary_coverage", 0.0) * G)))
        line = (f"  {Path(s.source).name}: {present:,} of {G:,} vocabulary genes "
                f"({100 * present / max(G, 1):.1f}%); {r.get('dropped', 0):,} of its "
                f"{r.get('source_genes', 0):,} genes not in the vocabulary")
        if r.get("dropped_examples"):
            line += f" (e.g. {', '.join(r['dropped_examples'][:5])})"
        out.append(line)
    return out


@dataclass
class StoreTask:
    entry: StoreEntry
    gene_map: np.ndarray
    obs_columns: dict[str, str | None]


#: planning scans up to this many inputs serially; more in parallel (Ray tasks, or threads for
#: s3:// inputs)
SCAN_PARALLEL_MIN_INPUTS = 8
#: inputs per Ray scan task at most: the task's overhead (a few ms) stays small against the
#: ~7-140 ms an input takes (benchmarks/results/scale.md)
SCAN_BATCH_INPUTS = 64
#: Ray scan tasks aimed for per cluster CPU (smaller batches for fewer inputs: all CPUs busy)
SCAN_TASKS_PER_CPU = 4
#: threads scanning s3:// inputs (latency-bound; local inputs are CPU-bound in h5py, anndata
#: and pandas under the GIL: threads were slower than a loop, 3.5-4.4 s vs 3.3 s for 500)
SCAN_THREADS = 16
SCAN_MODES = ("auto", "serial", "threads", "ray")


@dataclass(slots=True)
class InputScan:
    """What planning keeps of one input: a few fields, so the driver holds O(1) per input; its
    gene arrays are held once per distinct gene space (``space_key``)."""

    obs_columns: dict[str, str | None]
    n_obs: int
    controls: ControlSummary
    space_key: str
    #: (size, checksum), or the error file_fingerprint raised (raised where the serial
    #: planning raised it: after the vocabulary)
    fingerprint: tuple[int, str] | Exception


#: gene space key -> (symbols, gene ids)
SpaceArrays = dict[str, tuple[np.ndarray, np.ndarray | None]]


@dataclass
class ScanBatch:
    """Scans of consecutive inputs, up to the first that failed (``error``; later inputs of
    the batch are not scanned: an earlier failure is the one reported), and the distinct gene
    spaces among them."""

    scans: list[InputScan]
    error: Exception | None
    spaces: SpaceArrays


def scan_input(path: str, cfg: ConvertConfig) -> tuple[InputScan, np.ndarray, np.ndarray | None]:
    """One input's planning metadata (obs columns, cells, control cells, gene space key,
    fingerprint) and its gene arrays. Raises what planning reports for a bad input."""
    with H5adSource(path, cfg.matrix, cfg.symbol_column, cfg.gene_id_column) as src:
        obs_columns = _resolve_obs_columns(src, cfg)
        symbols, gene_ids, n_obs = src.symbols, src.gene_ids, src.n_obs
        controls = control_summary(_perturbation_counts(src, obs_columns, cfg), cfg)
    try:
        fingerprint: tuple[int, str] | Exception = file_fingerprint(path,
                                                                    full=cfg.full_checksum)
    except Exception as e:  # noqa: BLE001 - raised later, in the serial planning's order
        fingerprint = e
    return (InputScan(obs_columns, n_obs, controls, gene_space_key(symbols, gene_ids),
                      fingerprint), symbols, gene_ids)


def _scan_captured(path: str, cfg: ConvertConfig):
    try:
        return scan_input(path, cfg)
    except Exception as e:  # noqa: BLE001 - reported by the driver in input order
        return e


def scan_batch(paths: list[str], cfg: ConvertConfig, threads: int = 1) -> ScanBatch:
    """``scan_input`` over consecutive inputs (``threads`` > 1: in a thread pool, for s3://
    inputs), stopping at the first failure; identical gene spaces are kept once."""
    out = ScanBatch([], None, {})
    pool = ThreadPoolExecutor(threads) if threads > 1 and len(paths) > 1 else None
    try:
        results = (pool.map(_scan_captured, paths, [cfg] * len(paths)) if pool else
                   (_scan_captured(p, cfg) for p in paths))
        for r in results:
            if isinstance(r, Exception):
                out.error = r
                break
            scan, symbols, gene_ids = r
            out.scans.append(scan)
            out.spaces.setdefault(scan.space_key, (symbols, gene_ids))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def _scan_batch_task(paths: list[str], cfg: ConvertConfig,
                     threads: int) -> tuple[tuple[list[InputScan], Exception | None, list[str]],
                                            SpaceArrays]:
    """Ray task: the scans and the gene spaces as two objects, so that the driver fetches the
    spaces only when it has not seen them (scBaseCount: ~1,000 batches, a handful of spaces)."""
    b = scan_batch(paths, cfg, threads)
    err = b.error
    if err is not None:
        try:
            pickle.dumps(err)
        except Exception:  # noqa: BLE001 - an error that cannot travel: its type and text do
            err = ConversionError(f"{type(err).__name__}: {err}")
    return (b.scans, err, list(b.spaces)), b.spaces


def _scan_threads(paths: list[str]) -> int:
    return SCAN_THREADS if any(storage.is_remote(p) for p in paths) else 1


def _scan_mode(paths: list[str], cfg: ConvertConfig, scan: str) -> str:
    """"auto": Ray tasks for many inputs when the conversion runs under Ray (or Ray is up
    anyway), threads for many s3:// inputs, else a loop."""
    if scan not in SCAN_MODES:
        raise ConversionError(f"scan must be one of {SCAN_MODES}, got {scan!r}")
    if scan != "auto":
        return scan
    if len(paths) <= SCAN_PARALLEL_MIN_INPUTS:
        return "serial"
    ray_mod = sys.modules.get("ray")  # not imported: not initialised (importing it costs ~1 s)
    if cfg.parallel == "ray" or (ray_mod is not None and ray_mod.is_initialized()):
        return "ray"
    return "threads" if _scan_threads(paths) > 1 else "serial"


def _scan_with_ray(paths: list[str], cfg: ConvertConfig) -> ScanBatch:
    """Batches of inputs in Ray tasks spread over the cluster; results are merged as they come
    (gene spaces fetched only when new), and the first failure in input order is raised once
    every earlier input is scanned."""
    import ray  # lazily, as in _run_tasks: the CLI and the workers' imports stay light

    from vcc_dist.ray_utils import ensure_ray

    ensure_ray()
    n = len(paths)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = max(1, min(SCAN_BATCH_INPUTS, -(-n // (SCAN_TASKS_PER_CPU * cpus))))
    remote = ray.remote(num_cpus=1, num_returns=2, max_retries=cfg.task_retries,
                        scheduling_strategy="SPREAD")(_scan_batch_task)
    cfg_ref = ray.put(dataclasses.replace(cfg, inputs=(paths[0],)))  # not all the inputs
    pending: dict[Any, tuple[int, Any]] = {}  # scans ref -> (first input, spaces ref)
    for start in range(0, n, size):
        batch = paths[start:start + size]
        scans_ref, spaces_ref = remote.remote(batch, cfg_ref, _scan_threads(batch))
        pending[scans_ref] = (start, spaces_ref)
    scans: list[InputScan | None] = [None] * n
    spaces: SpaceArrays = {}
    errors: dict[int, Exception] = {}  # input index -> its error
    refs = list(pending)
    try:
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            if refs:  # and every other one already done
                more, refs = ray.wait(refs, num_returns=len(refs), timeout=0)
                ready += more
            for ref in ready:
                start, spaces_ref = pending.pop(ref)
                got, err, keys = ray.get(ref)
                scans[start:start + len(got)] = got
                if err is not None:
                    errors[start + len(got)] = err
                if any(k not in spaces for k in keys):
                    for k, v in ray.get(spaces_ref).items():
                        spaces.setdefault(k, v)
            if errors:
                first = min(errors)
                if all(start > first for start, _ in pending.values()):
                    raise errors[first]
    finally:
        for ref in refs:
            ray.cancel(ref)
    return ScanBatch(scans, None, spaces)  # type: ignore[arg-type] - all filled


def scan_inputs(paths: list[str], cfg: ConvertConfig,
                scan: str = "auto") -> tuple[list[InputScan], SpaceArrays]:
    """Every input's ``InputScan`` and the distinct gene spaces, by ``scan`` mode (see
    ``plan_corpus``). Raises the first bad input's error, in input order, as a serial scan
    does."""
    mode = _scan_mode(paths, cfg, scan)
    if mode == "ray":
        b = _scan_with_ray(paths, cfg)
    else:
        b = scan_batch(paths, cfg, SCAN_THREADS if mode == "threads" else 1)
        if b.error is not None:
            raise b.error
    shared: dict[tuple, dict[str, str | None]] = {}  # one obs-column dict per distinct one
    for s in b.scans:
        s.obs_columns = shared.setdefault(tuple(s.obs_columns.items()), s.obs_columns)
    return b.scans, b.spaces


def plan_corpus(cfg: ConvertConfig, scan: str = "auto") -> tuple[CorpusManifest, list[StoreTask]]:
    """Read every input's metadata (and its perturbation column, to check for control cells),
    build the vocabulary and one task per store. Raises before anything is written; warns
    about low gene coverage.

    ``scan``: how inputs are read: "serial"; "threads" (a thread pool: for s3:// inputs,
    whose reads wait on the network); "ray" (batches of inputs in Ray tasks spread over the
    cluster; joins or starts Ray); "auto" (default): "ray" above SCAN_PARALLEL_MIN_INPUTS
    inputs when ``cfg.parallel`` is "ray" or Ray is initialised, else "threads" for s3://
    inputs, else "serial". Every mode plans the same. Inputs with the same gene space (same
    symbols and ids) share one copy of its arrays and one gene map array object."""
    paths = expand_inputs(cfg.inputs)
    names = _store_names(paths)
    scans, spaces = scan_inputs(paths, cfg, scan)
    obs_cols = [s.obs_columns for s in scans]
    check_control_summaries(paths, [s.controls for s in scans], obs_cols, cfg)
    gene_spaces = [GeneSpace(p, *spaces[s.space_key], key=s.space_key)
                   for p, s in zip(paths, scans)]
    vocab, maps, reports = build_vocabulary(gene_spaces, cfg.genes_file, cfg.gene_conflicts)
    del gene_spaces, spaces  # the maps are what the tasks need
    check_gene_coverage(paths, reports, len(vocab), cfg)
    tasks: list[StoreTask] = []
    for p, name, m, rep, s in zip(paths, names, maps, reports, scans):
        if isinstance(s.fingerprint, Exception):
            raise s.fingerprint
        size, checksum = s.fingerprint
        n = s.n_obs
        n_parts = -(-n // cfg.max_cells_per_store)
        bounds = np.linspace(0, n, n_parts + 1).round().astype(int)
        for k in range(n_parts):
            sname = name if n_parts == 1 else f"{name}.part{k:03d}"
            e = StoreEntry(name=sname, source=p, source_rows=[int(bounds[k]), int(bounds[k + 1])],
                           source_size=size, source_checksum=checksum, coverage=rep)
            tasks.append(StoreTask(e, m, s.obs_columns))
    manifest = CorpusManifest(genes=vocab.symbols, gene_ids=vocab.gene_ids,
                              stores=[t.entry for t in tasks], options=cfg.stored_options())
    return manifest, tasks


# ---------------------------------------------------------------------------------------------
# worker side: one store
# ---------------------------------------------------------------------------------------------


def _labels(src: H5adSource, obs_columns: dict[str, str | None], cfg: ConvertConfig,
            a: int, b: int) -> dict[str, pd.Categorical]:
    """Corpus obs columns of rows [a, b) as categoricals (codes: 1-2 bytes a cell, not strings)."""
    out = {}
    for key in OBS_KEYS:
        col = obs_columns[key]
        if col is None:
            out[key] = pd.Categorical.from_codes(np.zeros(b - a, np.int8),
                                                 [str(cfg.obs_fill[key])])
            continue
        v = src.obs_column_categorical(col, a, b)
        missing = v.isna()
        if missing.any():
            r = int(np.flatnonzero(missing)[0]) + a
            raise ConversionError(
                f"{src.path}: obs column {col!r} has {int(missing.sum())} missing values (first "
                f"at row {r}). Fix: fill them in the file, or use --obs-fill {key}=<value> with "
                f"--obs-map to another column.")
        out[key] = v
    pert = out[K.PERT_KEY]
    if cfg.control_label != K.CONTROL_LABEL and cfg.control_label in pert.categories:
        if K.CONTROL_LABEL in pert.categories:
            raise ConversionError(
                f"{src.path}: obs column {obs_columns[K.PERT_KEY]!r} has both {cfg.control_label!r} "
                f"(--control-label) and {K.CONTROL_LABEL!r}; which cells are controls?")
        out[K.PERT_KEY] = pert.rename_categories({cfg.control_label: K.CONTROL_LABEL})
    return out


def _sorted_codes(cat: pd.Categorical, first: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Codes under alphabetically sorted categories (``first`` leading), unused ones dropped."""
    cat = cat.remove_unused_categories()
    cats = sorted(cat.categories.tolist())
    if first is not None and first in cats:
        cats.remove(first)
        cats.insert(0, first)
    return cat.reorder_categories(cats).codes.astype(np.int64), cats


def _check_values(data: np.ndarray, path: str, row_of: callable) -> None:
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            k = int(np.flatnonzero(~finite)[0])
            raise ConversionError(
                f"{path}: X holds non-finite values ({data[k]} in source row {row_of(k)}). The "
                "corpus stores raw counts; fix the file or choose the raw counts with --matrix.")
    if data.size and (data < 0).any():
        k = int(np.flatnonzero(data < 0)[0])
        raise ConversionError(
            f"{path}: X holds negative values ({data[k]} in source row {row_of(k)}). The corpus "
            "stores raw counts; choose the raw counts with --matrix raw/X or layers/<name>.")
    if data.dtype.kind == "f" and data.size and (data != np.floor(data)).any():
        k = int(np.flatnonzero(data != np.floor(data))[0])
        raise ConversionError(
            f"{path}: X holds non-integer values ({data[k]} in source row {row_of(k)}): it looks "
            "normalised or log-transformed. The corpus stores raw counts; choose them with "
            "--matrix raw/X or --matrix layers/counts.")


class _Scratch:
    """Uncompressed, contiguous CSR copy of a source (in source row order) for fast gathers.

    Random row reads from compressed chunks decompress a whole chunk per row; from this copy
    they are plain reads. Dense sources do not know their non-zeros up front: ``nnz=None`` makes
    the datasets growable."""

    def __init__(self, path: Path, nnz: int | None, data_dtype, n_rows: int):
        self.path = path
        self.f = h5py.File(path, "w")
        kw = ({"shape": (nnz,)} if nnz is not None else
              {"shape": (0,), "maxshape": (None,), "chunks": (1 << 18,)})
        self.data = self.f.create_dataset("data", dtype=data_dtype, **kw)
        self.indices = self.f.create_dataset("indices", dtype=np.int64, **kw)
        self.growable = nnz is None
        self.indptr = np.zeros(n_rows + 1, np.int64)
        self.pos = 0
        self.row = 0

    def append(self, blk: sp.csr_matrix) -> None:
        n = blk.nnz
        if self.growable:
            self.data.resize((self.pos + n,))
            self.indices.resize((self.pos + n,))
        self.data[self.pos:self.pos + n] = blk.data
        self.indices[self.pos:self.pos + n] = blk.indices
        self.indptr[self.row + 1:self.row + 1 + blk.shape[0]] = blk.indptr[1:] + self.pos
        self.pos += n
        self.row += blk.shape[0]

    def read_rows(self, rows: np.ndarray, n_cols: int) -> sp.csr_matrix:
        return gather_rows(self.data, self.indices, self.indptr, rows, n_cols)

    def close(self) -> None:
        self.f.close()
        self.path.unlink(missing_ok=True)


def _csc_to_scratch(src: H5adSource, scratch_dir: Path, budget: int, a: int, b: int,
                    check) -> _Scratch:
    """External transpose of CSC rows [a, b) into a scratch CSR, bounded memory.

    Entries are bucketed by row range into flat binary files (one sequential pass over the
    columns), then each bucket (at most ~budget bytes) is sorted into rows and appended.
    """
    n = b - a
    row_nnz = np.zeros(n, np.int64)
    for _, _, data, rows, _ in src.iter_csc_columns(budget):
        keep = (rows >= a) & (rows < b)
        check(data[keep], lambda k, r=rows[keep]: int(r[k]))
        row_nnz += np.bincount(rows[keep] - a, minlength=n)
    entry_bytes = 8 + 8 + 8
    cum = np.cumsum(row_nnz)
    n_buckets = max(int(cum[-1] * entry_bytes // budget) + 1, 1) if n else 1
    edges = np.searchsorted(cum, np.linspace(0, cum[-1], n_buckets + 1)[1:-1], side="left")
    edges = np.unique(np.r_[0, edges, n])
    files = [open(scratch_dir / f"bucket{k}.bin", "wb") for k in range(len(edges) - 1)]
    try:
        for c0, _, data, rows, ip in src.iter_csc_columns(budget):
            cols = np.repeat(np.arange(c0, c0 + len(ip) - 1), np.diff(ip))
            keep = (rows >= a) & (rows < b)
            r, c, v = rows[keep] - a, cols[keep], data[keep].astype(np.float64)
            bk = np.searchsorted(edges, r, side="right") - 1
            for k in np.unique(bk):
                sel = bk == k
                np.stack([r[sel].astype(np.float64), c[sel].astype(np.float64), v[sel]],
                         1).tofile(files[k])
    finally:
        for f in files:
            f.close()
    total = int(row_nnz.sum())
    scratch = _Scratch(scratch_dir / "scratch.h5", total, src.info.dtype, n)
    for k in range(len(edges) - 1):
        path = scratch_dir / f"bucket{k}.bin"
        trip = np.fromfile(path, dtype=np.float64).reshape(-1, 3)
        path.unlink()
        r0, r1 = int(edges[k]), int(edges[k + 1])
        order = np.lexsort((trip[:, 1], trip[:, 0]))
        trip = trip[order]
        local = trip[:, 0].astype(np.int64) - r0
        indptr = np.r_[0, np.cumsum(np.bincount(local, minlength=r1 - r0))]
        blk = sp.csr_matrix((trip[:, 2].astype(src.info.dtype), trip[:, 1].astype(np.int64),
                             indptr), shape=(r1 - r0, src.n_vars))
        scratch.append(blk)
    return scratch


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc only).

    Codec threads allocate in their own malloc arenas; without a trim, freed blocks stay in
    those arenas and a task's RSS creeps up with the number of blocks it has processed, i.e.
    with input size. ``malloc_trim`` returns them, keeping peak RSS flat."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _has_zarrs() -> bool:
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    return True


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def convert_store(task: StoreTask, cfg: ConvertConfig, corpus_dir: str, genes: list[str],
                  gene_ids: list[str | None], vocab_hash: str, progress=None,
                  s3: storage.S3Options | None = None) -> dict[str, Any]:
    """Convert one store; returns its summary (with ``location``: where it was written
    relative to the corpus, None for the default ``stores/<name>.zarr``, and ``provenance``).
    Runs in a Ray task (or in-process). ``corpus_dir`` may be ``s3://bucket/prefix`` and the
    input an ``s3://`` object (``s3``: object-storage settings, default the AWS variables)."""
    t0 = time.perf_counter()
    rss0 = _peak_rss_mb()
    e = task.entry
    if progress is None and cfg.progress:
        progress = _ProgressLines(e.name, e.source_rows[1] - e.source_rows[0])
    a, b = e.source_rows
    n = b - a
    G = len(genes)
    gmap = task.gene_map
    budget = cfg.read_budget_mb << 20
    remote_out = storage.is_remote(corpus_dir)
    staging = None  # local working directory of a remote output or input
    if remote_out or storage.is_remote(e.source):
        staging = Path(tempfile.mkdtemp(prefix=f"vcc-convert-{e.name}-"))
    attempt = uuid.uuid4().hex
    if remote_out:  # written locally, then uploaded under an attempt-unique prefix
        tmp = staging / f"{e.name}.zarr"
        scratch_dir = staging / "scratch"
        location = f"{K.CORPUS_STORES_DIR}/{e.name}{ATTEMPT_SEP}{attempt[:12]}.zarr"
    else:
        stores = Path(corpus_dir) / K.CORPUS_STORES_DIR
        tmp = stores / f".{e.name}.zarr.tmp-{attempt[:8]}"
        scratch_dir = stores / f".{e.name}.scratch-{attempt[8:16]}"
        location = None
    uploading = None
    scratch = None
    stack = contextlib.ExitStack()
    try:
        src_path = e.source
        if storage.is_remote(e.source):  # conversion reads sequentially and by row: a local copy
            src_path = str(staging / "input.h5ad")
            storage.download_file(e.source, src_path, s3)
            if file_fingerprint(src_path, full=cfg.full_checksum) != (e.source_size,
                                                                      e.source_checksum):
                raise ConversionError(f"{e.source} changed since planning (size/checksum "
                                      "differ); run the conversion again.")
        with H5adSource(src_path, cfg.matrix, cfg.symbol_column, cfg.gene_id_column) as src:
            src.path = e.source  # messages name the input, not its local copy
            if src.n_obs < b:
                raise ConversionError(f"{e.source} has {src.n_obs} cells; expected >= {b}. "
                                      "The file changed since planning; run again.")
            labels = _labels(src, task.obs_columns, cfg, a, b)
            ctx_c, ctx_cats = _sorted_codes(labels[K.CONTEXT_KEY])
            pert_c, pert_cats = _sorted_codes(labels[K.PERT_KEY], first=K.CONTROL_LABEL)
            bat_c, bat_cats = _sorted_codes(labels[K.BATCH_KEY])
            order = np.lexsort((bat_c, pert_c, ctx_c))  # output row i <- local source row order[i]

            # ---- pass 1 (sequential): validate, totals, nnz after mapping, max; and, when the
            # source is out of output order, route each row into the bucket file of its output
            # range (a distribution sort: every read and write is sequential, see module doc)
            fmt = src.info.fmt
            totals = np.zeros(n, np.float64)
            kept_nnz = np.zeros(n, np.int64)
            max_value = 0.0
            drop = bool((gmap < 0).any())

            def check(data, row_of):
                _check_values(data, e.source, row_of)

            if fmt == "csc":  # rows are scattered over all columns: transpose into a scratch
                scratch_dir.mkdir(parents=True)
                scratch = _csc_to_scratch(src, scratch_dir, budget, a, b, check)
            elif fmt == "dense":  # non-zeros unknown up front: copy into a sparse scratch first
                scratch_dir.mkdir(parents=True)
                scratch = _Scratch(scratch_dir / "scratch.h5", None, src.info.dtype, n)
                for _, _, m in src.iter_row_blocks(a, b, budget):
                    check(m.data, lambda k: a + scratch.row)
                    scratch.append(m)
            if scratch is not None:
                row_nnz = np.diff(scratch.indptr)
                blocks = ((r0, r1, scratch.read_rows(np.arange(r0, r1), src.n_vars))
                          for r0, r1 in _sub_blocks(scratch.indptr[1:], 0, n, budget // 16))
            else:
                row_nnz = src.row_nnz(a, b)
                blocks = ((r0 - a, r1 - a, m) for r0, r1, m in src.iter_row_blocks(a, b, budget))
            runs = 1 + int(np.count_nonzero(np.diff(order) != 1)) if n > 1 else 1
            bucketed = n / runs < 64  # mostly in output order: gather runs straight from source
            pos = np.empty(n, np.int64)
            pos[order] = np.arange(n)
            if bucketed:
                scratch_dir.mkdir(parents=True, exist_ok=True)
                cap = max(budget // 16, 1)  # entries per bucket (~4-8 bytes each on disk)
                edges = np.array([o0 for o0, _ in _sub_blocks(np.cumsum(row_nnz[order]), 0, n, cap)]
                                 + [n])
                bucket_of_src = np.searchsorted(edges, pos, side="right") - 1
            for nblk, (r0, r1, m) in enumerate(blocks):
                if fmt == "csr":
                    ip = m.indptr
                    check(m.data, lambda k, ip=ip, r0=r0: a + r0 + int(
                        np.searchsorted(ip, k, side="right") - 1))
                if m.data.size:
                    max_value = max(max_value, float(m.data.max()))
                totals[r0:r1] = np.asarray(m.sum(1, dtype=np.float64)).ravel()
                m.sum_duplicates()
                if drop:
                    m.data[gmap[m.indices] < 0] = 0
                m.eliminate_zeros()
                kept_nnz[r0:r1] = np.diff(m.indptr)
                if bucketed:
                    bk = bucket_of_src[r0:r1]
                    srt = np.argsort(bk, kind="stable")
                    mm = m[srt]
                    bks = bk[srt]
                    cut = np.flatnonzero(np.r_[True, bks[1:] != bks[:-1], True])
                    for s0, s1 in zip(cut[:-1], cut[1:]):
                        e0, e1 = mm.indptr[s0], mm.indptr[s1]
                        _write_segment(scratch_dir / f"b{bks[s0]:06d}.bin", r0 + srt[s0:s1],
                                       np.diff(mm.indptr[s0:s1 + 1]), mm.data[e0:e1],
                                       mm.indices[e0:e1])
                if nblk % 8 == 0:
                    _release_free_memory()
                if progress is not None:
                    progress("scan", r1 - r0)
            nnz = int(kept_nnz.sum())
            layout = choose_layout(G, max_value, nnz / max(n, 1), cfg.chunk_rows, cfg.shard_mb,
                                   cfg.compressor, cfg.clevel)

            # ---- write the AnnData skeleton (obs, var) under the temporary name
            import anndata as ad
            import zarr

            ad.settings.zarr_write_format = 3
            barcodes = src.obs_column(None)[a:b][order]
            obs = pd.DataFrame({
                K.CONTEXT_KEY: pd.Categorical.from_codes(ctx_c[order], ctx_cats),
                K.PERT_KEY: pd.Categorical.from_codes(pert_c[order], pert_cats),
                K.BATCH_KEY: pd.Categorical.from_codes(bat_c[order], bat_cats),
                K.GUIDE_KEY: labels[K.GUIDE_KEY][order].remove_unused_categories(),
                K.TOTAL_COUNTS_KEY: totals[order].round().astype(np.int64),
                K.SOURCE_ROW_KEY: (order + a).astype(np.int64),
            }, index=pd.Index(barcodes.astype(str), name=None))
            del barcodes, labels
            if not obs.index.is_unique:  # anndata needs unique names; keep them traceable
                obs.index = pd.Index([f"{bc}-{r}" for bc, r in zip(obs.index, order + a)])
            var = pd.DataFrame({K.GENE_ID_KEY: [g if g is not None else "" for g in gene_ids]},
                               index=pd.Index(genes))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ad.AnnData(obs=obs, var=var).write_zarr(str(tmp))
            del obs
            root = zarr.open_group(str(tmp), mode="a", use_consolidated=False)
            # the Rust codec pipeline encodes shards on all cores, off the GIL (docs/stack_notes.md);
            # zarr fixes an array's pipeline when the array is created, so set it first
            if _has_zarrs():
                stack.enter_context(
                    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}))
            writer = CSRStoreWriter(root, n, G, nnz, layout)

            # ---- pass B: gather in output order, map genes, write, accumulate
            acc = GeneAccumulator(n_genes=G)
            cond_key = ctx_c[order] * (len(pert_cats) + 1) + pert_c[order]
            cond_starts = np.flatnonzero(np.r_[True, cond_key[1:] != cond_key[:-1]])
            cond_stops = np.r_[cond_starts[1:], n]
            pb = _PseudobulkWriter(root, len(cond_starts), G)
            sorted_tot = totals[order]
            out_nnz = kept_nnz[order]
            cum = np.cumsum(out_nnz)
            # pass B holds ~50 bytes of temporaries per non-zero (gather, reorder, map, stats):
            # size its blocks so those stay within the read budget
            per_entry = 50
            if bucketed:
                out_blocks = _bucket_blocks(scratch_dir, edges, pos, src.n_vars, budget // per_entry)
            else:
                reader = (scratch.read_rows if scratch is not None else
                          (lambda rows, ncol: src.read_rows(rows + a)))
                out_blocks = _gather_blocks(reader, order, cum, src.n_vars, budget // per_entry)
            for o0, o1, blk in out_blocks:
                data, ind, ip = _map_block(blk, gmap, G)
                writer.append(data.astype(layout.data_dtype), ind.astype(layout.indices_dtype), ip)
                lg = acc.update(data, ind, ip, sorted_tot[o0:o1])
                pb.add(o0, o1, ip, ind, lg, cond_starts, cond_stops)
                if progress is not None:
                    progress("write", o1 - o0)
            writer.close()
            pb.close()
            stack.close()

            # ---- uns: groups, conditions, store manifest; then commit by rename
            gkey = np.stack([ctx_c[order], pert_c[order], bat_c[order]], 1)
            gstarts = np.flatnonzero(np.r_[True, (gkey[1:] != gkey[:-1]).any(1)])
            gstops = np.r_[gstarts[1:], n]
            groups = pd.DataFrame({
                K.CONTEXT_KEY: [ctx_cats[i] for i in gkey[gstarts, 0]],
                K.PERT_KEY: [pert_cats[i] for i in gkey[gstarts, 1]],
                K.BATCH_KEY: [bat_cats[i] for i in gkey[gstarts, 2]],
                "start": gstarts.astype(np.int64), "stop": gstops.astype(np.int64)})
            conds = pd.DataFrame({
                K.CONTEXT_KEY: [ctx_cats[i] for i in ctx_c[order][cond_starts]],
                K.PERT_KEY: [pert_cats[i] for i in pert_c[order][cond_starts]],
                "start": cond_starts.astype(np.int64), "stop": cond_stops.astype(np.int64)})
            meta = {
                "format": K.CORPUS_FORMAT, "format_version": K.CORPUS_FORMAT_VERSION,
                "name": e.name, "source": e.source, "source_rows": np.asarray(e.source_rows),
                "source_size": e.source_size, "source_checksum": e.source_checksum,
                "vocab_hash": vocab_hash, "n_cells": n, "nnz": nnz,
                "layout": layout.to_dict(), "source_format": fmt,
                "stats_target_sum": K.STATS_TARGET_SUM,
                "gene_accumulator": acc.to_arrays(),
                "complete": True,
            }
            from anndata.io import write_elem

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_elem(root["uns"], K.STORE_GROUPS_KEY, groups)
                write_elem(root["uns"], "vcc_dist_conditions", conds)
                write_elem(root["uns"], K.STORE_UNS_KEY, meta)
                zarr.consolidate_metadata(str(tmp))
        if remote_out:
            # no rename on S3: the root zarr.json (consolidated metadata) goes last, so a
            # partial upload never opens; corpus.json listing ``location`` is the commit point
            uploading = storage.join(corpus_dir, *location.split("/"))
            storage.upload_dir_last(tmp, uploading, "zarr.json", s3)
            uploading = None
        else:
            final = store_path(corpus_dir, e.name)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)  # the commit point
        seconds = time.perf_counter() - t0
        return {"name": e.name, "n_cells": n, "nnz": nnz, "seconds": seconds,
                "peak_rss_mb": _peak_rss_mb(), "peak_rss_mb_at_start": rss0,
                "layout": layout.to_dict(), "bucketed": bool(bucketed), "location": location,
                "provenance": {**process_provenance(), "seconds": round(seconds, 3)}}
    except (OSError, KeyError) as err:  # h5py's errors for damaged files
        raise ConversionError(
            f"{e.source}: reading failed during conversion of store {e.name} ({type(err).__name__}: "
            f"{err}). The file is truncated or corrupt: re-export it (anndata write_h5ad) or remove "
            "it from the inputs; nothing of this store was kept.") from None
    finally:
        stack.close()
        if scratch is not None:
            scratch.f.close()
        shutil.rmtree(scratch_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if uploading is not None:  # a failed upload: remove what reached the object store
            with contextlib.suppress(Exception):
                storage.delete_tree(uploading, s3)


_SEG_DATA = (np.uint16, np.uint32, np.float64)
_SEG_IND = (np.uint16, np.uint32, np.int64)


def _write_segment(path: Path, rows: np.ndarray, nnz: np.ndarray, data: np.ndarray,
                   ind: np.ndarray) -> None:
    """Append rows (their local ids, non-zeros per row, values, columns) to a bucket file, in
    the smallest dtypes that hold them (values are validated integer counts)."""
    mx = float(data.max()) if data.size else 0.0
    dc = 0 if mx < 2**16 else (1 if mx < 2**32 else 2)
    im = int(ind.max()) if ind.size else 0
    ic = 0 if im < 2**16 else (1 if im < 2**32 else 2)
    with open(path, "ab") as f:
        np.array([len(rows), len(data), dc, ic], np.int64).tofile(f)
        np.asarray(rows, np.int64).tofile(f)
        np.asarray(nnz, np.int64).tofile(f)
        np.asarray(data).astype(_SEG_DATA[dc]).tofile(f)
        np.asarray(ind).astype(_SEG_IND[ic]).tofile(f)


def _read_bucket(path: Path):
    buf = np.fromfile(path, dtype=np.uint8)
    rows, nnz, data, ind = [], [], [], []
    off = 0
    while off < buf.size:
        nr, ne, dc, ic = (int(v) for v in buf[off:off + 32].view(np.int64))
        off += 32
        for out, dt, k in ((rows, np.int64, nr), (nnz, np.int64, nr), (data, _SEG_DATA[dc], ne),
                           (ind, _SEG_IND[ic], ne)):
            nb = k * np.dtype(dt).itemsize
            out.append(buf[off:off + nb].view(dt))
            off += nb
    ind = np.concatenate(ind)
    return (np.concatenate(rows), np.concatenate(nnz), np.concatenate(data),
            ind.astype(np.int32 if ind.size == 0 or ind.max() < 2**31 else np.int64))


def _sub_blocks(cum: np.ndarray, start: int, stop: int, max_entries: int):
    """Split rows [start, stop) into runs of at most max_entries non-zeros (>= 1 row)."""
    o0 = start
    while o0 < stop:
        base = cum[o0 - 1] if o0 else 0
        o1 = int(np.searchsorted(cum, base + max(max_entries, 1), side="right"))
        o1 = min(max(o1, o0 + 1), stop)
        yield o0, o1
        o0 = o1


def _gather_blocks(reader, order, cum, n_cols, max_entries):
    """Output blocks read straight from the source (it is mostly in output order)."""
    for o0, o1 in _sub_blocks(cum, 0, len(order), max_entries):
        rows = order[o0:o1]
        srt = np.argsort(rows, kind="stable")
        blk = reader(rows[srt], n_cols)
        inv = np.empty_like(srt)
        inv[srt] = np.arange(len(srt))
        yield o0, o1, blk[inv]


def _bucket_blocks(scratch_dir: Path, edges, pos, n_cols, max_entries):
    """Output blocks from the bucket files: each bucket holds one output row range."""
    for k in range(len(edges) - 1):
        lo, hi = int(edges[k]), int(edges[k + 1])
        path = scratch_dir / f"b{k:06d}.bin"
        _release_free_memory()
        rows, nnz, data, ind = _read_bucket(path)  # every bucket has >= 1 row, so a file
        path.unlink()
        tgt = pos[rows] - lo
        if len(rows) != hi - lo or not np.array_equal(np.sort(tgt), np.arange(hi - lo)):
            raise RuntimeError(f"bucket {k} is incomplete: {len(rows)} of {hi - lo} rows")
        perm = np.argsort(tgt)
        blk = sp.csr_matrix((data, ind, np.r_[0, np.cumsum(nnz)]),
                            shape=(len(rows), n_cols))[perm]
        bcum = np.cumsum(np.diff(blk.indptr))
        for s0, s1 in _sub_blocks(bcum, 0, hi - lo, max_entries):
            yield lo + s0, lo + s1, blk[s0:s1]


class _ProgressLines:
    """Progress of one store as log lines every 10% of each pass (from a Ray task, a tqdm bar
    would interleave with the driver's; Ray forwards these lines to the driver's console)."""

    def __init__(self, name: str, n: int):
        self.name, self.n = name, max(n, 1)
        self.done = {"scan": 0, "write": 0}
        self.shown = {"scan": 0, "write": 0}

    def __call__(self, phase: str, rows: int) -> None:
        self.done[phase] += rows
        pct = 100 * self.done[phase] // self.n
        if pct >= self.shown[phase] + 10:
            self.shown[phase] = pct - pct % 10
            what = "pass 1 (read, validate, sort)" if phase == "scan" else "pass 2 (write)"
            print(f"  store {self.name}: {what} {self.shown[phase]}%", flush=True)


def _map_block(blk: sp.csr_matrix, gmap: np.ndarray, G: int):
    """Source columns -> vocabulary columns; drops unmapped genes and zeros; sorted indices."""
    blk.sum_duplicates()
    blk.eliminate_zeros()
    cols = gmap[blk.indices]
    keep = cols >= 0
    if not keep.all():
        rows = np.repeat(np.arange(blk.shape[0]), np.diff(blk.indptr))[keep]
        blk = sp.csr_matrix((blk.data[keep], (rows, cols[keep])), shape=(blk.shape[0], G))
    else:
        blk = sp.csr_matrix((blk.data, cols, blk.indptr), shape=(blk.shape[0], G))
    if not blk.has_sorted_indices:  # an O(nnz) check; sorting only when the map reorders genes
        blk.sort_indices()
    return blk.data, blk.indices, blk.indptr.astype(np.int64)


class _PseudobulkWriter:
    """Mean log1p-CP10k per (context, perturbation) condition, written 16 conditions at a time."""

    ROWS = 16

    def __init__(self, root, n_conds: int, G: int):
        self.arr = root["uns"].create_array(
            "vcc_dist_pseudobulk", shape=(n_conds, G), dtype="float32",
            chunks=(min(self.ROWS, max(n_conds, 1)), G))
        self.arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        self.G = G
        self.open: dict[int, np.ndarray] = {}
        self.buf: list[np.ndarray] = []
        self.next = 0

    def add(self, o0, o1, ip, ind, lg, starts, stops):
        c_first = int(np.searchsorted(starts, o0, side="right") - 1)
        c_last = int(np.searchsorted(starts, o1 - 1, side="right") - 1)
        for c in range(c_first, c_last + 1):
            lo = max(int(starts[c]), o0)
            hi = min(int(stops[c]), o1)
            e0, e1 = ip[lo - o0], ip[hi - o0]
            s = self.open.setdefault(c, np.zeros(self.G, np.float64))
            s += np.bincount(ind[e0:e1].astype(np.intp), weights=lg[e0:e1], minlength=self.G)
            if stops[c] <= o1:
                self.buf.append((self.open.pop(c) / (stops[c] - starts[c])).astype(np.float32))
                if len(self.buf) == self.ROWS:
                    self._flush()

    def _flush(self):
        if self.buf:
            k = len(self.buf)
            self.arr[self.next:self.next + k] = np.stack(self.buf)
            self.next += k
            self.buf = []

    def close(self):
        self._flush()


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def _open_store(path: Path | str, s3: storage.S3Options | None = None):
    """A finished store's root group, read through its consolidated metadata: written last
    (locally before the rename; on S3 the root zarr.json is uploaded last), so a store that
    opens this way was written completely."""
    import zarr

    return zarr.open_group(storage.open_zarr_store(path, "r", s3), mode="r",
                           use_consolidated=True)


def _store_is_complete(path: Path | str, entry: StoreEntry, vocab_hash: str,
                       s3: storage.S3Options | None = None) -> bool:
    """Whether the store at ``path`` carries its completion mark and was made from ``entry``'s
    source rows with this vocabulary."""
    from anndata.io import read_elem

    try:
        meta = read_elem(_open_store(path, s3)["uns"][K.STORE_UNS_KEY])
    except Exception:  # noqa: BLE001 - anything unreadable is by definition not complete
        return False
    return (bool(meta.get("complete")) and meta.get("vocab_hash") == vocab_hash
            and meta.get("source_checksum") == entry.source_checksum
            and list(np.asarray(meta.get("source_rows")).tolist()) == entry.source_rows)


_FINALIZE_ONLY = {"n_top_genes"}


def _reconcile(existing: CorpusManifest | None, planned: CorpusManifest, corpus: Path,
               cfg: ConvertConfig) -> CorpusManifest:
    """Resume logic: keep completed stores that still match their sources; refuse silent
    changes of options or vocabulary."""
    if existing is None:
        return planned
    # options that only shape the final statistics are re-applied on resume, not refused
    diff = {k: (existing.options.get(k), planned.options.get(k))
            for k in set(existing.options) | set(planned.options)
            if existing.options.get(k) != planned.options.get(k) and k not in _FINALIZE_ONLY}
    if diff:
        raise ConversionError(
            f"{corpus} was converted with other options {diff} (stored, asked). Fix: use the "
            "original options to resume, a new output directory, or --overwrite.")
    if existing.vocab_hash != planned.vocab_hash:
        raise ConversionError(
            f"{corpus} has a different gene vocabulary than these inputs give (inputs added or "
            "changed?). Fix: a new output directory, or --overwrite to rebuild it.")
    old = {s.name: s for s in existing.stores}
    for s in planned.stores:
        o = old.get(s.name)
        if o is not None and o.status == "complete":
            if (o.source_checksum, o.source_rows) != (s.source_checksum, s.source_rows):
                raise ConversionError(
                    f"input {s.source} changed since store {s.name} was written. Fix: "
                    "--overwrite to rebuild the corpus, or restore the original file.")
            s.status, s.n_cells, s.nnz = o.status, o.n_cells, o.nnz
            s.location, s.provenance = o.location, o.provenance
    return planned


def convert_corpus(cfg: ConvertConfig) -> CorpusManifest:
    """Convert inputs into a corpus at ``cfg.out`` (a directory or ``s3://bucket/prefix``);
    resumes an interrupted run."""
    if storage.is_remote(cfg.out):
        return _convert_remote_corpus(cfg)
    corpus = Path(cfg.out)
    manifest, tasks = plan_corpus(cfg)
    print("\n".join(gene_coverage_lines(manifest)), flush=True)
    if cfg.overwrite and corpus.exists():
        shutil.rmtree(corpus)
    (corpus / K.CORPUS_STORES_DIR).mkdir(parents=True, exist_ok=True)
    existing = None
    if (corpus / K.CORPUS_MANIFEST).exists():
        existing = load_manifest(corpus, require_complete=False)
    elif any((corpus / K.CORPUS_STORES_DIR).iterdir()):
        raise ConversionError(f"{corpus} holds stores but no {K.CORPUS_MANIFEST}; it is not a "
                              "corpus of this tool. Use an empty directory or --overwrite.")
    manifest = _reconcile(existing, manifest, corpus, cfg)
    # hidden temporaries of killed runs are never complete: remove them
    for p in (corpus / K.CORPUS_STORES_DIR).glob(".*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    # a store renamed into place just before a kill, but not yet recorded: adopt it if valid
    for t in tasks:
        path = store_path(corpus, t.entry.name)
        if t.entry.status != "complete" and path.exists():
            if _store_is_complete(path, t.entry, manifest.vocab_hash):
                _adopt(t.entry, path)
            else:
                shutil.rmtree(path)
    return _convert_pending(manifest, tasks, corpus, cfg, None)


def _convert_pending(manifest: CorpusManifest, tasks: list[StoreTask], corpus: Path | str,
                     cfg: ConvertConfig, s3: storage.S3Options | None) -> CorpusManifest:
    """Record the plan (status converting), convert the stores not yet complete, finalize."""
    manifest.status = "converting"
    manifest.save(corpus)
    pending = [t for t in tasks if t.entry.status != "complete"]
    total_cells = sum(t.entry.source_rows[1] - t.entry.source_rows[0] for t in pending)
    _run_tasks(pending, cfg, manifest, corpus, total_cells, s3)
    _finalize(manifest, corpus, cfg, s3)
    return manifest


def _listing(uri: str, s3: storage.S3Options | None) -> list[str]:
    """Names under ``uri``, listed afresh (another process may have written); none: []."""
    try:
        return storage.listdir(uri, s3)
    except FileNotFoundError:
        return []


def _convert_remote_corpus(cfg: ConvertConfig) -> CorpusManifest:
    """convert_corpus into object storage (docs/design.md §3, "Commit protocol on object
    storage"): resume from corpus.json, adopt stores finished but not yet recorded, delete
    abandoned attempt prefixes, convert the rest."""
    corpus = str(storage.location(cfg.out))
    s3 = storage.S3Options.from_env()  # captured once; shipped to the tasks
    if not storage.bucket_exists(corpus, s3):
        bucket = storage.split_s3(corpus)[0]
        raise ConversionError(
            f"output {cfg.out}: bucket {bucket!r} does not exist ({s3.describe()}). Fix: create "
            "the bucket, correct the URI, or set AWS_ENDPOINT_URL to the object store that "
            "holds it.")
    manifest, tasks = plan_corpus(cfg)
    print("\n".join(gene_coverage_lines(manifest)), flush=True)
    if cfg.overwrite:
        storage.delete_tree(corpus, s3)
    existing = None
    if K.CORPUS_MANIFEST in _listing(corpus, s3):
        existing = load_manifest(corpus, require_complete=False, options=s3)
    names = _listing(str(storage.join(corpus, K.CORPUS_STORES_DIR)), s3)
    if existing is None and names:
        raise ConversionError(f"{corpus} holds stores but no {K.CORPUS_MANIFEST}; it is not a "
                              "corpus of this tool. Use an empty prefix or --overwrite.")
    manifest = _reconcile(existing, manifest, corpus, cfg)
    listed = {t.entry.relpath for t in tasks if t.entry.status == "complete"}
    attempts: dict[str, list[str]] = {}  # store name -> its unlisted attempt prefixes
    for n in names:
        base, sep, rest = n.rpartition(ATTEMPT_SEP)
        rel = f"{K.CORPUS_STORES_DIR}/{n}"
        if sep and ATTEMPT_RE.fullmatch(rest) and rel not in listed:
            attempts.setdefault(base, []).append(rel)
    # an attempt finished but not yet recorded when the run was killed: adopt it if it carries
    # its completion mark; every other unlisted attempt is abandoned: delete it
    for t in tasks:
        if t.entry.status == "complete":
            continue  # its other attempts, if any, are deleted below
        for rel in sorted(attempts.pop(t.entry.name, [])):
            path = storage.join(corpus, *rel.split("/"))
            if t.entry.status != "complete" and _store_is_complete(path, t.entry,
                                                                   manifest.vocab_hash, s3):
                _adopt(t.entry, path, s3)
                t.entry.location = rel
            else:
                storage.delete_tree(path, s3)
    for rels in attempts.values():
        for rel in rels:
            storage.delete_tree(storage.join(corpus, *rel.split("/")), s3)
    return _convert_pending(manifest, tasks, corpus, cfg, s3)


def _adopt(entry: StoreEntry, path: Path | str, s3: storage.S3Options | None = None) -> None:
    from anndata.io import read_elem

    meta = read_elem(_open_store(path, s3)["uns"][K.STORE_UNS_KEY])
    entry.status, entry.n_cells, entry.nnz = "complete", int(meta["n_cells"]), int(meta["nnz"])
    entry.provenance = {"adopted": True}  # written by a run killed before recording it


class ManifestSaver:
    """Saves corpus.json while stores finish, bounded: at most once every ``interval_s``
    seconds, and only when the last save took at most ``fraction`` of the time since (a save
    writes the whole manifest, O(stores): one save per finished store made a conversion
    O(stores^2), 108 h projected at 60,000 stores in benchmarks/results/scale.md). Saving
    thus takes at most about ``fraction`` of the driver's time, linear in the stores overall.
    Stores finished since the last save are recorded by ``flush`` (called when the tasks end,
    also on failure); after a hard kill they are adopted on resume (``_convert_remote_corpus``,
    and ``convert_corpus`` for a local corpus) when they carry their completion mark."""

    def __init__(self, manifest: CorpusManifest, corpus: Path | str, interval_s: float = 1.0,
                 fraction: float = 0.05, clock=time.monotonic):
        self.manifest, self.corpus = manifest, corpus
        self.interval_s, self.fraction, self.clock = interval_s, fraction, clock
        self.unsaved = 0  # stores finished since the last save
        self.saves = 0
        self.last_end = clock()
        self.last_cost = 0.0

    def store_done(self) -> None:
        self.unsaved += 1
        wait = max(self.interval_s, self.last_cost / self.fraction)
        if self.clock() - self.last_end >= wait:
            self.flush()

    def flush(self) -> None:
        if not self.unsaved:
            return
        t0 = self.clock()
        self.manifest.save(self.corpus)  # the driver is the only writer of corpus.json
        self.last_end = self.clock()
        self.last_cost = self.last_end - t0
        self.unsaved = 0
        self.saves += 1


def _run_tasks(pending: list[StoreTask], cfg: ConvertConfig, manifest: CorpusManifest,
               corpus: Path | str, total_cells: int, s3: storage.S3Options | None = None) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=total_cells, unit="cells", desc="convert", disable=not cfg.progress,
               dynamic_ncols=True)
    saver = ManifestSaver(manifest, corpus, cfg.manifest_save_interval_s,
                          cfg.manifest_save_fraction)

    def done(t: StoreTask, r: dict) -> None:
        t.entry.status, t.entry.n_cells, t.entry.nnz = "complete", r["n_cells"], r["nnz"]
        t.entry.location, t.entry.provenance = r["location"], r["provenance"]
        saver.store_done()
        bar.update(r["n_cells"])
        where = r["provenance"].get("node_ip") or r["provenance"]["host"]
        bar.write(f"  store {r['name']}: {r['n_cells']} cells in {r['seconds']:.1f}s "
                  f"on {where} (peak RSS {r['peak_rss_mb']:.0f} MB)")

    args = (str(corpus), manifest.genes, manifest.gene_ids, manifest.vocab_hash)
    try:
        if cfg.parallel == "serial" or not pending:
            for t in pending:
                done(t, convert_store(t, cfg, *args, s3=s3))
        else:
            import ray

            from vcc_dist.ray_utils import ensure_ray

            ensure_ray()
            # SPREAD: stores go to every node, not packed onto the driver's; retries cover a
            # lost worker or node (each attempt writes its own files: safe to repeat)
            remote = ray.remote(num_cpus=cfg.num_cpus_per_task, max_retries=cfg.task_retries,
                                scheduling_strategy="SPREAD")(_convert_remote)
            cfg_ref = ray.put(cfg)
            refs = {remote.remote(t, cfg_ref, *args, s3): t for t in pending}
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    t = refs.pop(ref)
                    try:
                        done(t, ray.get(ref))
                    except ray.exceptions.RayTaskError as err:
                        for r in refs:
                            ray.cancel(r, force=True)
                        cause = err.cause if hasattr(err, "cause") else err
                        if isinstance(cause, ConversionError):
                            # the task's own error type and message, without Ray's wrapper
                            raise type(cause)(str(cause)) from None
                        raise
    finally:
        saver.flush()
        bar.close()


def _convert_remote(task, cfg, corpus, genes, gene_ids, vocab_hash, s3=None):
    return convert_store(task, cfg, corpus, genes, gene_ids, vocab_hash, s3=s3)


def _finalize(manifest: CorpusManifest, corpus: Path | str, cfg: ConvertConfig,
              s3: storage.S3Options | None = None) -> None:
    from anndata.io import read_elem

    acc = GeneAccumulator(n_genes=len(manifest.genes))
    contexts: set[str] = set()
    control_contexts: set[str] = set()
    perts: set[str] = set()
    n_controls = 0
    cells_per_cond: list[int] = []
    for s in manifest.stores:
        root = _open_store(store_path(corpus, s), s3)
        meta = read_elem(root["uns"][K.STORE_UNS_KEY])
        acc.merge(GeneAccumulator.from_arrays(meta["gene_accumulator"]))
        conds = read_elem(root["uns"]["vcc_dist_conditions"])
        contexts |= set(conds[K.CONTEXT_KEY])
        perts |= set(conds[K.PERT_KEY]) - {K.CONTROL_LABEL}
        size = conds["stop"] - conds["start"]
        ctrl = conds[K.PERT_KEY] == K.CONTROL_LABEL
        n_controls += int(size[ctrl].sum())
        control_contexts |= set(conds[K.CONTEXT_KEY][ctrl])
        cells_per_cond += size[~ctrl].tolist()
    table = acc.gene_table(n_top_genes=cfg.n_top_genes)
    manifest.gene_stats = {c: table[c].tolist() for c in table.columns}
    cpc = np.asarray(cells_per_cond) if cells_per_cond else np.zeros(1)
    manifest.summary = {
        "n_cells": int(acc.n_cells), "n_genes": len(manifest.genes),
        "n_stores": len(manifest.stores), "nnz": int(sum(s.nnz or 0 for s in manifest.stores)),
        "n_contexts": len(contexts), "n_perturbations": len(perts), "n_controls": n_controls,
        "cells_per_condition_median": float(np.median(cpc)),
        "cells_per_condition_min": int(cpc.min()), "cells_per_condition_max": int(cpc.max()),
        "n_highly_variable": int(table["highly_variable"].sum()),
    }
    manifest.status = "complete"
    manifest.save(corpus)
    lacking = sorted(contexts - control_contexts)
    if lacking:
        warnings.warn(ConversionWarning(
            f"{len(lacking)} context(s) have no control cells: {lacking[:10]}. ST training needs "
            f"controls in every context (validate_corpus reports this as a problem). Fix: add "
            f"their control cells, or check --control-label ({cfg.control_label!r})."),
            stacklevel=3)


def config_from_dict(d: dict[str, Any]) -> ConvertConfig:
    d = dict(d)
    d["inputs"] = tuple(d["inputs"])
    return ConvertConfig(**d)


def config_to_dict(cfg: ConvertConfig) -> dict[str, Any]:
    return asdict(cfg)
