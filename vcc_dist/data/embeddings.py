"""Cell embeddings stored inside the corpus stores (docs/design.md §3: ``obsm/<key>``).

An embedding job (SE, ``jobs/embed_cells.py``) streams over a corpus store by store, in row
order, and writes one float vector per cell into that store as ``obsm/<key>`` (default
``"X_se"``), in AnnData's encoding, so that ``anndata.read_zarr(store).obsm["X_se"]`` is the
``(n_obs, dim)`` matrix with no vcc-dist code. Layout of one store::

    stores/<name>.zarr/obsm/<key>            dense 2-D array, encoding-type "array" 0.2.0;
                                             attrs["vcc_dist_embedding"]: the manifest
                                             (complete, n_rows, dim, dtype, created_at, ...
                                             plus the caller's meta, e.g. the checkpoint)
    stores/.<name>.zarr.obsm-<key>.partial   the array being written (hidden, outside the
                                             store): never visible to anndata or to readers

Why the partial array lives next to the store rather than in ``obsm/``: every store has
consolidated metadata and anndata lists ``obsm`` members; a half-written array inside
``obsm`` would appear as an obsm entry to whoever consolidates or lists the group next. The
hidden sibling is on the same file system, so committing is one ``rename`` into ``obsm/``,
followed by re-consolidating the store's metadata (so ``anndata.read_zarr`` sees the key).
The converter removes hidden ``stores/.*`` leftovers when it (re)runs, as for its own
temporaries: do not convert and embed the same corpus at the same time.

Atomicity: an ``obsm/<key>`` exists only after a complete write (its manifest says
``complete: True`` before the rename that makes it appear). Replacing an existing key moves
the old array aside just before the new one is renamed in; a kill between those two renames
leaves the key missing (never half-written), and a rerun recomputes it.

Chunking: rows are chunked so that one chunk is about 1 MiB (16 to 1024 rows x the full
dim): a set stream gathers short runs of rows at random offsets and decodes whole chunks, so
small chunks waste little; chunks are sharded into ~64 MiB files so a store is a handful of
files. The writer buffers one shard and writes each shard once (zarr rewrites a whole shard
for a partial write), recording the rows written so far in the partial array's attributes:
``resume=True`` continues after the last shard flushed.

Stores in object storage (``s3://``): S3 has no rename, so the partial array is written in
this host's scratch directory (vcc_dist.storage.scratch_dir) and committed by uploading it
into ``obsm/<key>`` with its ``zarr.json`` last (readers open the array through that file,
so a half-uploaded array is never read), then re-consolidating the store's metadata.
Replacing an existing key deletes it first: a kill in between leaves the key missing, never
mixed, and a rerun recomputes it. A partial write resumes only on the host that holds it;
elsewhere the store starts over (one store is the unit of lost work).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import read_elem, sparse_dataset, write_elem
from pandas.api.types import union_categoricals
from zarr.codecs import BloscCodec

from vcc_dist import constants as K
from vcc_dist import storage
from vcc_dist.data.corpus import load_manifest, store_path
from vcc_dist.data.reader import zarrs_pipeline
from vcc_dist.provenance import process_provenance

#: array attribute holding the embedding manifest
EMBED_ATTR = "vcc_dist_embedding"
EMBED_FORMAT = "vcc-dist-embedding"
EMBED_FORMAT_VERSION = 1
DEFAULT_KEY = "X_se"
#: fields the writer owns in the manifest (the caller's meta may not use them)
RESERVED = frozenset({"format", "format_version", "key", "complete", "n_rows", "dim", "dtype",
                      "chunk_rows", "shard_rows", "rows_written", "created_at", "updated_at",
                      "written_by"})
#: target bytes of one chunk / one shard
CHUNK_BYTES = 1 << 20
SHARD_BYTES = 64 << 20
#: most chunks decoded by one read of :func:`read_embeddings` (bounds its memory)
MAX_CHUNKS_PER_READ = 64
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
EMBED_JOB = "python jobs/embed_cells.py"


class EmbeddingError(ValueError):
    """Cell embeddings are missing, incomplete, inconsistent, or written wrongly."""


# ---------------------------------------------------------------------------------------------
# paths and layout
# ---------------------------------------------------------------------------------------------


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise EmbeddingError(f"embedding key {key!r} must be a plain name (letters, digits, "
                             "'_', '.', '-'; not starting with '.'), e.g. 'X_se'")
    return key


def final_path(store: str | os.PathLike, key: str) -> Path | str:
    """Where a complete embedding lives: ``<store>/obsm/<key>`` (a ``Path`` for a local store,
    an ``s3://`` URI for one in object storage)."""
    return storage.join(store, "obsm", _check_key(key))


def partial_path(store: str | os.PathLike, key: str) -> Path:
    """Where an embedding is written before its commit: the store's hidden sibling, or for a
    store in object storage a directory in this host's scratch space."""
    if storage.is_remote(store):
        return storage.scratch_dir(f"{storage.resolved(store)}.obsm-{_check_key(key)}.partial")
    s = Path(store)
    return s.parent / f".{s.name}.obsm-{_check_key(key)}.partial"


def chunk_rows_for(dim: int, dtype: str | np.dtype = "float32") -> int:
    """Rows per chunk: a power of two giving ~``CHUNK_BYTES`` per chunk, within [16, 1024]."""
    row = max(int(dim) * np.dtype(dtype).itemsize, 1)
    r = 2 ** int(np.floor(np.log2(max(CHUNK_BYTES // row, 1))))
    return int(min(max(r, 16), 1024))


def shard_rows_for(n_rows: int, chunk_rows: int, dim: int, dtype: str | np.dtype) -> int:
    """Rows per shard: a multiple of ``chunk_rows`` of ~``SHARD_BYTES``, at most the array."""
    row = max(int(dim) * np.dtype(dtype).itemsize, 1)
    per = max(SHARD_BYTES // (row * chunk_rows), 1)
    need = max(-(-max(int(n_rows), 1) // chunk_rows), 1)
    return int(chunk_rows * min(per, need))


def _json_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """The caller's meta as JSON values (tuples -> lists), so that a resumed writer compares
    it with what the partial array recorded."""
    meta = dict(meta or {})
    clash = sorted(RESERVED & set(meta))
    if clash:
        raise EmbeddingError(f"meta keys {clash} are reserved for the embedding manifest")
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise EmbeddingError(f"embedding meta must be JSON-serialisable: {e}") from None


def _zarr_json(path: Path | str) -> dict[str, Any]:
    """A ``zarr.json`` (local or remote) as a dict; OSError/ValueError when absent or bad."""
    return json.loads(storage.read_bytes(storage.join(path, "zarr.json")))


def _store_rows(store: Path | str) -> int:
    """Rows of a corpus store (from X's shape attribute)."""
    try:
        return int(_zarr_json(storage.join(store, "X"))["attributes"]["shape"][0])
    except storage.StorageError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise EmbeddingError(f"{store} is not a corpus store (no X shape: {e!r})") from None


def _zarr_target(store: Path | str):
    """What zarr opens for a store: its path, or an object-storage store for ``s3://``."""
    return storage.open_zarr_store(store, "a") if storage.is_remote(store) else str(store)


def _reconsolidate(store: Path | str) -> None:
    """Refresh the store's consolidated metadata (anndata reads through it), if it has any.
    zarr writes the root ``zarr.json`` atomically (temporary file + rename; one PUT on S3)."""
    try:
        root_meta = _zarr_json(store)
    except (OSError, ValueError):
        return
    if root_meta.get("consolidated_metadata") is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that v3 consolidation is not in the spec
        zarr.consolidate_metadata(_zarr_target(store))


def _visible(store: Path | str, key: str) -> bool:
    """Whether anndata sees ``obsm/<key>``: listed in the store's consolidated metadata (or the
    store has none). False only after a kill between a commit's rename (upload) and its
    re-consolidation."""
    try:
        root_meta = _zarr_json(store)
    except (OSError, ValueError):
        return False
    cm = root_meta.get("consolidated_metadata")
    return cm is None or f"obsm/{key}" in (cm.get("metadata") or {})


def _ensure_obsm(store: Path | str) -> None:
    """Create ``obsm`` with anndata's dict encoding when a store has none."""
    if not storage.exists(storage.join(store, "obsm", "zarr.json")):
        root = zarr.open_group(_zarr_target(store), mode="a", use_consolidated=False)
        root.create_group("obsm", attributes={"encoding-type": "dict",
                                              "encoding-version": "0.1.0"})


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


class EmbeddingWriter:
    """Writes one store's embeddings, rows in order, and commits them atomically.

    ``write(start_row, values)`` takes consecutive row ranges of any size (``start_row`` must
    be :attr:`next_row`); ``commit()`` needs all ``n_rows`` rows. Nothing that looks complete
    exists before ``commit()`` returns; an existing ``obsm/<key>`` stays valid until then.

    ``resume=True``: when a partial write of the same key, shape, dtype and ``meta`` exists,
    continue it: :attr:`rows_done` (= :attr:`next_row`) rows, a multiple of the shard size,
    are kept and the caller writes from there. Otherwise (or with ``resume=False``) any partial
    write is discarded and writing starts at row 0. ``meta`` should identify the model (e.g.
    checkpoint path and hash): :class:`CorpusEmbeddings` refuses stores with different meta.
    One writer per (store, key) at a time.
    """

    def __init__(self, store_path: str | os.PathLike, key: str = DEFAULT_KEY,
                 n_rows: int | None = None, dim: int | None = None, dtype: str = "float32",
                 meta: dict[str, Any] | None = None, *, resume: bool = False):
        self.store = storage.location(store_path)
        self.key = _check_key(key)
        if not storage.exists(storage.join(self.store, "zarr.json")):
            raise EmbeddingError(f"{self.store} is not a zarr store")
        rows = _store_rows(self.store)
        if n_rows is None:
            n_rows = rows
        if int(n_rows) != rows:
            raise EmbeddingError(f"n_rows={n_rows} but store {self.store} has {rows} rows")
        if dim is None or int(dim) < 1:
            raise EmbeddingError(f"dim={dim!r} must be a positive integer")
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise EmbeddingError(f"dtype={dtype!r}: embeddings are floating point")
        self.n_rows, self.dim = int(n_rows), int(dim)
        self.chunk_rows = chunk_rows_for(self.dim, self.dtype)
        self.shard_rows = shard_rows_for(self.n_rows, self.chunk_rows, self.dim, self.dtype)
        self.meta = _json_meta(meta)
        self.partial = partial_path(self.store, key)
        self.final = final_path(self.store, key)
        self._arr: zarr.Array | None = None
        self._buf: np.ndarray | None = None
        self._buf_start = 0
        self._next = 0
        self._committed = False
        if resume and self._open_partial():
            self.rows_done = self._next
        else:
            self._create_partial()
            self.rows_done = 0

    # -- manifest --
    def _manifest(self, rows_written: int, complete: bool) -> dict[str, Any]:
        return {"format": EMBED_FORMAT, "format_version": EMBED_FORMAT_VERSION, "key": self.key,
                "complete": bool(complete), "n_rows": self.n_rows, "dim": self.dim,
                "dtype": self.dtype.name, "chunk_rows": self.chunk_rows,
                "shard_rows": self.shard_rows, "rows_written": int(rows_written),
                "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.meta}

    def _matches(self, m: dict[str, Any]) -> bool:
        want = self._manifest(0, False)
        skip = {"rows_written", "updated_at", "created_at", "complete"}
        return (not m.get("complete") and
                {k: v for k, v in m.items() if k not in skip} ==
                {k: v for k, v in want.items() if k not in skip})

    def _open_partial(self) -> bool:
        if not (self.partial / "zarr.json").exists():
            return False
        try:
            with zarrs_pipeline():
                arr = zarr.open_array(str(self.partial), mode="r+")
            m = dict(arr.attrs.get(EMBED_ATTR) or {})
        except Exception:  # noqa: BLE001 - damaged by a kill during creation: start over
            return False
        if not self._matches(m) or arr.shape != (self.n_rows, self.dim):
            return False
        done = int(m.get("rows_written", 0))
        if done % self.shard_rows and done != self.n_rows:
            return False
        self._arr, self._next, self._buf_start = arr, done, done
        return True

    def _create_partial(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        attrs = {"encoding-type": "array", "encoding-version": "0.2.0",
                 EMBED_ATTR: self._manifest(0, False)}
        with warnings.catch_warnings(), zarrs_pipeline():
            warnings.simplefilter("ignore")
            self._arr = zarr.create_array(
                str(self.partial), shape=(self.n_rows, self.dim), dtype=self.dtype,
                chunks=(self.chunk_rows, self.dim), shards=(self.shard_rows, self.dim),
                compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
                fill_value=0.0, attributes=attrs, zarr_format=3)

    # -- rows --
    @property
    def next_row(self) -> int:
        """The row the next :meth:`write` must start at."""
        return self._next

    def write(self, start_row: int, values: np.ndarray) -> None:
        """Rows ``[start_row, start_row + len(values))``; ``values`` is ``[n, dim]``."""
        if self._committed:
            raise EmbeddingError(f"{self.store}: embedding {self.key!r} is already committed")
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != self.dim:
            raise EmbeddingError(f"values have shape {values.shape}; expected [n, {self.dim}]")
        start_row, n = int(start_row), values.shape[0]
        if start_row != self._next:
            raise EmbeddingError(f"{self.store}: write at row {start_row} but the next row to "
                                 f"write is {self._next} (rows must come in order, once)")
        if start_row + n > self.n_rows:
            raise EmbeddingError(f"{self.store}: rows [{start_row}, {start_row + n}) exceed the "
                                 f"store's {self.n_rows} rows")
        if values.dtype.kind not in "fiu":
            raise EmbeddingError(f"values have dtype {values.dtype}; expected floats")
        if not np.isfinite(values).all():
            raise EmbeddingError(f"{self.store}: rows [{start_row}, {start_row + n}) hold "
                                 "non-finite values")
        pos = 0
        while pos < n:
            if self._buf is None:
                size = min(self.shard_rows, self.n_rows - self._buf_start)
                self._buf = np.empty((size, self.dim), self.dtype)
            off = self._next - self._buf_start
            k = min(n - pos, self._buf.shape[0] - off)
            self._buf[off:off + k] = values[pos:pos + k]
            pos += k
            self._next += k
            if self._next - self._buf_start == self._buf.shape[0]:
                self._flush()

    def _flush(self) -> None:
        """Write the buffered (whole) shard, then record progress for resume."""
        a, z = self._buf_start, self._next
        if z > a:
            self._arr[a:z] = self._buf[:z - a]
            self._arr.attrs[EMBED_ATTR] = self._manifest(z, False)
        self._buf, self._buf_start = None, z

    def commit(self) -> dict[str, Any]:
        """Make ``obsm/<key>`` the written array (replacing an older one); returns its
        manifest."""
        if self._committed:
            raise EmbeddingError(f"{self.store}: embedding {self.key!r} is already committed")
        if self._next != self.n_rows:
            raise EmbeddingError(f"{self.store}: only {self._next} of {self.n_rows} rows of "
                                 f"embedding {self.key!r} were written; cannot commit")
        if self._buf is not None:
            self._flush()
        m = self._manifest(self.n_rows, True)
        m["created_at"] = m["updated_at"]
        m["written_by"] = process_provenance()
        self._arr.attrs[EMBED_ATTR] = m  # complete, but still outside the store
        _ensure_obsm(self.store)
        if storage.is_remote(self.store):
            self._commit_remote()
        else:
            self._commit_local()
        self._committed = True
        self._arr = None
        return m

    def _commit_remote(self) -> None:
        """Upload the partial array into ``obsm/<key>``, its ``zarr.json`` last (the commit
        point: readers open the array through it). An older array is deleted first and the
        metadata re-consolidated without it, so no reader ever sees old and new chunks mixed."""
        if storage.exists(storage.join(self.final, "zarr.json")):
            storage.delete_tree(self.final)
            _reconsolidate(self.store)
        storage.upload_dir_last(self.partial, str(self.final), "zarr.json")
        _reconsolidate(self.store)
        shutil.rmtree(self.partial, ignore_errors=True)

    def _commit_local(self) -> None:
        old = None
        if self.final.exists():
            old = self.store.parent / f".{self.store.name}.obsm-{self.key}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.final, old)
        os.rename(self.partial, self.final)  # the commit point
        _reconsolidate(self.store)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def _read_manifest(store: Path | str, key: str,
                   options: storage.S3Options | None = None) -> dict[str, Any] | None:
    """The manifest of a complete ``obsm/<key>`` of a store (local or remote), else None."""
    p = storage.join(final_path(store, key), "zarr.json")
    try:
        d = json.loads(storage.read_bytes(p, options))
    except FileNotFoundError:
        return None
    except storage.StorageError:
        raise  # unreachable object storage is not "no embedding"
    except (OSError, ValueError):
        return None
    m = (d.get("attributes") or {}).get(EMBED_ATTR)
    if not isinstance(m, dict) or m.get("complete") is not True:
        return None
    if list(d.get("shape", [])) != [m.get("n_rows"), m.get("dim")]:
        return None
    return m


def _open(store: Path | str, key: str, threads: int | None = None,
          options: storage.S3Options | None = None) -> tuple[zarr.Array, dict]:
    m = _read_manifest(store, key, options)
    final = final_path(store, key)
    if m is None:
        what = ("has no" if not storage.exists(storage.join(final, "zarr.json"), options)
                else "has an incomplete")
        raise EmbeddingError(f"store {store} {what} embedding {key!r}; run `{EMBED_JOB}` on its "
                             "corpus to compute it (it resumes unfinished stores)")
    # the pipeline is fixed when an array is opened; zarrs reads local files only
    with contextlib.nullcontext() if storage.is_remote(final) else zarrs_pipeline(threads):
        arr = zarr.open_array(storage.open_zarr_store(final, "r", options), mode="r")
    return arr, m


def _resolve_store(path: str | os.PathLike, store: str | None) -> Path | str:
    p = storage.location(path)
    if storage.exists(storage.join(p, K.CORPUS_MANIFEST)):
        entries = {s.name: s for s in load_manifest(p, require_complete=False).stores}
        names = list(entries)
        if store is None:
            if len(names) != 1:
                raise EmbeddingError(f"{p} is a corpus of {len(names)} stores: pass store=<name>")
            store = names[0]
        if store not in names:
            raise EmbeddingError(f"corpus {p} has no store {store!r}")
        return store_path(p, entries[store])
    if store is not None:
        raise EmbeddingError(f"store={store!r} given but {p} is not a corpus directory")
    return p


def _gather_rows(arr: zarr.Array, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[k] = arr[rows[k]]`` decoding each needed chunk once: the unique rows' chunks are
    read as runs of consecutive chunks (at most ``MAX_CHUNKS_PER_READ`` per read)."""
    rows = np.asarray(rows, np.int64).ravel()
    if rows.size == 0:
        return out
    n = arr.shape[0]
    if rows.min() < 0 or rows.max() >= n:
        raise IndexError(f"embedding rows outside [0, {n}) requested")
    cr = int(arr.chunks[0])
    uniq, inv = np.unique(rows, return_inverse=True)
    chunks = np.unique(uniq // cr)
    brk = np.flatnonzero(np.diff(chunks) != 1) + 1
    vals = out if uniq.size == rows.size and np.array_equal(uniq, rows) else \
        np.empty((uniq.size, arr.shape[1]), np.float32)
    for run in np.split(chunks, brk):
        for i in range(0, run.size, MAX_CHUNKS_PER_READ):
            c0, c1 = int(run[i]), int(run[min(i + MAX_CHUNKS_PER_READ, run.size) - 1]) + 1
            a, z = c0 * cr, min(c1 * cr, n)
            i0, i1 = np.searchsorted(uniq, [a, z])
            block = arr[a:z]
            vals[i0:i1] = block[uniq[i0:i1] - a]
    if vals is not out:
        np.take(vals, inv.ravel(), axis=0, out=out)
    return out


def read_embeddings(path: str | os.PathLike, key: str, rows: np.ndarray,
                    store: str | None = None) -> np.ndarray:
    """Embeddings ``[len(rows), dim]`` float32 of rows (any order, repeats allowed) of ONE
    store: ``path`` is the store, or a corpus directory plus ``store=<name>`` (optional for a
    one-store corpus). Only the chunks holding the rows are decoded."""
    arr, m = _open(_resolve_store(path, store), key)
    rows = np.asarray(rows, np.int64).ravel()
    return _gather_rows(arr, rows, np.empty((rows.size, int(m["dim"])), np.float32))


def embedding_status(corpus_dir: str | os.PathLike, key: str = DEFAULT_KEY,
                     options: storage.S3Options | None = None
                     ) -> dict[str, dict[str, Any] | None]:
    """Store name -> the manifest of its complete embedding ``key`` (None: missing, partial,
    or not matching the store's cell count), for every store of the corpus manifest. Also
    finishes a commit that was killed after its rename or upload (re-consolidates that
    store)."""
    _check_key(key)
    m = load_manifest(corpus_dir, require_complete=False, options=options)
    out: dict[str, dict[str, Any] | None] = {}
    for s in m.stores:
        sp = store_path(corpus_dir, s)
        meta = _read_manifest(sp, key, options)
        if meta is not None and s.n_cells is not None and int(meta["n_rows"]) != int(s.n_cells):
            meta = None
        if meta is not None and not _visible(sp, key):
            with contextlib.suppress(OSError):  # finish a commit killed before its last step
                _reconsolidate(sp)
        out[s.name] = meta
    return out


def _model_meta(m: dict[str, Any]) -> dict[str, Any]:
    """The caller's part of a manifest (what identifies the model)."""
    return {k: v for k, v in m.items() if k not in RESERVED}


class CorpusEmbeddings:
    """The complete embeddings ``key`` of every store of a corpus, for gathering rows.

    Construction checks that every store has a complete embedding of the store's row count,
    all of one ``dim`` and made with the same caller meta (one model): mixing stores embedded
    by different models would silently train on incompatible spaces. Arrays are opened lazily
    in each process; pickling ships only paths (Ray tasks reopen them). Store ids are the
    corpus's store numbers; ``stores`` (names) limits the checks to those stores (the others
    cannot be gathered from then). ``corpus_dir`` may be ``s3://bucket/prefix``: the
    object-storage settings (``s3``, default the AWS variables now) travel with the pickle."""

    def __init__(self, corpus_dir: str | os.PathLike, key: str = DEFAULT_KEY,
                 decode_threads: int | None = None, stores: Sequence[str] | None = None,
                 s3: storage.S3Options | None = None):
        self.corpus_dir = storage.location(corpus_dir)
        self.s3 = (s3 or storage.S3Options.from_env()) if storage.is_remote(corpus_dir) else None
        self.key = _check_key(key)
        self.decode_threads = decode_threads
        manifest = load_manifest(self.corpus_dir, options=self.s3)
        self.store_names = [s.name for s in manifest.stores]
        self.store_paths = [store_path(self.corpus_dir, s) for s in manifest.stores]
        status = embedding_status(self.corpus_dir, key, self.s3)
        wanted = self.store_names if stores is None else list(stores)
        unknown = [n for n in wanted if n not in status]
        if unknown:
            raise EmbeddingError(f"corpus {self.corpus_dir} has no stores {unknown[:5]}")
        missing = [n for n in wanted if status[n] is None]
        if missing:
            raise EmbeddingError(
                f"{len(missing)} of {len(wanted)} stores of corpus {self.corpus_dir} "
                f"have no complete cell embedding {key!r} (e.g. {missing[0]!r}"
                f"{', ...' if len(missing) > 1 else ''}); run `{EMBED_JOB}` on this corpus to "
                "compute them (it resumes unfinished stores)")
        self.store_meta = [status[n] if n in wanted else None for n in self.store_names]
        checked = [(n, m) for n, m in zip(self.store_names, self.store_meta) if m is not None]
        dims = {int(m["dim"]) for _, m in checked}
        if len(dims) > 1:
            raise EmbeddingError(f"the stores' embeddings {key!r} have different dims {sorted(dims)}"
                                 f"; re-run `{EMBED_JOB}` with one model on the whole corpus")
        ref = _model_meta(checked[0][1]) if checked else {}
        odd = [n for n, m in checked if _model_meta(m) != ref]
        if odd:
            raise EmbeddingError(
                f"stores {odd[:5]} hold embeddings {key!r} made with other meta (model) than "
                f"store {checked[0][0]!r}: {_model_meta(status[odd[0]])} vs {ref}; re-run "
                f"`{EMBED_JOB}` with one model on the whole corpus")
        self.dim = dims.pop() if dims else 0
        self.meta = dict(checked[0][1]) if checked else {}
        self._arrays: dict[int, zarr.Array] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arrays"] = {}
        return d

    def __setstate__(self, d) -> None:
        self.__dict__.update(d)
        self._arrays = {}  # reopened lazily in this process

    def array(self, i: int) -> zarr.Array:
        """Store ``i``'s embedding array (opened once per process)."""
        a = self._arrays.get(i)
        if a is None:
            a, _ = _open(self.store_paths[i], self.key,
                         self.decode_threads, self.s3)
            self._arrays[i] = a
        return a

    def read(self, store: int, rows: np.ndarray) -> np.ndarray:
        """Rows of store ``store`` (any order, repeats allowed) -> ``[n, dim]`` float32."""
        rows = np.asarray(rows, np.int64).ravel()
        return _gather_rows(self.array(int(store)), rows,
                            np.empty((rows.size, self.dim), np.float32))

    def gather(self, store_ids: np.ndarray, rows: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of cells (``store_ids[k]``, ``rows[k]``) -> ``[n, dim]`` float32 in the
        order given; ``out`` (C-ordered ``[n, dim]`` float32) receives them without a copy."""
        store_ids = np.asarray(store_ids).ravel()
        rows = np.asarray(rows, np.int64).ravel()
        if store_ids.size != rows.size:
            raise ValueError(f"{store_ids.size} store ids for {rows.size} rows")
        if out is None:
            out = np.empty((rows.size, self.dim), np.float32)
        elif out.shape != (rows.size, self.dim) or out.dtype != np.float32 \
                or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-ordered float32 {(rows.size, self.dim)}")
        us = np.unique(store_ids)
        if us.size == 1:
            return _gather_rows(self.array(int(us[0])), rows, out)
        for s in us:
            m = np.flatnonzero(store_ids == s)
            out[m] = self.read(int(s), rows[m])
        return out


# ---------------------------------------------------------------------------------------------
# export for scanpy
# ---------------------------------------------------------------------------------------------


def _concat_obs(frames: list):
    """Concatenate obs frames, keeping categorical columns categorical (union of categories;
    plain ``pd.concat`` turns differing categories into object columns)."""
    cols: dict[str, Any] = {}
    for c in frames[0].columns:
        parts = [f[c] for f in frames]
        if all(isinstance(p.dtype, pd.CategoricalDtype) for p in parts):
            cols[c] = union_categoricals([p.array for p in parts], ignore_order=True)
        else:
            cols[c] = np.concatenate([p.to_numpy() for p in parts])
    index = pd.Index(np.concatenate([f.index.to_numpy().astype(str) for f in frames]))
    return pd.DataFrame(cols, index=index)


def export_anndata(corpus_dir: str | os.PathLike, key: str, out_path: str | os.PathLike,
                   obsm_key: str = "X_state", with_X: bool = False,
                   stores: Sequence[str] | None = None) -> Path | str:
    """Write the corpus's embeddings as one ``.h5ad`` for scanpy: ``obs`` from the stores (plus
    ``store`` and ``store_row`` columns, to find each cell in the corpus),
    ``obsm[obsm_key]`` = the embeddings, ``uns["vcc_dist_embedding"]`` = the manifest as JSON,
    and ``X`` empty (``n_vars`` 0) unless ``with_X`` (raw counts as float32 CSR over the corpus
    vocabulary). ``stores``: a subset of store names (default all, in corpus order).

    Memory: the concatenated obs of all chosen stores is held at once (tens of bytes per
    cell); embeddings and X are streamed store by store into the file (one store at a time).
    Obs names are the stores' cell names, suffixed ``-<store>`` for all cells when they
    collide across stores. Written to a temporary name and renamed (or, for an ``s3://``
    ``out_path``, written in scratch and uploaded whole): a killed export leaves no file that
    looks complete. ``corpus_dir`` may be in object storage."""
    corpus_dir, dest = storage.location(corpus_dir), storage.location(out_path)
    out_path = (storage.scratch_dir(str(dest)) if storage.is_remote(dest) else Path(dest))
    if stores is not None and not list(stores):
        raise EmbeddingError("no stores to export")
    emb = CorpusEmbeddings(corpus_dir, key, stores=stores)
    manifest = load_manifest(corpus_dir)
    names = emb.store_names if stores is None else list(stores)
    ids = [emb.store_names.index(n) for n in names]

    frames = []
    for i, n in zip(ids, names):
        root = zarr.open_group(storage.open_zarr_store(emb.store_paths[i], "r"), mode="r")
        obs = read_elem(root["obs"])
        obs["store"] = pd.Categorical([n] * len(obs), categories=names)
        obs["store_row"] = np.arange(len(obs), dtype=np.int64)
        frames.append(obs)
    obs = _concat_obs(frames)
    if not obs.index.is_unique:
        obs.index = pd.Index([f"{c}-{s}" for c, s in zip(obs.index, obs["store"])])
    del frames
    if with_X:
        var = pd.DataFrame({K.GENE_ID_KEY: [g or "" for g in manifest.gene_ids]},
                           index=pd.Index(manifest.genes))
    else:
        var = pd.DataFrame(index=pd.Index([], dtype=str))
    adata = ad.AnnData(obs=obs, var=var)
    adata.uns["vcc_dist_embedding"] = json.dumps({**emb.meta, "corpus": str(corpus_dir),
                                                  "stores": names})
    n_obs = adata.n_obs
    del obs

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_h5ad(tmp)
        del adata
        with h5py.File(tmp, "a") as f:
            ds = f["obsm"].create_dataset(obsm_key, shape=(n_obs, emb.dim), dtype="float32",
                                          chunks=(max(1, min(n_obs, 4096)), emb.dim)
                                          if n_obs else None)
            ds.attrs["encoding-type"] = "array"
            ds.attrs["encoding-version"] = "0.2.0"
            pos = 0
            for i, n in zip(ids, names):
                arr = emb.array(i)
                step = max(int(arr.chunks[0]), 1) * MAX_CHUNKS_PER_READ
                for a in range(0, arr.shape[0], step):
                    z = min(a + step, arr.shape[0])
                    ds[pos + a:pos + z] = np.asarray(arr[a:z], np.float32)
                pos += arr.shape[0]
                if with_X:
                    x = read_elem(zarr.open_group(storage.open_zarr_store(emb.store_paths[i], "r"),
                                                  mode="r")["X"])
                    x = sp.csr_matrix((x.data.astype(np.float32), x.indices.astype(np.int32),
                                       x.indptr.astype(np.int64)), shape=x.shape)
                    if "X" in f:
                        sparse_dataset(f["X"]).append(x)
                    else:
                        write_elem(f, "X", x)
                    del x
        if storage.is_remote(dest):
            storage.upload_file(tmp, dest)
        else:
            os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return dest
