"""Row-range reads from a corpus (docs/design.md §4): the one place that touches store bytes.

Every loader in vcc-dist reads rows through :class:`CorpusReader`:

* a store's ``indptr``, ``total_counts`` and obs label codes are held in memory (8 + 8 + a few
  bytes per cell) for at most ``max_open_stores`` stores at a time (least recently used are
  closed), so a reader's memory does not grow with the number of stores in a corpus;
* a request for rows becomes sorted runs of consecutive rows; runs closer than one inner chunk
  are merged (a chunk is decoded once either way), and each merged run costs one slice of
  ``X/data`` and one of ``X/indices`` through zarr's Rust codec pipeline (zarrs);
* the rows come back in the order asked for, as a :class:`CSRBlock` of raw counts, which
  :meth:`CorpusReader.normalize` turns into scanpy-identical ``normalize_total`` + ``log1p``
  values and :func:`densify` into a dense float32 matrix over the chosen genes.

Why not anndata's lazy ``sparse_dataset``: it re-reads ``indptr`` slices and decodes each
requested row range separately (no merging, no reuse of decoded chunks) and cannot return rows
in a requested order; it was 2x slower per row in benchmarks/store_layout.py.

A corpus may live in object storage (``s3://bucket/prefix``, vcc_dist/storage.py): the stores
are opened through ``storage.open_zarr_store`` and a read fetches up to
``storage.concurrency()`` slices (of ``X/data`` or ``X/indices``) at once per process, each
slice's chunks with zarr's own bounded ``async.concurrency``; values are identical to a local
read.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numba as nb
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from zarr.core.buffer.cpu import NDBuffer

from vcc_dist import constants as K
from vcc_dist import storage
from vcc_dist.data.corpus import CorpusError, CorpusManifest, load_manifest, store_path

#: obs columns whose integer codes a reader keeps per store (labels stay in the categories)
LABEL_KEYS = (K.CONTEXT_KEY, K.PERT_KEY, K.BATCH_KEY)


def zarrs_pipeline(threads: int | None = None):
    """Context manager selecting the zarrs (Rust) codec pipeline when it is installed.

    zarrs decodes the chunks of one slice in parallel and off the GIL; it made reads 2.4-3.2x
    cheaper per CPU second (benchmarks/store_layout.py). ``threads`` caps its thread pool: a
    Ray task holding one CPU should decode on one thread (busy-waiting pool threads of
    several tasks on the same cores cost CPU time for nothing)."""
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return contextlib.nullcontext()
    cfg = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
    if threads:
        cfg["threading.max_workers"] = int(threads)
    return zarr.config.set(cfg)


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep freed large buffers in this process's heap instead of returning them to the OS.

    glibc serves allocations above 32 MiB with fresh mmap pages, so every batch buffer of a
    loader (tens to hundreds of MB) page-faults on first touch; that was a third of a read
    task's CPU time (benchmarks/RESULTS.md). Raising the mmap and trim thresholds makes them
    reuse heap memory; the process keeps its high-water mark, which the stream settings bound.
    Called once per process by every store reader; set VCC_DIST_MALLOC=default to skip it."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("VCC_DIST_MALLOC") == "default":
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: 1 GiB
        libc.mallopt(-1, 2 << 30)  # M_TRIM_THRESHOLD: 2 GiB
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


# ---------------------------------------------------------------------------------------------
# blocks of rows
# ---------------------------------------------------------------------------------------------


@dataclass
class CSRBlock:
    """Rows of one or more stores in CSR form (columns = corpus vocabulary).

    ``data`` holds raw counts as stored (unsigned integers) until :meth:`CorpusReader.normalize`
    replaces it with float32 log1p values. ``totals`` is each row's ``total_counts``."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray  # int64, len n_rows + 1
    totals: np.ndarray  # int64 per row
    n_cols: int
    normalized: bool = False  # data already float32 normalize_total (+ log1p) values

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def to_scipy(self):
        # scipy wants signed indices (the stores keep uint16/uint32)
        return sp.csr_matrix((self.data, self.indices.astype(np.int64), self.indptr),
                             shape=(self.n_rows, self.n_cols))


@nb.njit(nogil=True, cache=True)
def _gather_spans(src_data, src_idx, starts, lens, out_ptr, out_data, out_idx):  # pragma: no cover
    """Copy spans ``[starts[r], starts[r] + lens[r])`` of the source arrays, row after row."""
    k = 0
    out_ptr[0] = 0
    for r in range(starts.shape[0]):
        a = starts[r]
        for j in range(lens[r]):
            out_data[k] = src_data[a + j]
            out_idx[k] = src_idx[a + j]
            k += 1
        out_ptr[r + 1] = k


