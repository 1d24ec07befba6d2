"""ST training on Ray Train + DeepSpeed (docs/design.md §5).

    cfg = st_recipe("demo", corpus="runs/demo/corpus", split="runs/demo/sim/split.toml",
                    run_dir="runs/demo/st")
    result = train_st(cfg)            # embedded local Ray unless RAY_ADDRESS / a cluster
    result.best_checkpoint            # a directory: DeepSpeed state + manifest.json + features

What happens:

1. **Preparation** (driver, cached in ``<run_dir>/prep``; vcc_dist.train.loop.begin_run refuses
   a run before writing anything): cheap checks first (the plan, the step count, the model
   config), then the training pseudobulks of every (context, perturbation) group and the
   perturbation feature table ``[C, P, D]`` (vcc_dist.data.pseudobulk), then the validation
   cells: the split's ``val`` perturbations of the held-out context with that context's
   controls (a split without them trains without validation, with a warning). Their challenge
   summaries are computed once, as are the cell-mean reference (the score's 0) and the
   context-mean baseline's metrics, so every validation reports the model next to them.
2. **Training** (``num_workers`` Ray Train workers): each consumes its shard of the set stream
   (vcc_dist.data.streams.set_stream) and steps a DeepSpeed engine (vcc_dist.train.engine:
   ZeRO stage, precision, accumulation, clipping, AdamW with warm-up + cosine). Loss: energy
   distance between predicted and real perturbed sets (or Sinkhorn / MSE), plus the gene
   decoder's term for embedding-space models.
3. **Validation and checkpoints** every ``checkpoint_every`` optimizer steps (0: at the end
   of every epoch) and at the last step: all ranks predict the validation perturbations (sets
   split over ranks), rank 0 scores them with the challenge metrics (DES, PDS, MAE, score
   against cell-mean: exactly vcc_dist.metrics, i.e. cell-eval 0.8.2) and every rank saves its
   DeepSpeed shard; Ray merges them into one checkpoint with a typed, versioned manifest
   (vcc_dist.checkpoint.STManifest: model config, ZeRO stage, genes, perturbations, contexts,
   feature table and sources, corpus fingerprint, normalisation, stream position, the ranks'
   Ray nodes). The best ``keep_checkpoints`` by validation score are kept, and the latest.
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
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import ray
import ray.train
import torch
import torch.distributed as dist

from vcc_dist import storage
from vcc_dist.checkpoint import (
    FEATURES,
    ST_KIND,
    CheckpointMismatch,
    STManifest,
    gather_checked_embeddings,
)
from vcc_dist.config import (
    ConfigError,
    build,
    check_ints,
    recipe_dict,
    take_derived,
    to_dict,
)
from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.data.embeddings import CorpusEmbeddings, embedding_status
from vcc_dist.data.labels import corpus_labels
from vcc_dist.data.plans import SetStreamConfig
from vcc_dist.data.pseudobulk import context_mean_cells
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.splits import has_role
from vcc_dist.data.streams import set_plan, set_stream
from vcc_dist.fileio import atomic_json
from vcc_dist.infer.st_predict import control_batches, make_forward, plan_sets, run_sets
from vcc_dist.metrics import vcc
from vcc_dist.models.losses import st_loss
from vcc_dist.models.st import ST_PRESETS, STConfig, STModel, preset_values
from vcc_dist.train.engine import EngineConfig, OptimConfig, build_engine, seed_everything
from vcc_dist.train.loop import (
    LoopHooks,
    RunSection,
    Schedule,
    begin_run,
    fit,
    worker_loop,
    worker_prep_dir,
)
from vcc_dist.train.st_data import build_features, corpus_fingerprint, group_means, heldout_groups

LOSSES = ("energy", "sinkhorn", "mse")
CHECKPOINT_KIND = ST_KIND


@dataclass(frozen=True)
class STTrainConfig(RunSection):
    """Everything one ST run needs: the run section (:class:`~vcc_dist.train.loop.RunSection`)
    and ST's own sections. JSON-serialisable (it crosses into Ray workers) with
    :meth:`to_dict`; build one with :func:`st_recipe` or :meth:`from_dict`.

    Derived values (never set them): ``data.set_size`` is ``model.cell_set_len`` (training,
    validation and prediction all use it); ``data.seed`` is ``seed``; ``model.n_genes`` and
    ``model.pert_dim`` come from the corpus and the features."""

    DERIVED = {"data": ("set_size", "seed"), "model": ("n_genes", "pert_dim")}

    split: str | None = None               # split TOML (training/validation/test roles)
    preset: str = "debug"                  # the model preset the model section started from
    model: STConfig = field(default_factory=STConfig)
    features: tuple[str, ...] = ("onehot",)     # "onehot", "transfer", or {gene: vector} .pt paths
    data: SetStreamConfig = field(default_factory=lambda: SetStreamConfig(target_sum="store"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loss: str = "energy"
    decoder_weight: float = 1.0
    val_role: str = "val"                  # split role scored during training ("" = none)
    val_max_cells: int = 256               # real cells per validation perturbation (sampled)
    val_max_controls: int = 512
    val_sets_per_batch: int = 16
    pseudobulk_max_cells: int = 2000
    # ST on SE: the obsm key of the corpus's cell embeddings (jobs/embed_cells.py). Control and
    # perturbed sets are then embeddings, the model works in embedding space and its gene
    # decoder maps predictions to genes (trained with decoder_weight x the loss on genes).
    embeddings: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "features", tuple(self.features))
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}: choose one of {LOSSES}")
        if self.preset not in ST_PRESETS:
            raise ConfigError(f"preset={self.preset!r}: choose one of {ST_PRESETS}")
        check_ints(self, ("val_max_cells", "val_max_controls", "val_sets_per_batch",
                          "pseudobulk_max_cells"))
        if not self.decoder_weight >= 0:
            raise ConfigError(f"decoder_weight={self.decoder_weight} must be >= 0")
        if not self.features:
            raise ConfigError("features is empty: use 'onehot', 'transfer' or a .pt file")
        if self.data.set_size != self.model.cell_set_len or self.data.seed != self.seed:
            raise ConfigError("data.set_size and data.seed are derived from model.cell_set_len "
                              "and seed: build the config with STTrainConfig.from_dict")
        if self.model.feature_shift and self.features[0] != "transfer":
            raise ConfigError("model.feature_shift adds the first features to the prediction: "
                              "they must be 'transfer' (put it first in features)")
        if self.model.output_space != "genes" and not self.embeddings:
            raise ConfigError("model.output_space='embedding' trains on SE cell embeddings: set "
                              "embeddings=<obsm key> (e.g. X_se, written by jobs/embed_cells.py)")

    # accessors (the sections are the values)
    def stream_config(self) -> SetStreamConfig:
        return self.data

    def engine_config(self) -> EngineConfig:
        return self.engine

    def optim_config(self, run_steps: int) -> OptimConfig:
        return self.optim.resolve(run_steps)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STTrainConfig:
        """The config from its nested-dict form: the model section starts from ``preset``'s
        values, the derived keys are filled in (and refused when given otherwise)."""
        d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
        preset = d.get("preset", "debug")
        if preset not in ST_PRESETS:
            raise ConfigError(f"preset={preset!r}: choose one of {ST_PRESETS}")
        model = d.get("model") or {}
        if isinstance(model, dict):
            for k in cls.DERIVED["model"]:
                take_derived(d, "model", k, 0)  # from the data, filled in by prepare()
            d["model"] = {**preset_values(preset), **d["model"]}
            set_len = d["model"].get("cell_set_len", STConfig.cell_set_len)
        else:
            set_len = model.cell_set_len
        if isinstance(d.get("data", {}), dict):
            d.setdefault("data", {}).setdefault("target_sum", "store")
            take_derived(d, "data", "set_size", set_len)
            take_derived(d, "data", "seed", d.get("seed", 0))
        return build(cls, d)


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

_DEMO_MODEL = {"hidden_dim": 256, "n_encoder_layers": 2, "n_decoder_layers": 2, "n_layers": 2,
               "n_heads": 4, "ffn_dim": 512, "cell_set_len": 32, "residual": "input"}

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
             "model": {**_DEMO_MODEL, "feature_shift": True, "zero_init_output": True},
             "data": {"batch_size": 8, "block_rows": 8},
             "features": ["transfer", "onehot"], "epochs": 8,
             "optim": {"lr": 3e-4, "weight_decay": 0.01}, "engine": {"zero_stage": 2},
             "log_every": 10},
    # ST on SE embeddings (needs jobs/embed_cells.py first): the demo's set transformer in
    # embedding space, a delta on the control embeddings, and a gene decoder
    "demo_se": {"preset": "debug", "embeddings": "X_se",
                "model": {**_DEMO_MODEL, "gene_decoder_hidden": [512, 1024]},
                "data": {"batch_size": 8, "block_rows": 8},
                "features": ["transfer", "onehot"], "epochs": 8, "decoder_weight": 1.0,
                "optim": {"lr": 3e-4, "weight_decay": 0.01}, "engine": {"zero_stage": 2},
                "log_every": 10},
    # STATE's state_sm shape (set 128, hidden 672, 4+4 MLP layers, 4 Llama layers x 8 heads),
    # STATE's VCC batch of 16 sets
    "state_sm": {"preset": "state_sm", "data": {"batch_size": 16, "block_rows": 32},
                 "features": ["onehot"], "epochs": 1, "optim": {"lr": 1e-4},
                 "engine": {"zero_stage": 2}},
}
RECIPES = tuple(_RECIPES)


def recipe_values(name: str) -> dict[str, Any]:
    """The options a named recipe sets (a copy), e.g. for ``--help`` and the recipe tests."""
    if name not in _RECIPES:
        raise ConfigError(f"recipe {name!r} is unknown; choose one of {RECIPES}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in _RECIPES[name].items()}


def st_recipe(recipe: str | os.PathLike, overrides: dict | None = None, **top: Any) -> STTrainConfig:
    """A complete config from a named recipe (``RECIPES``) or a JSON/YAML recipe file (e.g.
    the best config a Tune sweep wrote), merged with nested ``overrides`` and top-level
    keyword values (corpus, split, run_dir, ...). Every key is checked against the tree."""
    return STTrainConfig.from_dict(recipe_dict(recipe, _RECIPES, overrides, top))


# ---------------------------------------------------------------------------------------------
# preparation (driver)
# ---------------------------------------------------------------------------------------------


@dataclass
class Prep:
    """What the driver prepares once and every worker reads (``<run_dir>/prep``)."""

    dir: Path
    model_config: dict            # complete: n_genes, pert_dim, n_batches filled in
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
    embeddings: dict | None = None  # ST on SE: {"key", "dim", "model"} of the cell embeddings
    # the driver's (SetPlan, CorpusReader) when this prep was just made: the training stream
    # reuses it instead of passing over every store's labels again (not saved)
    plan: Any = field(default=None, repr=False, compare=False)

    def manifest(self) -> dict:
        """The trainer's part of every checkpoint manifest (vcc_dist.checkpoint.STManifest)."""
        return {"model_config": self.model_config, "genes": self.genes, "labels": self.labels,
                "feature_sources": self.feature_sources, "feature_shape": list(self.features.shape),
                "corpus_fingerprint": self.corpus_fingerprint,
                "normalization": self.normalization, "val": self.val,
                "baselines": self.baselines, "steps_per_epoch": self.steps_per_epoch,
                "batches_per_epoch": self.batches_per_epoch, "embeddings": self.embeddings}

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        np.save(self.dir / FEATURES, self.features)
        atomic_json(self.dir / "prep.json", self.manifest())

    @classmethod
    def load(cls, d: str | os.PathLike) -> Prep:
        d = Path(d)
        m = json.loads((d / "prep.json").read_text())
        return cls(d, m["model_config"], m["genes"], m["labels"], np.load(d / FEATURES),
                   m["feature_sources"], m["corpus_fingerprint"], m["normalization"], m["val"],
                   m["baselines"], m["steps_per_epoch"], m["batches_per_epoch"],
                   m.get("embeddings"))


