"""Conversion throughput and peak memory: vcc-dist vs the naive anndata path, same run.

    python benchmarks/conversion.py --presets medium vcc --workdir bench_data

For each simulated input (``medium``: 20k cells, ``vcc``: 221,273 cells, both x 18,080 genes at
VCC density, rows in random order as in real files) it runs, each in a fresh process:

- ours:  ``jobs/convert.py`` as users run it (embedded local Ray, one task per store of at most
  131,072 cells); peak RSS is the largest conversion task's own (each task reports it);
- naive: ``anndata.read_h5ad(path)`` + ``adata.write_zarr(out)`` (anndata's defaults), one
  process, its own peak RSS.

and records wall time, cells/s, peak RSS and output size in
``benchmarks/results/conversion.json`` (appended per run) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import du  # noqa: E402

NAIVE = """
import sys, warnings, anndata as ad
warnings.filterwarnings("ignore")
ad.settings.zarr_write_format = 3
a = ad.read_h5ad(sys.argv[1])
a.write_zarr(sys.argv[2])
"""


# runs a script or code string and prints its own peak RSS at exit (children's rusage would
# mix runs together)
WRAP = """
import atexit, resource, runpy, sys
atexit.register(lambda: print("PEAK_RSS_KB=%d" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                              file=sys.stderr))
target, sys.argv = sys.argv[1], sys.argv[1:]
if target == "-c":
    exec(compile(CODE, "<naive>", "exec"), {"__name__": "__main__"})
else:
    sys.path.insert(0, __import__("os").path.dirname(target))
    runpy.run_path(target, run_name="__main__")
"""


def _run(target: str, args: list[str], code: str = "", mem_limit_gb: float | None = None) -> dict:
    """Run a script (or code with target "-c") in a fresh interpreter; wall seconds, its peak
    RSS in MB, exit status."""
    def limit():
        if mem_limit_gb:
            b = int(mem_limit_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (b, b))

    wrap = WRAP.replace("CODE", repr(code))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrap, target, *args], capture_output=True,
                       text=True, preexec_fn=limit)
    dt = time.perf_counter() - t0
    peak = [int(x.split("=")[1]) for x in p.stderr.splitlines() if x.startswith("PEAK_RSS_KB=")]
    return {"seconds": round(dt, 2), "peak_rss_mb": round(peak[-1] / 1024, 1) if peak else None,
            "returncode": p.returncode, "stderr_tail": p.stderr[-600:] if p.returncode else "",
            "stdout": p.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["medium", "vcc"])
    ap.add_argument("--workdir", default=str(ROOT / "bench_data"))
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--naive-mem-limit-gb", type=float, default=22.0,
                    help="address-space cap for the naive run so it cannot take the machine "
                    "down (this box has 24 GiB)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "conversion.json"))
    a = ap.parse_args()

    from vcc_dist.data.simulate import sim_config, simulate

    work = Path(a.workdir)
    rows = []
    for preset in a.presets:
        sim_dir = work / f"sim_{preset}"
        h5ad = sim_dir / "perturbseq.h5ad"
        if not h5ad.exists():
            t0 = time.perf_counter()
            simulate(sim_config(preset), sim_dir)
            print(f"simulated {preset} in {time.perf_counter() - t0:.0f}s", flush=True)
        import h5py

        with h5py.File(h5ad, "r") as f:
            n_cells, n_genes = (int(s) for s in f["X"].attrs["shape"])
            nnz = int(f["X/data"].shape[0])
        out = work / f"corpus_{preset}"
        shutil.rmtree(out, ignore_errors=True)
        # the job as users run it: one Ray task per store on the embedded local Ray
        ours = _run(str(ROOT / "jobs" / "convert.py"), [str(h5ad), "--out", str(out), "--no-progress"])
        if ours["returncode"]:
            raise SystemExit(f"vcc-dist conversion failed:\n{ours['stderr_tail']}")
        tasks = [float(x) for x in re.findall(r"peak RSS (\d+) MB", ours.pop("stdout"))]
        ours["driver_peak_rss_mb"] = ours.pop("peak_rss_mb")
        ours["task_peak_rss_mb"] = tasks
        ours["peak_rss_mb"] = max(tasks)  # per conversion task: what bounds a worker's memory
        size, files = du(out)
        ours.update(cells_per_s=round(n_cells / ours["seconds"], 1), bytes=size, files=files)
        row = {"preset": preset, "cells": n_cells, "genes": n_genes, "nnz": nnz,
               "density": round(nnz / n_cells / n_genes, 4),
               "input_bytes": h5ad.stat().st_size, "ours": ours}
        print(json.dumps(row), flush=True)
        if not a.skip_naive:
            nout = work / f"naive_{preset}.zarr"
            shutil.rmtree(nout, ignore_errors=True)
            naive = _run("-c", [str(h5ad), str(nout)], code=NAIVE,
                         mem_limit_gb=a.naive_mem_limit_gb)
            naive.pop("stdout")
            if naive["returncode"] == 0:
                size, files = du(nout)
                naive.update(cells_per_s=round(n_cells / naive["seconds"], 1), bytes=size,
                             files=files)
            shutil.rmtree(nout, ignore_errors=True)
            row["naive"] = naive
        rows.append(row)
        print(json.dumps(row), flush=True)
    rec = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "rows": rows}
    path = Path(a.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    hist = json.loads(path.read_text()) if path.exists() else []
    hist.append(rec)
    path.write_text(json.dumps(hist, indent=1))
    print("\n| input | cells | tool | seconds | cells/s | peak RSS MB | output GB | files |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for tool in ("ours", "naive"):
            if tool not in r:
                continue
            t = r[tool]
            if t["returncode"]:
                print(f"| {r['preset']} | {r['cells']:,} | {tool} | failed (exit {t['returncode']}"
                      f") | | {t['peak_rss_mb']} | | |")
                continue
            print(f"| {r['preset']} | {r['cells']:,} | {tool} | {t['seconds']:.0f} | "
                  f"{t['cells_per_s']:,.0f} | {t['peak_rss_mb']:.0f} | {t['bytes'] / 1e9:.2f} | "
                  f"{t['files']} |")


if __name__ == "__main__":
    main()
