"""Peer measurement: STATE's own loader, cell-load, on a vcc-dist simulator dataset.

    python benchmarks/_cellload_peer.py bench_data/sim_medium --seconds 30

Builds ``cell_load.data_modules.PerturbationDataModule`` (cell-load 0.10.4) exactly as
``state tx train`` builds it for the Virtual Cell Challenge starter run, iterates its train
DataLoader for a fixed time (or number of batches) and prints one JSON object as the last line of
stdout. It is the comparison point for vcc-dist's ST set stream; the benchmark runs it as a
subprocess so that cell-load, lightning and the DataLoader workers stay out of its own process.

STATE's VCC settings reproduced here (``state tx train ... model=state_sm`` with
``data.kwargs.num_workers=4 batch_col=batch_var pert_col=target_gene cell_type_key=cell_type
control_pert=non-targeting perturbation_features_file=ESM2_pert_features.pt``, everything else
from STATE's ``configs/data/perturbation.yaml``, ``configs/training/default.yaml`` and
``configs/model/state_sm.yaml``):

- ``embed_key=None``, ``output_space="all"``: cells are read from ``X`` in gene space, every
  gene (18,080 for the VCC); ``pert_cell_emb`` and ``ctrl_cell_emb`` are ``[B*S, n_genes]``.
- ``cell_sentence_len`` = ``model.kwargs.cell_set_len`` = 128 (state_sm) and ``batch_size`` =
  ``training.batch_size`` = 16, so one batch holds 16 sets of 128 perturbed cells plus one mapped
  control per cell: 2,048 + 2,048 expression rows.
- ``basal_mapping_strategy="random"`` (a random control of the same cell type and split for
  every row), ``n_basal_samples=1``, ``should_yield_control_cells=True`` (control cells are also
  served as their own sets), ``barcode=True``, ``num_workers=4``; the DataLoader itself is
  cell-load's (``pin_memory=True``, ``prefetch_factor=4``, ``persistent_workers=True``).
- ``perturbation_features_file``: ``pert_features.pt`` beside the data when present (the
  simulator's stand-in for ``ESM2_pert_features.pt``: a dict gene -> vector).

The simulator's output needs no preparation: cell-load takes a ``[datasets]`` path that is a
directory (every ``*.h5``/``*.h5ad`` in it is one file), a single file holding several cell types
is split per cell type by ``obs[cell_type_key]``, ``obs`` columns must be categorical (they are),
and ``X`` may be CSR or dense, raw or log1p (cell-load does not transform ``X``; the VCC support
set is the same shape of data). If the TOML's dataset path is not ``data_dir``, a copy of the
TOML pointing at ``data_dir`` is written to a temporary directory.

Counting: ``cells`` counts both tensors of a batch (perturbed rows and control rows, ``B*S``
each). cell-load pads every (cell type, perturbation) group smaller than ``cell_sentence_len``
to a full set by sampling with replacement, so rows repeat within an epoch. CPU seconds cover this
process and its DataLoader workers (psutil, live children plus reaped ones); memory is the
sampled peak of RSS and of PSS summed over the process tree (RSS counts shared-memory batches
in both the worker and the main process; PSS splits them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MemSampler, tree_cpu  # noqa: E402

CONTROL = "non-targeting"
PERT_COL = "target_gene"
CELL_TYPE_COL = "cell_type"
BATCH_COL = "batch"
FEATURES_NAME = "pert_features.pt"


# --------------------------------------------------------------------------- process-tree meters


def _system_busy_cpu() -> float:
    """CPU seconds all processes on the machine have used (busy = total - idle - iowait)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(
        t, "guest_nice", 0.0
    )


# --------------------------------------------------------------------------- data and TOML


def _h5_files(data_dir: Path) -> list[Path]:
    if data_dir.is_file():
        return [data_dir]
    return sorted(list(data_dir.glob("*.h5")) + list(data_dir.glob("*.h5ad")))


def _resolve_toml(toml_path: Path, data_dir: Path, tmpdir: Path) -> tuple[Path, dict]:
    """The TOML to give cell-load: as is when its one dataset is ``data_dir``, else a copy."""
    import toml

    cfg = toml.load(toml_path)
    datasets = cfg.get("datasets", {})
    if not datasets:
        raise ValueError(f"{toml_path}: no [datasets] table")
    if all(Path(p).resolve() == data_dir.resolve() for p in datasets.values()):
        return toml_path, cfg
    if len(datasets) != 1:
        raise ValueError(
            f"{toml_path} names {len(datasets)} datasets and none is {data_dir}; "
            "pass a TOML whose [datasets] paths are right"
        )
    name = next(iter(datasets))
    cfg["datasets"] = {name: str(data_dir.resolve())}
    out = tmpdir / "split.toml"
    out.write_text(toml.dumps(cfg))
    return out, cfg


