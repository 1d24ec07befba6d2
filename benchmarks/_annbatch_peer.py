"""Peer measurement: annbatch (scverse) reading the same cells as vcc-dist's SE cell stream.

Runs in its own virtual environment (annbatch needs Python >= 3.12; vcc-dist's is 3.11)::

    ~/.pyenv/versions/3.12.1/bin/python -m venv .venv-annbatch
    .venv-annbatch/bin/pip install torch==2.13.0
    .venv-annbatch/bin/pip install torch==2.13.0 "annbatch[zarrs]" psutil

    .venv-annbatch/bin/python benchmarks/_annbatch_peer.py build --h5ad X.h5ad --out DIR
    .venv-annbatch/bin/python benchmarks/_annbatch_peer.py read --store DIR --seconds 60

``build`` writes annbatch's recommended layout with annbatch's own writer and defaults:
``DatasetCollection(DIR/collection.zarr).add_adatas([h5ad], shuffle=True)``, i.e. the rows
pre-shuffled (contiguous runs of ``shuffle_chunk_size=1000`` rows drawn in random order, then a
full in-memory permutation of each dataset), split into datasets of at most ``dataset_size="20GB"``
(uncompressed; one dataset for the 20k-cell input; ``--dataset-size`` lowers it to bound the build's
memory, which is about 3x the dataset size: "2GB" -> 8 datasets for the 221k-cell VCC-size file), each dataset a Zarr v3 AnnData store whose CSR
``X/data`` and ``X/indices`` are sharded (``shard_size="1GB"``) with inner chunks of
``n_obs_per_chunk=64`` rows' worth of non-zeros, Blosc lz4 clevel 3 with byte shuffle; indices are
written with the smallest integer dtype that fits. Reads and writes go through the zarrs codec
pipeline, as annbatch's docs require for local file systems.

``read`` iterates ``annbatch.Loader`` in shuffled mode over that collection with annbatch's
recommended settings (library defaults ``chunk_size=512, preload_nchunks=32`` and the documented
``batch_size=4096``; all overridable), ``preload_to_gpu=False`` (no cupy on a CPU machine).
annbatch yields ``batch["X"]`` *sparse* (raw counts, float32 as stored): a scipy ``csr_matrix``
with ``to=None``, a torch sparse CSR tensor with ``to="torch"``. Every batch is densified to a
float32 torch tensor ``[batch, n_genes]``:

- ``--densify scipy`` (default): ``to=None``, ``torch.from_numpy(X.toarray())`` - the fast way
  on a CPU (~0.15 s for 4,096 x 18,080 at 47% non-zero);
- ``--densify torch``: ``to="torch"`` and ``Tensor.to_dense()``, annbatch README's path minus the
  ``.cuda()``; torch's CPU sparse-CSR ``to_dense`` takes 2-4 s per 4,096-cell batch here, so this
  measures torch rather than annbatch.

With ``--log1p`` each batch is then normalised to ``--target-sum`` counts per cell and
log1p-transformed, as vcc-dist's DenseCells transform does. ``obs`` columns (default cell_type, target_gene, batch: the SE labels) are loaded
and sliced per batch, as annbatch does for any ``obs`` it is given. The loader is consumed
directly, not wrapped in a torch DataLoader (annbatch's advice); each epoch is a new iterator.

The last line of stdout is one JSON object: settings, setup seconds, time to first batch, batches,
cells, cells/s, CPU seconds of the process (all its threads; getrusage SELF + CHILDREN) and cells
per CPU-second over the read window, and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

# runs in its own venv (Python 3.12): _common needs only the standard library here
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import du  # noqa: E402

T_START = time.perf_counter()

COLLECTION_NAME = "collection.zarr"
DEFAULT_OBS = "cell_type,target_gene,batch"


def _cpu_seconds() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024.0


def _use_zarrs() -> None:
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def _size_arg(v: str) -> int | str:
    """annbatch's size arguments: an int is a row count, a string a size ("2GB")."""
    return int(v) if v.isdigit() else v


def _collection_path(d: str | os.PathLike) -> Path:
    p = Path(d)
    return p if p.suffix == ".zarr" else p / COLLECTION_NAME