def prep_key(cfg: STTrainConfig) -> dict:
    """What a prep depends on (a changed key recomputes it)."""
    return {"corpus": storage.resolved(cfg.corpus), "split": cfg.split,
            "features": list(cfg.features), "data": to_dict(cfg.data),
            "val": [cfg.val_role, cfg.val_max_cells, cfg.val_max_controls],
            "pb": cfg.pseudobulk_max_cells, "model": to_dict(cfg.model), "preset": cfg.preset,
            "workers": cfg.num_workers, "seed": cfg.seed, "embeddings": _embedding_state(cfg),
            "grad_accum": cfg.optim.grad_accum_steps,
            # 2: one context-mean prior for transfer features and baselines (vcc_dist.data.pseudobulk)
            "prep_version": 2}


def _embedding_state(cfg: STTrainConfig) -> dict | None:
    """The corpus embeddings' manifests (a re-embedded corpus invalidates the prep cache)."""
    if not cfg.embeddings:
        return None
    return {"key": cfg.embeddings, "stores": embedding_status(cfg.corpus, cfg.embeddings)}


def _model_config(cfg: STTrainConfig, n_genes: int, pert_dim: int, n_batches: int,
                  emb: dict | None) -> STConfig:
    """The complete model config: the model section with the data-derived values."""
    over: dict[str, Any] = {"n_genes": n_genes, "pert_dim": pert_dim}
    if cfg.model.n_batches == "auto":  # one embedding per experimental batch
        over["n_batches"] = n_batches
    if emb is not None:
        over.update(output_space="embedding", embed_dim=int(emb["dim"]), gene_decoder=True)
    return dataclasses.replace(cfg.model, **over)