@nb.njit(nogil=True, cache=True)
def _gather_spans_scaled(src_data, src_idx, starts, lens, scale, out_ptr, out_data,
                         out_idx):  # pragma: no cover
    """``_gather_spans`` that writes float32(count) / scale[row] (normalize_total) on the way."""
    k = 0
    out_ptr[0] = 0
    for r in range(starts.shape[0]):
        a = starts[r]
        s = scale[r]
        for j in range(lens[r]):
            out_data[k] = np.float32(src_data[a + j]) / s
            out_idx[k] = src_idx[a + j]
            k += 1
        out_ptr[r + 1] = k


@nb.njit(nogil=True, cache=True)
def _scale_rows(indptr, counts, scale, out):  # pragma: no cover
    """out[j] = float32(counts[j]) / scale[row of j] (scanpy's ``x / s`` in float32)."""
    for r in range(indptr.shape[0] - 1):
        s = scale[r]
        for j in range(indptr[r], indptr[r + 1]):
            out[j] = np.float32(counts[j]) / s


@nb.njit(nogil=True, cache=True)
def _densify(indptr, indices, data, colmap, out):  # pragma: no cover
    """out[r, colmap[g]] = value for every stored (r, g) whose gene is selected (colmap >= 0),
    zeros elsewhere. Each row is zeroed right before its scatter, while it is in cache: one
    pass over the output instead of a separate zero-fill."""
    for r in range(indptr.shape[0] - 1):
        row = out[r]
        row[:] = 0
        for j in range(indptr[r], indptr[r + 1]):
            c = colmap[indices[j]]
            if c >= 0:
                row[c] = data[j]


def densify(block: CSRBlock, colmap: np.ndarray, n_out: int,
            out: np.ndarray | None = None) -> np.ndarray:
    """Dense float32 ``(n_rows, n_out)`` matrix of ``block`` over the genes that ``colmap``
    (vocabulary column -> output column, -1 = dropped) selects. ``out`` (any content, C order)
    lets a caller write straight into a preallocated batch tensor."""
    if out is None:
        out = np.empty((block.n_rows, n_out), np.float32)
    elif out.shape != (block.n_rows, n_out) or not out.flags.c_contiguous:
        raise ValueError(f"out has shape {out.shape}, expected C-ordered {(block.n_rows, n_out)}")
    _densify(block.indptr, block.indices, block.data, colmap, out)
    return out


