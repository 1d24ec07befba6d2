"""Loader benchmark: vcc-dist's streams against cell-load (ST sets) and annbatch (SE cells).

    python benchmarks/loader.py --workdir bench_data --seconds 60

Every measurement runs in its own process, one after another (2-core machine), and reports
wall-clock cells/s over a steady window (after the first batch), CPU seconds of the whole
process tree in that window (Ray's workers and system processes included for vcc-dist;
DataLoader workers for cell-load), time to first batch, and peak memory. "Cells" counts every
row delivered as a dense float32 row of all 18,080 genes: for sets, perturbed *and* control
rows (2 x batch x set size per batch), as cell-load's ``pert_cell_emb`` + ``ctrl_cell_emb``.

Measurements (``--only`` picks some):

- ``sets``: ST set stream (S=128, 16 sets per batch: STATE's VCC settings) iterated by the
  driver; the VCC-size corpus (221k cells).
- ``cellload``: cell-load 0.10.4's PerturbationDataModule train loader on the same data as h5ad
  with the same split, STATE's VCC settings (benchmarks/_cellload_peer.py), 2 and 4 workers.
- ``bound``: the same set batches from an in-memory CSR matrix (rows gathered, normalised,
  densified; one process): what reading costs when decoding is free.
- ``train``: both streams delivered into 2 Ray Train workers end to end (each worker times its
  own iteration), plus time to first batch inside the workers.
- ``cells``: SE cell stream iterated by the driver; ``annbatch``: annbatch's Loader on its
  recommended store built from the same h5ad (benchmarks/_annbatch_peer.py, Python 3.12 venv).
- ``memory``: peak memory of the stream's read tasks on corpora of 20k and 221k cells with the
  same settings (bounded by the buffer settings, not by the corpus).

Results are appended to ``benchmarks/results/loader.json`` and summarised in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import MemSampler, tree_cpu  # noqa: E402

ST_S, ST_B = 128, 16  # STATE's state_sm cell_set_len and training batch size (VCC)
SE_B = 256


# ---------------------------------------------------------------------------------------------
# process-tree accounting
# ---------------------------------------------------------------------------------------------


class PeakPSS:
    """Peak PSS (MB) of the process tree, sampled in the background until ``stop()``."""

    def __init__(self):
        self._m = MemSampler(interval=0.5, pss_every=1)
        self._m.start()

    def stop(self) -> float:
        self._m.stop()
        return round(self._m.peak_pss / 2**20, 1)


def _ray_init(num_cpus: int = 2):
    import ray

    t = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - t


def _iterate(ds, batch_size: int, cells_per_batch: int, seconds: float, t_start: float):
    """Iterate batches for ``seconds`` after the first; steady-window figures."""
    it = iter(ds.iter_torch_batches(batch_size=batch_size))
    next(it)
    first = time.perf_counter() - t_start
    cpu0, t0, n = tree_cpu(), time.perf_counter(), 0
    for _ in it:
        n += 1
        if time.perf_counter() - t0 >= seconds:
            break
    el, cpu = time.perf_counter() - t0, tree_cpu() - cpu0
    cells = n * cells_per_batch
    return {"time_to_first_batch_s": round(first, 2), "steady_batches": n,
            "steady_seconds": round(el, 2), "cells": cells,
            "cells_per_s": round(cells / el, 1), "cpu_seconds": round(cpu, 1),
            "cells_per_cpu_s": round(cells / cpu, 1) if cpu else None}


# ---------------------------------------------------------------------------------------------
# single measurements (run in a child process each)
# ---------------------------------------------------------------------------------------------


def run_sets(a) -> dict:
    from vcc_dist.data.plans import SetStreamConfig
    from vcc_dist.data.streams import set_stream

    mem = PeakPSS()
    ray_s = _ray_init()
    t = time.perf_counter()
    cfg = SetStreamConfig(set_size=ST_S, batch_size=ST_B)
    s = set_stream(a.corpus, cfg, split=a.split)
    build = time.perf_counter() - t
    out = _iterate(s.dataset, s.batch_size, 2 * ST_B * ST_S, a.seconds, t)
    return {"tool": "vcc-dist set stream", "ray_init_s": round(ray_s, 2),
            "stream_build_s": round(build, 2), "settings": cfg.to_dict(),
            "batches_per_epoch": s.batches_per_epoch, **out, "peak_pss_mb": mem.stop()}


def run_cells(a) -> dict:
    from vcc_dist.data.plans import CellStreamConfig
    from vcc_dist.data.streams import cell_stream

    mem = PeakPSS()
    ray_s = _ray_init()
    t = time.perf_counter()
    cfg = CellStreamConfig(batch_size=SE_B)
    s = cell_stream(a.corpus, cfg)
    build = time.perf_counter() - t
    out = _iterate(s.dataset, s.batch_size, SE_B, a.seconds, t)
    return {"tool": "vcc-dist cell stream", "ray_init_s": round(ray_s, 2),
            "stream_build_s": round(build, 2), "settings": cfg.to_dict(), **out,
            "peak_pss_mb": mem.stop()}


def run_bound(a) -> dict:
    """The set batches of the stream's first ``n`` units from an in-memory CSR matrix."""
    import numpy as np

    from vcc_dist.data.plans import SetStreamConfig
    from vcc_dist.data.reader import CSRBlock, densify
    from vcc_dist.data.streams import set_plan

    cfg = SetStreamConfig(set_size=ST_S, batch_size=ST_B)
    plan, reader = set_plan(a.corpus, cfg, a.split)
    units = plan.epoch_units("train", 0)[: a.bound_batches]
    # untimed: the unit's rows as CSR in memory, and each set's row positions in it
    pending = []
    for u in units:
        d = plan.read_unit(reader, "train", 0, u)
        both = [d["pert_cells"], d["ctrl_cells"]]
        pending.append([b.to_scipy().astype(np.float32) for b in both] +
                        [[np.asarray(b.totals) for b in both]])
    rng = np.random.default_rng(0)
    cpu0, t0, cells = time.process_time(), time.perf_counter(), 0
    for pert, ctrl, (tp, tc) in pending:
        for m, tot in ((pert, tp), (ctrl, tc)):
            # the same work per row as the stream's transform: gather rows from memory
            # (a fresh random order), normalise, log1p, densify
            order = rng.permutation(m.shape[0])
            sub = m[order]
            scale = tot[order].astype(np.float32) / np.float32(reader.target_sum)
            sub.data /= np.repeat(scale, np.diff(sub.indptr))
            np.log1p(sub.data, out=sub.data)
            blk = CSRBlock(sub.data, sub.indices, sub.indptr.astype(np.int64), tot, sub.shape[1])
            densify(blk, reader.colmap, reader.n_genes).reshape(-1, ST_S, reader.n_genes)
            cells += m.shape[0]
    el, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"tool": "in-memory CSR bound (1 process)", "cells": cells,
            "cells_per_s": round(cells / el, 1), "cells_per_cpu_s": round(cells / cpu, 1)}


