"""SE pretraining on Ray Train + DeepSpeed (docs/design.md §5).

    cfg = se_recipe("small", corpus="runs/demo/corpus", gene_table="runs/demo/esm/gene_embeddings.pt",
                    run_dir="runs/demo/se")
    result = train_se(cfg)            # embedded local Ray unless RAY_ADDRESS / a cluster
    result.best_checkpoint            # DeepSpeed state + manifest.json + gene table

What happens:

1. **Preparation** (driver, cached in ``<run_dir>/prep``): the ESM2 gene table is matched to
   the corpus vocabulary (genes without an embedding are reported in ``prep.json`` and left
   out of every sentence), the model config is completed (table size and width, one dataset
   class per corpus store), and a fixed set of validation cells (the cell stream's held-out
   blocks, ``data.val_fraction``) is tokenised once with a fixed seed.
2. **Training** (``num_workers`` Ray Train workers): the SE cell stream
   (vcc_dist.data.streams.cell_stream, raw counts) is tokenised in Ray Data ``map_batches``
   (vcc_dist.data.se_tokens.SESentences), each worker steps a DeepSpeed engine (ZeRO-3 by
   default; precision, activation checkpointing, accumulation from the config; AdamW with
   warm-up and cosine decay stepped once per optimizer step).
3. **Validation and checkpoints** (vcc_dist.train.loop): every ``checkpoint_every`` optimizer
   steps and at each epoch's end, the validation loss on the held-out cells (split over
   ranks, summed), then a checkpoint of every rank's shard with a manifest. Checkpoints are
   ranked by ``-val_loss``; the best ``keep_checkpoints`` and the latest are kept.
4. **Fault tolerance and resume**: as for ST (position board, exact batch skipping, same
   command again resumes; a checkpoint made with another corpus, gene table or model is
   refused before workers start).
5. **Logging**: ``metrics_train.csv`` (loss parts, lr, grad norm, cells/s and tokens/s per
   worker), ``metrics_val.csv``, wandb (rank 0, offline unless configured), ``curves.png``.

Cell embeddings for ST come from ``jobs/embed_cells.py`` (vcc_dist.infer.se_embed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from vcc_dist import storage
from vcc_dist.checkpoint import SE_KIND, CheckpointMismatch, SEManifest
from vcc_dist.config import ConfigError, build, check_ints, recipe_dict, take_derived, to_dict
from vcc_dist.data.plans import CellPlan, CellStreamConfig
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.se_tokens import SESentences, SETokenizer, gene_map_for
from vcc_dist.data.streams import cell_stream
from vcc_dist.esm.embed import load_gene_embeddings
from vcc_dist.fileio import atomic_json
from vcc_dist.models.se import (
    SE_PRESETS,
    TARGET_PRESETS,
    SEConfig,
    SEModel,
    preset_values,
    se_loss,
)
from vcc_dist.train.engine import (
    EngineConfig,
    OptimConfig,
    build_engine,
    model_init_context,
    seed_everything,
)
from vcc_dist.train.loop import (
    LoopHooks,
    RunSection,
    Schedule,
    begin_run,
    fit,
    worker_loop,
    worker_prep_dir,
)
from vcc_dist.train.st_data import corpus_fingerprint

CHECKPOINT_KIND = SE_KIND
GENE_TABLE = "gene_table.npy"
GENE_MAP = "gene_map.npy"
VAL_TOKENS = "val_tokens.npz"


def _default_se_data() -> CellStreamConfig:
    return CellStreamConfig(batch_size=32, val_fraction=0.05, normalize=False, genes="all")


@dataclass(frozen=True)
class SETrainConfig(RunSection):
    """Everything one SE pretraining run needs: the run section
    (:class:`~vcc_dist.train.loop.RunSection`) and SE's own sections; JSON-serialisable with
    :meth:`to_dict`; build one with :func:`se_recipe` or :meth:`from_dict`.

    Derived values (never set them): ``data.seed`` is ``seed``; ``data.normalize`` (False)
    and ``data.genes`` ("all"): sentences are built from raw counts of every gene;
    ``model.n_genes`` and ``model.gene_dim`` come from the gene table. ``engine.zero_stage``
    defaults to 3 with several workers and 0 with one (one worker has nothing to shard, and
    stage 3 would cost it 10-20% of every step: benchmarks/se_speed.py)."""

    DERIVED = {"data": ("seed", "normalize", "genes"), "model": ("n_genes", "gene_dim")}

    gene_table: str = ""                   # gene_embeddings.pt/.npz of jobs/embed_genes.py
    preset: str = "debug"                  # the model preset the model section started from
    targets: str = ""                      # "" (the preset's) or a TARGET_PRESETS name
    model: SEConfig = field(default_factory=SEConfig)
    data: CellStreamConfig = field(default_factory=_default_se_data)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(zero_stage=0))
    val_max_cells: int = 512               # held-out cells in the validation loss
    val_batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gene_table:
            raise ConfigError("the config needs gene_table (--gene-table: gene_embeddings.pt "
                              "from jobs/embed_genes.py)")
        check_ints(self, ("val_max_cells", "val_batch_size"))
        if self.preset not in SE_PRESETS:
            raise ConfigError(f"preset={self.preset!r}: choose one of {SE_PRESETS}")
        if self.targets and self.targets not in TARGET_PRESETS:
            raise ConfigError(f"targets={self.targets!r}: choose one of {tuple(TARGET_PRESETS)}")
        if self.data.normalize or self.data.genes != "all" or self.data.seed != self.seed:
            raise ConfigError("data.normalize, data.genes and data.seed are derived: build the "
                              "config with SETrainConfig.from_dict")

    # accessors (the sections are the values)
    def stream_config(self) -> CellStreamConfig:
        return self.data

    def engine_config(self) -> EngineConfig:
        return self.engine

    def optim_config(self, run_steps: int) -> OptimConfig:
        return self.optim.resolve(run_steps)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SETrainConfig:
        """The config from its nested-dict form: the model section starts from ``preset``'s
        (and ``targets``') values, derived keys are filled in (refused when given otherwise),
        and the ZeRO stage defaults by the number of workers."""
        d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
        preset = d.get("preset", "debug")
        if preset not in SE_PRESETS:
            raise ConfigError(f"preset={preset!r}: choose one of {SE_PRESETS}")
        if isinstance(d.get("model", {}), dict):
            for k in cls.DERIVED["model"]:
                take_derived(d, "model", k, 0)  # from the gene table, filled in by prepare()
            d["model"] = {**preset_values(preset, d.get("targets") or None), **d["model"]}
        if isinstance(d.get("data", {}), dict):
            d["data"] = {"batch_size": 32, "val_fraction": 0.05, **d.get("data", {})}
            take_derived(d, "data", "seed", d.get("seed", 0))
            take_derived(d, "data", "normalize", False)
            take_derived(d, "data", "genes", "all")
        if isinstance(d.get("optim", {}), dict):
            d["optim"] = {"lr": 3e-4, **d.get("optim", {})}
        if isinstance(d.get("engine", {}), dict):
            d["engine"] = {"zero_stage": 3 if int(d.get("num_workers", 1)) > 1 else 0,
                           **d.get("engine", {})}
        return build(cls, d)


_RECIPES: dict[str, dict[str, Any]] = {
    # seconds on CPU: tests and smoke runs (ZeRO-3 as at scale)
    "debug": {"preset": "debug", "data": {"batch_size": 16, "block_rows": 16, "buffer_blocks": 8},
              "epochs": 1, "optim": {"lr": 1e-3, "warmup_steps": 2}, "log_every": 2,
              "val_max_cells": 64, "val_batch_size": 32},
    # the main job's SE: a few CPU minutes on the small simulated data set
    "demo": {"preset": "debug",
             "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_hid": 128,
                       "output_dim": 32, "dataset_dim": 8, "decoder_hidden": 64,
                       "sentence_len": 255, "n_expressed": 64, "n_unexpressed": 64,
                       "n_shared": 32},
             "data": {"batch_size": 32, "block_rows": 32, "buffer_blocks": 16},
             "epochs": 1, "max_steps": 300, "checkpoint_every": 100,
             "optim": {"lr": 1e-3, "warmup_steps": 10}, "log_every": 10},
    # the small CPU-trainable preset (benchmarks/se_speed.py)
    "small": {"preset": "small", "data": {"batch_size": 32, "block_rows": 32, "buffer_blocks": 32},
              "epochs": 1, "optim": {"lr": 3e-4}},
    # STATE's SE-600M (GPUs: bf16, ZeRO-3, activation checkpointing)
    "se600m": {"preset": "se600m", "targets": "state_code",
               "data": {"batch_size": 32, "block_rows": 64, "buffer_blocks": 64},
               "engine": {"zero_stage": 3, "precision": "auto", "activation_checkpointing": True},
               "optim": {"lr": 1e-5, "warmup_steps": 1000}, "checkpoint_every": 2000,
               "use_gpu": True},
}
RECIPES = tuple(_RECIPES)


def recipe_values(name: str) -> dict[str, Any]:
    """The options a named recipe sets (a copy), e.g. for ``--help`` and the recipe tests."""
    if name not in _RECIPES:
        raise ConfigError(f"recipe {name!r} is unknown; choose one of {RECIPES}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in _RECIPES[name].items()}


def se_recipe(recipe: str | os.PathLike, overrides: dict | None = None, **top: Any) -> SETrainConfig:
    """A complete config from a named recipe (``RECIPES``) or a JSON/YAML file, merged with
    nested ``overrides`` and top-level values (corpus, gene_table, run_dir, ...); every key is
    checked against the tree."""
    return SETrainConfig.from_dict(recipe_dict(recipe, _RECIPES, overrides, top,
                                               required=("corpus", "run_dir", "gene_table")))


# ---------------------------------------------------------------------------------------------
# preparation (driver)
# ---------------------------------------------------------------------------------------------


@dataclass
class SEPrep:
    dir: Path
    model_config: dict
    table_genes: list[str]        # rows of the gene table (corpus genes with an embedding)
    missing_genes: list[str]      # corpus genes with no embedding (excluded)
    gene_table_sha256: str
    corpus_fingerprint: str
    stores: list[str]             # dataset classes
    steps_per_epoch: int
    batches_per_epoch: int
    n_val_cells: int

    def manifest(self) -> dict:
        return {"model_config": self.model_config, "table_genes": self.table_genes,
                "missing_genes": self.missing_genes, "gene_table_sha256": self.gene_table_sha256,
                "corpus_fingerprint": self.corpus_fingerprint, "stores": self.stores,
                "steps_per_epoch": self.steps_per_epoch,
                "batches_per_epoch": self.batches_per_epoch, "n_val_cells": self.n_val_cells}

    @classmethod
    def load(cls, d: str | os.PathLike) -> SEPrep:
        d = Path(d)
        m = json.loads((d / "prep.json").read_text())
        return cls(d, **{k: m[k] for k in (f.name for f in dataclasses.fields(cls) if f.name != "dir")})

    def gene_table(self) -> np.ndarray:
        return np.load(self.dir / GENE_TABLE)

    def gene_map(self) -> np.ndarray:
        return np.load(self.dir / GENE_MAP)


def model_config_for(cfg: SETrainConfig, n_genes: int, gene_dim: int, n_datasets: int) -> SEConfig:
    """The complete model config: the model section with the data-derived values (one
    dataset class per store unless ``model.n_datasets`` is set)."""
    return dataclasses.replace(cfg.model, n_genes=n_genes, gene_dim=gene_dim,
                               n_datasets=cfg.model.n_datasets or n_datasets)


def prep_key(cfg: SETrainConfig) -> dict:
    """What a prep depends on (a changed key recomputes it)."""
    return {"corpus": storage.resolved(cfg.corpus),
            "gene_table_sha256": storage.sha256(cfg.gene_table), "model": to_dict(cfg.model),
            "preset": cfg.preset, "targets": cfg.targets, "data": to_dict(cfg.data),
            "val_max_cells": cfg.val_max_cells, "num_workers": cfg.num_workers,
            "seed": cfg.seed, "grad_accum": cfg.optim.grad_accum_steps}


def prepare(cfg: SETrainConfig, out_dir: str | os.PathLike, *, progress: bool = False) -> SEPrep:
    """The driver's one-off work, written to ``out_dir``: the gene table matched to the
    corpus, the model config, the step count (cheap checks first), then the validation
    sentences."""
    prep_dir = Path(out_dir)
    table_sha = storage.sha256(cfg.gene_table)
    reader = CorpusReader(cfg.corpus, normalize=False)  # raw counts: sentences are built from them
    manifest = reader.manifest
    vocab = list(manifest.genes)
    names, table = load_gene_embeddings(cfg.gene_table)
    gene_map, missing = gene_map_for(vocab, names)
    if (gene_map >= 0).sum() == 0:
        raise ValueError(f"no gene of the corpus vocabulary ({len(vocab)} genes, e.g. "
                         f"{vocab[:3]}) has an embedding in {cfg.gene_table}: check that the "
                         "table was made for this corpus's gene symbols")
    # the model's table: only corpus genes, in vocabulary order
    used = np.flatnonzero(gene_map >= 0)
    table_genes = [vocab[i] for i in used]
    small_table = table[gene_map[used]].astype(np.float32)
    small_map = np.full(len(vocab), -1, np.int64)
    small_map[used] = np.arange(used.size)
    if missing and progress:
        print(f"[se] {len(missing)} of {len(vocab)} corpus genes have no embedding and are "
              f"left out of the sentences (e.g. {missing[:5]})", flush=True)
    stores = [s.name for s in manifest.stores]
    mcfg = model_config_for(cfg, len(table_genes), int(table.shape[1]), len(stores))

    scfg = cfg.data
    plan = CellPlan(np.array([int(s.n_cells or 0) for s in manifest.stores]), scfg)
    per_epoch = plan.batches_per_epoch("train", cfg.num_workers)
    if per_epoch == 0:
        raise ConfigError(f"the corpus's training cells ({plan.n_cells('train')}) do not fill "
                          f"one batch of {scfg.batch_size} per worker x {cfg.num_workers} "
                          "workers; lower data.batch_size or num_workers")
    steps = max(1, per_epoch // cfg.num_workers // cfg.optim.grad_accum_steps)

    # validation sentences: the held-out blocks' first cells, tokenised once
    n_val = 0
    tok = {}
    if scfg.val_fraction > 0:
        blocks = plan.blocks("val")
        st = np.concatenate([np.full(plan.stop[b] - plan.start[b], plan.store[b]) for b in blocks])
        rows = np.concatenate([np.arange(plan.start[b], plan.stop[b]) for b in blocks])
        pick = np.sort(np.random.default_rng([cfg.seed, 11]).permutation(rows.size)[:cfg.val_max_cells])
        st, rows = st[pick], rows[pick]
        blk = reader.read_many(st, rows)
        tok = SETokenizer(mcfg, small_map, seed=cfg.seed + 1_000_003)(
            blk.indptr, blk.indices, blk.data, blk.totals, epoch=0, step=0, train=True)
        tok["dataset"] = st.astype(np.int32)
        n_val = int(rows.size)

    prep_dir.mkdir(parents=True, exist_ok=True)
    np.save(prep_dir / GENE_TABLE, small_table)
    np.save(prep_dir / GENE_MAP, small_map)
    if tok:
        np.savez(prep_dir / VAL_TOKENS, **tok)
    prep = SEPrep(prep_dir, mcfg.to_dict(), table_genes, missing, table_sha,
                  corpus_fingerprint(reader), stores, steps, per_epoch, n_val)
    atomic_json(prep_dir / "prep.json", prep.manifest())
    return prep


def check_resume(manifest: SEManifest, prep: SEPrep) -> None:
    """Refuse to resume a run whose checkpoint was made with other data, genes or model."""
    pm = prep.manifest()
    for k, what in (("corpus_fingerprint", "corpus"), ("table_genes", "gene table genes"),
                    ("gene_table_sha256", "gene table file"), ("model_config", "model config"),
                    ("stores", "corpus stores")):
        if getattr(manifest, k) != pm.get(k):
            raise CheckpointMismatch(
                f"the run's latest checkpoint was trained with another {what} than this config "
                "gives; use a new run_dir (or the original inputs) to resume")


# ---------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------


def _to(batch: dict, key: str, device, dtype=None):
    v = batch[key]
    v = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
    return v.to(device=device, dtype=dtype) if dtype is not None else v.to(device)


def se_step_inputs(batch: dict, device, dtype):
    """Flatten a tokenised batch's copies: [B, C, ...] -> [B*C, ...] model inputs and targets."""
    ids = _to(batch, "gene_ids", device).long()
    b, c, k = ids.shape
    expr = _to(batch, "expr", device, dtype).reshape(b * c, k)
    tids = _to(batch, "target_ids", device).long()
    t = tids.shape[-1]
    tids = tids[:, None, :].expand(b, c, t).reshape(b * c, t)
    target = _to(batch, "target", device, torch.float32).reshape(b * c, t)
    weight = _to(batch, "target_weight", device, torch.float32)[:, None, :].expand(b, c, t).reshape(b * c, t)
    depth = _to(batch, "depth", device, dtype).reshape(b * c)
    dataset = _to(batch, "dataset", device).long()[:, None].expand(b, c).reshape(b * c)
    return ids.reshape(b * c, k), expr, tids, depth, target, weight, dataset


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train worker function (see the module docstring)."""
    cfg = SETrainConfig.from_dict(config["cfg"])
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    prep = SEPrep.load(worker_prep_dir(config["prep_dir"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mcfg = SEConfig.from_dict(prep.model_config)
    ecfg = cfg.engine
    ecfg.check_hardware(torch.cuda.is_available())  # what this worker really has
    if ecfg.activation_checkpointing and not mcfg.activation_checkpointing:
        mcfg = dataclasses.replace(mcfg, activation_checkpointing=True)
    optim_cfg = OptimConfig(**config["optim"])
    B = cfg.data.batch_size
    seed_everything(ecfg.seed)  # before the model: its initial weights come from torch's RNG
    with model_init_context(ecfg, optim_cfg, B):  # ZeRO-3: parameters partitioned as built
        model = SEModel(mcfg, torch.from_numpy(prep.gene_table()))
    engine, _ = build_engine(model, ecfg, optim_cfg, micro_batch_size=B)
    device = engine.device
    dtype = next(p for p in engine.module.parameters()).dtype

    def step(batch: dict):
        ids, expr, tids, depth, target, weight, dataset = se_step_inputs(batch, device, dtype)
        out = engine(ids, expr, tids, depth)
        rec = se_loss(out, target, weight, dataset, mcfg)
        return rec, {"cells": ids.shape[0], "tokens": int((ids >= 0).sum()) + 2 * ids.shape[0]}

    val = dict(np.load(prep.dir / VAL_TOKENS)) if prep.n_val_cells else None

    def validate() -> dict[str, float]:
        # every rank scores its slice; the sums are reduced (equal forward counts for ZeRO-3)
        n = prep.n_val_cells
        per = math.ceil(n / world)
        mine = np.arange(rank * per, min(n, (rank + 1) * per))
        vb = cfg.val_batch_size
        n_batches = math.ceil(per / vb)
        acc = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for j in range(n_batches):
                sel = mine[j * vb:(j + 1) * vb]
                if sel.size == 0:  # keep forward counts equal across ranks
                    sel = np.arange(min(vb, n))
                    w_cells = 0.0
                else:
                    w_cells = float(sel.size)
                batch = {k: v[sel] for k, v in val.items()}
                ids, expr, tids, depth, target, weight, dataset = se_step_inputs(batch, device, dtype)
                out = engine(ids, expr, tids, depth)
                rec = se_loss(out, target, weight, dataset, mcfg)
                acc[0] += w_cells * float(rec.parts["expr"])
                acc[1] += w_cells * float(rec.parts.get("dataset", torch.tensor(0.0)))
                acc[2] += w_cells
        if world > 1:
            dist.all_reduce(acc)
        expr_l, ds_l = float(acc[0] / acc[2]), float(acc[1] / acc[2])
        return {"loss": expr_l + mcfg.dataset_weight * ds_l, "loss_expr": expr_l,
                "loss_dataset": ds_l}

    def write_files(d: Path) -> None:
        shutil.copy(prep.dir / GENE_MAP, d / GENE_MAP)

    hooks = LoopHooks(step=step, manifest=prep.manifest(),
                      validate=validate if val is not None else None,
                      score=lambda v: -v["loss"], check_resume=lambda m: check_resume(m, prep),
                      write_files=write_files, kind=CHECKPOINT_KIND, tag="se")
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
class SEResult:
    run_dir: Path | str                    # s3:// URIs for a run on object storage
    best_checkpoint: Path | str | None
    latest_checkpoint: Path | str | None
    metrics: dict
    return_value: dict | None
    prep: SEPrep
    wall_s: float


def train_se(cfg: SETrainConfig, *, progress: bool = True) -> SEResult:
    """Run (or resume) one SE pretraining run; see the module docstring."""
    t0 = time.perf_counter()
    rs = begin_run(cfg, prepare, prep_key, SEPrep.load, check_resume, "se", progress)
    cfg, prep, run_dir = rs.cfg, rs.prep, rs.run_dir
    mcfg = SEConfig.from_dict(prep.model_config)
    stream = cell_stream(cfg.corpus, cfg.data, split="train",
                         world_size=cfg.num_workers, board=rs.board,
                         transform=SESentences(mcfg, prep.gene_map(), seed=cfg.seed))
    res = fit(train_loop_per_worker,
              {"cfg": cfg.to_dict(), "prep_dir": rs.prep_location, "board": rs.board,
               "optim": rs.optim.to_dict(), "max_steps": rs.total_steps},
              run_dir=run_dir, datasets={"train": stream.dataset}, num_workers=cfg.num_workers,
              cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu,
              keep_checkpoints=cfg.keep_checkpoints, max_failures=cfg.max_failures,
              board_actor=rs.board_actor, placement_strategy=cfg.placement_strategy)
    return SEResult(run_dir, res.best_checkpoint, res.latest_checkpoint, res.metrics,
                    res.return_value, prep, time.perf_counter() - t0)


__all__ = ["CHECKPOINT_KIND", "RECIPES", "SEPrep", "SEResult", "SETrainConfig", "check_resume",
           "model_config_for", "prep_key", "prepare", "recipe_values", "se_recipe",
           "se_step_inputs", "train_loop_per_worker", "train_se"]
