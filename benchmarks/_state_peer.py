"""Peer measurement: training speed of Arc's ``state tx train`` (arc-state), ``model=state_sm``.

    python benchmarks/_state_peer.py --data-dir runs/demo/sim --toml runs/demo/sim/split.toml \\
        --workdir /tmp/state_peer --set-size 128 --batch-size 16 --steps 30

Runs Arc Institute's STATE transition-model trainer (PyPI ``arc-state``, which brings cell-load,
lightning and transformers) on CPU on a vcc-dist simulator dataset, and prints one JSON object as
the last line of stdout::

    {"tool": "arc-state", "version": "0.11.1", "cells_per_s": ..., "cells_per_cpu_s": ...,
     "steps": ..., "set_size": ..., "batch_size": ..., "n_genes": ..., "first_step_s": ...,
     "command": "...", ...extras (n_params, pert_dim, warmup_steps, step_s_median, ...)}

It is the comparison point for vcc-dist's own ST trainer on the same data; the benchmark driver
runs it as a subprocess with any Python (this file needs only the standard library in the calling
process; everything else runs in the separate arc-state venv given by ``--venv``).

The venv (arc-state pins nothing that forces a CUDA torch: it needs ``torch>=2.7.0``, so the local
CPU wheel satisfies it and pip keeps it; no ``nvidia-*`` package is pulled)::

    python3.11 -m venv .venv-state          # or /root/.pyenv/versions/3.11.7/bin/python -m venv
    .venv-state/bin/pip install torch==2.13.0            # CPU wheel (local find-links), FIRST
    .venv-state/bin/pip install arc-state==0.11.1 torch==2.13.0   # repeating the pin keeps it

What runs (the training process), exactly ``state tx train`` with these Hydra overrides::

    state tx train model=state_sm use_wandb=false overwrite=true output_dir=<workdir>/state_out
      name=run data.kwargs.toml_config_path=<workdir>/split.toml data.kwargs.embed_key=null
      data.kwargs.output_space=all data.kwargs.pert_col=target_gene
      data.kwargs.cell_type_key=cell_type data.kwargs.batch_col=batch
      data.kwargs.control_pert=non-targeting data.kwargs.num_workers=4
      data.kwargs.perturbation_features_file=<features.pt>      (omitted for one-hot features)
      model.kwargs.cell_set_len=<set-size> training.batch_size=<batch-size>
      training.max_steps=<steps>

These are STATE's Virtual Cell Challenge starter settings (see ``_cellload_peer.py``); everything
else is the package's ``configs/{config,data/perturbation,model/state_sm,training/default}.yaml``
(lr 1e-4, weight decay 5e-4, energy loss, grad clip 10, val every 2000 steps so no
validation falls inside a short run apart from lightning's 2 sanity-check batches at start-up).
No accelerator override is needed: ``_train.py`` picks ``accelerator="cpu"`` when CUDA is
unavailable (true with the CPU torch wheel).

How it is timed.  ``state`` is the console script ``state.__main__:main``; instead of the script
the training process is ``<venv>/bin/python _state_peer.py --_launch <timing.jsonl> -- tx train
<overrides>``, which installs two hooks and then calls ``state.__main__.main()`` with ``sys.argv``
set to ``state tx train <overrides>`` -- the same code path as the console script:

- a lightning ``Callback`` added to every ``lightning.pytorch.Trainer`` (by wrapping
  ``Trainer.__init__``): at ``on_fit_start`` it logs the parameter count, and at every
  ``on_train_batch_end`` a line with ``time.monotonic()`` (system-wide clock, comparable with the
  parent's), the CPU seconds of the training process alone and of its whole process tree
  (``_common.tree_cpu``: itself, its DataLoader workers, reaped children) and the batch's rows;
- a wrapper around every ``torch.utils.data.DataLoader``'s ``collate_fn`` (by wrapping
  ``DataLoader.__init__``; workers are forked, so it runs inside them) that logs the time each
  batch is finished by the loader.

This is exact per step and independent of log formats (lightning's progress bar has 1 s
resolution; STATE's CSV logger logs every 50 steps without timestamps). The window is from the
end of step ``warmup`` (default ``max(3, steps // 5)``) to the end of the last step.

Why the loader is logged too: cell-load's DataLoader (persistent workers, ``prefetch_factor=4``)
builds up to ``num_workers * 4`` batches ahead, much of it during start-up, and it starts each
epoch's batches only when that epoch starts. On small data sets (the demo's epoch is ~10 batches
at batch 16) and on 2 cores, steps fed from batches built *before* the window would look faster
and cheaper than steady-state training. So:

- ``cells_per_s`` = min(cells consumed by training steps in the window, cells whose batches the
  loader finished in the window) / window wall time -- the conservative rate of the slower side
  of the pipeline (with ``--num-workers 0`` loading is inside the step and the consumed rate is
  used). Both rates are reported (``consumed_cells_per_s``, ``built_cells_per_s``).
- ``cells_per_cpu_s`` = 1 / (main-process CPU in the window / cells consumed + loader-worker CPU
  in the window / cells built in the window); with no worker CPU it is cells / tree CPU.
- ``steady`` is false when the loader built < 80% of the consumed cells in the window (the run
  lived on start-up prefetch: give more ``--steps``). The window includes the epoch-boundary
  stalls of real training; use ``--steps`` spanning several epochs for a stable figure.
- A "cell" is one perturbed cell of a training set: a full step is ``batch_size * set_size``
  cells (the mapped control cells fed alongside are not counted); rows are counted per batch, so
  a short last batch of an epoch counts what it really held.
- ``first_step_s``: wall seconds from launching the training process to the end of training
  step 1 (imports, data-module setup, model build, lightning's 2 sanity-validation batches, loader
  prefetch and the first step). ``fit_start_s``: launch to ``on_fit_start``.
- The data preparation below is done before the training process starts and is excluded from
  every figure (``total_s``/``total_cpu_s`` cover the training process only, end to end).

Data preparation (outside every timing).  cell-load does not transform ``X`` and STATE expects
log-normalised expression; the simulator writes raw integer counts. So every ``*.h5ad``/``*.h5``
of ``--data-dir`` whose ``X`` is integer-valued is rewritten to ``<workdir>/data`` with scanpy's
``normalize_total`` (target = that file's median total) + ``log1p`` (which sets ``uns["log1p"]``,
so cell-load runs in is_log1p mode) -- what vcc-dist's trainer consumes too; non-integer files are
symlinked unchanged. Copies are reused while newer than their sources. The TOML is copied to
``<workdir>/split.toml`` with every ``[datasets]`` path replaced by ``<workdir>/data`` (the peer's
data are ``--data-dir``'s files, whatever the TOML's paths say).

Perturbation features (``--pert-features``): ``auto`` (default) uses ``<data-dir>/pert_features.pt``
when present (the simulator's stand-in for STATE's ``ESM2_pert_features.pt``, a dict gene ->
vector), else one-hot; ``onehot`` forces STATE's one-hot features; a path uses that file.
``--pert-feature-dim N`` instead writes random N-d features for every perturbation to the workdir
(``5120`` reproduces the ESM2 input width of the VCC run, and state_sm's ~37.8M parameters at
2,000 genes). The parameter count and pert width STATE really built are reported
(``n_params``: all parameters, ``n_trainable``, ``pert_dim``). Note state_sm's Llama backbone keeps
a frozen 32,000 x 672 token-embedding table (21.5M parameters, unused: inputs are embeddings),
which lightning counts as "Non-trainable"; at 2,000 genes state_sm has 35.36M trainable
parameters with 64-d simulator features (56.86M in all), and 5120-d features add 3.40M to both.

Caveats.  Threads are torch's default (one intra-op thread per core); the training process and
``num_workers`` DataLoader workers share the machine's cores, as in any CPU run of ``state``.
``data.kwargs.pin_memory`` stays STATE's default (true; a no-op warning on CPU). The process
writes checkpoints only at the end (``final.ckpt``, after the timed window). If the run fails,
the tail of ``<workdir>/state_train.log`` is printed to stderr and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# --------------------------------------------------------------------------------------------
# Modes that run inside the arc-state venv (--_launch, --_prepare)
# --------------------------------------------------------------------------------------------

def _launch(timing_path: str, state_argv: list[str]) -> None:
    """Run ``state <state_argv>`` in this process with a per-step timing callback."""
    import functools

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    sys.path.insert(0, str(HERE))
    import psutil
    from _common import tree_cpu

    me = psutil.Process()
    fd = os.open(timing_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(**rec):
        os.write(fd, (json.dumps(rec) + "\n").encode())

    class _StepTimer(Callback):
        def on_fit_start(self, trainer, pl_module):
            n = sum(p.numel() for p in pl_module.parameters())
            nt = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            emit(event="fit_start", t=time.monotonic(), n_params=n, n_trainable=nt,
                 model=type(pl_module).__name__, torch_threads=torch.get_num_threads(),
                 pert_dim=getattr(pl_module, "pert_dim", None),
                 hidden_dim=getattr(pl_module, "hidden_dim", None))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ct = me.cpu_times()
            rec = {"event": "step", "step": int(trainer.global_step), "t": time.monotonic(),
                   "cpu": tree_cpu(me), "main_cpu": ct.user + ct.system}
            x = batch.get("pert_cell_emb") if isinstance(batch, dict) else None
            if x is not None:
                rec["rows"] = int(x.shape[0])
                rec["genes"] = int(x.shape[-1])
            p = batch.get("pert_emb") if isinstance(batch, dict) else None
            if p is not None:
                rec["pert_dim"] = int(p.shape[-1])
            emit(**rec)

    import torch.utils.data as tud

    class _CountingCollate:
        """Wraps a DataLoader's collate_fn; runs where the batch is built (a forked worker or,
        with num_workers=0, the main process) and logs one line per finished batch."""

        def __init__(self, fn):
            self.fn = fn

        def __call__(self, samples):
            res = self.fn(samples)
            x = res.get("pert_cell_emb") if isinstance(res, dict) else None
            rec = {"event": "batch", "t": time.monotonic(), "pid": os.getpid(),
                   "rows": int(x.shape[0]) if x is not None else None}
            os.write(fd, (json.dumps(rec) + "\n").encode())
            return res

    orig_dl_init = tud.DataLoader.__init__

    @functools.wraps(orig_dl_init)
    def dl_init(self, *args, **kwargs):
        fn = kwargs.get("collate_fn")
        if not isinstance(fn, _CountingCollate):
            kwargs["collate_fn"] = _CountingCollate(fn or tud.default_collate)
        orig_dl_init(self, *args, **kwargs)

    tud.DataLoader.__init__ = dl_init

    orig_init = pl.Trainer.__init__

    @functools.wraps(orig_init)
    def init(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or []) + [_StepTimer()]
        orig_init(self, *args, callbacks=callbacks, **kwargs)

    pl.Trainer.__init__ = init

    from state.__main__ import main

    sys.argv = ["state", *state_argv]
    sys.exit(main())


def _prepare(data_dir: str, out_dir: str, feature_dim: int, features_out: str,
             pert_col: str) -> None:
    """Normalised copies of the data set (+ optional random perturbation features)."""
    import anndata as ad
    import numpy as np

    src, dst = Path(data_dir), Path(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.suffix in (".h5ad", ".h5"))
    if not files:
        raise SystemExit(f"no .h5ad/.h5 files in {src}")
    perts: set[str] = set()
    for f in files:
        target = dst / f.name
        if target.exists() and target.stat().st_mtime >= f.stat().st_mtime and feature_dim <= 0:
            print(f"reuse {target}", file=sys.stderr)
            continue
        a = ad.read_h5ad(f)
        perts |= set(map(str, a.obs[pert_col].unique()))
        if target.exists() and target.stat().st_mtime >= f.stat().st_mtime:
            continue
        sparse = hasattr(a.X, "data") and not isinstance(a.X, np.ndarray)
        x = a.X.data if sparse else np.asarray(a.X)
        sample = np.asarray(x).ravel()[:1_000_000]
        if target.exists() or target.is_symlink():
            target.unlink()
        if np.all(sample == np.round(sample)):
            import scanpy as sc

            sc.pp.normalize_total(a)
            sc.pp.log1p(a)
            a.write_h5ad(target)
            print(f"normalised {f} -> {target}", file=sys.stderr)
        else:
            target.symlink_to(f.resolve())
            print(f"linked {f} (X not integer-valued) -> {target}", file=sys.stderr)
    if feature_dim > 0:
        import torch

        g = torch.Generator().manual_seed(0)
        feats = {p: torch.randn(feature_dim, generator=g) for p in sorted(perts)}
        torch.save(feats, features_out)
        print(f"wrote {len(feats)} random {feature_dim}-d features -> {features_out}",
              file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Driver side (any Python)
# --------------------------------------------------------------------------------------------

def _rewrite_toml(src: Path, dst: Path, data_path: Path) -> None:
    """Copy of the TOML with every [datasets] entry pointing at ``data_path``."""
    out, section = [], None
    for line in src.read_text().splitlines():
        m = re.match(r"^\s*\[([^\]]+)\]\s*(#.*)?$", line)
        if m:
            section = m.group(1).strip()
        elif section == "datasets" and re.match(r"^\s*[^#=\s][^=]*=", line):
            key = line.split("=", 1)[0].rstrip()
            line = f"{key} = {json.dumps(str(data_path))}"
        out.append(line)
    dst.write_text("\n".join(out) + "\n")


def _tree_cpu_children() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with the simulator's h5ad files")
    ap.add_argument("--toml", required=True, help="STATE / cell-load split TOML")
    ap.add_argument("--workdir", required=True, help="scratch output folder")
    ap.add_argument("--set-size", type=int, default=128, help="cell_set_len (cells per set)")
    ap.add_argument("--batch-size", type=int, default=16, help="sets per batch")
    ap.add_argument("--steps", type=int, default=30, help="training.max_steps")
    ap.add_argument("--venv", default=str(ROOT / ".venv-state"), help="venv holding arc-state")
    ap.add_argument("--warmup", type=int, default=None,
                    help="steps excluded from the rate (default max(3, steps // 5))")
    ap.add_argument("--num-workers", type=int, default=4, help="data.kwargs.num_workers")
    ap.add_argument("--pert-features", default="auto",
                    help="auto | onehot | PATH of a dict gene -> vector (.pt)")
    ap.add_argument("--pert-feature-dim", type=int, default=0,
                    help="write random features of this width instead (5120 = ESM2)")
    ap.add_argument("--pert-col", default="target_gene")
    ap.add_argument("--cell-type-key", default="cell_type")
    ap.add_argument("--batch-col", default="batch")
    ap.add_argument("--control-pert", default="non-targeting")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--extra", nargs="*", default=[], help="further Hydra overrides for state")
    args = ap.parse_args(argv)

    venv = Path(args.venv)
    if not venv.is_absolute():
        venv = (ROOT / venv) if not venv.exists() else venv.resolve()
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"no arc-state venv at {venv} (see this script's docstring)", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).resolve()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    me = str(Path(__file__).resolve())

    version = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('arc-state'))"],
        capture_output=True, text=True, check=True).stdout.strip()

    # --- preparation (untimed) ---
    prep_dir = work / "data"
    feats: str | None
    if args.pert_feature_dim > 0:
        feats = str(work / f"pert_features_{args.pert_feature_dim}.pt")
    elif args.pert_features == "auto":
        cand = data_dir / "pert_features.pt"
        feats = str(cand) if cand.exists() else None
    elif args.pert_features == "onehot":
        feats = None
    else:
        feats = str(Path(args.pert_features).resolve())
    subprocess.run([str(py), me, "--_prepare", str(data_dir), str(prep_dir),
                    str(args.pert_feature_dim), feats or "", args.pert_col], check=True)
    toml = work / "split.toml"
    _rewrite_toml(Path(args.toml), toml, prep_dir)

    out_dir = work / "state_out"
    overrides = [
        "model=state_sm",
        "use_wandb=false",
        "overwrite=true",
        f"output_dir={out_dir}",
        "name=run",
        f"data.kwargs.toml_config_path={toml}",
        "data.kwargs.embed_key=null",
        "data.kwargs.output_space=all",
        f"data.kwargs.pert_col={args.pert_col}",
        f"data.kwargs.cell_type_key={args.cell_type_key}",
        f"data.kwargs.batch_col={args.batch_col}",
        f"data.kwargs.control_pert={args.control_pert}",
        f"data.kwargs.num_workers={args.num_workers}",
    ]
    if feats:
        overrides.append(f"data.kwargs.perturbation_features_file={feats}")
    overrides += [
        f"model.kwargs.cell_set_len={args.set_size}",
        f"training.batch_size={args.batch_size}",
        f"training.max_steps={args.steps}",
        *args.extra,
    ]
    command = "state tx train " + " ".join(shlex.quote(o) for o in overrides)

    # --- the timed training process ---
    timing = work / "timing.jsonl"
    timing.unlink(missing_ok=True)
    log = work / "state_train.log"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cpu0 = _tree_cpu_children()
    t0 = time.monotonic()
    with open(log, "w") as lf:
        p = subprocess.run([str(py), me, "--_launch", str(timing), "--", "tx", "train", *overrides],
                           stdout=lf, stderr=subprocess.STDOUT, env=env, timeout=args.timeout,
                           cwd=str(work), check=False)
    total_s = time.monotonic() - t0
    total_cpu = _tree_cpu_children() - cpu0

    recs = [json.loads(line) for line in timing.read_text().splitlines()] if timing.exists() else []
    steps = [r for r in recs if r["event"] == "step"]
    fit = next((r for r in recs if r["event"] == "fit_start"), {})
    if p.returncode != 0 or len(steps) < 2:
        tail = log.read_text()[-6000:] if log.exists() else ""
        print(tail, file=sys.stderr)
        print(f"state tx train failed (rc={p.returncode}, {len(steps)} steps timed); log: {log}",
              file=sys.stderr)
        return 1

    warm = args.warmup if args.warmup is not None else max(3, args.steps // 5)
    warm = min(warm, len(steps) - 2)
    a, b = steps[warm], steps[-1]
    window = steps[warm + 1:]
    full = args.batch_size * args.set_size
    cells = sum(r.get("rows") or full for r in window)
    wall, cpu = b["t"] - a["t"], b["cpu"] - a["cpu"]
    main_cpu = b["main_cpu"] - a["main_cpu"]
    loader_cpu = max(cpu - main_cpu, 0.0)
    built = [r for r in recs if r["event"] == "batch" and a["t"] < r["t"] <= b["t"]]
    built_cells = sum(r.get("rows") or full for r in built)
    consume = cells / wall
    produce = built_cells / wall
    # CPU per trained cell: the main process's share per consumed cell plus the loader workers'
    # share per cell they built in the window (prefetched batches built before the window are
    # not charged to it, batches built ahead of use in it are not credited to it).
    if args.num_workers == 0 or loader_cpu < 0.02 * cpu:
        cpu_per_cell = cpu / cells
    elif built_cells:
        cpu_per_cell = main_cpu / cells + loader_cpu / built_cells
    else:
        cpu_per_cell = None
    steady = bool(args.num_workers == 0 or built_cells >= 0.8 * cells)
    dts = sorted(s2["t"] - s1["t"] for s1, s2 in zip(steps[warm:], steps[warm + 1:]))
    res = {
        "tool": "arc-state",
        "version": version,
        "cells_per_s": round(min(consume, produce) if args.num_workers else consume, 2),
        "cells_per_cpu_s": round(1.0 / cpu_per_cell, 2) if cpu_per_cell else None,
        "steps": len(steps),
        "set_size": args.set_size,
        "batch_size": args.batch_size,
        "n_genes": steps[-1].get("genes"),
        "first_step_s": round(steps[0]["t"] - t0, 2),
        "command": command,
        "model": "state_sm",
        "n_params": fit.get("n_params"),
        "n_trainable": fit.get("n_trainable"),
        "pert_dim": steps[0].get("pert_dim", fit.get("pert_dim")),
        "pert_features": feats or "onehot",
        "warmup_steps": warm,
        "measured_steps": len(window),
        "measured_cells": cells,
        "measured_s": round(wall, 3),
        "measured_cpu_s": round(cpu, 3),
        "main_cpu_s": round(main_cpu, 3),
        "loader_cpu_s": round(loader_cpu, 3),
        "consumed_cells_per_s": round(consume, 2),
        "built_cells_per_s": round(produce, 2),
        "built_cells": built_cells,
        "steady": steady,
        "step_s_median": round(dts[len(dts) // 2], 4),
        "fit_start_s": round(fit["t"] - t0, 2) if "t" in fit else None,
        "total_s": round(total_s, 2),
        "total_cpu_s": round(total_cpu, 2),
        "num_workers": args.num_workers,
        "torch_threads": fit.get("torch_threads"),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_launch":
        _launch(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_prepare":
        _prepare(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        sys.exit(main())
