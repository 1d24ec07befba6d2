"""CorpusReader row reads from local disk vs object storage (obstore ObjectStore, fsspec/s3fs).

One run, one corpus, three locations side by side: the corpus on local disk, and the same
corpus uploaded to an S3 server on loopback (moto's server, in its own process so that this
process's CPU time is the reader's alone), read through ``zarr.storage.ObjectStore`` (obstore)
and through ``zarr.storage.FsspecStore`` (s3fs). Two access patterns, as the streams read:

* ``cell``: the SE cell stream's pattern, batches of random blocks of consecutive rows
  (``--block-rows``) from random stores, raw + normalised in one ``read_many``;
* ``set``: the ST set stream's pattern, batches of sets of random rows of one (context,
  perturbation, batch) group each.

Reported per location and pattern: cells/s (wall) and CPU-s per 1,000 cells of this process
(decode_threads=1, as a stream's Ray task).

``--streams``: then, in the same run, the Ray streams themselves (vcc_dist.data.streams: the ST
set stream and the SE cell stream, Ray Data read tasks on a local Ray with ``--ray-cpus`` CPUs)
over the local corpus and over its S3 copy (obstore), consumed by this driver as a trainer
consumes its shard: cells/s over one epoch (or ``--stream-batches`` batches) after the first
batch, and the time to that first batch. Loopback S3 has no network latency or bandwidth
limit, so these figures are the client-side costs of each store; against a real endpoint
latency is added per request, which the bounded concurrency of the reads hides.

    python benchmarks/object_storage.py --corpus runs/demo/corpus --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vcc_dist import storage
from vcc_dist.data.reader import CorpusReader

BUCKET = "vcc-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def cell_batches(rd: CorpusReader, n_batches: int, batch: int, block: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        sid, rows = [], []
        for _ in range(batch // block):
            s = int(rng.integers(len(rd.store_names)))
            a = int(rng.integers(0, max(int(rd.n_cells[s]) - block, 1)))
            sid += [s] * block
            rows += list(range(a, a + block))
        out.append((np.array(sid, np.int32), np.array(rows, np.int64)))
    return out


def set_batches(rd: CorpusReader, n_batches: int, sets: int, set_size: int, seed: int):
    rng = np.random.default_rng(seed)
    groups = [(s, g) for s in range(len(rd.store_names)) for g in
              rd.groups(s)[["start", "stop"]].itertuples(index=False)]
    out = []
    for _ in range(n_batches):
        sid, rows = [], []
        for _ in range(sets):
            s, (a, b) = groups[int(rng.integers(len(groups)))]
            sid += [s] * set_size
            rows += rng.integers(a, b, set_size).tolist()
        out.append((np.array(sid, np.int32), np.array(rows, np.int64)))
    return out


def measure(rd: CorpusReader, batches) -> dict:
    rd.read_many(*batches[0], normalize=True)  # open stores, load indptr (not timed)
    cells = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for sid, rows in batches:
        blk = rd.read_many(sid, rows, normalize=True)
        cells += blk.n_rows
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"cells": cells, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "cells_per_s": round(cells / wall, 1),
            "cpu_s_per_1k_cells": round(1e3 * cpu / cells, 4)}


def stream_rate(corpus: str, kind: str, max_batches: int, args) -> dict:
    """One pass of a Ray stream over ``corpus`` (an epoch, at most ``max_batches`` batches):
    cells per second after the first batch and the time to the first batch. Set stream: cells =
    perturbed + control cells of the sets (what a trainer reads); cell stream: cells."""
    from vcc_dist.data.plans import CellStreamConfig, SetStreamConfig
    from vcc_dist.data.streams import cell_stream, set_stream

    if kind == "set":
        st = set_stream(corpus, SetStreamConfig(set_size=args.set_size, batch_size=args.sets,
                                                seed=0))
        per_row = 2 * args.set_size
    else:
        st = cell_stream(corpus, CellStreamConfig(batch_size=args.batch_size,
                                                  block_rows=args.block_rows, seed=0))
        per_row = 1
    t0 = time.perf_counter()
    first, cells, n = None, 0, 0
    for b in st.dataset.iter_batches(batch_size=st.batch_size, batch_format="numpy"):
        rows = len(next(iter(b.values())))
        if first is None:
            first = time.perf_counter()
        else:
            cells += rows * per_row
        n += 1
        if n >= max_batches:
            break
    end = time.perf_counter()
    return {"batches": n, "cells_after_first": cells, "first_batch_s": first - t0,
            "cells_per_s": cells / max(end - first, 1e-9)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="a converted local corpus")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--block-rows", type=int, default=16)
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--set-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many passes")
    ap.add_argument("--streams", action="store_true",
                    help="also measure the Ray set and cell streams from local disk and S3")
    ap.add_argument("--stream-batches", type=int, default=200,
                    help="at most this many batches per stream pass (default: 200)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (default: 2)")
    args = ap.parse_args(argv)

    port = free_port()
    moto = start_moto(port)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3  # moto's dependency; only the benchmark creates buckets

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        uri = f"s3://{BUCKET}/corpus"
        storage.upload_dir(args.corpus, uri)
        local = CorpusReader(args.corpus, decode_threads=1)
        plans = {"cell": cell_batches(local, args.batches, args.batch_size, args.block_rows, 0),
                 "set": set_batches(local, args.batches, args.sets, args.set_size, 1)}
        results: dict = {}
        for loc, be in (("local", None), ("s3-obstore", "obstore"), ("s3-fsspec", "fsspec")):
            if be:
                os.environ["VCC_DIST_S3_BACKEND"] = be
            rd = CorpusReader(args.corpus if be is None else uri, decode_threads=1)
            results[loc] = {}
            for pat, batches in plans.items():
                runs = [measure(rd, batches) for _ in range(args.repeats)]
                results[loc][pat] = max(runs, key=lambda r: r["cells_per_s"])
                print(loc, pat, results[loc][pat], flush=True)
        streams: dict = {}
        if args.streams:
            import ray

            os.environ["VCC_DIST_S3_BACKEND"] = "obstore"
            ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False,
                     log_to_driver=False)
            try:
                ray.data.DataContext.get_current().enable_progress_bars = False
                for kind in ("set", "cell"):
                    for loc, where in (("local", args.corpus), ("s3-obstore", uri)):
                        runs = [stream_rate(where, kind, args.stream_batches, args)
                                for _ in range(args.repeats)]
                        streams.setdefault(loc, {})[kind] = max(
                            runs, key=lambda r: r["cells_per_s"])
                        print("stream", loc, kind, streams[loc][kind], flush=True)
            finally:
                ray.shutdown()
    finally:
        moto.terminate()
        moto.wait(10)
    m = json.loads((Path(args.corpus) / "corpus.json").read_text())
    out = {
        "command": "python benchmarks/object_storage.py " + " ".join(argv or sys.argv[1:]),
        "corpus": {"cells": int(sum(s["n_cells"] for s in m["stores"])),
                   "genes": len(m["genes"]), "stores": len(m["stores"])},
        "settings": {k: v for k, v in vars(args).items() if k not in ("corpus", "out")},
        "s3_server": "moto server on 127.0.0.1 (separate process)",
        "concurrency": storage.concurrency(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
        "streams": streams,
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "object_storage.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# CorpusReader reads: local disk vs S3 (moto on loopback)", "",
             f"Command: `{out['command']}`", "",
             f"Corpus: {out['corpus']['cells']} cells x {out['corpus']['genes']} genes, "
             f"{out['corpus']['stores']} stores; {args.batches} batches of "
             f"{args.batch_size} cells per pattern, best of {args.repeats}; decode_threads=1.",
             "", "| location | pattern | cells/s | CPU-s / 1k cells | vs local cells/s |",
             "|---|---|---:|---:|---:|"]
    for loc, per in results.items():
        for pat, r in per.items():
            rel = r["cells_per_s"] / results["local"][pat]["cells_per_s"]
            lines.append(f"| {loc} | {pat} | {r['cells_per_s']:.0f} | "
                         f"{r['cpu_s_per_1k_cells']:.3f} | {rel:.2f}x |")
    if streams:
        lines += ["", f"Ray streams (local Ray, {args.ray_cpus} CPUs; the driver consumes one "
                  f"pass of at most {args.stream_batches} batches, best of {args.repeats}; "
                  "set stream cells = perturbed + control cells of its sets):", "",
                  "| location | stream | cells/s | first batch s | vs local cells/s |",
                  "|---|---|---:|---:|---:|"]
        for loc, per in streams.items():
            for kind, r in per.items():
                rel = r["cells_per_s"] / streams["local"][kind]["cells_per_s"]
                lines.append(f"| {loc} | {kind} | {r['cells_per_s']:.0f} | "
                             f"{r['first_batch_s']:.2f} | {rel:.2f}x |")
    (outdir / "object_storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
