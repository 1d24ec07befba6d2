"""ST training on Ray Train + DeepSpeed (DESIGN.md §5).

    cfg = st_recipe("demo", corpus="runs/demo/corpus", split="runs/demo/sim/split.toml",
                    run_dir="runs/demo/st")
    result = train_st(cfg)            # embedded local Ray unless RAY_ADDRESS / a cluster
    result.best_checkpoint            # a directory: DeepSpeed state + manifest.json + features

What happens:

1. **Preparation** (driver, cached in ``<run_dir>/prep``): the training pseudobulks of every
   (context, perturbation) group, the perturbation feature table ``[C, P, D]``
   (vcc_dist.train.st_data), and the validation cells: the split's ``val`` perturbations of
   the held-out context with that context's controls. Their challenge summaries are computed
   once, as are the cell-mean reference (the score's 0) and the context-mean baseline's
   metrics, so every validation reports the model next to them.
2. **Training** (``num_workers`` Ray Train workers): each consumes its shard of the set stream
   (vcc_dist.data.streams.set_stream) and steps a DeepSpeed engine (vcc_dist.train.engine:
   ZeRO stage, precision, accumulation, clipping, AdamW with warm-up + cosine). Loss: energy
   distance between predicted and real perturbed sets (or Sinkhorn / MSE), plus the gene
   decoder's term for embedding-space models.
3. **Validation and checkpoints** every ``checkpoint_every`` optimizer steps and at the end of
   every epoch: all ranks predict the validation perturbations (sets split over ranks), rank 0
   scores them with the challenge metrics (DES, PDS, MAE, score against cell-mean: exactly
   vcc_dist.metrics, i.e. cell-eval 0.8.2) and every rank saves its DeepSpeed shard; Ray
   merges them into one checkpoint with a manifest (model config, genes, perturbations,
   contexts, feature table and sources, corpus fingerprint, normalisation, stream position).
   The best ``keep_checkpoints`` by validation score are kept, and the latest.
4. **Fault tolerance**: a killed worker restarts the worker group (``max_failures``) from the
   latest checkpoint; the stream resumes at the checkpoint's epoch, skipping the batches it
   had consumed (a named position board actor tells the datasource, see streams.py). Running
   the same command again (same ``run_dir``) resumes the run from its latest checkpoint.
5. **Logging** from rank 0 (vcc_dist.train.runlog): ``metrics_train.csv``,
   ``metrics_val.csv``, wandb (offline unless configured), ``curves.png`` at the end.

Normalisation: cells are ``log1p(normalize_total)`` with each store (source file) scaled to its
own median total (``data.target_sum="store"``), which is how cell-eval normalises a file: the
model's predictions are in the space the challenge scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vcc_dist.data.plans import SetStreamConfig, StreamPosition
from vcc_dist.train.engine import EngineConfig, OptimConfig

LOSSES = ("energy", "sinkhorn", "mse")
CHECKPOINT_KIND = "vcc-dist/st-checkpoint"
MANIFEST = "manifest.json"
FEATURES = "features.npy"
DS_DIR, DS_TAG = "deepspeed", "state"


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the corpus, split or features it is used with."""


