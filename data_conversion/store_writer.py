"""Writing one corpus store: AnnData-encoded Zarr v3 with a row-read-friendly CSR layout.

Why not ``anndata.write_zarr``/``write_elem`` for X: they need the whole matrix in memory and
ignore chunk settings for sparse X (docs/stack_notes.md), so we write the three CSR arrays ourselves in
anndata's documented encoding (group attrs ``encoding-type: csr_matrix``, ``encoding-version:
0.1.0``, ``shape``) and let anndata write everything else (obs, var, uns).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec


@dataclass(frozen=True)
class StoreLayout:
    chunk: int  # elements per inner chunk of data/indices
    shard: int  # elements per shard (a multiple of chunk): one file per shard
    data_dtype: str
    indices_dtype: str
    compressor: str  # blosc cname: lz4 | zstd
    clevel: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def choose_layout(n_genes: int, max_value: float, mean_nnz_per_row: float, chunk_rows: int,
                  shard_mb: int, compressor: str, clevel: int) -> StoreLayout:
    """Smallest exact dtypes; inner chunks holding ~chunk_rows rows; shards of ~shard_mb MiB.

    Chunk and shard sizes are powers of two so every store of a corpus reads alike (a chunk
    holds chunk_rows to 2 x chunk_rows rows); the default of 8 rows (~15 rows at VCC density)
    and lz4 come from benchmarks/store_layout.py and benchmarks/loader.py (see
    benchmarks/RESULTS.md): the loaders read runs of 32-64 rows at random offsets, and smaller
    chunks waste less at run edges; 64 MiB shards keep a 1.9e9-non-zero store to ~60 files per
    array.
    """
    if max_value < 2**8:
        ddt = "uint8"
    elif max_value < 2**16:
        ddt = "uint16"
    elif max_value < 2**32:
        ddt = "uint32"
    else:
        ddt = "float64"
    idt = "uint16" if n_genes <= 2**16 else "uint32"
    target = max(int(chunk_rows * max(mean_nnz_per_row, 1.0)), 1)
    chunk = int(min(max(2 ** int(np.ceil(np.log2(target))), 1 << 12), 1 << 21))
    per_elem = max(np.dtype(ddt).itemsize, np.dtype(idt).itemsize)
    shard_elems = max(shard_mb * (1 << 20) // per_elem, chunk)
    shard = chunk * max(shard_elems // chunk, 1)
    return StoreLayout(chunk=chunk, shard=shard, data_dtype=ddt, indices_dtype=idt,
                       compressor=compressor, clevel=clevel)


def _codec(layout: StoreLayout) -> BloscCodec:
    shuffle = "bitshuffle" if layout.data_dtype == "uint8" else "shuffle"
    return BloscCodec(cname=layout.compressor, clevel=layout.clevel, shuffle=shuffle)


class ShardAppender:
    """Appends to a 1-D sharded array whole shards at a time.

    zarr rewrites a whole shard for a partial write; buffering to shard boundaries means every
    shard is written exactly once. Memory: one shard plus the pending block.
    """

    def __init__(self, arr: zarr.Array, shard: int):
        self.arr = arr
        self.shard = shard
        self.pos = 0
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def append(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        self.pending.append(np.asarray(values, dtype=self.arr.dtype))
        self.n_pending += values.size
        if self.n_pending >= self.shard:
            buf = np.concatenate(self.pending)
            k = (buf.size // self.shard) * self.shard
            self.arr[self.pos:self.pos + k] = buf[:k]
            self.pos += k
            rest = buf[k:]
            self.pending = [rest] if rest.size else []
            self.n_pending = rest.size

    def close(self) -> int:
        if self.n_pending:
            buf = np.concatenate(self.pending)
            self.arr[self.pos:self.pos + buf.size] = buf
            self.pos += buf.size
            self.pending, self.n_pending = [], 0
        return self.pos


class CSRStoreWriter:
    """Creates X (CSR) in an open zarr v3 group and streams rows into it."""

    def __init__(self, root: zarr.Group, n_rows: int, n_genes: int, nnz: int,
                 layout: StoreLayout):
        self.layout = layout
        codec = _codec(layout)
        x = root.create_group("X", attributes={
            "encoding-type": "csr_matrix", "encoding-version": "0.1.0",
            "shape": [int(n_rows), int(n_genes)]})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # an empty array still needs a positive chunk shape
            ch = max(min(layout.chunk, max(nnz, 1)), 1)
            sh = max(min(layout.shard, ch * max(-(-max(nnz, 1) // ch), 1)), ch)
            sh = ch * max(sh // ch, 1)
            self.data = x.create_array("data", shape=(nnz,), dtype=layout.data_dtype,
                                       chunks=(ch,), shards=(sh,), compressors=[codec])
            self.indices = x.create_array("indices", shape=(nnz,), dtype=layout.indices_dtype,
                                          chunks=(ch,), shards=(sh,), compressors=[codec])
            ipc = min(n_rows + 1, 1 << 16)
            self.indptr = x.create_array("indptr", shape=(n_rows + 1,), dtype="int64",
                                         chunks=(ipc,), shards=(ipc * max(1, (n_rows + 1) // ipc + 1),),
                                         compressors=[codec])
        self._d = ShardAppender(self.data, sh)
        self._i = ShardAppender(self.indices, sh)
        self._indptr_parts: list[np.ndarray] = []
        self._rows = 0
        self._nnz = 0
        self.n_rows, self.nnz = n_rows, nnz

    def append(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray) -> None:
        self._d.append(data)
        self._i.append(indices)
        self._indptr_parts.append(indptr[1:] + self._nnz)
        self._nnz += int(indptr[-1])
        self._rows += len(indptr) - 1

    def close(self) -> None:
        nd, ni = self._d.close(), self._i.close()
        if not (nd == ni == self._nnz == self.nnz and self._rows == self.n_rows):
            raise RuntimeError(f"store writer got {self._rows} rows/{self._nnz} values, expected "
                               f"{self.n_rows}/{self.nnz}")
        # indptr: 8 bytes per row, written once at the end (the only per-cell array we hold)
        self.indptr[:] = np.concatenate([np.zeros(1, np.int64)] + self._indptr_parts)
