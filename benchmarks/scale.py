"""Driver-side costs against data size (issue 16, section 5).

Every point runs in its own child process (clean peak RSS). Times are wall seconds of one call
without tracing; memory is the tracemalloc peak of the same call repeated with tracing on
(numpy arrays included; skipped above ``--detail-max`` stores or files), plus the child's RSS.

1. **Corpus size** (``--cells``: 10^5, 10^6, 10^7). One store is converted with the project's
   own conversion (``data_conversion.convert.convert_corpus``, serial): 10^5 cells x 32 genes,
   4 contexts x 100 perturbations x 2 batches (800 groups), ~25% non-zero. A corpus of N cells
   is N / 10^5 stores that are symbolic links to that store, with a ``corpus.json`` listing them
   as distinct stores of distinct sources (the driver never reads X, so this is the driver-side
   work of a real corpus of that many stores and groups). ``--small-stores``: the same with
   1,000-cell stores (many small stores, scBaseCount-like). Measured: manifest bytes and load
   time; ``CorpusReader`` start-up (cold: the median total over all cells; warm: cached);
   ``corpus_labels``; ``set_plan`` (labels + ``SetPlan``); ``SetPlan.epoch_units``, and
   ``CellPlan`` + ``epoch_units``, for one epoch (world size 1: the plans cost the same at 64,
   only the trim differs, and 10^5 cells cannot fill 64 workers); the pickled size of the plans
   (the set stream's read tasks capture the whole ``SetPlan``); and the JSON size of a
   checkpoint's ``consumed`` list (worst case: every batch of the epoch).

2. **Input files** (``--files``). One tiny h5ad (10 cells x 20 genes, the corpus obs columns) is
   written with anndata and hard-linked N times (distinct paths, same bytes: page-cache-hot
   I/O, so the figures are the CPU cost of planning, not disk latency). Measured:
   ``plan_corpus`` (the conversion's whole driver-side planning: input expansion, store names,
   every input's metadata and perturbation column, vocabulary, fingerprints), wall time and
   peak memory, and its breakdown by function from one cProfile'd run. ``--wide-files``: the
   same with 36,601-gene inputs (driver memory and time per input file). ``--names``: the store
   naming step alone (quadratic). ``--manifests``: one save and one load of a ``corpus.json``
   of N stores with the Tahoe vocabulary (62,710 genes); the conversion saved it after every
   finished store (the "one per store" columns: that quadratic cost), and now saves it at most
   once a second and within 5% of the driver's time (data_conversion.convert.ManifestSaver).

3. **Input scanning modes** (``--scan-files``, ``--scan-wide-files``): ``plan_corpus`` over the
   same tiny (and 36,601-gene) inputs by each ``--scan-modes`` mode, in its own child:
   ``legacy`` (the planning before parallel scans and gene-space interning, rebuilt from the
   public parts: a serial loop keeping every input's gene arrays and its own gene map),
   ``serial``, ``threads`` and ``ray`` (``plan_corpus(cfg, scan=...)``; ``ray`` starts a local
   Ray with every CPU in the child first and warms its workers on 64 inputs, both timed apart;
   the other modes plan 16 inputs first, untimed).
   Driver memory: tracemalloc sees the driver's Python and numpy allocations, not arrays Ray
   hands over zero-copy from its object store; the child's peak RSS covers those.

Not measured here (they need a Ray run of the streams): time to first batch and read-task
memory; see ``benchmarks/loader.py`` and benchmarks/RESULTS.md ("Read-task memory").

    python benchmarks/scale.py --workdir /tmp/vcc_scale              # everything (~25 min)
    python benchmarks/scale.py --workdir /tmp/vcc_scale --quick      # smoke run (~2 min)
    python benchmarks/scale.py --update --cells --small-stores --files 1000 ...   # add series
    python benchmarks/scale.py --report-only                         # redraw .md and .png

Results: ``benchmarks/results/scale.json`` (raw), ``scale.md`` (tables, commands, growth
exponents) and ``scale.png`` (log-log curves). Run it under ``nice`` on a shared machine; only
the ``ray`` scan mode starts (a local) Ray.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pickle
import pstats
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

BASE_CELLS = 100_000
SMALL_CELLS = 1_000
N_GENES = 32
N_CONTEXTS, N_PERTS, N_BATCHES = 4, 100, 2
TAHOE_GENES = 62_710
WORLD_SIZE = 1  # the plans cost the same at any world size (only the trim differs); 64 does not fit 1e5 cells


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn: Callable[[], Any], trace: bool = True) -> tuple[Any, float, float]:
    """(result, seconds without tracing, tracemalloc peak MB of a second, traced call)."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    peak = float("nan")
    if trace:
        del out
        gc.collect()
        tracemalloc.start()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out, secs, peak


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares exponent of y ~ x^k over the points with y > 0."""
    pts = [(np.log(x), np.log(y)) for x, y in zip(xs, ys) if y and y > 0 and np.isfinite(y)]
    if len(pts) < 2:
        return None
    a = np.array(pts)
    return float(np.polyfit(a[:, 0], a[:, 1], 1)[0])


# ---------------------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------------------


def write_base_input(path: Path, n_cells: int, seed: int = 0) -> None:
    """A synthetic h5ad: n_cells x N_GENES sparse counts, rows in random order."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.3, size=(n_cells, N_GENES)).astype(np.int32)
    x = sp.csr_matrix(dense)
    perts = np.array(["non-targeting"] + [f"G{i:03d}" for i in range(N_PERTS - 1)])
    pert = perts[rng.integers(0, N_PERTS, n_cells)]
    pert[rng.random(n_cells) < 0.1] = "non-targeting"
    obs = pd.DataFrame({
        "cell_type": pd.Categorical([f"ctx{i}" for i in rng.integers(0, N_CONTEXTS, n_cells)]),
        "target_gene": pd.Categorical(pert),
        "batch": pd.Categorical([f"b{i}" for i in rng.integers(0, N_BATCHES, n_cells)]),
        "guide_id": pd.Categorical(np.char.add(pert.astype(str), "_g1")),
    }, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE{i:05d}" for i in range(N_GENES)])
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)