def _versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("annbatch", "anndata", "zarr", "zarrs", "torch", "numpy", "scipy"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = None
    return out


# --------------------------------------------------------------------------------------- build


def cmd_build(args) -> dict:
    import numpy as np

    _use_zarrs()
    from annbatch import DatasetCollection

    out = _collection_path(args.out)
    if out.exists():
        if not args.overwrite:
            raise SystemExit(f"{out} exists (pass --overwrite to rebuild it)")
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    DatasetCollection(str(out)).add_adatas(
        [str(args.h5ad)],
        shuffle=True,
        rng=np.random.default_rng(args.seed),
        **({"n_obs_per_chunk": args.n_obs_per_chunk} if args.n_obs_per_chunk else {}),
        **({"shard_size": args.shard_size} if args.shard_size else {}),
        **({"dataset_size": args.dataset_size} if args.dataset_size else {}),
    )
    secs, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    size, files = du(out)
    layout = _describe(out)
    return {
        "tool": "annbatch", "mode": "build", "h5ad": str(args.h5ad), "store": str(out),
        "seed": args.seed, "dataset_size": args.dataset_size or "20GB (default)",
        "shard_size": args.shard_size or "1GB (default)",
        "n_obs_per_chunk": args.n_obs_per_chunk or 64, "seconds": round(secs, 2), "cpu_s": round(cpu, 2),
        "store_mb": round(size / 2**20, 1), "files": files, "layout": layout,
        "peak_rss_mb": round(_peak_rss_mb(), 1), "versions": _versions(),
    }


def _describe(coll: Path) -> list[dict]:
    """Shape, dtype, chunk and shard of each dataset's X arrays."""
    import zarr

    g = zarr.open_group(str(coll), mode="r")
    out = []
    for k in sorted(g.group_keys()):
        x = g[k]["X"]
        d = {"dataset": k, "shape": list(x.attrs.get("shape", []))}
        for name in ("data", "indices", "indptr"):
            a = x[name]
            d[name] = {"dtype": str(a.dtype), "len": a.shape[0], "chunk": a.chunks[0],
                       "shard": (a.shards or a.chunks)[0],
                       "codecs": [type(c).__name__ for c in a.compressors]}
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------- read


def cmd_read(args) -> dict:
    import numpy as np

    _use_zarrs()
    if args.threads:
        import zarr

        zarr.config.set({"threading.max_workers": args.threads})
    import anndata as ad
    import torch
    from annbatch import DatasetCollection, Loader

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t_imported = time.perf_counter()
    obs_cols = [c for c in args.obs_columns.split(",") if c]

    def load_adata(g):
        # annbatch README's custom load function: backed CSR X, only the obs columns needed
        obs = ad.io.read_elem(g["obs"])
        return ad.AnnData(X=ad.io.sparse_dataset(g["X"]),
                          obs=obs[obs_cols] if obs_cols else obs.iloc[:, :0])

    cpu_setup0, t_setup0 = _cpu_seconds(), time.perf_counter()
    with ad.settings.override(remove_unused_categories=False):
        collection = DatasetCollection(str(_collection_path(args.store)), mode="r")
        loader = Loader(batch_size=args.batch_size, chunk_size=args.chunk_size,
                        preload_nchunks=args.preload_nchunks, shuffle=True, drop_last=False,
                        to="torch" if args.densify == "torch" else None,
                        preload_to_gpu=False, rng=np.random.default_rng(args.seed))
        loader = loader.use_collection(collection, load_adata=load_adata)
    setup_s = time.perf_counter() - t_setup0
    n_obs, n_var = loader.n_obs, loader.n_var

    target = float(args.target_sum)
    batches = cells = epochs = 0
    first_batch_s = None
    x_dtype = x_layout = raw_dtype = None
    checksum = 0.0
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    deadline = t0 + args.seconds
    done = False
    while not done:
        epochs += 1
        for batch in loader:
            x = batch["X"]
            if raw_dtype is None:
                raw_dtype = str(x.dtype)
                x_layout = str(x.layout) if isinstance(x, torch.Tensor) else type(x).__name__
            if isinstance(x, torch.Tensor):
                if x.layout != torch.strided:
                    x = x.to_dense()
            elif hasattr(x, "toarray"):
                x = torch.from_numpy(x.toarray())
            else:
                x = torch.from_numpy(np.asarray(x))
            x = x.to(torch.float32)
            if args.log1p:
                tot = x.sum(dim=1, keepdim=True).clamp_min_(1.0)
                x = torch.log1p(x.mul_(target / tot))
            obs = batch["obs"]
            assert x.shape[1] == n_var and (obs is None or len(obs) == x.shape[0])
            x_dtype = str(x.dtype)
            if batches == 0:
                first_batch_s = time.perf_counter() - t0
                checksum = float(x[:, :8].sum())  # touch the data once
            batches += 1
            cells += x.shape[0]
            if time.perf_counter() >= deadline or (args.max_batches and batches >= args.max_batches):
                done = True
                break
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    return {
        "tool": "annbatch", "mode": "read", "store": str(_collection_path(args.store)),
        "settings": {
            "batch_size": args.batch_size, "chunk_size": args.chunk_size,
            "preload_nchunks": args.preload_nchunks, "shuffle": True,
            "to": "torch" if args.densify == "torch" else None, "densify": args.densify,
            "preload_to_gpu": False, "obs_columns": obs_cols, "log1p": bool(args.log1p),
            "target_sum": target if args.log1p else None, "seed": args.seed,
            "codec_pipeline": "zarrs.ZarrsCodecPipeline",
            "zarr_threading_max_workers": args.threads or None,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        },
        "n_obs": n_obs, "n_genes": n_var,
        "yielded": {"raw_X": f"{x_layout} {raw_dtype}", "X": f"dense {x_dtype}"},
        "import_s": round(t_imported - T_START, 2), "setup_s": round(setup_s, 3),
        "setup_cpu_s": round(cpu0 - cpu_setup0, 3),
        "first_batch_s": round(first_batch_s, 3) if first_batch_s is not None else None,
        "seconds": round(wall, 2), "epochs_started": epochs, "batches": batches, "cells": cells,
        "cells_per_s": round(cells / wall, 1), "cpu_s": round(cpu, 2),
        "cpu_util": round(cpu / wall, 2),
        "cells_per_cpu_s": round(cells / cpu, 1) if cpu > 0 else None,
        "cpu_s_total": round(_cpu_seconds(), 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1), "checksum": checksum, "versions": _versions(),
    }


# ----------------------------------------------------------------------------------------- cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build annbatch's pre-shuffled sharded Zarr collection")
    b.add_argument("--h5ad", required=True, type=Path)
    b.add_argument("--out", required=True, help="directory (collection.zarr inside) or a .zarr")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--n-obs-per-chunk", type=int, default=None, help="annbatch default: 64")
    b.add_argument("--shard-size", default=None, type=_size_arg,
                   help='annbatch default: "1GB" (an integer is a number of rows)')
    b.add_argument("--dataset-size", default=None, type=_size_arg,
                   help='annbatch default: "20GB" (uncompressed bytes, binary units; an integer is '
                        'a number of rows). Bounds build memory: each dataset is loaded, permuted '
                        'and written in memory (peak RSS ~3x this); e.g. "2GB" for a 15 GB h5ad')
    r = sub.add_parser("read", help="iterate annbatch.Loader (shuffled) and measure it")
    r.add_argument("--store", required=True)
    r.add_argument("--seconds", type=float, default=60.0)
    r.add_argument("--max-batches", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=4096)
    r.add_argument("--chunk-size", type=int, default=512)
    r.add_argument("--preload-nchunks", type=int, default=32)
    r.add_argument("--obs-columns", default=DEFAULT_OBS, help='comma list; "" for none')
    r.add_argument("--densify", choices=("scipy", "torch"), default="scipy",
                   help="scipy: to=None + csr.toarray(); torch: to='torch' + Tensor.to_dense()")
    r.add_argument("--log1p", action="store_true", help="normalise_total + log1p after densify")
    r.add_argument("--target-sum", type=float, default=1e4)
    r.add_argument("--threads", type=int, default=0, help="zarr threading.max_workers (0: default)")
    r.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    r.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    res = cmd_build(args) if args.cmd == "build" else cmd_read(args)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
