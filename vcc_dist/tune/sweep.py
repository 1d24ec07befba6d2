"""Ray Tune sweeps of ST training against the challenge score (docs/design.md §5, jobs/tune_st.py).

    cfg = SweepConfig(recipe="demo", space="default", corpus="runs/demo/corpus",
                      split="runs/demo/sim/split.toml", run_dir="runs/demo/tune", num_samples=16)
    res = run_sweep(cfg)                 # embedded local Ray unless RAY_ADDRESS / a cluster
    res.best_recipe                      # a recipe file: jobs/train_st.py --recipe <it>

How it runs (Ray 2.60's pattern for Tune over Train V2, docs/stack_notes.md): every trial is a
*driver function* (it reserves no CPU) that builds the trial's complete
:class:`~vcc_dist.train.st.STTrainConfig` (the base recipe plus the sampled values, dotted
keys such as ``optim.lr`` or ``model.hidden_dim``) and runs :func:`vcc_dist.train.st.train_st`,
whose TorchTrainer reserves the trial's workers and reports every checkpoint's validation
metrics to Tune through ``TuneReportCallback``. The objective is ``score``: the overall
challenge score (DES, PDS and MAE scaled against the cell-mean baseline, exactly cell-eval
0.8.2) on the split's validation perturbations; DES, PDS and MAE are reported with it.

- Scheduler: ASHA (early stopping on ``training_iteration`` = validations so far) or FIFO.
  Stopping a trial early ends its Train run; its placement group is released only when the
  Ray dashboard runs (ray issue 54305), so sweeps start Ray with the dashboard.
- Searcher: Optuna (TPE) or random; ``max_concurrent_trials`` derived from the cluster's CPUs
  and GPUs unless given.
- Trials are named by Tune's trial id (stable across a restore); each has its own ST run
  directory ``<run_dir>/trials/<trial id>`` with its checkpoints, CSVs and wandb run (one per
  trial, grouped by sweep).
- A trial that crashes is recorded (status ``error`` and the message) and the sweep goes on.
- Resume: running the same sweep again (same ``run_dir``) restores it with ``Tuner.restore``:
  finished trials are kept, unfinished ones resume from their latest checkpoint.

Run directory on object storage: ``run_dir="s3://bucket/prefix/sweep"`` keeps the whole sweep
there (vcc_dist.storage; endpoint and credentials from the AWS variables, which the Ray
workers must see too: set them before Ray starts, or in the cluster's environment). Tune's
own experiment state goes through a pyarrow S3 filesystem
(``RunConfig(storage_path="bucket/prefix", storage_filesystem=...)``, since Ray's own ``s3://``
resolution ignores ``AWS_ENDPOINT_URL``), and ``Tuner.can_restore``/``Tuner.restore`` use the
same filesystem, so a sweep resumes from object storage alone; each trial's ST run is
``s3://bucket/prefix/sweep/trials/<trial id>`` (vcc_dist.train.loop keeps its checkpoints
there); the outputs below are whole-object PUTs into the sweep's prefix. Nothing is written to
a local sweep directory (the plot is drawn in a temporary directory and uploaded). Tune
pickles its filesystem into the sweep (``tuner.pkl``), so that filesystem carries no keys: the
AWS SDK's default chain reads them from the same variables (:func:`sweep_location`).

Outputs in ``run_dir``: ``trials.csv`` (one row per trial: status, validations, best score and
its DES/PDS/MAE, every sampled value, run directory, error), ``best_recipe.json`` (the best
trial's complete config, which ``jobs/train_st.py --recipe`` accepts directly; pass a new
``--run-dir``), ``sweep.png`` (score by trial and score against each parameter),
``summary.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from vcc_dist import storage
from vcc_dist.config import ConfigError, check_dotted, check_ints, check_keys, merge, set_dotted
from vcc_dist.ray_utils import ensure_ray
from vcc_dist.train.st import STTrainConfig, st_recipe, train_st

#: named search spaces: dotted config key -> (kind, *args); kinds: loguniform, uniform,
#: choice, randint, grid (every value, for each of num_samples)
SPACES: dict[str, dict[str, tuple]] = {
    # CI and smoke tests: two cheap knobs of the debug recipe
    "debug": {"optim.lr": ("loguniform", 1e-4, 1e-2),
              "model.hidden_dim": ("choice", [16, 32])},
    # the main job's small sweep around the demo recipe (a few CPU minutes)
    "demo": {"optim.lr": ("loguniform", 1e-4, 3e-3),
             "model.hidden_dim": ("choice", [128, 256]),
             "model.cell_set_len": ("choice", [16, 32]),
             "loss": ("choice", ["energy", "mse"])},
    # the ST knobs that matter on the challenge's context generalisation
    "default": {"optim.lr": ("loguniform", 5e-5, 3e-3),
                "optim.weight_decay": ("loguniform", 1e-4, 1e-1),
                "model.hidden_dim": ("choice", [128, 256, 512]),
                "model.n_layers": ("choice", [1, 2, 4]),
                "model.cell_set_len": ("choice", [16, 32, 64]),
                "loss": ("choice", ["energy", "mse"]),
                "data.control_strategy": ("choice", ["random", "batch"])},
    # ST on SE embeddings: also the gene decoder's weight
    "se": {"optim.lr": ("loguniform", 5e-5, 3e-3),
           "model.hidden_dim": ("choice", [128, 256, 512]),
           "model.n_layers": ("choice", [1, 2, 4]),
           "model.cell_set_len": ("choice", [16, 32, 64]),
           "decoder_weight": ("loguniform", 0.1, 10.0),
           "data.control_strategy": ("choice", ["random", "batch"])},
}
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("optuna", "random")
TRIAL_DONE = "trial_done.json"
#: what a trial's driver function reserves: no CPU (it only waits on its TorchTrainer, which
#: reserves the workers), a token of memory (Tune refuses an empty request)
TRIAL_DRIVER = {"memory": 64 * 1024**2}


def tune_space(name: str | dict) -> dict[str, Any]:
    """Ray Tune domains for a named space (or a dict in the same format)."""
    spec = SPACES.get(name) if isinstance(name, str) else name
    if spec is None:
        raise ValueError(f"search space {name!r} is unknown; choose one of {tuple(SPACES)}")
    out = {}
    for key, (kind, *args) in spec.items():
        if kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "choice":
            out[key] = tune.choice(list(args[0]))
        elif kind == "randint":
            out[key] = tune.randint(*args)
        elif kind == "grid":
            out[key] = tune.grid_search(list(args[0]))
        else:
            raise ValueError(f"space {name!r}: {key} has unknown kind {kind!r}")
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        set_dotted(out, k, v)
    return out


@dataclass(frozen=True)
class SweepConfig:
    """One sweep; JSON-serialisable."""

    corpus: str
    split: str
    run_dir: str
    recipe: str = "demo"                 # the base ST recipe (name or file)
    space: str | dict = "default"        # a SPACES name, or a space in the same format
    num_samples: int = 16
    max_concurrent: int = 0              # 0: derived from the cluster's resources
    trial_workers: int = 1               # Ray Train workers per trial
    cpus_per_trial: float = 1.0          # CPUs per trial worker
    gpus_per_trial: float = 0.0          # GPUs per trial worker
    data_cpus: float = 1.0               # CPUs a trial's data stream needs (for the derivation)
    scheduler: str = "asha"
    searcher: str = "optuna"
    max_t: int = 0                       # ASHA: most validations per trial (0: the trial's own)
    grace_period: int = 1                # ASHA: validations before a trial can be stopped
    reduction_factor: int = 2
    max_steps: int = 0                   # optimizer steps per trial (0: the recipe's)
    checkpoint_every: int = 0            # validations every N steps (0: the recipe's)
    overrides: dict = field(default_factory=dict)   # nested train_st overrides for all trials
    wandb: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.space, dict):
            object.__setattr__(self, "space", {k: tuple(v) for k, v in self.space.items()})
        elif self.space not in SPACES:
            raise ValueError(f"space={self.space!r}: choose one of {tuple(SPACES)}")
        # every sampled key must be an option of the ST config tree (a typo would fail every
        # trial): checked now, before Ray starts
        for key in self.space_spec:
            try:
                check_dotted(STTrainConfig, key)
            except ConfigError as e:
                raise ConfigError(f"search space key {key!r}: {e}") from None
        check_keys(STTrainConfig, self.overrides)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r}: choose one of {SCHEDULERS}")
        if self.searcher not in SEARCHERS:
            raise ValueError(f"searcher={self.searcher!r}: choose one of {SEARCHERS}")
        check_ints(self, ("num_samples", "trial_workers", "grace_period", "reduction_factor"),
                   ("max_concurrent", "max_t", "max_steps", "checkpoint_every", "seed"))
        if not self.cpus_per_trial > 0 or self.gpus_per_trial < 0 or self.data_cpus < 0:
            raise ValueError("cpus_per_trial must be > 0, gpus_per_trial and data_cpus >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def base_config(self) -> dict[str, Any]:
        """The trials' common ST config (checked now, so a bad recipe fails before Ray)."""
        over = merge(self.overrides, {"num_workers": self.trial_workers,
                                      "cpus_per_worker": self.cpus_per_trial,
                                      "use_gpu": self.gpus_per_trial > 0, "seed": self.seed})
        if self.max_steps:
            over["max_steps"] = self.max_steps
        if self.checkpoint_every:
            over["checkpoint_every"] = self.checkpoint_every
        if self.wandb:
            over["wandb"] = dict(self.wandb)
        over.setdefault("wandb", {}).setdefault("group", storage.basename(self.run_dir))
        cfg = st_recipe(self.recipe, over, corpus=self.corpus, split=self.split,
                        run_dir=str(storage.join(self.run_dir, "trials", "_check")))
        if not cfg.split or not cfg.val_role:
            raise ValueError("a sweep needs a split with validation perturbations (its "
                             "objective is the validation score)")
        return cfg.to_dict()

    @property
    def space_spec(self) -> dict[str, tuple]:
        return self.space if isinstance(self.space, dict) else SPACES[self.space]