def _train_loop(config):
    import time as _t

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    out = {}
    for name, bs, per in (("sets", config["sets_bs"], config["sets_cells"]),
                          ("cells", config["cells_bs"], config["cells_cells"])):
        shard = ray.train.get_dataset_shard(name)
        t0 = _t.perf_counter()
        it = iter(shard.iter_torch_batches(batch_size=bs))
        next(it)
        first = _t.perf_counter() - t0
        n, t1 = 0, _t.perf_counter()
        for _ in it:
            n += 1
            if n >= config["batches"]:
                break
        out[name] = {"first_s": first, "batches": n, "seconds": _t.perf_counter() - t1,
                     "cells": n * per}
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(out, f)


def run_train(a) -> dict:
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vcc_dist.data.plans import CellStreamConfig, SetStreamConfig
    from vcc_dist.data.streams import cell_stream, set_stream

    mem = PeakPSS()
    _ray_init()
    sets = set_stream(a.corpus, SetStreamConfig(set_size=ST_S, batch_size=ST_B), split=a.split,
                      world_size=2)
    cells = cell_stream(a.corpus, CellStreamConfig(batch_size=SE_B), world_size=2)
    tmp = tempfile.mkdtemp()
    cpu0 = tree_cpu()
    t = time.perf_counter()
    TorchTrainer(
        _train_loop,
        train_loop_config={"out": tmp, "sets_bs": ST_B, "sets_cells": 2 * ST_B * ST_S,
                           "cells_bs": SE_B, "cells_cells": SE_B, "batches": a.train_batches},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"sets": sets.dataset, "cells": cells.dataset},
        run_config=RunConfig(name="loader_bench", storage_path=tmp)).fit()
    wall = time.perf_counter() - t
    ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
    out = {"tool": "vcc-dist streams into 2 Ray Train workers", "fit_wall_s": round(wall, 1),
           "cpu_seconds_fit": round(tree_cpu() - cpu0, 1), "peak_pss_mb": mem.stop()}
    for name in ("sets", "cells"):
        r = [x[name] for x in ranks]
        secs = max(x["seconds"] for x in r)
        out[name] = {"time_to_first_batch_in_worker_s": round(max(x["first_s"] for x in r), 2),
                     "batches_per_worker": [x["batches"] for x in r],
                     "cells": sum(x["cells"] for x in r),
                     "cells_per_s": round(sum(x["cells"] for x in r) / secs, 1)}
    return out