def base_store(workdir: Path, n_cells: int = BASE_CELLS) -> tuple[Path, dict]:
    """Convert the synthetic input once with the project's conversion; returns (corpus dir,
    conversion record)."""
    from data_conversion.convert import ConvertConfig, convert_corpus

    base = workdir / f"base_corpus_{n_cells}"
    rec_path = workdir / f"base_corpus_{n_cells}.record.json"
    if (base / "corpus.json").exists() and rec_path.exists():
        return base, json.loads(rec_path.read_text())
    src = workdir / f"base_input_{n_cells}.h5ad"
    t0 = time.perf_counter()
    write_base_input(src, n_cells)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    convert_corpus(ConvertConfig(inputs=(str(src),), out=str(base), parallel="serial",
                                 progress=False, overwrite=True, n_top_genes=8))
    rec = {"cells": n_cells, "genes": N_GENES, "write_h5ad_s": t_write,
           "convert_s": time.perf_counter() - t0}
    rec_path.write_text(json.dumps(rec))
    return base, rec


def replicate_corpus(base: Path, out: Path, n_stores: int) -> None:
    """A corpus of ``n_stores`` stores, each a symbolic link to the base corpus's one store."""
    if (out / "corpus.json").exists():
        m = json.loads((out / "corpus.json").read_text())
        if len(m["stores"]) == n_stores:
            return
    if out.exists():
        shutil.rmtree(out)
    (out / "stores").mkdir(parents=True)
    m = json.loads((base / "corpus.json").read_text())
    entry = m["stores"][0]
    target = (base / "stores" / f"{entry['name']}.zarr").resolve()
    stores = []
    for i in range(n_stores):
        e = dict(entry)
        e["name"] = f"s{i:06d}"
        e["source"] = f"/synthetic/input_{i:06d}.h5ad"
        stores.append(e)
        os.symlink(target, out / "stores" / f"{e['name']}.zarr")
    m["stores"] = stores
    if m.get("summary"):
        m["summary"] = dict(m["summary"], n_cells=n_stores * entry["n_cells"], n_stores=n_stores,
                            nnz=n_stores * entry["nnz"])
    (out / "corpus.json").write_text(json.dumps(m, indent=1))