def merge_runs(rows: np.ndarray, indptr: np.ndarray, max_gap: int) -> np.ndarray:
    """Sorted unique ``rows`` -> ``(k, 2)`` row runs ``[start, stop)``; consecutive runs whose
    element gap is below ``max_gap`` (one inner chunk) are merged, since reading through the
    gap decodes no chunk that the two reads would not decode anyway."""
    if rows.size == 0:
        return np.zeros((0, 2), np.int64)
    brk = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, brk]]
    stops = rows[np.r_[brk - 1, rows.size - 1]] + 1
    if starts.size > 1:
        gap = indptr[starts[1:]] - indptr[stops[:-1]]
        keep = np.r_[True, gap >= max_gap]
        run_id = np.cumsum(keep) - 1
        new_starts = starts[keep]
        new_stops = np.zeros_like(new_starts)
        np.maximum.at(new_stops, run_id, stops)
        starts, stops = new_starts, new_stops
    return np.stack([starts, stops], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# one store
# ---------------------------------------------------------------------------------------------


class StoreReader:
    """One corpus store: in-memory indptr/totals/label codes, row reads of X.

    ``path``: a local directory or an ``s3://`` URI (``options``: its object-storage settings,
    default the AWS variables)."""

    def __init__(self, path: str | os.PathLike, n_genes: int, threads: int | None = None,
                 options: storage.S3Options | None = None):
        tune_malloc()
        self.path = str(path)
        self.remote = storage.is_remote(path)
        try:
            root = zarr.open_group(storage.open_zarr_store(path, "r", options), mode="r")
            x = root["X"]
            # the pipeline is fixed when an array is opened; zarrs reads local files itself
            # and has no object-store access (zarr's own pipeline decodes remote chunks)
            with contextlib.nullcontext() if self.remote else zarrs_pipeline(threads):
                self._data = x["data"]
                self._indices = x["indices"]
            self.indptr = np.asarray(x["indptr"][:], np.int64)
            obs = root["obs"]
            self.totals = np.asarray(obs[K.TOTAL_COUNTS_KEY][:], np.int64)
            self.codes: dict[str, np.ndarray] = {}
            self.categories: dict[str, list[str]] = {}
            for key in LABEL_KEYS:
                self.codes[key] = np.asarray(obs[key]["codes"][:])
                self.categories[key] = [str(c) for c in obs[key]["categories"][:]]
        except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise CorpusError(f"store {self.path} is missing {e}; it is not a complete vcc-dist "
                              "store. Re-run the conversion (it resumes) or "
                              "`python jobs/validate_corpus.py`.") from e
        shape = tuple(x.attrs.get("shape", ()))
        self.n_rows = len(self.indptr) - 1
        if shape != (self.n_rows, n_genes) or len(self.totals) != self.n_rows:
            raise CorpusError(f"store {self.path}: X has shape {shape}, indptr {self.n_rows} rows, "
                              f"total_counts {len(self.totals)}; expected "
                              f"({self.n_rows}, {n_genes}) "
                              "from corpus.json. The store does not belong to this corpus.")
        self.chunk = int(self._data.chunks[0])
        self.data_dtype = self._data.dtype

    def plan(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted unique ``rows`` -> (runs, element offset of each row inside the concatenated
        runs, total elements of the runs)."""
        runs = merge_runs(rows, self.indptr, self.chunk)
        ip = self.indptr
        run_elems = ip[runs[:, 1]] - ip[runs[:, 0]]
        run_base = np.r_[0, np.cumsum(run_elems)[:-1]].astype(np.int64)
        which = np.searchsorted(runs[:, 1], rows, side="right")
        offs = run_base[which] + (ip[rows] - ip[runs[which, 0]])
        return runs, offs, int(run_elems.sum())

    def read_into(self, runs: np.ndarray, data: np.ndarray, indices: np.ndarray) -> None:
        """Decode the runs' values straight into ``data``/``indices`` (consecutive, no copy).
        A remote store reads up to ``storage.concurrency()`` slices at once."""
        ip = self.indptr
        jobs = []
        pos = 0
        for a, b in runs:
            ea, eb = int(ip[a]), int(ip[b])
            if eb == ea:
                continue
            n = eb - ea
            for arr, buf in ((self._data, data), (self._indices, indices)):
                jobs.append((arr, ea, eb, buf[pos:pos + n]))
            pos += n
        if self.remote and len(jobs) > 1:
            list(_remote_pool().map(lambda j: _read_slice(*j), jobs))
        else:
            for j in jobs:
                _read_slice(*j)


def _read_slice(arr: zarr.Array, a: int, b: int, dst: np.ndarray) -> None:
    """``dst[:] = arr[a:b]``, decoded straight into ``dst`` when the dtypes agree."""
    if arr.dtype == dst.dtype:
        arr.get_basic_selection(slice(a, b), out=NDBuffer.from_numpy_array(dst))
    else:  # stores of one corpus with different dtypes
        dst[:] = arr[a:b]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _remote_pool() -> ThreadPoolExecutor:
    """Threads that wait on object-storage reads (zarr's event loop does the I/O); their number
    bounds the slices in flight per process."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(storage.concurrency(), thread_name_prefix="vcc-s3-read")
        return _POOL


def _spans_to_block(data, idx, starts, lens, totals, n_cols, scale=None) -> CSRBlock:
    """Gather spans into a CSRBlock; with ``scale``, as float32 ``count / scale[row]``."""
    out_ptr = np.zeros(starts.size + 1, np.int64)
    n = int(lens.sum())
    out_idx = np.empty(n, idx.dtype)
    starts, lens = starts.astype(np.int64), lens.astype(np.int64)
    if scale is None:
        out_data = np.empty(n, data.dtype)
        _gather_spans(data, idx, starts, lens, out_ptr, out_data, out_idx)
    else:
        out_data = np.empty(n, np.float32)
        _gather_spans_scaled(data, idx, starts, lens, scale, out_ptr, out_data, out_idx)
    return CSRBlock(out_data, out_idx, out_ptr, totals, n_cols)


# ---------------------------------------------------------------------------------------------
# a corpus
# ---------------------------------------------------------------------------------------------


def _median_totals(corpus_dir: Path | str, manifest: CorpusManifest,
                   options: storage.S3Options | None = None) -> tuple[float, list[float]]:
    """Median ``total_counts`` over all cells of the corpus (scanpy's default target), and for
    each store the median over the cells of its source file (what cell-eval normalises that
    file to; a large file is split into several stores).

    Exact, in bounded memory: per-store value histograms (``np.unique``) are merged, so the
    whole column is never held at once. Cached next to ``corpus.json`` (keyed by the stores'
    names and checksums) because a 10^8-cell corpus needs a full pass over obs."""
    key = json.dumps([[s.name, s.source_checksum, s.n_cells] for s in manifest.stores])
    cache = storage.join(corpus_dir, ".median_total.json")
    try:
        c = json.loads(storage.read_bytes(cache, options))
        if c.get("key") == key and len(c["store_medians"]) == len(manifest.stores):
            return float(c["median"]), [float(x) for x in c["store_medians"]]
    except (OSError, ValueError, KeyError, TypeError):  # StorageError is a ValueError
        pass
    vals: dict[int, int] = {}
    by_source: dict[str, dict[int, int]] = {}
    for s in manifest.stores:
        root = zarr.open_group(storage.open_zarr_store(store_path(corpus_dir, s), "r",
                                                       options), mode="r")
        tot = root["obs"][K.TOTAL_COUNTS_KEY][:]
        u, c = np.unique(np.asarray(tot, np.int64), return_counts=True)
        src = by_source.setdefault(str(s.source), {})
        for a, b in zip(u.tolist(), c.tolist()):
            vals[a] = vals.get(a, 0) + b
            src[a] = src.get(a, 0) + b
    if not vals:
        raise CorpusError(f"corpus {corpus_dir} has no cells")

    def median(h: dict[int, int]) -> float:
        u = np.array(sorted(h), np.float64)
        return _hist_median(u, np.array([h[int(x)] for x in u], np.int64)) if h else float("nan")

    med = median(vals)
    src_med = {k: median(h) for k, h in by_source.items()}
    store_medians = [src_med[str(s.source)] for s in manifest.stores]
    # atomic (temporary file + rename, or one PUT); a read-only corpus recomputes next time
    with contextlib.suppress(OSError, storage.StorageError):
        storage.write_bytes(cache, json.dumps({"key": key, "median": med,
                                               "store_medians": store_medians}).encode(), options)
    return float(med), store_medians


def _hist_median(u: np.ndarray, c: np.ndarray) -> float:
    """np.median of the values ``u`` repeated ``c`` times (``u`` sorted)."""
    cum = np.cumsum(c)
    n = int(cum[-1])
    lo = u[np.searchsorted(cum, (n - 1) // 2, side="right")]
    hi = u[np.searchsorted(cum, n // 2, side="right")]
    return float((lo + hi) / 2.0)


def _median_total(corpus_dir: Path | str, manifest: CorpusManifest,
                  options: storage.S3Options | None = None) -> float:
    return _median_totals(corpus_dir, manifest, options)[0]


def gene_selection(manifest: CorpusManifest, genes: str | Sequence[str]) -> np.ndarray:
    """Vocabulary column numbers of ``genes``: "all", "hvg" (the corpus's highly variable
    genes) or an explicit list of symbols (output order = the list's order)."""
    if isinstance(genes, str):
        if genes == "all":
            return np.arange(len(manifest.genes), dtype=np.int64)
        if genes == "hvg":
            sel = np.flatnonzero(manifest.highly_variable)
            if sel.size == 0:
                raise CorpusError("the corpus has no highly variable genes; use genes='all'")
            return sel.astype(np.int64)
        raise ValueError(f"genes={genes!r}: expected 'all', 'hvg' or a list of gene symbols")
    pos = {g: i for i, g in enumerate(manifest.genes)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise CorpusError(f"{len(missing)} requested genes are not in the corpus vocabulary, "
                          f"e.g. {missing[:5]}")
    return np.array([pos[g] for g in genes], np.int64)


# process-wide cache of open stores, least recently used first (bounded: see CorpusReader.store)
_OPEN: OrderedDict[tuple, StoreReader] = OrderedDict()
_OPEN_LOCK = threading.Lock()
_OPEN_MIN = 2


class CorpusReader:
    """Reads rows of any store of a corpus, normalised on the fly.

    ``genes``: "all", "hvg" or a list of symbols (output columns). ``target_sum``: the
    normalize_total target; None = the median ``total_counts`` of the corpus (scanpy's
    default); "store" = the median of each store's source file (how cell-eval normalises a
    file, so predictions land in the scale the challenge scores);
    ``log1p``: natural log1p after normalising; ``normalize=False`` returns raw
    counts as float32. ``decode_threads``: threads decoding one read (None = all cores; the
    streams use 1 per Ray task). Picklable (it reopens stores lazily in each process).

    ``corpus_dir``: a local directory or ``s3://bucket/prefix``; for the latter the
    object-storage settings (``s3``, default the AWS variables at construction) travel with
    the pickled reader, so Ray workers need no AWS variables of their own."""

    def __init__(self, corpus_dir: str | os.PathLike, genes: str | Sequence[str] = "all",
                 target_sum: float | None = None, normalize: bool = True, log1p: bool = True,
                 max_open_stores: int = 8, decode_threads: int | None = None,
                 s3: storage.S3Options | None = None):
        self.corpus_dir = storage.location(corpus_dir)
        self.s3 = (s3 or storage.S3Options.from_env()) if storage.is_remote(corpus_dir) else None
        self.manifest = load_manifest(self.corpus_dir, options=self.s3)
        self.store_names = [s.name for s in self.manifest.stores]
        self.store_paths = [store_path(self.corpus_dir, s) for s in self.manifest.stores]
        self.n_cells = np.array([int(s.n_cells or 0) for s in self.manifest.stores], np.int64)
        self.n_vocab = len(self.manifest.genes)
        self.gene_index = gene_selection(self.manifest, genes)
        self.genes = [self.manifest.genes[i] for i in self.gene_index]
        self.colmap = np.full(self.n_vocab, -1, np.int64)
        self.colmap[self.gene_index] = np.arange(self.gene_index.size)
        self.normalize_counts = bool(normalize)
        self.log1p = bool(log1p)
        self.store_targets: np.ndarray | None = None
        if target_sum == "store":
            med, per_store = _median_totals(self.corpus_dir, self.manifest, self.s3)
            self.target_sum = med
            self.store_targets = np.array([m if m > 0 else med for m in per_store], np.float32)
        elif isinstance(target_sum, str) or (target_sum is not None and not target_sum > 0):
            raise ValueError(f"target_sum={target_sum!r} must be positive, None (the corpus "
                             "median) or 'store' (each store's median)")
        else:
            self.target_sum = (float(target_sum) if target_sum is not None
                               else _median_total(self.corpus_dir, self.manifest, self.s3))
        if max_open_stores < 1:
            raise ValueError("max_open_stores must be >= 1")
        self.max_open_stores = int(max_open_stores)
        self.decode_threads = decode_threads

    @property
    def n_genes(self) -> int:
        return int(self.gene_index.size)

    def __getstate__(self):
        # ship only what reading needs (no manifest or gene statistics)
        d = dict(self.__dict__)
        d["manifest"] = None
        d["genes"] = None
        return d

    def store(self, i: int) -> StoreReader:
        """Open store ``i`` (shared by every reader of this process: Ray runs many read tasks in
        one worker process, and reopening a store costs its indptr and labels each time)."""
        where = (str(self.corpus_dir.resolve()) if isinstance(self.corpus_dir, Path)
                 else (self.corpus_dir, storage.backend()))
        key = (where, str(self.store_paths[i]), self.decode_threads, self.s3)
        with _OPEN_LOCK:
            s = _OPEN.get(key)
            if s is not None:
                _OPEN.move_to_end(key)
                return s
        s = StoreReader(self.store_paths[i], self.n_vocab,
                        self.decode_threads, self.s3)
        with _OPEN_LOCK:
            _OPEN[key] = s
            while len(_OPEN) > max(self.max_open_stores, _OPEN_MIN):
                _OPEN.popitem(last=False)
        return s

    def open_store(self, i: int):
        """The zarr store of store ``i`` (for ``zarr.open_group``), local or remote."""
        return storage.open_zarr_store(self.store_paths[i], "r", self.s3)

    def groups(self, i: int) -> pd.DataFrame:
        """The store's (context, perturbation, batch) groups with row ranges [start, stop)."""
        root = zarr.open_group(self.open_store(i), mode="r")
        g = root["uns"][K.STORE_GROUPS_KEY]
        return pd.DataFrame({k: g[k][:] for k in (K.CONTEXT_KEY, K.PERT_KEY, K.BATCH_KEY,
                                                  "start", "stop")})

    def read(self, store: int, rows: np.ndarray, normalize: bool = False) -> CSRBlock:
        """Rows of one store in the order given (raw counts, or normalised: see read_many)."""
        rows = np.asarray(rows, np.int64)
        return self.read_many(np.full(rows.size, store, np.int32), rows, normalize)

    def read_many(self, store_ids: np.ndarray, rows: np.ndarray,
                  normalize: bool = False) -> CSRBlock:
        """Rows from several stores (``store_ids[k]``, ``rows[k]``), in the order given.

        Every store's runs are decoded straight into one buffer and the requested rows are
        gathered from it once: one decode and one copy per value. ``normalize=True`` returns
        the normalised values (:meth:`normalize`), computed during that copy."""
        store_ids = np.asarray(store_ids)
        rows = np.asarray(rows, np.int64)
        stores = {int(s): self.store(int(s)) for s in np.unique(store_ids)}
        starts = np.empty(rows.size, np.int64)
        lens = np.empty(rows.size, np.int64)
        totals = np.empty(rows.size, np.int64)
        plans, base = [], 0
        for s, st in stores.items():
            m = np.flatnonzero(store_ids == s)
            r = rows[m]
            if r.size and (r.min() < 0 or r.max() >= st.n_rows):
                raise IndexError(f"rows outside [0, {st.n_rows}) requested from {st.path}")
            uniq, inv = np.unique(r, return_inverse=True)
            runs, offs, total = st.plan(uniq)
            starts[m] = base + offs[inv]
            lens[m] = (st.indptr[uniq + 1] - st.indptr[uniq])[inv]
            totals[m] = st.totals[r]
            plans.append((st, runs, base, total))
            base += total
        if stores:
            ddt = np.result_type(*[st.data_dtype for st in stores.values()])
            idt = np.result_type(*[st._indices.dtype for st in stores.values()])
        else:
            ddt, idt = np.dtype(np.uint32), np.dtype(np.uint32)
        data, idx = np.empty(base, ddt), np.empty(base, idt)
        for st, runs, b, total in plans:
            st.read_into(runs, data[b:b + total], idx[b:b + total])
        if not (normalize and self.normalize_counts):
            blk = _spans_to_block(data, idx, starts, lens, totals, self.n_vocab)
            return self.normalize(blk, store_ids) if normalize else blk
        blk = _spans_to_block(data, idx, starts, lens, totals, self.n_vocab,
                              scale=self._scale(totals, store_ids))
        if self.log1p:
            np.log1p(blk.data, out=blk.data)  # numpy's log1p, as scanpy: bit-identical values
        blk.normalized = True
        return blk

    def _scale(self, totals: np.ndarray, store_ids: np.ndarray | None = None) -> np.ndarray:
        """scanpy's per-cell divisor in float32: total / target, zeros replaced by 1."""
        if self.store_targets is None:
            target = np.float32(self.target_sum)
        elif store_ids is None:
            raise ValueError("this reader normalises each store to its own median "
                             "(target_sum='store'): pass the rows' store ids")
        else:
            target = self.store_targets[np.asarray(store_ids, np.int64)]
        scale = totals.astype(np.float32) / target
        scale[scale == 0] = 1
        return scale

    def normalize(self, block: CSRBlock, store_ids: np.ndarray | None = None) -> CSRBlock:
        """Raw counts -> float32 ``normalize_total(target_sum)`` (+ ``log1p``), in scanpy's
        float32 arithmetic (``x / (total / target)``, zero totals left as is). A block that is
        already normalised is returned as is."""
        if block.normalized:
            return block
        vals = np.empty(block.data.size, np.float32)
        if not self.normalize_counts:
            vals[:] = block.data
        else:
            _scale_rows(block.indptr, block.data, self._scale(block.totals, store_ids), vals)
            if self.log1p:
                np.log1p(vals, out=vals)  # numpy's log1p, as scanpy: bit-identical values
        return CSRBlock(vals, block.indices, block.indptr, block.totals, block.n_cols, True)

    def dense(self, block: CSRBlock, out: np.ndarray | None = None) -> np.ndarray:
        """Normalised block -> dense float32 over the selected genes."""
        return densify(block, self.colmap, self.n_genes, out)


def take_rows(block: CSRBlock, pos: np.ndarray) -> CSRBlock:
    """Rows ``pos`` of ``block`` (any order, repeats allowed)."""
    pos = np.asarray(pos, np.int64)
    out = _spans_to_block(block.data, block.indices, block.indptr[pos],
                          block.indptr[pos + 1] - block.indptr[pos], block.totals[pos],
                          block.n_cols)
    out.normalized = block.normalized
    return out