def _steps_per_epoch(cfg: STTrainConfig, plan) -> tuple[int, int]:
    units = plan.epoch_units("train", 0, cfg.num_workers)
    n_batches = sum(u.n_batches for u in units)
    spe = (n_batches // cfg.num_workers) // cfg.optim.grad_accum_steps
    if spe < 1:
        raise ConfigError(f"one epoch has {n_batches} batches for {cfg.num_workers} workers x "
                          f"grad_accum_steps={cfg.optim.grad_accum_steps}: fewer than one "
                          "optimizer step; lower data.batch_size or optim.grad_accum_steps")
    return spe, n_batches


def prepare(cfg: STTrainConfig, out_dir: str | os.PathLike, *, progress: bool = False) -> Prep:
    """Pseudobulks, features, validation cells and their baselines, written to ``out_dir``.

    Cheap checks first (the plan, the model config, the step count), then the tables (the
    training pseudobulks and the feature table), then the validation cells and their
    baselines. A split without ``val_role`` perturbations trains without validation (with a
    warning); any other problem with the validation cells (e.g. a context without control
    cells) is an error."""
    d = Path(out_dir)
    # 1. cheap checks: the plan, the embeddings, the step count
    plan, reader = set_plan(cfg.corpus, cfg.data, cfg.split)
    labels = plan.labels
    emb = None
    if cfg.embeddings:
        ce = CorpusEmbeddings(cfg.corpus, cfg.embeddings)  # clear error if a store lacks them
        emb = {"key": cfg.embeddings, "dim": int(ce.dim), "model": ce.meta}
    spe, n_batches = _steps_per_epoch(cfg, plan)
    with_val = bool(cfg.val_role and cfg.split)
    if with_val and not any(has_role(r, cfg.val_role) for r in plan.table["role"]):
        warnings.warn(f"the split {cfg.split} has no {cfg.val_role!r} perturbations in this "
                      "corpus: training runs without validation (checkpoints are ranked by "
                      "step)", stacklevel=2)
        with_val = False
    # 2. tables
    means = group_means(plan, reader, max_cells=cfg.pseudobulk_max_cells, seed=cfg.seed,
                        progress=progress)
    table = build_features(cfg.features, labels.contexts, labels.perturbations, means)
    mcfg = _model_config(cfg, reader.n_genes, table.dim, len(labels.batches), emb)
    # 3. validation cells and the baselines' metrics on them
    val, baselines = None, {}
    if with_val:
        held = heldout_groups(plan, cfg.val_role, max_cells=cfg.val_max_cells,
                              max_controls=cfg.val_max_controls, seed=cfg.seed)
        val = held.to_dict()
        baselines = _val_baselines(reader, held, means, d)
    norm = {"target_sum": cfg.data.target_sum, "log1p": cfg.data.log1p,
            "store_targets": None if reader.store_targets is None
            else [float(x) for x in reader.store_targets], "corpus_median": reader.target_sum}
    prep = Prep(d, mcfg.to_dict(), list(reader.genes), labels.to_json(), table.table,
                table.sources, corpus_fingerprint(reader), norm, val, baselines, spe, n_batches,
                emb, plan=(plan, reader))
    prep.save()
    return prep


def _dense(reader, st, rows) -> np.ndarray:
    return reader.dense(reader.read_many(st, rows, normalize=True))


def _held_adata(values: list[np.ndarray], perts: list[str], ctrl: np.ndarray, genes: list[str]):
    x = np.vstack([*values, ctrl]).astype(np.float32)
    lab = np.concatenate([np.repeat(np.array(perts, dtype=object), [v.shape[0] for v in values]),
                          np.full(ctrl.shape[0], CONTROL_LABEL, dtype=object)])
    obs = pd.DataFrame({PERT_KEY: pd.Categorical(lab.astype(str))},
                       index=pd.Index(np.arange(x.shape[0]).astype(str)))
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))