def write_tiny_inputs(workdir: Path, n_files: int, n_genes: int = 20) -> list[str]:
    """``n_files`` distinct paths to one tiny h5ad (hard links)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    d = workdir / f"tiny_g{n_genes}"
    d.mkdir(parents=True, exist_ok=True)
    tpl = workdir / f"tiny_template_g{n_genes}.h5ad"
    if not tpl.exists():
        rng = np.random.default_rng(1)
        x = sp.csr_matrix(rng.poisson(0.5, size=(10, n_genes)).astype(np.int32))
        obs = pd.DataFrame({
            "cell_type": pd.Categorical(["ctx0"] * 10),
            "target_gene": pd.Categorical(["non-targeting"] * 5 + ["G001"] * 5),
            "batch": pd.Categorical(["b0"] * 10),
            "guide_id": pd.Categorical(["g"] * 10),
        }, index=[f"c{i}" for i in range(10)])
        var = pd.DataFrame({"gene_id": [f"ENSG{i:011d}" for i in range(n_genes)]},
                           index=[f"GENE{i:05d}" for i in range(n_genes)])
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(tpl)
    paths = []
    for i in range(n_files):
        p = d / f"sample_{i:06d}.h5ad"
        if not p.exists():
            os.link(tpl, p)
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------------------------------------
# children: one measurement point each
# ---------------------------------------------------------------------------------------------


def child_corpus(corpus: str, trace: bool = True) -> dict:
    from vcc_dist.data.corpus import load_manifest
    from vcc_dist.data.labels import corpus_labels
    from vcc_dist.data.plans import CellPlan, CellStreamConfig, SetStreamConfig
    from vcc_dist.data.reader import CorpusReader
    from vcc_dist.data.streams import set_plan

    r: dict[str, Any] = {"manifest_bytes": os.path.getsize(Path(corpus) / "corpus.json")}
    cache = Path(corpus) / ".median_total.json"
    m, r["load_manifest_s"], r["load_manifest_peak_mb"] = measure(lambda: load_manifest(corpus), trace)
    r["n_stores"] = len(m.stores)
    r["cells"] = int(sum(s.n_cells for s in m.stores))

    def cold_reader():
        cache.unlink(missing_ok=True)
        return CorpusReader(corpus)

    _, r["reader_cold_s"], r["reader_cold_peak_mb"] = measure(cold_reader, trace)
    reader, r["reader_warm_s"], r["reader_warm_peak_mb"] = measure(lambda: CorpusReader(corpus), trace)
    (labels, groups), r["corpus_labels_s"], r["corpus_labels_peak_mb"] = measure(
        lambda: corpus_labels(reader), trace)
    r["groups"] = len(groups)
    scfg = SetStreamConfig()
    (plan, _), r["set_plan_s"], r["set_plan_peak_mb"] = measure(
        lambda: set_plan(corpus, scfg, None, reader=reader), trace)
    units, r["set_epoch_units_s"], r["set_epoch_units_peak_mb"] = measure(
        lambda: plan.epoch_units("train", 1, world_size=WORLD_SIZE), trace)
    r["set_units"] = len(units)
    r["set_batches"] = int(sum(u.n_batches for u in units))
    r["set_plan_pickle_bytes"] = len(pickle.dumps(plan, protocol=5))
    r["set_units_pickle_bytes"] = len(pickle.dumps(units, protocol=5))
    r["set_consumed_json_bytes"] = len(json.dumps(list(range(r["set_batches"]))))
    ccfg = CellStreamConfig()
    cplan, r["cell_plan_s"], r["cell_plan_peak_mb"] = measure(
        lambda: CellPlan(reader.n_cells, ccfg), trace)
    cunits, r["cell_epoch_units_s"], r["cell_epoch_units_peak_mb"] = measure(
        lambda: cplan.epoch_units("train", 1, world_size=WORLD_SIZE), trace)
    r["cell_units"] = len(cunits)
    r["cell_batches"] = int(sum(u.n_batches for u in cunits))
    r["cell_plan_pickle_bytes"] = len(pickle.dumps(cplan, protocol=5))
    r["cell_units_pickle_bytes"] = len(pickle.dumps(cunits, protocol=5))
    r["cell_consumed_json_bytes"] = len(json.dumps(list(range(r["cell_batches"]))))
    r["peak_rss_mb"] = peak_rss_mb()
    return r


PROFILED = ("plan_corpus", "expand_inputs", "_store_names", "__init__", "_perturbation_counts",
            "check_controls", "build_vocabulary", "check_gene_coverage", "file_fingerprint")


def child_files(paths_file: str, workdir: str, detail: bool = True) -> dict:
    from data_conversion.convert import ConvertConfig, plan_corpus

    paths = json.loads(Path(paths_file).read_text())
    cfg = ConvertConfig(inputs=tuple(paths), out=str(Path(workdir) / "unused_corpus"),
                        progress=False)
    r: dict[str, Any] = {"files": len(paths)}
    (manifest, tasks), r["plan_corpus_s"], r["plan_corpus_peak_mb"] = measure(
        lambda: plan_corpus(cfg, scan="serial"), detail)
    r["stores"] = len(tasks)
    r["vocabulary_genes"] = len(manifest.genes)
    r["tasks_pickle_bytes"] = len(pickle.dumps(tasks, protocol=5))
    r["coverage_report"] = manifest.stores[0].coverage
    if not detail:
        r["peak_rss_mb"] = peak_rss_mb()
        return r
    # breakdown: one cProfile'd run, cumulative seconds of the planning steps
    prof = cProfile.Profile()
    prof.enable()
    plan_corpus(cfg, scan="serial")
    prof.disable()
    st = pstats.Stats(prof)
    br: dict[str, float] = {}
    for (file, _line, fn), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if fn == "__init__" and not file.endswith("source.py"):
            continue
        if fn in PROFILED and ("data_conversion" in file):
            key = "H5adSource.__init__" if fn == "__init__" else fn
            br[key] = br.get(key, 0.0) + ct
    r["profile_cumulative_s"] = br
    r["peak_rss_mb"] = peak_rss_mb()
    return r


def legacy_plan(cfg) -> tuple[Any, list]:
    """``plan_corpus`` as it was before parallel scans and gene-space interning (the "before"
    of the scan-mode series), from public parts: inputs scanned in a loop, every input keeping
    its own gene arrays (``GeneSpace`` without a key) and its own gene map until the tasks
    exist. Same plan; the per-input scan is today's (it also hashes the gene space)."""
    from data_conversion import convert
    from data_conversion.vocab import GeneSpace, build_vocabulary
    from vcc_dist.data.corpus import CorpusManifest, StoreEntry

    paths = convert.expand_inputs(cfg.inputs)
    names = getattr(convert, "_store_names")(paths)  # private: not imported (as child_names)
    scans, spaces = [], []
    for p in paths:
        scan, symbols, gene_ids = convert.scan_input(p, cfg)
        scans.append(scan)
        spaces.append(GeneSpace(p, symbols, gene_ids))
    convert.check_control_summaries(paths, [s.controls for s in scans],
                                    [s.obs_columns for s in scans], cfg)
    vocab, maps, reports = build_vocabulary(spaces, cfg.genes_file, cfg.gene_conflicts)
    convert.check_gene_coverage(paths, reports, len(vocab), cfg)
    tasks = []
    for p, name, m, rep, s in zip(paths, names, maps, reports, scans):
        size, checksum = s.fingerprint
        e = StoreEntry(name=name, source=p, source_rows=[0, s.n_obs], source_size=size,
                       source_checksum=checksum, coverage=rep)
        tasks.append(convert.StoreTask(e, m, s.obs_columns))
    manifest = CorpusManifest(genes=vocab.symbols, gene_ids=vocab.gene_ids,
                              stores=[t.entry for t in tasks], options=cfg.stored_options())
    return manifest, tasks