def run_memory(a) -> dict:
    """Peak memory of one read task's work (read + transform of whole units, as a Ray read task
    runs them) on ``a.corpus``: RSS growth over the process after imports."""
    import resource


    from vcc_dist.data.corpus import load_manifest
    from vcc_dist.data.plans import CellPlan, CellStreamConfig, SetStreamConfig
    from vcc_dist.data.streams import (DenseCells, DenseSets, _read_cell_units, _read_set_units,
                                       corpus_labels, set_plan)
    from vcc_dist.data.reader import CorpusReader

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    base = rss_mb()
    out = {"tool": "read-task memory", "corpus_cells": load_manifest(a.corpus).summary["n_cells"]}
    if a.kind == "cells":
        cfg = CellStreamConfig(batch_size=SE_B)
        r = CorpusReader(a.corpus, decode_threads=1)
        labels, _ = corpus_labels(r)
        units = CellPlan(r.n_cells, cfg).epoch_units("train", 0)[: a.memory_batches]
        gen = _read_cell_units(r, cfg, "train", labels.store_maps, 0, units, frozenset())
        tr = DenseCells(r)
    else:
        cfg = SetStreamConfig(set_size=ST_S, batch_size=ST_B)
        plan, r = set_plan(a.corpus, cfg, None)
        units = plan.epoch_units("train", 0)[: a.memory_batches]
        gen = _read_set_units(r, plan, "train", 0, units, frozenset())
        tr = DenseSets(r, ST_S)
    n = 0
    for blk in gen:
        tr({"packed": blk["packed"].to_numpy()})
        n += 1
    out.update(kind=a.kind, batches=n, settings=cfg.to_dict(),
               rss_after_imports_mb=round(base, 1), peak_rss_mb=round(rss_mb(), 1),
               loader_mb=round(rss_mb() - base, 1))
    return out


MEASURE = {"sets": run_sets, "cells": run_cells, "bound": run_bound, "train": run_train,
           "memory": run_memory}


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------


def _child(kind: str, a, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "_one", kind, "--corpus", str(a.corpus),
           "--corpus-small", str(a.corpus_small), "--split", str(a.split),
           "--seconds", str(a.seconds), "--train-batches", str(a.train_batches),
           "--bound-batches", str(a.bound_batches), "--memory-batches", str(a.memory_batches)]
    return _run_json(cmd + extra, env={"RAY_DATA_DISABLE_PROGRESS_BARS": "1"})