def _val_baselines(reader, held, means, prep_dir: Path) -> dict:
    """Summaries of the real validation cells, and the cell-mean and context-mean baselines'
    metrics on them (cell-mean is the score's reference)."""
    prep_dir.mkdir(parents=True, exist_ok=True)
    ctrl = _dense(reader, *held.control)
    real = [_dense(reader, st, rw) for st, rw in held.cells]
    genes = list(reader.genes)
    real_s = vcc.summarize(_held_adata(real, held.perts, ctrl, genes), what="val real")
    real_s.save(prep_dir / "val_real.npz")
    cm = means.cell_mean()
    cm_pred = [np.repeat(cm[None], r.shape[0], 0) for r in real]
    effect = means.context_mean(held.context_index).effect[held.pert_index]
    ctx_pred = list(context_mean_cells(ctrl, effect, [r.shape[0] for r in real],
                                       np.random.default_rng(0)))
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


class Validator:
    """Predicts the validation perturbations (sets split over ranks) and scores them (rank 0)."""

    def __init__(self, prep: Prep, cfg: STTrainConfig, rank: int, world: int):
        v = prep.val
        self.rank, self.world, self.cfg = rank, world, cfg
        reader = CorpusReader(cfg.corpus, genes=prep.genes, target_sum=cfg.data.target_sum)
        cst, crw = (np.asarray(a) for a in v["control"])
        self.ctrl = _dense(reader, cst, crw)
        # the model's input: gene values, or the controls' SE embeddings (ST on SE)
        self.ctrl_in = (self.ctrl if not prep.embeddings else
                        gather_checked_embeddings(cfg.corpus, prep.embeddings, cst, crw))
        self.perts = list(v["perts"])
        self.counts = [len(c[1]) for c in v["cells"]]
        self.ctrl_batch = None
        if int(prep.model_config.get("n_batches", 0)):
            self.ctrl_batch = control_batches(reader, corpus_labels(reader)[0], cst, crw)
        self.feats = prep.features[v["context_index"], np.asarray(v["pert_index"])]
        S = int(prep.model_config["cell_set_len"])
        self.plan = plan_sets(self.counts, self.ctrl.shape[0], S, seed=cfg.seed)
        self.genes = prep.genes
        self.real = vcc.FileSummary.load(prep.dir / "val_real.npz") if rank == 0 else None
        self.ref = prep.baselines.get("cell-mean")

    def __call__(self, forward) -> dict[str, float]:
        mine = list(run_sets(forward, self.plan, self.ctrl_in, self.feats,
                             sets_per_batch=self.cfg.val_sets_per_batch, rank=self.rank,
                             world_size=self.world, batch_index=self.ctrl_batch))
        parts = [None] * self.world if self.world > 1 else [mine]
        if self.world > 1:  # collective: every rank sends its sets to every rank
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