def _from_dict(cls, d: dict, what: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid: {sorted(known)}")
    return cls(**d)


@dataclass(frozen=True)
class STTrainConfig:
    """Everything one ST run needs; JSON-serialisable (it crosses into Ray workers)."""

    corpus: str
    split: str | None
    run_dir: str
    preset: str = "debug"                  # vcc_dist.models.st presets: debug, state_sm
    model: dict = field(default_factory=dict)   # STConfig overrides
    features: tuple[str, ...] = ("onehot",)     # "onehot", "transfer", or {gene: vector} .pt paths
    data: dict = field(default_factory=dict)    # SetStreamConfig fields (set_size from the model)
    optim: dict = field(default_factory=dict)   # OptimConfig fields (total_steps derived if 0)
    engine: dict = field(default_factory=dict)  # EngineConfig fields
    loss: str = "energy"
    decoder_weight: float = 1.0
    epochs: int = 1
    max_steps: int = 0                     # optimizer steps; 0 = epochs x steps per epoch
    checkpoint_every: int = 0              # optimizer steps; 0 = end of each epoch only
    keep_checkpoints: int = 2
    log_every: int = 10
    val_role: str = "val"                  # split role scored during training ("" = none)
    val_max_cells: int = 256               # real cells per validation perturbation (sampled)
    val_max_controls: int = 512
    val_sets_per_batch: int = 16
    pseudobulk_max_cells: int = 2000
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    torch_threads: int = 0                 # intra-op threads per worker; 0 = Ray's (its CPUs)
    use_gpu: bool = False
    max_failures: int = 2
    seed: int = 0
    record_batches: bool = False           # workers/batches.jsonl: every (rank, epoch, step) consumed
    wandb: dict = field(default_factory=dict)   # vcc_dist.train.runlog.WandbConfig fields
    name: str = ""                         # run name (default: basename of run_dir)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        for k in ("model", "data", "optim", "engine", "wandb"):
            if not isinstance(getattr(self, k), dict):
                raise TypeError(f"STTrainConfig.{k} must be a dict of options")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: choose one of {LOSSES}")
        for k in ("epochs", "keep_checkpoints", "log_every", "num_workers", "val_max_cells",
                  "val_max_controls", "val_sets_per_batch", "pseudobulk_max_cells"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"STTrainConfig.{k}={v!r} must be a positive integer")
        for k in ("max_steps", "checkpoint_every", "max_failures", "seed", "torch_threads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"STTrainConfig.{k}={v!r} must be an integer >= 0")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker} must be > 0")
        if not self.decoder_weight >= 0:
            raise ValueError(f"decoder_weight={self.decoder_weight} must be >= 0")
        if not self.features:
            raise ValueError("features is empty: use 'onehot', 'transfer' or a .pt file")
        # fail here, not inside a worker
        self.optim_config(1)
        EngineConfig(**{"seed": self.seed, **self.engine})
        self.stream_config()

    # -- derived configs --
    @property
    def run_name(self) -> str:
        return self.name or Path(self.run_dir).name

    def stream_config(self) -> SetStreamConfig:
        from vcc_dist.models.st import _PRESETS

        d = {"set_size": self.model.get("cell_set_len", _PRESETS.get(self.preset, {})
                                        .get("cell_set_len", 128)),
             "target_sum": "store", "seed": self.seed, **self.data}
        try:
            return SetStreamConfig(**d)
        except TypeError as e:
            raise ValueError(f"data options: {e}; valid: "
                             f"{[f.name for f in dataclasses.fields(SetStreamConfig)]}") from None

    def optim_config(self, total_steps: int) -> OptimConfig:
        d = dict(self.optim)
        if not d.get("total_steps"):
            d["total_steps"] = max(int(total_steps), 2)
        if "warmup_steps" not in d:
            d["warmup_steps"] = min(100, max(1, d["total_steps"] // 10))
        d["warmup_steps"] = min(int(d["warmup_steps"]), d["total_steps"] - 1)
        return _from_dict(OptimConfig, d, "optim")

    def engine_config(self) -> EngineConfig:
        return _from_dict(EngineConfig, {"seed": self.seed, **self.engine}, "engine")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STTrainConfig:
        return _from_dict(cls, dict(d), "STTrainConfig")


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

_RECIPES: dict[str, dict[str, Any]] = {
    # seconds on CPU: tests and smoke runs
    "debug": {"preset": "debug", "model": {"cell_set_len": 8, "residual": "input",
                                           "n_batches": "auto"},
              "data": {"batch_size": 4, "block_rows": 4},
              "features": ["onehot", "transfer"], "epochs": 2,
              "optim": {"lr": 1e-3, "warmup_steps": 2}, "engine": {"zero_stage": 2},
              "log_every": 2, "val_max_cells": 64, "val_max_controls": 128},
    # the main job's model: a few CPU minutes on the small simulated data set
    "demo": {"preset": "debug",
             "model": {"hidden_dim": 256, "n_encoder_layers": 2, "n_decoder_layers": 2,
                       "n_layers": 2, "n_heads": 4, "ffn_dim": 512, "cell_set_len": 32,
                       "residual": "input", "feature_shift": True, "zero_init_output": True},
             "data": {"batch_size": 8, "block_rows": 8},
             "features": ["transfer", "onehot"], "epochs": 8,
             "optim": {"lr": 3e-4, "weight_decay": 0.01}, "engine": {"zero_stage": 2},
             "log_every": 10},
    # STATE's state_sm shape (set 128, hidden 672, 4+4 MLP layers, 4 Llama layers x 8 heads),
    # STATE's VCC batch of 16 sets
    "state_sm": {"preset": "state_sm", "data": {"batch_size": 16, "block_rows": 32},
                 "features": ["onehot"], "epochs": 1, "optim": {"lr": 1e-4},
                 "engine": {"zero_stage": 2}},
}
RECIPES = tuple(_RECIPES)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section")
    cur[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings (dotted keys into sections, values parsed as JSON when they
    parse, else kept as strings) -> a nested dict."""
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"override {p!r} is not key=value (e.g. optim.lr=3e-4)")
        k, v = p.split("=", 1)
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        _set_dotted(out, k.strip(), val)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def st_recipe(recipe: str | os.PathLike, overrides: dict | None = None, **top: Any) -> STTrainConfig:
    """A complete config from a named recipe (``RECIPES``) or a JSON/YAML recipe file (e.g.
    the best config a Tune sweep wrote), merged with nested ``overrides`` and top-level
    keyword values (corpus, split, run_dir, ...)."""
    if str(recipe) in _RECIPES:
        base = json.loads(json.dumps(_RECIPES[str(recipe)]))
    else:
        path = Path(recipe)
        if not path.is_file():
            raise ValueError(f"recipe {str(recipe)!r} is neither a named recipe {RECIPES} nor a "
                             "file")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            base = yaml.safe_load(text)
        else:
            base = json.loads(text)
        if not isinstance(base, dict):
            raise ValueError(f"recipe file {path} must hold a mapping of options")
    d = _merge(base, overrides or {})
    d = _merge(d, {k: v for k, v in top.items() if v is not None})
    missing = [k for k in ("corpus", "run_dir") if not d.get(k)]
    if missing:
        raise ValueError(f"the config needs {missing} (e.g. --corpus, --run-dir)")
    d.setdefault("split", None)
    return STTrainConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------
# preparation (driver)
# ---------------------------------------------------------------------------------------------


@dataclass
class Prep:
    """What the driver prepares once and every worker reads (``<run_dir>/prep``)."""

    dir: Path
    model_config: dict
    genes: list[str]
    labels: dict
    features: np.ndarray          # [C, P, D]
    feature_sources: list[dict]
    corpus_fingerprint: str
    normalization: dict
    val: dict | None              # heldout cells (vcc_dist.train.st_data.HeldOut as dict)
    baselines: dict               # name -> aggregated val metrics
    steps_per_epoch: int
    batches_per_epoch: int

    def manifest(self) -> dict:
        return {"model_config": self.model_config, "genes": self.genes, "labels": self.labels,
                "feature_sources": self.feature_sources, "feature_shape": list(self.features.shape),
                "corpus_fingerprint": self.corpus_fingerprint,
                "normalization": self.normalization, "val": self.val,
                "baselines": self.baselines, "steps_per_epoch": self.steps_per_epoch,
                "batches_per_epoch": self.batches_per_epoch}

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        np.save(self.dir / FEATURES, self.features)
        _atomic_json(self.dir / "prep.json", self.manifest())

    @classmethod
    def load(cls, d: str | os.PathLike) -> Prep:
        d = Path(d)
        m = json.loads((d / "prep.json").read_text())
        return cls(d, m["model_config"], m["genes"], m["labels"], np.load(d / FEATURES),
                   m["feature_sources"], m["corpus_fingerprint"], m["normalization"], m["val"],
                   m["baselines"], m["steps_per_epoch"], m["batches_per_epoch"])


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _prep_key(cfg: STTrainConfig) -> dict:
    return {"corpus": str(Path(cfg.corpus).resolve()), "split": cfg.split,
            "features": list(cfg.features), "data": dataclasses.asdict(cfg.stream_config()),
            "val": [cfg.val_role, cfg.val_max_cells, cfg.val_max_controls],
            "pb": cfg.pseudobulk_max_cells, "model": cfg.model, "preset": cfg.preset,
            "workers": cfg.num_workers, "seed": cfg.seed}


def prepare(cfg: STTrainConfig, *, progress: bool = False) -> Prep:
    """Pseudobulks, features, validation cells and their baselines; cached in run_dir/prep."""
    from vcc_dist.data.streams import set_plan
    from vcc_dist.models.st import st_preset
    from vcc_dist.train.st_data import (
        build_features,
        corpus_fingerprint,
        group_means,
        heldout_groups,
    )

    d = Path(cfg.run_dir) / "prep"
    key = _prep_key(cfg)
    try:
        if json.loads((d / "key.json").read_text()) == key:
            return Prep.load(d)
    except (OSError, ValueError, KeyError):
        pass
    scfg = cfg.stream_config()
    plan, reader = set_plan(cfg.corpus, scfg, cfg.split)
    labels = plan.labels
    means = group_means(plan, reader, max_cells=cfg.pseudobulk_max_cells, seed=cfg.seed,
                        progress=progress)
    table = build_features(cfg.features, labels.contexts, labels.perturbations, means)
    model_over = {k: v for k, v in cfg.model.items() if k not in ("n_genes", "pert_dim")}
    if model_over.get("n_batches") == "auto":  # one embedding per experimental batch
        model_over["n_batches"] = len(labels.batches)
    mcfg = st_preset(cfg.preset, n_genes=reader.n_genes, pert_dim=table.dim, **model_over)
    if mcfg.feature_shift and cfg.features[0] != "transfer":
        raise ValueError("model.feature_shift adds the first features to the prediction: they "
                         "must be 'transfer' (put it first in features)")
    if mcfg.output_space != "genes":
        raise ValueError("output_space='embedding' trains on SE cell embeddings, which the "
                         "corpus gets from jobs/embed_cells.py (SE issue); use 'genes' here")
    units = plan.epoch_units("train", 0, cfg.num_workers)
    n_batches = sum(u.n_batches for u in units)
    spe = (n_batches // cfg.num_workers) // cfg.optim_config(2).grad_accum_steps
    if spe < 1:
        raise ValueError(f"one epoch has {n_batches} batches for {cfg.num_workers} workers x "
                         f"grad_accum_steps: fewer than one optimizer step; lower data.batch_size"
                         " or grad_accum_steps")
    val, baselines = None, {}
    if cfg.val_role and cfg.split:
        try:
            held = heldout_groups(plan, cfg.val_role, max_cells=cfg.val_max_cells,
                                  max_controls=cfg.val_max_controls, seed=cfg.seed)
        except ValueError as e:
            if "has no" not in str(e):
                raise
            held = None
        if held is not None:
            val = held.to_dict()
            baselines = _val_baselines(reader, held, means, d)
    norm = {"target_sum": scfg.target_sum, "log1p": scfg.log1p,
            "store_targets": None if reader.store_targets is None
            else [float(x) for x in reader.store_targets], "corpus_median": reader.target_sum}
    prep = Prep(d, mcfg.to_dict(), list(reader.genes), labels.to_json(), table.table,
                table.sources, corpus_fingerprint(reader), norm, val, baselines, spe, n_batches)
    prep.save()
    _atomic_json(d / "key.json", key)
    return prep


def _dense(reader, st, rows) -> np.ndarray:
    return reader.dense(reader.read_many(st, rows, normalize=True))


def _held_adata(values: list[np.ndarray], perts: list[str], ctrl: np.ndarray, genes: list[str]):
    import anndata as ad
    import pandas as pd

    from vcc_dist.constants import CONTROL_LABEL, PERT_KEY

    x = np.vstack([*values, ctrl]).astype(np.float32)
    lab = np.concatenate([np.repeat(np.array(perts, dtype=object), [v.shape[0] for v in values]),
                          np.full(ctrl.shape[0], CONTROL_LABEL, dtype=object)])
    obs = pd.DataFrame({PERT_KEY: pd.Categorical(lab.astype(str))},
                       index=pd.Index(np.arange(x.shape[0]).astype(str)))
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))


def _val_baselines(reader, held, means, prep_dir: Path) -> dict:
    """Summaries of the real validation cells, and the cell-mean and context-mean baselines'
    metrics on them (cell-mean is the score's reference)."""
    from vcc_dist.metrics import vcc

    prep_dir.mkdir(parents=True, exist_ok=True)
    ctrl = _dense(reader, *held.control)
    real = [_dense(reader, st, rw) for st, rw in held.cells]
    genes = list(reader.genes)
    real_s = vcc.summarize(_held_adata(real, held.perts, ctrl, genes), what="val real")
    real_s.save(prep_dir / "val_real.npz")
    cm = means.cell_mean()
    cm_pred = [np.repeat(cm[None], r.shape[0], 0) for r in real]
    tr = means.transfer()[held.context_index]
    rng = np.random.default_rng(0)
    ctx_pred = [np.maximum(ctrl[rng.integers(0, ctrl.shape[0], r.shape[0])] + tr[p], 0)
                for r, p in zip(real, held.pert_index)]
    out = {}
    cm_s = vcc.summarize(_held_adata(cm_pred, held.perts, ctrl, genes), what="cell-mean")
    out["cell-mean"] = vcc.evaluate(real_s, cm_s).agg
    ctx_s = vcc.summarize(_held_adata(ctx_pred, held.perts, ctrl, genes), what="context-mean")
    ev = vcc.evaluate(real_s, ctx_s, baseline_agg=out["cell-mean"])
    out["context-mean"] = {**ev.agg, "score": float(ev.scores["avg_score"])}
    out["cell-mean"]["score"] = 0.0
    return {k: {m: float(v) for m, v in d.items()} for k, d in out.items()}


# ---------------------------------------------------------------------------------------------
# the per-worker loop
# ---------------------------------------------------------------------------------------------


class _Validator:
    """Predicts the validation perturbations (sets split over ranks) and scores them (rank 0)."""

    def __init__(self, prep: Prep, cfg: STTrainConfig, rank: int, world: int):
        from vcc_dist.data.reader import CorpusReader
        from vcc_dist.infer.st_predict import plan_sets
        from vcc_dist.metrics import vcc

        v = prep.val
        self.rank, self.world, self.cfg = rank, world, cfg
        reader = CorpusReader(cfg.corpus, genes=prep.genes, target_sum=cfg.stream_config().target_sum)
        cst, crw = (np.asarray(a) for a in v["control"])
        self.ctrl = _dense(reader, cst, crw)
        self.perts = list(v["perts"])
        self.counts = [len(c[1]) for c in v["cells"]]
        self.ctrl_batch = None
        if int(prep.model_config.get("n_batches", 0)):
            from vcc_dist.data.labels import corpus_labels
            from vcc_dist.infer.st_predict import control_batches

            self.ctrl_batch = control_batches(reader, corpus_labels(reader)[0], cst, crw)
        self.feats = prep.features[v["context_index"], np.asarray(v["pert_index"])]
        S = int(prep.model_config["cell_set_len"])
        self.plan = plan_sets(self.counts, self.ctrl.shape[0], S, seed=cfg.seed)
        self.genes = prep.genes
        self.real = vcc.FileSummary.load(prep.dir / "val_real.npz") if rank == 0 else None
        self.ref = prep.baselines.get("cell-mean")

    def __call__(self, forward) -> dict[str, float]:
        import torch.distributed as dist

        from vcc_dist.infer.st_predict import run_sets
        from vcc_dist.metrics import vcc

        mine = list(run_sets(forward, self.plan, self.ctrl, self.feats,
                             sets_per_batch=self.cfg.val_sets_per_batch, rank=self.rank,
                             world_size=self.world, batch_index=self.ctrl_batch))
        parts = [None] * self.world if self.world > 1 else [mine]
        if self.world > 1:
            dist.all_gather_object(parts, mine)
        if self.rank != 0:
            return {}
        by_set = dict(kv for p in parts for kv in p)
        preds = [[] for _ in self.perts]
        for k in range(self.plan.pert.size):
            preds[self.plan.pert[k]].append(by_set[k])
        values = [np.vstack(p) for p in preds]
        pred = _held_adata(values, self.perts, self.ctrl, self.genes)
        ev = vcc.evaluate(self.real, vcc.summarize(pred, what="val pred"),
                          baseline_agg=self.ref)
        out = {m: float(ev.agg[m]) for m in vcc.METRICS}  # overlap_at_N (DES), PDS, MAE
        out["score"] = float(ev.scores["avg_score"]) if ev.scores is not None else float("nan")
        return out


def _check_resume(manifest: dict, prep: Prep) -> None:
    """Refuse to resume a run whose checkpoint was made with other data or features."""
    pm = prep.manifest()

    def sources(m):  # kind, dim and file checksum (a moved file is the same features)
        return [(f.get("kind"), f.get("dim"), f.get("sha256")) for f in m.get("feature_sources", [])]

    if sources(manifest) != sources(pm):
        raise CheckpointMismatch(
            f"the run's latest checkpoint was trained with other perturbation features "
            f"({sources(manifest)}) than this config gives ({sources(pm)}); use a new run_dir "
            "(or the original features) to resume")
    for key, what in (("corpus_fingerprint", "corpus"), ("genes", "gene vocabulary"),
                      ("labels", "perturbation/context labels"),
                      ("feature_shape", "perturbation feature table shape"),
                      ("model_config", "model config")):
        if manifest.get(key) != pm.get(key):
            raise CheckpointMismatch(
                f"the run's latest checkpoint was trained with another {what} than this "
                f"config gives; use a new run_dir (or the original config) to resume")


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train worker function (see the module docstring)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from vcc_dist.data.streams import set_board
    from vcc_dist.infer.st_predict import make_forward
    from vcc_dist.models.losses import st_loss
    from vcc_dist.models.st import STConfig, STModel
    from vcc_dist.train.engine import build_engine, load_checkpoint, save_checkpoint
    from vcc_dist.train.runlog import RunLogger, WandbConfig

    cfg = STTrainConfig.from_dict(config["cfg"])
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    prep = Prep.load(config["prep_dir"])
    board = config["board"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(cfg.run_dir)
    # observability (and the kill-a-worker test): each rank's process id
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (run_dir / "workers" / f"rank{rank}.pid").write_text(str(os.getpid()))

    mcfg = STConfig.from_dict(prep.model_config)
    model = STModel(mcfg)
    optim_cfg = OptimConfig(**config["optim"])
    engine, _ = build_engine(model, cfg.engine_config(), optim_cfg,
                             micro_batch_size=cfg.stream_config().batch_size)
    device = engine.device
    dtype = next(engine.module.parameters()).dtype
    feats = torch.from_numpy(prep.features).to(device)
    accum = optim_cfg.grad_accum_steps
    B = cfg.stream_config().batch_size
    S = mcfg.cell_set_len
    max_steps = config["max_steps"]

    state = {"epoch": 0, "consumed": [], "step": 0, "best_score": None}
    resumed = False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            man = json.loads((Path(d) / MANIFEST).read_text())
            _check_resume(man, prep)
            client = load_checkpoint(engine, Path(d) / DS_DIR, tag=DS_TAG)
            state = dict(client["trainer"])
            resumed = True

    logger = RunLogger(run_dir, run_name=cfg.run_name, config=cfg.to_dict(),
                       wandb=WandbConfig.from_dict(cfg.wandb), enabled=rank == 0,
                       resume_step=state["step"] if resumed else None)
    if rank == 0 and resumed:
        print(f"[st] resumed from step {state['step']} (epoch {state['epoch']}, "
              f"{len(state['consumed'])} batches of it done)", flush=True)
    validator = _Validator(prep, cfg, rank, world) if prep.val else None
    shard = ray.train.get_dataset_shard("train")

    step = int(state["step"])
    last_val: dict[str, float] = {}

    def checkpoint(epoch_next: int, consumed: list[int]) -> None:
        nonlocal last_val
        metrics: dict[str, Any] = {"step": step, "epoch": epoch_next}
        if validator is not None:
            engine.eval()
            vals = validator(make_forward(engine.module, device=device, dtype=dtype))
            engine.train()
            if rank == 0:
                last_val = vals
                logger.log(step, vals, kind="val")
                metrics.update({f"val_{k}": v for k, v in vals.items()})
                if state["best_score"] is None or vals["score"] > state["best_score"]:
                    state["best_score"] = vals["score"]
        score = metrics.get("val_score", float(step))
        best = [state["best_score"]]
        if world > 1:
            dist.broadcast_object_list(best, src=0)
            score_l = [score]
            dist.broadcast_object_list(score_l, src=0)
            score = score_l[0]
        state["best_score"] = best[0]
        trainer_state = {"epoch": epoch_next, "consumed": sorted(consumed), "step": step,
                         "best_score": state["best_score"]}
        with tempfile.TemporaryDirectory(prefix="vcc-st-ckpt-") as tmp:
            save_checkpoint(engine, Path(tmp) / DS_DIR, DS_TAG, {"trainer": trainer_state})
            if rank == 0:
                np.save(Path(tmp) / FEATURES, prep.features)
                _atomic_json(Path(tmp) / MANIFEST, {
                    "kind": CHECKPOINT_KIND, **prep.manifest(), "train_config": cfg.to_dict(),
                    "optim": config["optim"], "trainer_state": trainer_state,
                    "val_metrics": last_val, "saved_at": time.time()})
            metrics["score"] = score  # the checkpoint ranking (validation score, else step)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def record(obj: dict) -> None:
        if cfg.record_batches:
            with open(run_dir / "workers" / "batches.jsonl", "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "rank": rank, **obj}) + "\n")

    if resumed:
        record({"event": "resume", "epoch": state["epoch"], "consumed": state["consumed"],
                "step": state["step"]})
    t_last, cells_since, t_start = time.perf_counter(), 0, time.perf_counter()
    done = step >= max_steps
    epoch = int(state["epoch"])
    while not done and epoch < cfg.epochs:
        consumed_before = list(state["consumed"]) if epoch == state["epoch"] else []
        if rank == 0:
            set_board(board, StreamPosition(epoch, tuple(consumed_before)))
        if world > 1:
            dist.barrier()
        mine: list[int] = []
        micro = 0
        for batch in shard.iter_torch_batches(batch_size=B):
            ctrl = batch["ctrl"].to(device=device, dtype=dtype)
            target = batch["pert"].to(device=device, dtype=dtype)
            f = feats[batch["context_index"].long().to(device), batch["pert_index"].long().to(device)]
            # each predicted cell keeps the batch of the control cell it comes from
            bidx = batch["ctrl_cell_batch"].long().to(device) if mcfg.n_batches else None
            out = engine(ctrl, f.to(dtype), bidx)
            rec = st_loss(out["pred"].float(), target.float(), kind=cfg.loss,
                          weights={"main": 1.0})
            engine.backward(rec.total)
            engine.step()
            ids = [int(s) for s in torch.unique(batch["step"]).tolist()]
            mine.extend(ids)
            record({"event": "batch", "epoch": int(batch["epoch"][0]), "steps": ids})
            micro += 1
            cells_since += B * S
            if micro % accum:
                continue
            step += 1
            if step >= max_steps:
                done = True
            if step % cfg.log_every == 0 or step == 1 or done:
                vec = torch.tensor([rec.total.item(), *[v.item() for v in rec.parts.values()]])
                if world > 1:
                    dist.all_reduce(vec)
                    vec /= world
                now = time.perf_counter()
                if rank == 0:
                    gn = engine.get_global_grad_norm()
                    logger.log(step, {
                        "loss": float(vec[0]), **{f"loss/{k}": float(x) for k, x in
                                                  zip(rec.parts, vec[1:].tolist())},
                        "lr": float(engine.get_lr()[0]),
                        "grad_norm": float(gn) if gn is not None else float("nan"),
                        "cells_per_s_worker": cells_since / max(now - t_last, 1e-9),
                        "epoch": epoch}, kind="train")
                t_last, cells_since = now, 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not done:
                gathered = [None] * world
                if world > 1:
                    dist.all_gather_object(gathered, mine)
                else:
                    gathered = [mine]
                allc = sorted(set(consumed_before).union(*[set(g) for g in gathered]))
                checkpoint(epoch, allc)
            if done:
                break
        epoch += 1
        state["epoch"], state["consumed"] = epoch, []
        checkpoint(epoch, [])  # end of epoch (or of training): validate and keep
    logger.summary(step=step, best_val_score=state["best_score"],
                   wall_s=time.perf_counter() - t_start,
                   **{f"val_{k}": v for k, v in last_val.items()})
    png = logger.finish(baselines=prep.baselines or None)
    if rank == 0:
        return {"step": step, "best_val_score": state["best_score"], "last_val": last_val,
                "curves": str(png) if png else None}
    return None


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory (None if there is none)."""
    found = [p for p in Path(run_dir).glob("checkpoint_*") if (p / MANIFEST).is_file()]
    return max(found, key=lambda p: p.name) if found else None


@dataclass
class STResult:
    run_dir: Path
    best_checkpoint: Path | None
    latest_checkpoint: Path | None
    metrics: dict
    return_value: dict | None
    prep: Prep
    wall_s: float


def train_st(cfg: STTrainConfig, *, progress: bool = True) -> STResult:
    """Run (or resume) one ST training run; see the module docstring."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vcc_dist.data.streams import position_board, set_stream
    from vcc_dist.ray_utils import ensure_ray

    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    _atomic_json(run_dir / "config.json", cfg.to_dict())
    prep = prepare(cfg, progress=progress)
    total = cfg.max_steps or cfg.epochs * prep.steps_per_epoch
    if cfg.max_steps:
        cfg = dataclasses.replace(cfg, epochs=max(cfg.epochs,
                                                  math.ceil(cfg.max_steps / prep.steps_per_epoch)))
    optim = cfg.optim_config(total)
    latest = latest_checkpoint(run_dir)
    if latest is not None:  # fail before starting workers, with the reason
        _check_resume(json.loads((latest / MANIFEST).read_text()), prep)

    ensure_ray()
    board = f"vcc-st-board-{uuid.uuid4().hex[:12]}"
    board_actor = position_board(board)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    stream = set_stream(cfg.corpus, cfg.stream_config(), split=cfg.split, role="train",
                        world_size=cfg.num_workers, board=board)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "prep_dir": str(prep.dir), "board": board,
                           "optim": optim.to_dict(), "max_steps": total},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute="score",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": stream.dataset},
    )
    try:
        result = trainer.fit()
    finally:
        ray.kill(board_actor)
    latest = Path(result.checkpoint.path) if result.checkpoint else None
    best = None
    if result.best_checkpoints:
        ck, _ = max(result.best_checkpoints, key=lambda cm: cm[1].get("score", -math.inf))
        best = Path(ck.path)
    for name, p in (("best", best), ("latest", latest)):
        if p is not None:
            _atomic_json(run_dir / f"{name}_checkpoint.json", {"path": str(p)})
    return STResult(run_dir, best, latest, dict(result.metrics or {}), result.return_value,
                    prep, time.perf_counter() - t0)
