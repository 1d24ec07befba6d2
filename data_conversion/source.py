"""Reading h5ad inputs without loading X: metadata, row blocks, and row gathers.

We read X through h5py rather than ``anndata.read_h5ad(backed="r")`` because we need control
over the reads: one slice of ``data``/``indices`` per run of consecutive rows (anndata's backed
CSR indexing with an arbitrary row list is much slower), byte-budgeted row blocks, and CSC or
dense layouts streamed into row order. obs/var columns are decoded with anndata's own
``read_elem`` so every anndata encoding (categoricals, nullable, string arrays) is understood.

A sparse matrix is checked as it is read: its index pointer when the file is opened, the
indices of every block read. A damaged file raises ``CorruptInputError`` naming the file, the
rows and the fix, never an ``IndexError`` (or silently wrong genes) further down.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcc_dist import storage


class ConversionError(ValueError):
    """Bad input for conversion. The message names the problem and how to fix it."""


class CorruptInputError(ConversionError):
    """An input's sparse matrix is internally inconsistent (a damaged file): column/row indices
    outside the matrix, an index pointer that decreases or does not match the stored values, or
    indices of a non-integer dtype. The message names the file, the rows and the fix."""


class ConversionWarning(UserWarning):
    """A conversion input is usable but probably not what was meant (low gene coverage, no
    control cells where they were allowed to be missing)."""


_CORRUPT_FIX = ("The file is damaged: re-export it (anndata write_h5ad) from the original data "
                "or check its integrity (compare its checksum with the original copy), or remove "
                "it from the inputs.")


GENE_ID_CANDIDATES = ("gene_id", "gene_ids", "ensembl_id", "gene_ensembl_id", "feature_id")


def file_fingerprint(path: str | os.PathLike, full: bool = False, n_samples: int = 64,
                     sample_bytes: int = 1 << 16,
                     options: storage.S3Options | None = None) -> tuple[int, str]:
    """(size, checksum) of a file, local or in object storage (``s3://``; the same bytes give
    the same checksum).

    The default "sampled" checksum hashes the size and 64 evenly spaced 64 KiB blocks: it detects
    a replaced, truncated or rewritten input in milliseconds even for 100 GB files. ``full=True``
    hashes every byte (blake2b, ~1 GB/s).
    """
    size = storage.file_size(path, options)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    sampled = not (full or size <= n_samples * sample_bytes)
    with storage.open_read(path, options, block_size=sample_bytes if sampled else 1 << 22) as f:
        if not sampled:
            while chunk := f.read(1 << 22):
                h.update(chunk)
            kind = "blake2b-full"
        else:
            step = (size - sample_bytes) // (n_samples - 1)
            for i in range(n_samples):
                f.seek(i * step)
                h.update(f.read(sample_bytes))
            kind = "blake2b-sampled64"
    return size, f"{kind}:{h.hexdigest()}"


@dataclass
class MatrixInfo:
    fmt: str  # csr | csc | dense
    shape: tuple[int, int]
    dtype: np.dtype
    compressed: bool  # any HDF5 filter on the value arrays (random reads decompress chunks)


class RawH5Array:
    """Element-range reads of an unfiltered HDF5 dataset straight from the file with ``pread``.

    h5py costs ~50-150 us per slice call, which dominates when gathering hundreds of thousands
    of single rows; a ``pread`` from the page cache costs a few us. Works for contiguous
    datasets (what ``write_h5ad`` produces) and for chunked ones without filters (files written
    by appending); anything else keeps using h5py.
    """

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds
        self.dtype = np.dtype(ds.dtype)
        self.item = self.dtype.itemsize
        self.fd = None
        self._ready = False  # the chunk table is built on the first read: opening a source to
        # plan or validate (metadata only) costs nothing

    def _prepare(self) -> None:
        self._ready = True
        ds = self.ds
        if ds.compression is not None or ds.dtype.byteorder == ">" or ds.shape == ():
            return
        try:
            if ds.chunks is None:
                off = ds.id.get_offset()
                if off is None:
                    return
                self.starts = np.array([0], np.int64)
                self.offsets = np.array([off], np.int64)
                self.chunk = ds.shape[0]
            else:
                nch = ds.id.get_num_chunks()
                info = [ds.id.get_chunk_info(i) for i in range(nch)]
                if any(c.filter_mask for c in info):
                    return
                order = np.argsort([c.chunk_offset[0] for c in info])
                self.starts = np.array([info[i].chunk_offset[0] for i in order], np.int64)
                self.offsets = np.array([info[i].byte_offset for i in order], np.int64)
                self.chunk = ds.chunks[0]
                # every chunk must be allocated for the table to be complete
                if nch != -(-ds.shape[0] // self.chunk):
                    return
            self.fd = os.open(ds.file.filename, os.O_RDONLY)
        except (AttributeError, OSError, RuntimeError, ValueError):
            self.fd = None

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = sl.start, sl.stop
        if not self._ready:
            self._prepare()
        if self.fd is None:
            return self.ds[a:b]
        out = np.empty(b - a, self.dtype)
        buf = memoryview(out).cast("B")
        k = int(np.searchsorted(self.starts, a, side="right") - 1)
        pos = a
        while pos < b:
            end = min(b, int(self.starts[k]) + self.chunk)
            nbytes = (end - pos) * self.item
            off = int(self.offsets[k]) + (pos - int(self.starts[k])) * self.item
            dst = (pos - a) * self.item
            got = os.preadv(self.fd, [buf[dst:dst + nbytes]], off)
            if got != nbytes:
                raise OSError(f"short read from {self.ds.file.filename}")
            pos = end
            k += 1
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def gather_rows(data, indices, indptr: np.ndarray, rows: np.ndarray,
                n_cols: int) -> sp.csr_matrix:
    """CSR rows ``rows`` (sorted, unique) from array-likes ``data``/``indices`` sliced by element
    range: one slice of each per run of consecutive rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, len(rows)]
    datas, inds = [], []
    for s, e in zip(starts, stops):
        a, b = int(indptr[rows[s]]), int(indptr[rows[e - 1] + 1])
        datas.append(data[a:b])
        inds.append(indices[a:b])
    out_ptr = np.r_[0, np.cumsum(indptr[rows + 1] - indptr[rows])]
    return sp.csr_matrix((np.concatenate(datas), np.concatenate(inds), out_ptr),
                         shape=(len(rows), n_cols))