def check_resume(manifest: STManifest, prep: Prep) -> None:
    """Refuse to resume a run whose checkpoint was made with other data or features."""
    pm = prep.manifest()

    def sources(srcs):  # kind, dim and file checksum (a moved file is the same features)
        return [(f.get("kind"), f.get("dim"), f.get("sha256")) for f in srcs]

    if sources(manifest.feature_sources) != sources(pm["feature_sources"]):
        raise CheckpointMismatch(
            f"the run's latest checkpoint was trained with other perturbation features "
            f"({sources(manifest.feature_sources)}) than this config gives "
            f"({sources(pm['feature_sources'])}); use a new run_dir (or the original features) "
            "to resume")
    for key, what in (("corpus_fingerprint", "corpus"), ("genes", "gene vocabulary"),
                      ("labels", "perturbation/context labels"),
                      ("feature_shape", "perturbation feature table shape"),
                      ("model_config", "model config"), ("embeddings", "cell embeddings")):
        if getattr(manifest, key) != pm.get(key):
            raise CheckpointMismatch(
                f"the run's latest checkpoint was trained with another {what} than this "
                f"config gives; use a new run_dir (or the original config) to resume")


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train worker function (see the module docstring)."""
    cfg = STTrainConfig.from_dict(config["cfg"])
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    prep = Prep.load(worker_prep_dir(config["prep_dir"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg.engine.check_hardware(torch.cuda.is_available())  # what this worker really has

    mcfg = STConfig.from_dict(prep.model_config)
    optim_cfg = OptimConfig(**config["optim"])
    B = cfg.data.batch_size
    seed_everything(cfg.engine.seed)  # before the model: its initial weights come from torch's RNG
    engine, _ = build_engine(STModel(mcfg), cfg.engine, optim_cfg, micro_batch_size=B)
    device = engine.device
    dtype = next(engine.module.parameters()).dtype
    feats = torch.from_numpy(prep.features).to(device)
    S = mcfg.cell_set_len

    on_se = bool(prep.embeddings)

    def step(batch: dict):
        # ST on SE: sets of SE embeddings in, embeddings out, the gene decoder's output
        # compared with the perturbed cells' genes
        ctrl = batch["ctrl_emb" if on_se else "ctrl"].to(device=device, dtype=dtype)
        target = batch["pert_emb" if on_se else "pert"].to(device=device, dtype=dtype)
        f = feats[batch["context_index"].long().to(device), batch["pert_index"].long().to(device)]
        # each predicted cell keeps the batch of the control cell it comes from
        bidx = batch["ctrl_cell_batch"].long().to(device) if mcfg.n_batches else None
        out = engine(ctrl, f.to(dtype), bidx)
        if on_se:
            rec = st_loss(out["pred"].float(), target.float(), kind=cfg.loss,
                          weights={"main": 1.0, "decoder": cfg.decoder_weight},
                          pred_genes=out["pred_genes"].float(),
                          target_genes=batch["pert"].to(device=device, dtype=torch.float32))
        else:
            rec = st_loss(out["pred"].float(), target.float(), kind=cfg.loss,
                          weights={"main": 1.0})
        return rec, {"cells": B * S}

    validator = Validator(prep, cfg, rank, world) if prep.val else None

    def validate() -> dict[str, float]:
        return validator(make_forward(engine.module, device=device, dtype=dtype))

    def write_files(d: Path) -> None:
        np.save(d / FEATURES, prep.features)

    hooks = LoopHooks(step=step, manifest=prep.manifest(),
                      validate=validate if validator is not None else None,
                      score=lambda v: v["score"], check_resume=lambda m: check_resume(m, prep),
                      write_files=write_files, baselines=prep.baselines or None,
                      kind=CHECKPOINT_KIND, tag="st")
    shard = ray.train.get_dataset_shard("train")
    sched = Schedule(cfg.epochs, config["max_steps"], cfg.checkpoint_every, cfg.log_every,
                     optim_cfg.grad_accum_steps, cfg.record_batches, prep.batches_per_epoch)
    return worker_loop(engine, lambda: shard.iter_torch_batches(batch_size=B), config["board"],
                       sched, hooks, run_dir=cfg.run_dir, run_name=cfg.run_name,
                       config=cfg.to_dict(), wandb=cfg.wandb, optim=config["optim"])


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


@dataclass
class STResult:
    run_dir: Path | str                    # s3:// URIs for a run on object storage
    best_checkpoint: Path | str | None
    latest_checkpoint: Path | str | None
    metrics: dict
    return_value: dict | None
    prep: Prep
    wall_s: float


def train_st(cfg: STTrainConfig, *, progress: bool = True,
             callbacks: list | None = None) -> STResult:
    """Run (or resume) one ST training run; see the module docstring."""
    t0 = time.perf_counter()
    rs = begin_run(cfg, prepare, prep_key, Prep.load, check_resume, "st", progress)
    cfg, prep, run_dir = rs.cfg, rs.prep, rs.run_dir
    stream = set_stream(cfg.corpus, cfg.data, split=cfg.split, role="train",
                        world_size=cfg.num_workers, board=rs.board, plan=prep.plan,
                        **({"embeddings": cfg.embeddings} if cfg.embeddings else {}))
    res = fit(train_loop_per_worker,
              {"cfg": cfg.to_dict(), "prep_dir": rs.prep_location, "board": rs.board,
               "optim": rs.optim.to_dict(), "max_steps": rs.total_steps},
              run_dir=run_dir, datasets={"train": stream.dataset}, num_workers=cfg.num_workers,
              cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu,
              keep_checkpoints=cfg.keep_checkpoints, max_failures=cfg.max_failures,
              board_actor=rs.board_actor, callbacks=callbacks,
              placement_strategy=cfg.placement_strategy)
    return STResult(run_dir, res.best_checkpoint, res.latest_checkpoint, res.metrics,
                    res.return_value, prep, time.perf_counter() - t0)


__all__ = ["CHECKPOINT_KIND", "LOSSES", "RECIPES", "CheckpointMismatch", "Prep", "STResult",
           "STTrainConfig", "Validator", "check_resume", "prep_key", "prepare", "recipe_values",
           "st_recipe", "train_loop_per_worker", "train_st"]