def _check_toml_against_data(cfg: dict, files: list[Path]) -> list[str]:
    """cell-load silently ignores split keys that match nothing: say so instead."""
    import h5py

    cell_types: set[str] = set()
    perts: set[str] = set()
    for f in files:
        with h5py.File(f, "r") as h:
            cell_types |= {_dec(x) for x in h[f"obs/{CELL_TYPE_COL}/categories"][:]}
            perts |= {_dec(x) for x in h[f"obs/{PERT_COL}/categories"][:]}
    problems = []
    names = set(cfg.get("datasets", {}))
    for section in ("zeroshot", "fewshot"):
        for key, val in cfg.get(section, {}).items():
            ds, _, ct = key.partition(".")
            if ds not in names:
                problems.append(f"[{section}] {key}: dataset {ds!r} not in [datasets]")
            if ct not in cell_types:
                problems.append(f"[{section}] {key}: cell type {ct!r} not in obs.{CELL_TYPE_COL}")
            if section == "fewshot":
                for split, lst in val.items():
                    missing = sorted(set(lst) - perts)
                    if missing:
                        problems.append(
                            f"[fewshot.{key}] {split}: {len(missing)} perturbations not in data"
                        )
    return problems


def _dec(x) -> str:
    return x.decode() if isinstance(x, (bytes, bytearray)) else str(x)


def _split_summary(dm) -> dict:
    """Rows per split and cell type as cell-load assigned them (perturbed / control)."""
    out: dict = {}
    for split, subsets in (
        ("train", dm.train_datasets),
        ("val", dm.val_datasets),
        ("test", dm.test_datasets),
    ):
        rows = []
        for sub in subsets:
            ds = sub.dataset
            idx = np.asarray(sub.indices)
            ctrl = ds.metadata_cache.control_mask[idx]
            n_perts = len(np.unique(ds.metadata_cache.pert_codes[idx[~ctrl]]))
            rows.append(
                {
                    "file": ds.h5_path.name,
                    "cell_type": str(ds.get_cell_type(idx[0])) if len(idx) else None,
                    "perturbed_cells": int((~ctrl).sum()),
                    "control_cells": int(ctrl.sum()),
                    "perturbations": int(n_perts),
                }
            )
        out[split] = rows
    return out


# --------------------------------------------------------------------------- the measurement