def derive_concurrency(cfg: SweepConfig, resources: dict[str, float]) -> int:
    """Trials that fit the cluster at once: CPUs for the trial's workers and its data stream,
    and GPUs when trials use them."""
    cpus = resources.get("CPU", 1)
    reserve = cfg.trial_workers * cfg.cpus_per_trial
    n = int(cpus // max(reserve + cfg.data_cpus, 1e-9))
    # Ray Data's read tasks take one whole CPU each: reservations must leave one free, or
    # every trial waits forever for its data
    n = min(n, int(max(cpus - 1, 0) // reserve))
    if cfg.gpus_per_trial > 0:
        n = min(n, int(resources.get("GPU", 0) // (cfg.trial_workers * cfg.gpus_per_trial)))
    return max(1, n)


def sweep_location(run_dir: str | Path) -> tuple[str, Any]:
    """Where Tune keeps the sweep's experiment state: ``(path, filesystem)`` for
    ``Tuner.can_restore``/``Tuner.restore`` and ``RunConfig``. A local sweep: its absolute path
    and None (Tune's own resolution); on object storage: ``"bucket/prefix/sweep"`` on a pyarrow
    S3 filesystem configured from the AWS variables (vcc_dist.storage.pyarrow_filesystem)."""
    if not storage.is_remote(run_dir):
        return str(Path(run_dir).resolve()), None
    # Tune pickles its RunConfig, filesystem included, into the sweep (tuner.pkl): the
    # filesystem made from the AWS variables carries no keys (the AWS SDK's default chain reads
    # those same variables in every process), so they are never written to the bucket
    fs, parent = storage.pyarrow_filesystem(str(storage.parent(run_dir)))
    return f"{parent}/{storage.basename(run_dir)}", fs


def can_restore(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` (a local path or ``s3://`` URI) holds a sweep Tune can restore."""
    path, fs = sweep_location(run_dir)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def _trial(config: dict, base: dict, sweep_dir: str) -> None:
    """One trial (a Tune driver function): train ST with the sampled values."""
    trial_id = tune.get_context().get_trial_id()
    d = merge(base, _nest(config))
    run_dir = storage.join(sweep_dir, "trials", trial_id)
    d["run_dir"], d["name"] = str(run_dir), trial_id
    cfg = STTrainConfig.from_dict(d)
    res = train_st(cfg, progress=False, callbacks=[TuneReportCallback()])
    storage.write_json(storage.join(run_dir, TRIAL_DONE),
                       {"trial_id": trial_id, "best_checkpoint": str(res.best_checkpoint),
                        "return_value": res.return_value})


@dataclass
class SweepResult:
    run_dir: Path | str          # an s3:// URI (str) for a sweep on object storage
    trials: Any                  # pandas.DataFrame (trials.csv)
    best_recipe: Path | str | None
    best: dict | None
    plot: Path | str | None
    wall_s: float


def run_sweep(cfg: SweepConfig, *, progress: bool = True, resume: bool = True) -> SweepResult:
    """Run (or restore and finish) a sweep; see the module docstring."""
    t0 = time.perf_counter()
    remote = storage.is_remote(cfg.run_dir)
    run_dir: Path | str = (storage.location(cfg.run_dir) if remote
                           else Path(cfg.run_dir).resolve())
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    base = cfg.base_config()
    if not remote:
        run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_json(storage.join(run_dir, "sweep_config.json"), cfg.to_dict())
    # ASHA's early stops release their Train placement groups only with the dashboard running
    ensure_ray(include_dashboard=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    res = ray.cluster_resources()
    if res.get("CPU", 0) - cfg.trial_workers * cfg.cpus_per_trial < 1:
        raise ValueError(f"a trial reserves {cfg.trial_workers} x {cfg.cpus_per_trial} CPUs of the "
                         f"cluster's {res.get('CPU', 0):g}: Ray Data needs one more for the "
                         "trial's data; lower --cpus-per-trial or --trial-workers")
    conc = cfg.max_concurrent or derive_concurrency(cfg, res)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, sweep_dir=str(run_dir)), TRIAL_DRIVER)
    exp_path, exp_fs = sweep_location(run_dir)
    if resume and tune.Tuner.can_restore(exp_path, storage_filesystem=exp_fs):
        if progress:
            print(f"[tune] restoring the sweep in {run_dir}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=False,
                                   restart_errored=False, resume_unfinished=True,
                                   storage_filesystem=exp_fs)
    else:
        if cfg.scheduler == "asha":
            sched = ASHAScheduler(time_attr="training_iteration",
                                  max_t=cfg.max_t or 10_000, grace_period=cfg.grace_period,
                                  reduction_factor=cfg.reduction_factor)
        else:
            sched = FIFOScheduler()
        searcher = None
        if cfg.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=cfg.seed)
        name = lambda t: f"trial_{t.trial_id}"  # noqa: E731  stable: no timestamps
        tuner = tune.Tuner(
            trainable, param_space=tune_space(cfg.space_spec),
            tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=sched,
                                        search_alg=searcher, num_samples=cfg.num_samples,
                                        max_concurrent_trials=conc,
                                        trial_name_creator=name, trial_dirname_creator=name),
            run_config=tune.RunConfig(name=storage.basename(run_dir),
                                      storage_path=(exp_path.rsplit("/", 1)[0] if remote
                                                    else str(run_dir.parent)),
                                      storage_filesystem=exp_fs,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      # Tune's own status table ranks trials by their
                                      # *last* result; the sweep's one ranking (best over a
                                      # trial's validations) is printed after fit
                                      verbose=0))
    if progress:
        print(f"[tune] {cfg.num_samples} samples of space {cfg.space!r} on recipe "
              f"{cfg.recipe!r}, {conc} at a time, {cfg.scheduler} + {cfg.searcher}; "
              f"trial runs in {storage.join(run_dir, 'trials')}", flush=True)
    grid = tuner.fit()
    table = trials_table(grid, run_dir, list(cfg.space_spec))
    storage.write_bytes(storage.join(run_dir, "trials.csv"), table.to_csv(index=False).encode())
    best, best_recipe = None, None
    ok = table[table["best_score"].notna()]
    if len(ok):
        row = ok.loc[ok["best_score"].idxmax()]
        best = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in row.to_dict().items()}
        trial_cfg = storage.read_json(storage.join(row["run_dir"], "config.json"))
        recipe = {k: v for k, v in trial_cfg.items() if k not in ("run_dir", "name")}
        recipe["wandb"] = {k: v for k, v in recipe.get("wandb", {}).items() if k != "group"}
        best_recipe = storage.join(run_dir, "best_recipe.json")
        storage.write_json(best_recipe, recipe)
    plot = plot_sweep(table, list(cfg.space_spec), storage.join(run_dir, "sweep.png"))
    summary = {"trials": len(table), "by_status": table["status"].value_counts().to_dict(),
               "best": best, "best_recipe": str(best_recipe) if best_recipe else None,
               "max_concurrent": conc, "wall_s": time.perf_counter() - t0}
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    if progress:
        for _, r in table.iterrows():
            print(f"[tune] trial {r['trial_id']}: {r['status']}, {r['validations']} validations, "
                  f"best validation score {r.get('best_score')}", flush=True)
        if best is not None:
            print(f"[tune] best trial {best['trial_id']} by validation score (its best over "
                  f"{best['validations']} validations): {best['best_score']:.4f}; recipe "
                  f"{best_recipe}", flush=True)
    return SweepResult(run_dir, table, best_recipe, best, plot, summary["wall_s"])


def _done(trial_run: Path | str) -> bool:
    """Whether a trial's driver function returned (it writes TRIAL_DONE last)."""
    marker = storage.join(trial_run, TRIAL_DONE)
    return storage.exists(marker) if storage.is_remote(marker) else marker.is_file()


def trials_table(grid, run_dir: Path | str, params: list[str]):
    """One row per trial: status (completed / stopped early / error), validations, the best
    validation score with its DES/PDS/MAE, the sampled values, run directory and error."""
    rows = []
    for r in grid:
        cfg = r.config or {}
        # a trial's Tune directory, on the sweep's filesystem ("bucket/key/..." on S3)
        tid = str(r.path).rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_") if r.path else None
        trial_run = storage.join(run_dir, "trials", str(tid))
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        row: dict[str, Any] = {"trial_id": tid}
        if r.error is not None:
            row["status"] = "error"
        elif _done(trial_run):
            row["status"] = "completed"
        else:
            row["status"] = "stopped early"
        row["validations"] = int(len(hist))
        if len(hist) and "score" in hist:
            b = hist.loc[hist["score"].idxmax()]
            row["best_score"] = float(b["score"])
            for m, col in (("DES", "val_overlap_at_N"), ("PDS", "val_discrimination_score_l1"),
                           ("MAE", "val_mae")):
                row[m] = float(b[col]) if col in b else float("nan")
            row["best_step"] = int(b["step"]) if "step" in b else None
        else:
            row["best_score"] = float("nan")
        for p in params:
            row[p] = cfg.get(p)
        row["run_dir"] = str(trial_run)
        row["error"] = (str(r.error).strip().splitlines() or [""])[-1][:300] if r.error else ""
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values("trial_id").reset_index(drop=True) if len(df) else df


def plot_sweep(table, params: list[str], path: Path | str) -> Path | str | None:
    """Score by trial (coloured by status) and score against each sampled parameter; ``path``
    on object storage: drawn in a temporary directory and uploaded (one PUT)."""
    if table is None or not len(table):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = 1 + len(params)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    colors = {"completed": "tab:blue", "stopped early": "tab:orange", "error": "tab:red"}
    ax = axes[0][0]
    x = np.arange(len(table))
    for st, c in colors.items():
        m = (table["status"] == st).to_numpy()
        ax.scatter(x[m], table["best_score"].to_numpy(float)[m], c=c, label=st, s=25)
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation score")
    ax.set_title("score by trial")
    ax.legend(fontsize=7)
    for i, p in enumerate(params, start=1):
        ax = axes[i // cols][i % cols]
        vals = table[p]
        y = table["best_score"].to_numpy(float)
        if vals.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all():
            xv = vals.to_numpy(float)
            ax.scatter(xv, y, s=25)
            if np.nanmin(xv) > 0 and np.nanmax(xv) / max(np.nanmin(xv), 1e-30) > 50:
                ax.set_xscale("log")
        else:
            cats = sorted({str(v) for v in vals})
            ax.scatter([cats.index(str(v)) for v in vals], y, s=25)
            ax.set_xticks(range(len(cats)), cats, fontsize=7)
        ax.set_title(p, fontsize=9)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="vcc-sweep-") as tmpdir:
            local = Path(tmpdir) / "sweep.png"
            fig.savefig(local, dpi=110)
            plt.close(fig)
            storage.write_bytes(path, local.read_bytes())
        return storage.location(path)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["SPACES", "SweepConfig", "SweepResult", "can_restore", "derive_concurrency",
           "run_sweep", "sweep_location", "trials_table", "tune_space"]