def child_scan(paths_file: str, workdir: str, mode: str, detail: bool = True) -> dict:
    """``plan_corpus`` over the inputs by one scan mode (``legacy``: ``legacy_plan``)."""
    from data_conversion.convert import ConvertConfig, plan_corpus

    paths = json.loads(Path(paths_file).read_text())
    cfg = ConvertConfig(inputs=tuple(paths), out=str(Path(workdir) / "unused_corpus"),
                        progress=False)
    r: dict[str, Any] = {"files": len(paths), "mode": mode}
    if mode == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
        r["ray_init_s"] = time.perf_counter() - t0
        warm = ConvertConfig(inputs=tuple(paths[:64]), out=cfg.out, progress=False)
        t0 = time.perf_counter()
        plan_corpus(warm, scan="ray")  # worker processes started and their imports done
        r["ray_warmup_s"] = time.perf_counter() - t0
    def plan(c: ConvertConfig) -> tuple[Any, list]:
        return legacy_plan(c) if mode == "legacy" else plan_corpus(c, scan=mode)

    if mode != "ray":  # one-time costs (lazy imports, first HDF5 opens) out of the timing
        plan(ConvertConfig(inputs=tuple(paths[:16]), out=cfg.out, progress=False))
    (manifest, tasks), r["plan_corpus_s"], r["plan_corpus_peak_mb"] = measure(
        lambda: plan(cfg), detail)
    r["stores"] = len(tasks)
    r["vocabulary_genes"] = len(manifest.genes)
    r["distinct_gene_maps"] = len({id(t.gene_map) for t in tasks})
    r["tasks_pickle_bytes"] = len(pickle.dumps(tasks, protocol=5))
    r["peak_rss_mb"] = peak_rss_mb()
    return r


def child_names(n: int) -> dict:
    """Store naming (``convert._store_names``, private: timed here because it is quadratic) for
    ``n`` scBaseCount-like paths (accession-numbered files in one directory)."""
    from data_conversion import convert

    paths = [f"/data/scbasecount/SRX{i:08d}.h5ad" for i in range(n)]
    name_fn = getattr(convert, "_store_names")
    _, secs, _ = measure(lambda: name_fn(paths), trace=False)
    return {"files": n, "store_names_s": secs}


def child_manifest(n: int, workdir: str) -> dict:
    """One save and one load of a manifest of ``n`` stores with the Tahoe vocabulary (62,710
    genes), each store carrying a coverage report as planning writes it. The conversion saved
    the whole manifest after every finished store (``n`` such saves: the quadratic cost these
    columns record); ManifestSaver now bounds them to ~5% of the driver's time."""
    from vcc_dist.data.corpus import CorpusManifest, StoreEntry, load_manifest

    rep = {"source_genes": 36_601, "mapped": 36_601, "mapped_by_id": 36_601,
           "mapped_by_symbol": 0, "dropped": 0, "dropped_examples": [], "renamed_examples": [],
           "vocabulary_genes_present": 36_601, "vocabulary_coverage": 0.583655}
    stores = [StoreEntry(name=f"SRX{i:08d}", source=f"/data/scbasecount/SRX{i:08d}.h5ad",
                         source_rows=[0, 5000], source_size=123_456_789,
                         source_checksum="blake2b-sampled64:" + "0" * 32, status="complete",
                         n_cells=5000, nnz=10_000_000, coverage=dict(rep))
              for i in range(n)]
    genes = [f"GENE{i:05d}" for i in range(TAHOE_GENES)]
    m = CorpusManifest(genes=genes, gene_ids=[f"ENSG{i:011d}" for i in range(TAHOE_GENES)],
                       stores=stores, options={}, status="complete")
    out = Path(workdir) / f"manifest_{n}"
    out.mkdir(parents=True, exist_ok=True)
    _, save_s, _ = measure(lambda: m.save(out), trace=False)
    _, load_s, load_mb = measure(lambda: load_manifest(out), trace=True)
    size = os.path.getsize(out / "corpus.json")
    return {"stores": n, "manifest_save_s": save_s, "manifest_bytes": size,
            "load_manifest_s": load_s, "load_manifest_peak_mb": load_mb,
            "saves_during_conversion_s": save_s * n,
            "bytes_written_during_conversion": size * n}


def run_child(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(HERE.parent))
    if p.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