def run_cellload(
    data_dir,
    toml_path=None,
    *,
    cell_sentence_len: int = 128,
    batch_size: int = 16,
    num_workers: int = 4,
    seconds: float = 60.0,
    max_batches: int | None = None,
    mapping: str = "random",
    gene_space: str = "all",
    seed: int = 0,
    barcode: bool = True,
    pert_features: str | None = "auto",
    consecutive_loading: bool = False,
) -> dict:
    """Iterate cell-load's train DataLoader on ``data_dir`` and measure it.

    ``data_dir``: a directory of ``.h5ad``/``.h5`` files (or one file) with obs ``target_gene``
    (control ``non-targeting``), ``cell_type``, ``batch``. ``toml_path``: the split TOML
    (default ``data_dir/split.toml``). ``gene_space``: ``"all"`` reads every gene of ``X``
    (STATE's VCC starter); ``"hvg"`` reads ``obsm/X_hvg`` (``embed_key="X_hvg"``,
    ``output_space="gene"``), which the file must hold. ``mapping``: ``"random"`` (STATE's
    default) or ``"batch"`` (controls of the same batch). Stops after ``seconds`` of iteration
    or ``max_batches`` batches, whichever comes first.
    """
    if gene_space not in ("all", "hvg"):
        raise ValueError(f"gene_space must be 'all' or 'hvg', not {gene_space!r}")
    if mapping not in ("random", "batch"):
        raise ValueError(f"mapping must be 'random' or 'batch', not {mapping!r}")
    data_dir = Path(data_dir)
    toml_path = Path(toml_path) if toml_path else (data_dir if data_dir.is_dir() else data_dir.parent) / "split.toml"
    files = _h5_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no .h5/.h5ad file in {data_dir}")
    if pert_features == "auto":
        cand = (data_dir if data_dir.is_dir() else data_dir.parent) / FEATURES_NAME
        pert_features = str(cand) if cand.exists() else None

    proc = psutil.Process()
    mem = MemSampler()
    mem.start()
    cpu_start = tree_cpu(proc)
    t_start = time.perf_counter()

    # STATE seeds everything (pl.seed_everything) before building the data module; cell-load's
    # sampler shuffles with the global numpy RNG.
    random.seed(seed)
    np.random.seed(seed)

    t = time.perf_counter()
    import torch
    from cell_load.data_modules import PerturbationDataModule

    torch.manual_seed(seed)
    import_s = time.perf_counter() - t

    tmp = tempfile.TemporaryDirectory(prefix="cellload_peer_")
    toml_used, cfg = _resolve_toml(toml_path, data_dir, Path(tmp.name))
    toml_problems = _check_toml_against_data(cfg, files)

    settings = dict(
        toml_config_path=str(toml_used),
        batch_size=batch_size,
        num_workers=num_workers,
        random_seed=seed,
        pert_col=PERT_COL,
        batch_col=BATCH_COL,
        cell_type_key=CELL_TYPE_COL,
        control_pert=CONTROL,
        embed_key=None if gene_space == "all" else "X_hvg",
        output_space="all" if gene_space == "all" else "gene",
        basal_mapping_strategy=mapping,
        n_basal_samples=1,
        should_yield_control_cells=True,
        cell_sentence_len=cell_sentence_len,
        use_consecutive_loading=consecutive_loading,
        map_controls=True,
        barcode=barcode,
        perturbation_features_file=pert_features,
    )

    t = time.perf_counter()
    cpu = tree_cpu(proc)
    dm = PerturbationDataModule(**settings)
    dm.setup(stage="fit")
    dl = dm.train_dataloader()
    setup_s = time.perf_counter() - t
    setup_cpu = tree_cpu(proc) - cpu
    sampler = dl.batch_sampler
    sentences = sampler.sentences
    n_partial = sum(len(s) < cell_sentence_len for s in sentences)

    batches = rows = 0
    epochs = 0
    first_batch_s = None
    shape = None
    keys = None
    dtypes = None
    arrivals: list[tuple[float, float, int]] = []  # (time, tree CPU, rows) per batch
    t_iter = time.perf_counter()
    cpu_iter = tree_cpu(proc)
    sys_iter = _system_busy_cpu()
    deadline = t_iter + seconds
    done = False
    it = None
    while not done:
        it = iter(dl)
        epochs += 1
        for batch in it:
            now = time.perf_counter()
            n = int(batch["pert_cell_emb"].shape[0])
            if first_batch_s is None:
                first_batch_s = now - t_iter
                keys = sorted(batch)
                shape = {
                    k: (list(v.shape) if hasattr(v, "shape") else f"list[{len(v)}]")
                    for k, v in batch.items()
                }
                dtypes = {k: str(v.dtype) for k, v in batch.items() if hasattr(v, "dtype")}
            batches += 1
            rows += n
            arrivals.append((now, tree_cpu(proc), n))
            del batch
            if now >= deadline or (max_batches is not None and batches >= max_batches):
                done = True
                break
        else:
            if batches == 0:
                raise RuntimeError("cell-load's train DataLoader yielded no batch")
    t_end = time.perf_counter()
    cpu_end = tree_cpu(proc)  # workers still alive: their CPU so far, incl. in-flight batches
    sys_end = _system_busy_cpu()
    n_workers_alive = len(proc.children(recursive=True))
    # Shut the persistent workers down so that the reaped CPU can be checked against the live one.
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    del it, dl
    mem.stop()
    cpu_after_shutdown = tree_cpu(proc)
    tmp.cleanup()

    iter_s = t_end - t_iter
    cells = 2 * rows  # perturbed rows + their mapped control rows
    # Steady state: from the first batch to the last batch that closes a whole round of workers
    # (workers start together and deliver in rounds of num_workers batches; a window cut inside a
    # round would count batches built mostly before it opened). Caches (cell-load keeps an LRU of
    # 10,000 dense rows per worker) warm up over the run, so this rate still rises with length.
    rounds = (batches - 1) // max(num_workers, 1)
    if rounds >= 1:
        j = rounds * max(num_workers, 1)  # 0-based index of the closing batch
        steady_s = arrivals[j][0] - arrivals[0][0]
        steady_cpu = arrivals[j][1] - arrivals[0][1]
        steady_rows = sum(a[2] for a in arrivals[1 : j + 1])
        steady_batches = j
    else:
        steady_s = steady_cpu = None
        steady_rows = steady_batches = 0
    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

    return {
        "loader": "cell-load",
        "cell_load_version": _version("cell-load"),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "data": [str(f) for f in files],
        "toml": str(toml_path),
        "toml_rewritten": str(toml_used) != str(toml_path),
        "toml_problems": toml_problems,
        "settings": {
            k: v for k, v in settings.items() if k != "toml_config_path"
        }
        | {"seed": seed, "seconds": seconds, "max_batches": max_batches, "gene_space": gene_space},
        "dataloader": {
            "pin_memory": True,
            "prefetch_factor": 4 if num_workers > 0 else None,
            "persistent_workers": num_workers > 0,
            "batches_per_epoch": len(sampler),
            "sentences_per_epoch": len(sentences),
            "partial_sentences_padded": int(n_partial),
            "distinct_rows_per_epoch": int(sum(len(s) for s in sentences)),
        },
        "splits": _split_summary(dm),
        "batch_keys": keys,
        "batch_shapes": shape,
        "batch_dtypes": dtypes,
        "import_seconds": round(import_s, 3),
        "setup_seconds": round(setup_s, 3),
        "setup_cpu_seconds": round(setup_cpu, 3),
        "time_to_first_batch_s": round(first_batch_s, 3) if first_batch_s is not None else None,
        "iteration_seconds": round(iter_s, 3),
        "epochs_started": epochs,
        "batches": batches,
        "rows": rows,
        "cells": cells,
        "cells_per_s": round(cells / iter_s, 1),
        "steady_batches": steady_batches,
        "steady_seconds": round(steady_s, 3) if steady_s else None,
        "steady_cells_per_s": round(2 * steady_rows / steady_s, 1) if steady_s else None,
        "cpu_seconds_iteration": round(cpu_end - cpu_iter, 3),
        "cpu_seconds_steady": round(steady_cpu, 3) if steady_s else None,
        "cpu_seconds_total": round(cpu_end - cpu_start, 3),
        "cpu_seconds_total_after_shutdown": round(cpu_after_shutdown - cpu_start, 3),
        "cpu_s_per_1k_cells": round(1000 * (cpu_end - cpu_iter) / cells, 4) if cells else None,
        "cpu_s_per_1k_cells_steady": (
            round(1000 * steady_cpu / (2 * steady_rows), 4) if steady_rows else None
        ),
        "wall_seconds_total": round(t_end - t_start, 3),
        # Contention check: CPU other processes on the machine used during the iteration window
        # (wall-clock rates are only comparable between runs where this is ~0).
        "other_processes_cpu_seconds_iteration": round(
            max(0.0, (sys_end - sys_iter) - (cpu_end - cpu_iter)), 2
        ),
        "batch_arrival_s": [round(a[0] - t_iter, 2) for a in arrivals],
        "workers_alive_at_stop": n_workers_alive,
        "peak_rss_tree_mb": round(mem.peak_rss / 2**20, 1),
        "peak_pss_tree_mb": round(mem.peak_pss / 2**20, 1),
        "ru_maxrss_self_mb": round(ru_self / 1024, 1),
        "ru_maxrss_largest_child_mb": round(ru_children / 1024, 1),
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", help="directory of .h5ad/.h5 files (or one file)")
    ap.add_argument("--toml", default=None, help="split TOML (default: DATA_DIR/split.toml)")
    ap.add_argument("--cell-sentence-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-batches", type=int, default=None)
    ap.add_argument("--mapping", choices=("random", "batch"), default="random")
    ap.add_argument("--gene-space", choices=("all", "hvg"), default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-barcode", action="store_true")
    ap.add_argument(
        "--pert-features",
        default="auto",
        help="perturbation features .pt (default: DATA_DIR/pert_features.pt if present; 'none' for one-hot)",
    )
    ap.add_argument("--consecutive-loading", action="store_true",
                    help="cell-load's use_consecutive_loading (needs (cell_type, pert) runs contiguous in the file)")
    ap.add_argument("--quiet", action="store_true", help="silence cell-load's logging and progress bars")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    result = run_cellload(
        args.data_dir,
        args.toml,
        cell_sentence_len=args.cell_sentence_len,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seconds=args.seconds,
        max_batches=args.max_batches,
        mapping=args.mapping,
        gene_space=args.gene_space,
        seed=args.seed,
        barcode=not args.no_barcode,
        pert_features=None if args.pert_features == "none" else args.pert_features,
        consecutive_loading=args.consecutive_loading,
    )
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