def _run_json(cmd: list[str], env: dict | None = None, timeout: int = 1800) -> dict:
    e = dict(os.environ, **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
    lines = [x for x in p.stdout.strip().splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}", "stderr": p.stderr[-3000:]}
    return json.loads(lines[-1])


def _warm(paths):
    """Read the inputs once so every tool starts from the page cache (the VM reclaims idle
    cache, so this is done right before each measurement)."""
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="bench_data")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--only", nargs="*", default=None,
                    help="sets cellload bound train cells annbatch memory")
    ap.add_argument("--train-batches", type=int, default=40)
    ap.add_argument("--bound-batches", type=int, default=6)
    ap.add_argument("--memory-batches", type=int, default=20)
    ap.add_argument("--annbatch-python", default=str(ROOT / ".venv-annbatch" / "bin" / "python"))
    a = ap.parse_args(argv)
    wd = Path(a.workdir)
    a.corpus = wd / "corpus_vcc"
    a.corpus_small = wd / "corpus_medium"
    a.split = wd / "sim_vcc" / "split.toml"
    only = set(a.only or ["sets", "cellload", "bound", "train", "cells", "annbatch", "memory"])
    rec = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": _git(), "seconds": a.seconds,
           "machine": f"{os.cpu_count()} CPUs", "results": {}}
    res = rec["results"]

    def note(k, v):
        res[k] = v
        print(k, json.dumps(v)[:400], flush=True)

    if "sets" in only:
        _warm([a.corpus])
        note("sets", _child("sets", a, []))
    if "cellload" in only:
        for workers in (2, 4):
            _warm([wd / "sim_vcc" / "perturbseq.h5ad"])
            note(f"cellload_w{workers}", _run_json(
                [sys.executable, str(ROOT / "benchmarks" / "_cellload_peer.py"),
                 str(wd / "sim_vcc"), "--seconds", str(a.seconds), "--num-workers",
                 str(workers), "--quiet"]))
    if "bound" in only:
        _warm([a.corpus])
        note("bound", _child("bound", a, []))
    if "train" in only:
        _warm([a.corpus])
        note("train", _child("train", a, []))
    if "cells" in only:
        _warm([a.corpus])
        note("cells", _child("cells", a, []))
    if "annbatch" in only:
        store = wd / "annbatch_vcc"
        if not store.exists():
            note("annbatch", {"error": f"{store} missing: build it with benchmarks/_annbatch_peer.py"})
        else:
            for extra in ([], ["--log1p"]):
                _warm([store])
                note("annbatch" + ("_log1p" if extra else ""), _run_json(
                    [a.annbatch_python, str(ROOT / "benchmarks" / "_annbatch_peer.py"), "read",
                     "--store", str(store), "--seconds", str(a.seconds)] + extra))
    if "memory" in only:
        for kind in ("cells", "sets"):
            for corpus in (a.corpus_small, a.corpus):
                b = argparse.Namespace(**{**vars(a), "corpus": corpus})
                note(f"memory_{kind}_{Path(corpus).name}", _child("memory", b, ["--kind", kind]))
    out = ROOT / "benchmarks" / "results" / "loader.json"
    hist = json.loads(out.read_text()) if out.exists() else []
    hist.append(rec)
    out.write_text(json.dumps(hist, indent=1))
    print(f"recorded in {out}")
    return 0


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_one":
        kind = sys.argv[2]
        p = argparse.ArgumentParser()
        for k in ("--corpus", "--corpus-small", "--split"):
            p.add_argument(k)
        p.add_argument("--seconds", type=float)
        p.add_argument("--train-batches", type=int)
        p.add_argument("--bound-batches", type=int)
        p.add_argument("--memory-batches", type=int)
        p.add_argument("--kind", default="cells")
        args = p.parse_args(sys.argv[3:])
        print(json.dumps(MEASURE[kind](args)), flush=True)
    else:
        sys.exit(main())