CORPUS_COLS = [
    ("cells", "cells", "{:,}"), ("n_stores", "stores", "{:,}"), ("groups", "groups", "{:,}"),
    ("manifest_bytes", "corpus.json bytes", "{:,}"), ("load_manifest_s", "load manifest s", "{:.3f}"),
    ("reader_cold_s", "CorpusReader cold s", "{:.2f}"), ("reader_warm_s", "CorpusReader warm s", "{:.3f}"),
    ("corpus_labels_s", "corpus_labels s", "{:.2f}"), ("corpus_labels_peak_mb", "corpus_labels MB", "{:.1f}"),
    ("set_plan_s", "set_plan s", "{:.2f}"), ("set_plan_peak_mb", "set_plan MB", "{:.1f}"),
    ("set_epoch_units_s", "set epoch_units s", "{:.3f}"), ("set_epoch_units_peak_mb", "set epoch_units MB", "{:.1f}"),
    ("cell_plan_s", "CellPlan s", "{:.3f}"), ("cell_plan_peak_mb", "CellPlan MB", "{:.1f}"),
    ("cell_epoch_units_s", "cell epoch_units s", "{:.3f}"), ("cell_epoch_units_peak_mb", "cell epoch_units MB", "{:.1f}"),
    ("set_plan_pickle_bytes", "SetPlan pickle bytes", "{:,}"), ("cell_units_pickle_bytes", "cell units pickle bytes", "{:,}"),
    ("set_consumed_json_bytes", "set ckpt consumed bytes", "{:,}"),
    ("cell_consumed_json_bytes", "cell ckpt consumed bytes", "{:,}"),
    ("peak_rss_mb", "child peak RSS MB", "{:,.0f}"),
]
FILE_COLS = [
    ("files", "input files", "{:,}"), ("plan_corpus_s", "plan_corpus s", "{:.2f}"),
    ("plan_corpus_peak_mb", "plan_corpus MB", "{:.1f}"), ("tasks_pickle_bytes", "tasks pickle bytes", "{:,}"),
    ("peak_rss_mb", "child peak RSS MB", "{:,.0f}"),
]
NAME_COLS = [("files", "input paths", "{:,}"), ("store_names_s", "_store_names s", "{:.3f}")]
MANIFEST_COLS = [
    ("stores", "stores", "{:,}"), ("manifest_bytes", "corpus.json bytes", "{:,}"),
    ("manifest_save_s", "one save s", "{:.3f}"), ("load_manifest_s", "one load s", "{:.3f}"),
    ("load_manifest_peak_mb", "load MB", "{:.0f}"),
    ("saves_during_conversion_s", "saves during a conversion s (one per store, before ManifestSaver)", "{:,.0f}"),
    ("bytes_written_during_conversion", "bytes written by those saves", "{:,.0f}"),
]


def table(rows: list[dict], cols, transpose: bool = False) -> list[str]:
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    if transpose:
        head = "| quantity | " + " | ".join(cols[0][2].format(r[cols[0][0]]) for r in rows) + " |"
        out = [head, "|---|" + "---:|" * len(rows)]
        for key, name, fmt in cols[1:]:
            out.append(f"| {name} | " + " | ".join(fmt.format(r[key]) for r in rows) + " |")
        return out
    out = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---:|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(c[2].format(r[c[0]]) for c in cols) + " |")
    return out


def exponents(rows: list[dict], xkey: str, keys: list[str]) -> dict[str, float | None]:
    xs = [r[xkey] for r in rows]
    return {k: slope(xs, [r.get(k) for r in rows]) for k in keys if all(k in r for r in rows)}


def exponent_lines(rows: list[dict], xkey: str, fitted: dict[str, float | None]) -> list[str]:
    """One line per quantity: the exponent fitted over all points and over the last two (the
    largest sizes, where fixed costs matter least)."""
    out = []
    for k, v in fitted.items():
        if v is None:
            continue
        top = slope([r[xkey] for r in rows[-2:]], [r.get(k) for r in rows[-2:]])
        out.append(f"- `{k}`: {v:.2f} (last two points: "
                   f"{'n/a' if top is None else f'{top:.2f}'})")
    return out


