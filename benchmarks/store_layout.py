"""Row-range read throughput of store layouts: the measurement behind the corpus defaults.

    python benchmarks/store_layout.py --preset medium --workdir bench_data

One simulated VCC-shaped input (default ``medium``: 20k cells x 18,080 genes, ~48% dense) is
written as:

- vcc-dist stores with inner chunks of 8 / 32 / 128 rows (lz4) and 32 rows with zstd;
- anndata's default Zarr layout (``read_h5ad`` + ``write_zarr``);
- the source h5ad itself (read backed).

Each is read with runs of ``--rows`` consecutive rows at random offsets (what block-sampling
loaders do) and with a sequential scan; cells/s, bytes on disk and file count are recorded in
``benchmarks/results/store_layout.json``. vcc-dist stores are read with the plain reader (indptr
in memory, one slice of data and indices per run) with zarr's default codec pipeline and with
zarrs; every layout is also read through anndata's ``sparse_dataset`` for a like-for-like view.
Reads come from the page cache (warm): this measures decode cost, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import du  # noqa: E402
warnings.filterwarnings("ignore")


class PlainReader:
    """indptr in memory; one slice of data and one of indices per run of rows."""

    def __init__(self, store: Path):
        import zarr

        x = zarr.open_group(str(store), mode="r")["X"]
        self.data, self.indices = x["data"], x["indices"]
        self.indptr = x["indptr"][:]

    def read(self, a: int, b: int):
        lo, hi = int(self.indptr[a]), int(self.indptr[b])
        return self.data[lo:hi], self.indices[lo:hi]


def _time_reads(read, n_obs: int, rows: int, n_reads: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    offs = rng.integers(0, n_obs - rows, n_reads)
    read(0, rows)  # open/metadata costs outside the timing
    t0 = time.perf_counter()
    for o in offs:
        read(int(o), int(o) + rows)
    return rows * n_reads / (time.perf_counter() - t0)


def _time_scan(read, n_obs: int, rows: int = 1024) -> float:
    t0 = time.perf_counter()
    for a in range(0, n_obs, rows):
        read(a, min(a + rows, n_obs))
    return n_obs / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--workdir", default=str(ROOT / "bench_data"))
    ap.add_argument("--rows", type=int, default=32, help="rows per random read")
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "store_layout.json"))
    a = ap.parse_args()

    import anndata as ad
    import h5py
    import zarr
    from anndata.io import sparse_dataset

    from data_conversion import ConvertConfig, convert_corpus
    from vcc_dist.data.simulate import sim_config, simulate

    work = Path(a.workdir)
    sim_dir = work / f"sim_{a.preset}"
    h5ad = sim_dir / "perturbseq.h5ad"
    if not h5ad.exists():
        simulate(sim_config(a.preset), sim_dir)
    with h5py.File(h5ad, "r") as f:
        n_obs = int(f["X"].attrs["shape"][0])

    variants = {"vcc-dist 8 rows lz4": dict(chunk_rows=8, compressor="lz4"),
                "vcc-dist 32 rows lz4 (default)": dict(chunk_rows=32, compressor="lz4"),
                "vcc-dist 128 rows lz4": dict(chunk_rows=128, compressor="lz4"),
                "vcc-dist 32 rows zstd": dict(chunk_rows=32, compressor="zstd")}
    results = []
    for label, opts in variants.items():
        out = work / f"layout_{opts['chunk_rows']}_{opts['compressor']}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        convert_corpus(ConvertConfig(inputs=(str(h5ad),), out=str(out), parallel="serial",
                                     progress=False, **opts))
        conv_s = time.perf_counter() - t0
        store = out / "stores" / "perturbseq.zarr"
        size, files = du(store / "X")
        row = {"layout": label, "bytes_X": size, "files_X": files, "convert_s": round(conv_s, 1)}
        for pipeline in ("default", "zarrs"):
            path = ("zarr.core.codec_pipeline.BatchedCodecPipeline" if pipeline == "default"
                    else "zarrs.ZarrsCodecPipeline")
            zarr.config.set({"codec_pipeline.path": path})
            r = PlainReader(store)
            row[f"random_cells_s_{pipeline}"] = round(_time_reads(r.read, n_obs, a.rows, a.reads))
            row[f"scan_cells_s_{pipeline}"] = round(_time_scan(r.read, n_obs))
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
        sd = sparse_dataset(zarr.open_group(str(store), mode="r")["X"])
        row["random_cells_s_anndata_api"] = round(_time_reads(lambda i, j: sd[i:j], n_obs, a.rows,
                                                              a.reads))
        results.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)

    # anndata's default zarr layout, read through anndata (how a user would)
    zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"})
    dz = work / "layout_anndata_default.zarr"
    shutil.rmtree(dz, ignore_errors=True)
    ad.settings.zarr_write_format = 3
    t0 = time.perf_counter()
    ad.read_h5ad(h5ad).write_zarr(dz)
    conv_s = time.perf_counter() - t0
    size, files = du(dz / "X")
    sd = sparse_dataset(zarr.open_group(str(dz), mode="r")["X"])
    chunk = zarr.open_group(str(dz), mode="r")["X/data"].chunks
    row = {"layout": f"anndata default zarr (chunks {chunk[0]})", "bytes_X": size,
           "files_X": files, "convert_s": round(conv_s, 1),
           "random_cells_s_anndata_api": round(_time_reads(lambda i, j: sd[i:j], n_obs, a.rows,
                                                           a.reads))}
    r = PlainReader(dz)
    row["random_cells_s_default"] = round(_time_reads(r.read, n_obs, a.rows, a.reads))
    row["scan_cells_s_default"] = round(_time_scan(r.read, n_obs))
    results.append(row)
    print(json.dumps(row), flush=True)
    shutil.rmtree(dz, ignore_errors=True)

    # the backed h5ad source
    f = h5py.File(h5ad, "r")
    sd = sparse_dataset(f["X"])
    ip = f["X/indptr"][:]
    d, i = f["X/data"], f["X/indices"]
    size, files = du(h5ad)
    row = {"layout": "backed h5ad (uncompressed source)", "bytes_X": size, "files_X": files,
           "random_cells_s_anndata_api": round(_time_reads(lambda p, q: sd[p:q], n_obs, a.rows,
                                                           a.reads)),
           "random_cells_s_default": round(_time_reads(
               lambda p, q: (d[ip[p]:ip[q]], i[ip[p]:ip[q]]), n_obs, a.rows, a.reads)),
           "scan_cells_s_default": round(_time_scan(
               lambda p, q: (d[ip[p]:ip[q]], i[ip[p]:ip[q]]), n_obs))}
    f.close()
    results.append(row)
    print(json.dumps(row), flush=True)

    rec = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "preset": a.preset,
           "n_obs": n_obs, "rows_per_read": a.rows, "reads": a.reads, "rows": results}
    path = Path(a.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    hist = json.loads(path.read_text()) if path.exists() else []
    hist.append(rec)
    path.write_text(json.dumps(hist, indent=1))
    print(f"\n| layout | X MB | files | random {a.rows}-row reads, cells/s (zarr / zarrs / "
          "anndata API) | sequential scan cells/s (zarr / zarrs) |")
    print("|---|---:|---:|---|---|")
    for r in results:
        print(f"| {r['layout']} | {r['bytes_X'] / 1e6:,.0f} | {r['files_X']} | "
              f"{r.get('random_cells_s_default', '-'):,} / {r.get('random_cells_s_zarrs', '-')} / "
              f"{r.get('random_cells_s_anndata_api', '-'):,} | "
              f"{r.get('scan_cells_s_default', '-'):,} / {r.get('scan_cells_s_zarrs', '-')} |")


if __name__ == "__main__":
    main()