class H5adSource:
    """One h5ad file opened read-only. Use as a context manager or call `close()`."""

    def __init__(self, path: str | os.PathLike, matrix: str = "X",
                 symbol_column: str | None = None, gene_id_column: str | None = "auto"):
        self.path = str(path)
        self.matrix = matrix
        self._file = None  # the s3fs file object an s3:// input is read through
        try:
            size = storage.file_size(self.path)
        except FileNotFoundError:
            raise ConversionError(f"input {self.path} does not exist") from None
        if size == 0:
            raise ConversionError(f"input {self.path} is empty (0 bytes): an interrupted download "
                                  "or export? Re-create it or remove it from the inputs.")
        try:
            if storage.is_remote(self.path):  # metadata reads only (planning, validation): a
                # conversion task reads a local copy (data_conversion.convert.convert_store)
                self._file = storage.open_read(self.path)
                self.f = h5py.File(self._file, "r")
            else:
                self.f = h5py.File(self.path, "r")
        except OSError as e:
            if self._file is not None:
                self._file.close()
            raise ConversionError(
                f"cannot read {self.path} as an h5ad (HDF5) file: {e}. The file is corrupt or not "
                "an h5ad; re-export it with anndata's write_h5ad or remove it from the inputs."
            ) from None
        try:
            self._init(symbol_column, gene_id_column)
        except ConversionError:
            self.close()
            raise
        except (KeyError, OSError, RuntimeError, TypeError) as e:
            self.close()
            raise ConversionError(
                f"cannot read {self.path}: {type(e).__name__}: {e}. The file is truncated or not "
                "a valid h5ad; re-export it with anndata's write_h5ad.") from None

    # ------------------------------------------------------------------ metadata
    def _init(self, symbol_column, gene_id_column) -> None:
        from anndata.io import read_elem

        self._read_elem = read_elem
        m = self.matrix
        if m not in self.f:
            have = [k for k in ("X", "raw/X") if k in self.f]
            if "layers" in self.f:
                have += [f"layers/{k}" for k in self.f["layers"].keys()]
            raise ConversionError(f"{self.path} has no matrix {m!r}; it has {have}. "
                                  "Choose one with --matrix.")
        var_path = "raw/var" if m.startswith("raw/") else "var"
        if "obs" not in self.f or var_path not in self.f:
            raise ConversionError(f"{self.path} lacks obs or {var_path}: not an AnnData h5ad file")
        node = self.f[m]
        if isinstance(node, h5py.Group):
            enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            fmt = {"csr_matrix": "csr", "csr": "csr", "csc_matrix": "csc", "csc": "csc"}.get(enc)
            if fmt is None:
                raise ConversionError(f"{self.path}: matrix {m!r} has unsupported encoding {enc!r}")
            shape = tuple(int(s) for s in node.attrs["shape"])
            data = node["data"]
            self._data, self._indices = RawH5Array(data), RawH5Array(node["indices"])
            self._indptr = node["indptr"][:].astype(np.int64)
            self._fmt = fmt
            self._check_sparse_structure(shape, data.shape[0], node["indices"])
            compressed = data.compression is not None
        else:
            fmt, shape, data = "dense", tuple(int(s) for s in node.shape), node
            if len(shape) != 2:
                raise ConversionError(f"{self.path}: matrix {m!r} is not 2-D (shape {shape})")
            self._data = node
            compressed = node.compression is not None
        self.info = MatrixInfo(fmt=fmt, shape=shape, dtype=np.dtype(data.dtype),
                               compressed=compressed)
        if shape[0] == 0 or shape[1] == 0:
            raise ConversionError(f"{self.path} is empty ({shape[0]} cells x {shape[1]} genes); "
                                  "remove it from the inputs.")
        if not (np.issubdtype(self.info.dtype, np.integer)
                or np.issubdtype(self.info.dtype, np.floating)):
            raise ConversionError(f"{self.path}: matrix {m!r} has non-numeric dtype {self.info.dtype}")
        # genes
        var = self.f[var_path]
        idx_name = var.attrs.get("_index", "_index")
        idx_name = idx_name.decode() if isinstance(idx_name, bytes) else idx_name
        var_cols = [k for k in var.keys() if k != idx_name]
        if symbol_column is None:
            symbols = np.asarray(read_elem(var[idx_name])).astype(str)
        else:
            if symbol_column not in var:
                raise ConversionError(f"{self.path}: var has no column {symbol_column!r} "
                                      f"(--symbol-column); var columns are {var_cols}")
            symbols = np.asarray(read_elem(var[symbol_column])).astype(str)
        gid = None
        if gene_id_column == "auto":
            gene_id_column = next((c for c in GENE_ID_CANDIDATES if c in var), None)
        if gene_id_column:
            if gene_id_column not in var:
                raise ConversionError(f"{self.path}: var has no column {gene_id_column!r} "
                                      f"(--gene-id-column); var columns are {var_cols}")
            gid = np.asarray(read_elem(var[gene_id_column])).astype(object)
            gid = np.array([None if (g is None or (isinstance(g, float) and np.isnan(g))
                                     or str(g) in ("", "nan")) else str(g) for g in gid], object)
        if len(symbols) != shape[1]:
            raise ConversionError(f"{self.path}: var has {len(symbols)} genes but {m!r} has "
                                  f"{shape[1]} columns")
        self.symbols = symbols
        self.gene_ids = gid
        obs = self.f["obs"]
        oi = obs.attrs.get("_index", "_index")
        self._obs_index = oi.decode() if isinstance(oi, bytes) else oi
        self.obs_columns = [k for k in obs.keys() if k != self._obs_index]

    def _check_sparse_structure(self, shape: tuple[int, int], n_data: int,
                                indices: h5py.Dataset) -> None:
        """Cheap consistency checks of a CSR/CSC matrix (O(rows), indptr is in memory already):
        integer indices, an index pointer of the right length that starts at 0, never
        decreases and ends at the number of stored values. A file damaged on disk fails here
        with a clear message instead of an IndexError deep inside the conversion."""
        m = self.matrix
        major = "row" if self._fmt == "csr" else "column"
        if np.dtype(indices.dtype).kind not in "iu":
            raise CorruptInputError(
                f"{self.path}: {m}/indices has dtype {indices.dtype}, not an integer type (wrong "
                f"dtype). {_CORRUPT_FIX}")
        ip = self._indptr
        n_major = shape[0] if self._fmt == "csr" else shape[1]
        if len(ip) != n_major + 1:
            raise CorruptInputError(
                f"{self.path}: {m}/indptr has {len(ip)} entries for {n_major} {major}s (expected "
                f"{n_major + 1}). {_CORRUPT_FIX}")
        if ip[0] != 0:
            raise CorruptInputError(f"{self.path}: {m}/indptr starts at {ip[0]}, not 0. "
                                    f"{_CORRUPT_FIX}")
        dec = np.flatnonzero(np.diff(ip) < 0)
        if dec.size:
            k = int(dec[0])
            raise CorruptInputError(
                f"{self.path}: {m}/indptr is non-monotonic: {major}s [{k}, {int(dec[-1]) + 1}) "
                f"include {dec.size} with a negative length (indptr[{k}]={ip[k]} > "
                f"indptr[{k + 1}]={ip[k + 1]}). "
                f"{_CORRUPT_FIX}")
        if not (ip[-1] == n_data == indices.shape[0]):
            raise CorruptInputError(
                f"{self.path}: {m}/indptr ends at {ip[-1]} but {m}/data holds {n_data} and "
                f"{m}/indices {indices.shape[0]} values. {_CORRUPT_FIX}")

    def check_indices(self, ind: np.ndarray, local_ptr: np.ndarray,
                      majors: np.ndarray | int) -> None:
        """Raise ``CorruptInputError`` if a block's minor indices (columns of CSR rows, rows of
        CSC columns) fall outside the matrix. ``local_ptr``: the block's index pointer rebased
        to 0; ``majors``: the source row (CSR) or column (CSC) of each of its rows, or the
        first of a consecutive run. The message names the affected rows."""
        limit = self.n_vars if self._fmt == "csr" else self.n_obs
        if ind.size == 0:
            return
        if int(ind.max()) < limit and (ind.dtype.kind == "u" or int(ind.min()) >= 0):
            return
        bad = np.flatnonzero((ind < 0) | (ind >= limit))
        k = np.searchsorted(local_ptr, bad, side="right") - 1
        at = k + majors if np.isscalar(majors) else np.asarray(majors)[k]
        major, minor = ("rows", "column") if self._fmt == "csr" else ("columns", "row")
        raise CorruptInputError(
            f"{self.path}: {self.matrix}/indices of {major} [{int(at.min())}, {int(at.max()) + 1}) "
            f"hold {bad.size} {minor} index(es) out of range (e.g. "
            f"{int(ind[bad[0]])} in {major[:-1]} {int(at[0])}; valid: 0..{limit - 1}). "
            f"{_CORRUPT_FIX}")

    @property
    def n_obs(self) -> int:
        return self.info.shape[0]

    @property
    def n_vars(self) -> int:
        return self.info.shape[1]

    def obs_column(self, name: str | None) -> np.ndarray:
        """Decode one obs column (the index with name None) as a numpy array."""
        obs = self.f["obs"]
        key = self._obs_index if name is None else name
        arr = np.asarray(self._read_elem(obs[key]))
        if arr.dtype == object or arr.dtype.kind in "SU":
            arr = arr.astype(str)
        if len(arr) != self.n_obs:
            raise ConversionError(f"{self.path}: obs column {key!r} has {len(arr)} rows for "
                                  f"{self.n_obs} cells")
        return arr

    def obs_column_categorical(self, name: str, a: int, b: int) -> pd.Categorical:
        """Rows [a, b) of an obs column as a categorical of strings (NaN where missing)."""
        values = self._read_elem(self.f["obs"][name])
        if len(values) != self.n_obs:
            raise ConversionError(f"{self.path}: obs column {name!r} has {len(values)} rows for "
                                  f"{self.n_obs} cells")
        if isinstance(values, pd.Categorical):
            cat = values[a:b]
            return cat.rename_categories([str(c) for c in cat.categories])
        v = pd.Series(np.asarray(values)[a:b])
        missing = v.isna() | v.astype(str).isin(["", "nan"])
        cat = pd.Categorical(v.astype(str))
        if missing.any():
            cat = cat.copy()
            cat[missing.to_numpy()] = np.nan
        return cat

    # ------------------------------------------------------------------ X access
    def row_nnz(self, start: int, stop: int) -> np.ndarray:
        if self.info.fmt != "csr":
            raise RuntimeError("row_nnz needs CSR")
        return np.diff(self._indptr[start:stop + 1])

    def iter_row_blocks(self, start: int, stop: int, budget_bytes: int):
        """Yield (r0, r1, csr_matrix) over rows [start, stop) in order, each block ~budget bytes.

        For CSC sources see `iter_csc_row_blocks` (needs scratch space)."""
        fmt = self.info.fmt
        item = self.info.dtype.itemsize
        if fmt == "csr":
            ip = self._indptr
            r = start
            while r < stop:
                # choose the largest r1 whose nnz fits the budget (at least one row)
                max_nnz = max(budget_bytes // (item + self._indices.dtype.itemsize), 1)
                r1 = int(np.searchsorted(ip, ip[r] + max_nnz, side="right")) - 1
                r1 = min(max(r1, r + 1), stop)
                a, b = int(ip[r]), int(ip[r1])
                data = self._data[a:b]
                ind = self._indices[a:b]
                local = ip[r:r1 + 1] - a
                self.check_indices(ind, local, r)
                yield r, r1, sp.csr_matrix((data, ind, local), shape=(r1 - r, self.n_vars))
                r = r1
        elif fmt == "dense":
            rows = max(budget_bytes // max(self.n_vars * item, 1), 1)
            for r in range(start, stop, rows):
                r1 = min(r + rows, stop)
                yield r, r1, sp.csr_matrix(self._data[r:r1])
        else:
            raise RuntimeError("CSC sources are read through a scratch transpose")

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows (sorted ascending, unique) of a CSR source; one read per run of rows."""
        if len(rows) == 0:
            return sp.csr_matrix((0, self.n_vars), dtype=self.info.dtype)
        out = gather_rows(self._data, self._indices, self._indptr, rows, self.n_vars)
        self.check_indices(out.indices, out.indptr, rows)
        return out

    def iter_csc_columns(self, budget_bytes: int):
        """Yield (c0, c1, data, indices(row ids), indptr) column blocks of a CSC source."""
        ip = self._indptr
        item = self.info.dtype.itemsize + self._indices.dtype.itemsize
        c = 0
        n = self.n_vars
        while c < n:
            max_nnz = max(budget_bytes // item, 1)
            c1 = int(np.searchsorted(ip, ip[c] + max_nnz, side="right")) - 1
            c1 = min(max(c1, c + 1), n)
            a, b = int(ip[c]), int(ip[c1])
            ind, local = self._indices[a:b], ip[c:c1 + 1] - a
            self.check_indices(ind, local, c)
            yield c, c1, self._data[a:b], ind, local
            c = c1

    def close(self) -> None:
        for arr in (getattr(self, "_data", None), getattr(self, "_indices", None)):
            if isinstance(arr, RawH5Array):
                arr.close()
        try:
            self.f.close()
        except Exception:  # noqa: BLE001 - closing twice or after a failed open is harmless
            pass
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> H5adSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