def scan_section(rows: list[dict], commands: list[str], what: str,
                 notes: list[str]) -> list[str]:
    """One table: per input count, each scan mode's plan_corpus time, driver memory, child
    RSS and distinct gene maps; then ``notes`` (written into the record by hand: what the
    run's circumstances were)."""
    g = rows[0]["genes_per_file"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    sizes = list(dict.fromkeys(r["files"] for r in rows))
    at = {(r["files"], r["mode"]): r for r in rows}
    lines = [f"## Input scanning by mode: {what} (10 cells x {g:,} genes each, one gene space)",
             "", "Commands:", "", *[f"    {c}" for c in commands], "",
             ("`legacy`: planning before parallel scans and gene-space interning (a serial "
              "loop keeping every input's gene arrays and own gene map; `benchmarks/scale.py` "
              "`legacy_plan`); `serial`, `threads`, `ray`: `plan_corpus(cfg, scan=...)`. MB: "
              "tracemalloc peak of the driver (nan: not traced at that size; Ray's zero-copy "
              "arrays are not seen, the RSS column is). Ray: a local Ray on this machine's "
              "CPUs, started and warmed up before the timed call (init + warm-up seconds "
              "apart); the other modes are warmed up on 16 inputs."), ""]
    cols = [("plan_corpus_s", "s", "{:.2f}"), ("plan_corpus_peak_mb", "MB", "{:.1f}"),
            ("peak_rss_mb", "RSS MB", "{:,.0f}"), ("distinct_gene_maps", "maps", "{:,}")]
    head = ["input files"] + [f"{m} {c[1]}" for c in cols for m in modes]
    lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for n in sizes:
        cells = [f"{n:,}"]
        for key, _, fmt in cols:
            for m in modes:
                r = at.get((n, m))
                cells.append(fmt.format(r[key]) if r and key in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    ray_rows = [r for r in rows if r["mode"] == "ray"]
    if ray_rows:
        lines += ["Ray start-up (not in the times above): " + ", ".join(
            f"{r['files']:,} files: init {r['ray_init_s']:.1f} s + warm-up "
            f"{r['ray_warmup_s']:.1f} s" for r in ray_rows) + ".", ""]
    for m in modes:
        pts = [at[(n, m)] for n in sizes if (n, m) in at]
        k = slope([r["files"] for r in pts], [r["plan_corpus_s"] for r in pts])
        if len(pts) >= 2:
            per = ((pts[-1]["plan_corpus_s"] - pts[0]["plan_corpus_s"])
                   / (pts[-1]["files"] - pts[0]["files"]))
            lines.append(f"- `{m}`: {per * 1e3:.2f} ms per additional input (exponent "
                         f"{k:.2f}); projected at 60,000 inputs: "
                         f"{pts[-1]['plan_corpus_s'] + per * (60_000 - pts[-1]['files']):,.0f} s")
    lines.append("")
    if notes:
        lines += [*notes, ""]
    return lines


def write_report(res: dict, md: Path, png: Path) -> None:
    lines = [f"# Driver-side costs against data size ({res['date']})", "",
             "Commands (the second adds its series to the first's record):", "",
             f"    {res['command']}",
             *[f"    {c}" for c in res.get("commands_added", [])], "",
             f"Machine: {res['machine']}. Each point runs in its own child process; times are "
             "wall seconds of one call without tracing, MB are tracemalloc peaks of the same call "
             "repeated with tracing (Python and numpy allocations).", ""]
    if res.get("base"):
        b = res["base"]
        lines += [f"Base store: {b['cells']:,} cells x {b['genes']} genes converted with "
                  f"`convert_corpus` (serial) in {b['convert_s']:.1f} s; larger corpora are "
                  "symbolic links to it listed as distinct stores.", ""]
    for key, title in (("corpus", f"Corpus size, {BASE_CELLS:,}-cell stores"),
                       ("small_stores", f"Corpus size, {SMALL_CELLS:,}-cell stores "
                                        "(scBaseCount-like: many small stores)")):
        if not res.get(key):
            continue
        lines += [f"## {title} (world size 1, default stream settings)", ""]
        lines += table(res[key], CORPUS_COLS, transpose=True)
        lines += ["", "Growth exponents k (quantity ~ cells^k, least squares over the points; "
                  "nan = not traced at that size):", ""]
        lines += exponent_lines(res[key], "cells", res[f"{key}_exponents"])
        lines.append("")
    if res.get("files"):
        lines += ["## Number of input files (10 cells x 20 genes each)", ""]
        lines += table(res["files"], FILE_COLS)
        lines += ["", "Breakdown of `plan_corpus` (cProfile cumulative seconds, profiled run):", ""]
        prof_rows = [r for r in res["files"] if "profile_cumulative_s" in r]
        keys = sorted({k for r in prof_rows for k in r["profile_cumulative_s"]})
        lines += ["| files | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
        for r in prof_rows:
            p = r["profile_cumulative_s"]
            lines.append(f"| {r['files']:,} | " + " | ".join(f"{p.get(k, 0):.2f}" for k in keys) + " |")
        lines += ["", "Growth exponents k (quantity ~ files^k):", ""]
        lines += exponent_lines(res["files"], "files", res["files_exponents"])
        lines.append("")
    if res.get("wide_files"):
        g = res["wide_files"][0]["genes_per_file"]
        lines += [f"## Wide input files (10 cells x {g:,} genes each): planning cost per file", ""]
        lines += table(res["wide_files"], FILE_COLS)
        if res.get("wide_files_per_file"):
            pf = res["wide_files_per_file"]
            lines += ["", f"Per additional input file: {pf['plan_corpus_s'] * 1e3:.1f} ms of "
                      f"planning, {pf['plan_corpus_peak_mb']:.2f} MB of driver memory held until "
                      f"the tasks exist, {pf['tasks_pickle_bytes'] / 1e6:.2f} MB of pickled "
                      "store task (its gene map)."]
        lines.append("")
    for key, what in (("scan_files", "tiny input files"),
                      ("scan_wide_files", "wide input files")):
        if res.get(key):
            lines += scan_section(res[key], res.get(key + "_commands", []), what,
                                  res.get(key + "_notes", []))
    if res.get("names"):
        lines += ["## Store naming alone (`data_conversion.convert._store_names`)", ""]
        lines += table(res["names"], NAME_COLS)
        lines += [""] + exponent_lines(res["names"], "files", res["names_exponents"]) + [""]
    if res.get("manifests"):
        lines += [f"## corpus.json with {TAHOE_GENES:,} genes against stores", ""]
        lines += table(res["manifests"], MANIFEST_COLS)
        lines += ["", "Exponents (quantity ~ stores^k):", ""]
        lines += exponent_lines(res["manifests"], "stores", res["manifests_exponents"])
        lines.append("")
    md.write_text("\n".join(lines) + "\n")
    plot(res, png)


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    if res.get("corpus") or res.get("small_stores"):
        rows = res.get("corpus") or res["small_stores"]
        x = [r["cells"] for r in rows]
        ax = axes[0]
        for k in ("reader_cold_s", "corpus_labels_s", "set_plan_s", "set_epoch_units_s",
                  "cell_plan_s", "cell_epoch_units_s", "load_manifest_s"):
            ax.loglog(x, [max(r[k], 1e-5) for r in rows], "o-", label=k)
        ax.loglog(x, [rows[0]["set_plan_s"] * xi / x[0] for xi in x], "k:", label="linear")
        if res.get("corpus") and res.get("small_stores"):
            small = res["small_stores"]
            for k in ("corpus_labels_s", "reader_cold_s"):
                ax.loglog([r["cells"] for r in small], [max(r[k], 1e-5) for r in small], "x--",
                          label=f"{k} ({SMALL_CELLS:,}-cell stores)")
        ax.set(xlabel="cells", ylabel="seconds",
               title=f"driver time vs corpus size ({BASE_CELLS:,}-cell stores)")
        ax.legend(fontsize=7)
        ax = axes[1]
        rows = res.get("corpus") or rows
        x = [r["cells"] for r in rows]
        for k in ("set_plan_peak_mb", "set_epoch_units_peak_mb", "cell_plan_peak_mb",
                  "cell_epoch_units_peak_mb", "corpus_labels_peak_mb", "reader_cold_peak_mb"):
            ax.loglog(x, [max(r[k], 1e-3) for r in rows], "o-", label=k)
        ax.loglog(x, [r["set_plan_pickle_bytes"] / 2**20 for r in rows], "s--",
                  label="SetPlan pickle MB")
        ax.loglog(x, [r["cell_units_pickle_bytes"] / 2**20 for r in rows], "s--",
                  label="cell units pickle MB")
        ax.set(xlabel="cells", ylabel="MB",
               title=f"driver memory vs corpus size ({BASE_CELLS:,}-cell stores)")
        ax.legend(fontsize=7)
    ax = axes[2]
    if res.get("files"):
        rows = res["files"]
        x = [r["files"] for r in rows]
        ax.loglog(x, [r["plan_corpus_s"] for r in rows], "o-", label="plan_corpus s")
        ax.loglog(x, [rows[0]["plan_corpus_s"] * xi / x[0] for xi in x], "k:", label="linear")
    if res.get("names"):
        rows = res["names"]
        ax.loglog([r["files"] for r in rows], [r["store_names_s"] for r in rows], "o-",
                  label="store naming (convert._store_names) s")
    if res.get("manifests"):
        rows = res["manifests"]
        ax.loglog([r["stores"] for r in rows], [r["saves_during_conversion_s"] for r in rows],
                  "s-", label="manifest saves during a conversion s")
    if res.get("files") or res.get("names") or res.get("manifests"):
        ax.set(xlabel="input files", ylabel="seconds", title="conversion planning vs files")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/vcc_scale", help="synthetic data (reused)")
    ap.add_argument("--cells", type=float, nargs="*", default=[1e5, 1e6, 1e7],
                    help="corpus sizes in cells (multiples of 100,000)")
    ap.add_argument("--files", type=int, nargs="*", default=[1_000, 3_000, 10_000],
                    help="numbers of input files for conversion planning (60,000 takes ~10 "
                         "min per run here; the per-file cost is linear, so it is projected)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: every series at two small sizes; prints the record and "
                         "writes no result files unless --out is given")
    ap.add_argument("--out", default=None, help="JSON record (default results/scale.json)")
    ap.add_argument("--small-stores", type=int, nargs="*", default=[100, 1_000],
                    help="corpora of this many 1,000-cell stores (scBaseCount-like)")
    ap.add_argument("--names", type=int, nargs="*", default=[1_000, 3_000, 10_000],
                    help="numbers of input paths for the store-naming step alone")
    ap.add_argument("--manifests", type=int, nargs="*", default=[1_000, 10_000, 60_000],
                    help="numbers of stores for one manifest save/load")
    ap.add_argument("--wide-files", type=int, nargs="*", default=[20, 60],
                    help="numbers of input files with --wide-genes genes each (driver memory "
                         "per input file during planning)")
    ap.add_argument("--wide-genes", type=int, default=36_601,
                    help="genes per wide input file (36,601: scBaseCount's STARsolo genes)")
    ap.add_argument("--scan-files", type=int, nargs="*", default=[1_000, 3_000, 10_000],
                    help="numbers of tiny input files planned by each --scan-modes mode")
    ap.add_argument("--scan-wide-files", type=int, nargs="*", default=[20, 60],
                    help="numbers of --wide-genes input files planned by each --scan-modes mode")
    ap.add_argument("--scan-modes", nargs="*", default=["legacy", "serial", "ray"],
                    choices=["legacy", "serial", "threads", "ray"],
                    help="input scanning modes compared (legacy: before parallel scans and "
                         "gene-space interning)")
    ap.add_argument("--update", action="store_true",
                    help="add the series asked for to an existing --out record (pass empty "
                         "lists, e.g. `--cells --files`, for the series to keep)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the .md and .png of an existing --out record; measure nothing")
    ap.add_argument("--detail-max", type=int, default=1_000,
                    help="trace memory (and profile planning) only up to this many stores/files")
    ap.add_argument("--child-corpus", help=argparse.SUPPRESS)
    ap.add_argument("--child-files", help=argparse.SUPPRESS)
    ap.add_argument("--child-names", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-manifest", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-scan", help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", help=argparse.SUPPRESS)
    ap.add_argument("--child-detail", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_corpus:
        print(json.dumps(child_corpus(a.child_corpus, bool(a.child_detail))))
        return
    if a.child_files:
        print(json.dumps(child_files(a.child_files, a.workdir, bool(a.child_detail))))
        return
    if a.child_scan:
        print(json.dumps(child_scan(a.child_scan, a.workdir, a.child_mode,
                                    bool(a.child_detail))))
        return
    if a.child_names:
        print(json.dumps(child_names(a.child_names)))
        return
    if a.child_manifest:
        print(json.dumps(child_manifest(a.child_manifest, a.workdir)))
        return
    if a.quick:
        a.cells, a.files, a.small_stores = [1e5, 3e5], [100, 300], [10, 30]
        a.names, a.manifests, a.wide_files = [300, 1000], [100, 1000], [5, 10]
        a.scan_files, a.scan_wide_files = [100, 300], [5, 10]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else RESULTS / "scale.json"
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": f"{os.cpu_count()} CPU cores (shared), Python {sys.version.split()[0]}",
        "world_size": WORLD_SIZE, "corpus": [], "files": []}
    if a.report_only:
        res = json.loads(out.read_text())
        write_report(res, out.with_suffix(".md"), out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.png')}")
        return
    if a.update:
        if not out.exists():
            raise SystemExit(f"--update: {out} does not exist; run without --update first")
        old = json.loads(out.read_text())
        old["commands_added"] = old.get("commands_added", []) + [command]
        res = old
    if a.cells:
        base, res["base"] = base_store(work)
        res["corpus"] = []
        for n in a.cells:
            n_stores = max(1, int(round(n / BASE_CELLS)))
            d = work / f"corpus_{n_stores}"
            replicate_corpus(base, d, n_stores)
            r = run_child(["--child-corpus", str(d),
                           "--child-detail", str(int(n_stores <= a.detail_max))])
            print(json.dumps(r), flush=True)
            res["corpus"].append(r)
        res["corpus_exponents"] = exponents(
            res["corpus"], "cells",
            [c[0] for c in CORPUS_COLS if c[0] not in ("cells", "n_stores", "groups")])
    if a.small_stores:
        small, res["base_small"] = base_store(work, SMALL_CELLS)
        res["small_stores"] = []
        for n_stores in a.small_stores:
            d = work / f"corpus_small_{n_stores}"
            replicate_corpus(small, d, n_stores)
            r = run_child(["--child-corpus", str(d),
                           "--child-detail", str(int(n_stores <= a.detail_max))])
            print(json.dumps(r), flush=True)
            res["small_stores"].append(r)
        res["small_stores_exponents"] = exponents(
            res["small_stores"], "cells",
            [c[0] for c in CORPUS_COLS if c[0] not in ("cells", "n_stores", "groups")])
    if a.files:
        res["files"] = []
    for n in a.files:
        paths = write_tiny_inputs(work, n)
        pf = work / f"paths_{n}.json"
        pf.write_text(json.dumps(paths))
        r = run_child(["--child-files", str(pf), "--workdir", str(work),
                       "--child-detail", str(int(n <= a.detail_max))])
        print(json.dumps(r), flush=True)
        res["files"].append(r)
    if a.wide_files:
        res["wide_files"] = []
        for n in a.wide_files:
            paths = write_tiny_inputs(work, n, n_genes=a.wide_genes)
            pf = work / f"paths_wide_{n}.json"
            pf.write_text(json.dumps(paths))
            r = run_child(["--child-files", str(pf), "--workdir", str(work), "--child-detail", "1"])
            r["genes_per_file"] = a.wide_genes
            print(json.dumps(r), flush=True)
            res["wide_files"].append(r)
        w = res["wide_files"]
        if len(w) >= 2:
            res["wide_files_per_file"] = {
                k: (w[-1][k] - w[0][k]) / (w[-1]["files"] - w[0]["files"])
                for k in ("plan_corpus_s", "plan_corpus_peak_mb", "tasks_pickle_bytes")}
    if a.files:
        res["files_exponents"] = exponents(res["files"], "files",
                                           [c[0] for c in FILE_COLS if c[0] != "files"])
    for key, sizes, genes in (("scan_files", a.scan_files, 20),
                              ("scan_wide_files", a.scan_wide_files, a.wide_genes)):
        if not sizes:
            continue
        # --update adds rows (a new size or mode replaces only its own row)
        new_keys = {(n, m) for n in sizes for m in a.scan_modes}
        rows = [r for r in res.get(key, []) if (r["files"], r["mode"]) not in new_keys]
        res[key] = rows
        for n in sizes:
            paths = write_tiny_inputs(work, n, n_genes=genes)
            pf = work / f"paths_g{genes}_{n}.json"
            pf.write_text(json.dumps(paths))
            for mode in a.scan_modes:
                r = run_child(["--child-scan", str(pf), "--child-mode", mode, "--workdir",
                               str(work), "--child-detail", str(int(n <= a.detail_max))])
                r["genes_per_file"] = genes
                print(json.dumps(r), flush=True)
                res[key].append(r)
        res[key].sort(key=lambda r: r["files"])
        res[key + "_commands"] = res.get(key + "_commands", []) + [command]
    if a.names:
        res["names"] = []
    for n in a.names:
        r = run_child(["--child-names", str(n)])
        print(json.dumps(r), flush=True)
        res["names"].append(r)
    if a.names:
        res["names_exponents"] = exponents(res["names"], "files", ["store_names_s"])
    if a.manifests:
        res["manifests"] = []
    for n in a.manifests:
        r = run_child(["--child-manifest", str(n), "--workdir", str(work)])
        print(json.dumps(r), flush=True)
        res["manifests"].append(r)
    if a.manifests:
        res["manifests_exponents"] = exponents(
            res["manifests"], "stores", ["manifest_save_s", "manifest_bytes", "load_manifest_s",
                                         "load_manifest_peak_mb", "saves_during_conversion_s"])
    if a.quick and a.out is None:
        print(json.dumps(res, indent=1))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out.with_suffix(".md"), out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
