"""What every vcc-dist trainer shares (ST and SE): the run section of their configs, the
per-worker training loop with exact-resume checkpoints, and the Ray Train driver.

The per-worker loop (:func:`worker_loop`) is the part worth sharing: for each epoch, rank 0
tells the stream's position board which epoch to play and which batches to skip (after a
restart), then every rank consumes its shard, steps the DeepSpeed engine, logs from rank 0,
and every ``checkpoint_every`` optimizer steps (or, when it is 0, at each epoch's end) and at
the last step runs the trainer's validation (collective), saves every rank's DeepSpeed shard
plus a manifest and reports the checkpoint to Ray with its ranking ``score``. The trainer
supplies a :class:`LoopHooks`: the step (micro-batch -> loss), the validation, the manifest
and the resume check.

The driver's preamble (:func:`begin_run`) refuses a run before it writes anything: missing
inputs, hardware the workers lack, a checkpoint made with other inputs, and a resource plan
under which the data stream gets no CPU (:func:`check_resource_plan`).

Checkpoints follow the contract in :mod:`vcc_dist.checkpoint` (layout, typed manifest).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from vcc_dist import storage
from vcc_dist.checkpoint import (
    DS_DIR,
    DS_TAG,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointMismatch,
    latest_checkpoint,
    local_checkpoint,
    read_manifest,
)
from vcc_dist.config import ConfigError, check_ints, check_sections
from vcc_dist.data.plans import StreamPosition
from vcc_dist.data.streams import position_board, set_board
from vcc_dist.fileio import atomic_json
from vcc_dist.ray_utils import ensure_ray
from vcc_dist.train.engine import EngineConfig, OptimConfig, load_checkpoint, save_checkpoint
from vcc_dist.train.runlog import (
    CSV_PATTERN,
    CURVES_FILE,
    SUMMARY_FILE,
    WANDB_ID_FILE,
    RunLogger,
    WandbConfig,
)


# ---------------------------------------------------------------------------------------------
# the run section every trainer config shares
# ---------------------------------------------------------------------------------------------


#: Ray placement-group strategies for the training workers (ray.train.ScalingConfig)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class RunSection:
    """The options every training run has (ST and SE configs extend it): inputs and where the
    run lives, its length and checkpoints, its workers and its logging."""

    corpus: str = ""                       # corpus directory (data_conversion)
    run_dir: str = ""                      # checkpoints, logs, prep cache; rerun = resume
    name: str = ""                         # run name (default: basename of run_dir)
    seed: int = 0                          # model init, stream order, sampling: same seed +
    #                                        same num_workers = same run
    epochs: int = 1
    max_steps: int = 0                     # optimizer steps; 0 = epochs x steps per epoch
    checkpoint_every: int = 0              # optimizer steps between checkpoints (with
    #                                        validation); 0 = at the end of each epoch
    keep_checkpoints: int = 2              # best by validation kept, plus the latest
    log_every: int = 10                    # optimizer steps between training log rows
    num_workers: int = 1                   # Ray Train workers
    cpus_per_worker: float = 1.0           # CPUs reserved per worker (the data stream needs
    #                                        at least one more CPU free)
    torch_threads: int = 0                 # intra-op threads per worker; 0 = Ray's (its CPUs)
    use_gpu: bool = False                  # one GPU per worker
    placement_strategy: str = "PACK"       # the workers' placement group: PACK (fill a node
    #                                        first), SPREAD (across nodes), STRICT_PACK,
    #                                        STRICT_SPREAD (one worker per node, or wait)
    max_failures: int = 2                  # worker-group restarts from the latest checkpoint
    record_batches: bool = False           # workers/batches.jsonl: every (rank, epoch, step)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        check_sections(self)
        missing = [k for k in ("corpus", "run_dir") if not getattr(self, k)]
        if missing:
            raise ConfigError(f"the config needs {missing} (e.g. --corpus, --run-dir)")
        check_ints(self, ("epochs", "keep_checkpoints", "log_every", "num_workers"),
                   ("max_steps", "checkpoint_every", "max_failures", "seed", "torch_threads"))
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"placement_strategy={self.placement_strategy!r}: choose one of "
                              f"{PLACEMENT_STRATEGIES}")
        if not (isinstance(self.cpus_per_worker, (int, float)) and self.cpus_per_worker > 0):
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker!r} must be > 0")

    @property
    def run_name(self) -> str:
        return self.name or storage.basename(self.run_dir)

    def check_hardware(self, engine: EngineConfig) -> None:
        """Hardware-dependent settings against what the workers get (not the driver)."""
        engine.check_hardware(self.use_gpu)


# ---------------------------------------------------------------------------------------------
# the per-worker loop
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopHooks:
    """What a trainer plugs into :func:`worker_loop`.

    step(batch) -> (LossRecord, counts): one micro-batch forward + loss (the loop calls
        backward/step); ``counts`` e.g. {"cells": n, "tokens": t}, logged as per-second rates.
    validate() -> metrics: collective (every rank calls it); rank 0's return value is logged
        and attached to the checkpoint. None: no validation.
    score(val_metrics) -> float: the checkpoint ranking (higher is better); with no
        validation the step number is used.
    manifest: the trainer's part of manifest.json (JSON-serialisable).
    check_resume(manifest): raise CheckpointMismatch if a checkpoint does not fit.
    write_files(dir): rank 0 adds files to each checkpoint.
    """

    step: Callable[[dict], tuple[Any, dict[str, float]]]
    manifest: dict
    validate: Callable[[], dict[str, float]] | None = None
    score: Callable[[dict], float] | None = None
    check_resume: Callable[[dict], None] | None = None
    write_files: Callable[[Path], None] | None = None
    baselines: dict | None = None
    kind: str = "vcc-dist/checkpoint"
    tag: str = "train"                # log prefix, e.g. "st", "se"


@dataclass
class Schedule:
    epochs: int
    max_steps: int               # optimizer steps in total
    checkpoint_every: int        # optimizer steps (0: epoch ends only)
    log_every: int
    grad_accum_steps: int
    record_batches: bool = False
    batches_per_epoch: int = 0   # over all workers (0: unknown)


def worker_loop(engine, batches: Callable, board: str, sched: Schedule, hooks: LoopHooks, *, run_dir: str,
                run_name: str, config: dict, wandb: WandbConfig, optim: dict) -> dict | None:
    """Train with resume from ``ray.train.get_checkpoint()``; see the module docstring.
    Returns rank 0's summary (None on other ranks)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    remote = storage.is_remote(run_dir)
    # a run directory on object storage: this process works in a local directory of its own
    # (the hosts share no path) and uploads the logs with every checkpoint and at the end
    run_path = Path(tempfile.mkdtemp(prefix=f"vcc-{hooks.tag}-rank{rank}-")) if remote \
        else Path(run_dir)
    if remote and rank == 0:
        pull_logs(run_dir, run_path)
    workers = run_path / "workers"
    workers.mkdir(parents=True, exist_ok=True)
    # observability (and the kill-a-worker tests): each rank's process id
    (workers / f"rank{rank}.pid").write_text(str(os.getpid()))
    # batch records: one file per process on object storage (no appends there)
    batches_file = workers / (f"batches-rank{rank}-{os.getpid()}.jsonl" if remote
                              else "batches.jsonl")

    def push_logs() -> None:
        if remote:
            push_run_files(run_path, run_dir, rank, batches_file)

    state = {"epoch": 0, "consumed": [], "step": 0, "best_score": None}
    resumed = False
    # the checkpoint to resume from, chosen by rank 0 for every rank
    choice = [resume_location(ray.train.get_checkpoint(), run_dir) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is not None:
        d = local_checkpoint(choice[0])
        man = read_manifest(d)
        if hooks.check_resume is not None:
            hooks.check_resume(man)
        client = load_checkpoint(engine, d / DS_DIR, tag=DS_TAG)
        state = dict(client["trainer"])
        resumed = True

    logger = RunLogger(run_path, run_name=run_name, config=config,
                       wandb=wandb, enabled=rank == 0,
                       resume_step=state["step"] if resumed else None)
    if rank == 0 and resumed:
        print(f"[{hooks.tag}] resumed from step {state['step']} (epoch {state['epoch']}, "
              f"{len(state['consumed'])} batches of it done)", flush=True)

    step = int(state["step"])
    last_val: dict[str, float] = {}
    zero_stage = int(engine.zero_optimization_stage())
    # the Ray node of every rank, recorded in each checkpoint (multi-host runs)
    node_ids = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        gathered_nodes: list = [None] * world
        dist.all_gather_object(gathered_nodes, node_ids[0])
        node_ids = [str(n) for n in gathered_nodes]

    def checkpoint(epoch_next: int, consumed: list[int]) -> None:
        nonlocal last_val
        metrics: dict[str, Any] = {"step": step, "epoch": epoch_next}
        score = float(step)
        if hooks.validate is not None:
            engine.eval()
            vals = hooks.validate()
            engine.train()
            if rank == 0:
                last_val = vals
                logger.log(step, vals, kind="val")
                metrics.update({f"val_{k}": v for k, v in vals.items()})
                score = hooks.score(vals) if hooks.score else float(step)
                if state["best_score"] is None or score > state["best_score"]:
                    state["best_score"] = score
        if world > 1:  # rank 0's ranking and best score for everyone
            obj = [score, state["best_score"]]
            dist.broadcast_object_list(obj, src=0)
            score, state["best_score"] = obj
        trainer_state = {"epoch": epoch_next, "consumed": sorted(consumed), "step": step,
                         "best_score": state["best_score"]}
        with tempfile.TemporaryDirectory(prefix=f"vcc-{hooks.tag}-ckpt-") as tmp:
            save_checkpoint(engine, Path(tmp) / DS_DIR, DS_TAG, {"trainer": trainer_state})
            if rank == 0:
                if hooks.write_files is not None:
                    hooks.write_files(Path(tmp))
                # the manifest is written last: a checkpoint without one is incomplete
                atomic_json(Path(tmp) / MANIFEST, {
                    "kind": hooks.kind, "format_version": FORMAT_VERSION, **hooks.manifest,
                    "zero_stage": zero_stage, "node_ids": node_ids, "train_config": config,
                    "optim": optim, "trainer_state": trainer_state, "val_metrics": last_val,
                    "saved_at": time.time()})
            metrics["score"] = score
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        push_logs()

    def record(obj: dict) -> None:
        if sched.record_batches:
            with open(batches_file, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "rank": rank, **obj}) + "\n")

    if resumed:
        record({"event": "resume", "epoch": state["epoch"], "consumed": state["consumed"],
                "step": state["step"]})
    t_last, t_start = time.perf_counter(), time.perf_counter()
    since: dict[str, float] = {}
    done = step >= sched.max_steps
    epoch = int(state["epoch"])
    accum = sched.grad_accum_steps
    while not done and epoch < sched.epochs:
        consumed_before = list(state["consumed"]) if epoch == state["epoch"] else []
        if rank == 0:
            set_board(board, StreamPosition(epoch, tuple(consumed_before)))
        if world > 1:
            dist.barrier()
        mine: list[int] = []
        micro = 0
        for batch in batches():
            rec, counts = hooks.step(batch)
            engine.backward(rec.total)
            engine.step()
            ids = [int(s) for s in torch.unique(batch["step"]).tolist()]
            mine.extend(ids)
            record({"event": "batch", "epoch": int(batch["epoch"][0]), "steps": ids})
            micro += 1
            for k, v in counts.items():
                since[k] = since.get(k, 0.0) + float(v)
            if micro % accum:
                continue
            step += 1
            if step >= sched.max_steps:
                done = True
            if step % sched.log_every == 0 or step == 1 or done:
                vec = torch.tensor([rec.total.item(), *[v.item() for v in rec.parts.values()]])
                if world > 1:
                    dist.all_reduce(vec)
                    vec /= world
                now = time.perf_counter()
                if rank == 0:
                    gn = engine.get_global_grad_norm()
                    dt = max(now - t_last, 1e-9)
                    logger.log(step, {
                        "loss": float(vec[0]), **{f"loss/{k}": float(x) for k, x in
                                                  zip(rec.parts, vec[1:].tolist())},
                        "lr": float(engine.get_lr()[0]),
                        "grad_norm": float(gn) if gn is not None else float("nan"),
                        **{f"{k}_per_s_worker": v / dt for k, v in since.items()},
                        "epoch": epoch}, kind="train")
                t_last, since = now, {}
            if done or (sched.checkpoint_every and step % sched.checkpoint_every == 0):
                # mid-epoch: record the batches every rank consumed, so a resumed (or
                # extended: a larger max_steps) run plays exactly the rest of this epoch
                gathered: list = [None] * world
                if world > 1:
                    dist.all_gather_object(gathered, mine)
                else:
                    gathered = [mine]
                allc = sorted(set(consumed_before).union(*[set(g) for g in gathered]))
                if done and len(allc) == sched.batches_per_epoch:  # the epoch is complete
                    state["epoch"], state["consumed"] = epoch + 1, []
                    checkpoint(epoch + 1, [])
                else:
                    checkpoint(epoch, allc)
            if done:
                break
        if done:
            break
        epoch += 1
        state["epoch"], state["consumed"] = epoch, []
        if not sched.checkpoint_every:  # checkpoint_every replaces the per-epoch checkpoints
            checkpoint(epoch, [])  # end of epoch: validate and keep
    logger.summary(step=step, best_val_score=state["best_score"],
                   wall_s=time.perf_counter() - t_start,
                   **{f"val_{k}": v for k, v in last_val.items()})
    png = logger.finish(baselines=hooks.baselines or None)
    push_logs()
    if remote and png is not None:
        png = storage.join(run_dir, png.name)
    if remote:
        shutil.rmtree(run_path, ignore_errors=True)
    if rank == 0:
        return {"step": step, "best_val_score": state["best_score"], "last_val": last_val,
                "curves": str(png) if png else None}
    return None


def resume_location(ckpt, run_dir: str) -> str | None:
    """Where a (re)started worker group resumes: Ray Train's checkpoint, unless the run
    directory holds a complete checkpoint (manifest written last) of a later step. Ray Train
    learns of a checkpoint only when its controller next polls the workers, so a host lost, or
    a head restarted, right after an upload would otherwise resume from an older checkpoint, or
    start again from none. None: start from scratch."""
    ray_loc = None
    if ckpt is not None:
        ray_loc = storage.s3_uri(ckpt.path) if storage.is_remote(run_dir) else ckpt.path
    try:
        found = latest_checkpoint(run_dir)
    except FileNotFoundError:
        found = None
    if found is None:
        return ray_loc
    if ray_loc is None:
        return str(found)
    if read_manifest(found).trainer_state.step > read_manifest(ray_loc).trainer_state.step:
        return str(found)
    return ray_loc


#: the run's log files (vcc_dist.train.runlog) that follow a run directory on object storage
LOG_FILES = (CSV_PATTERN.format(kind="*"), SUMMARY_FILE, CURVES_FILE, WANDB_ID_FILE)


def pull_logs(run_dir: str, local: Path) -> None:
    """Copy a remote run directory's log files into ``local`` (before a resumed rank 0's
    logger truncates them to the resumed step)."""
    try:
        names = storage.listdir(run_dir)
    except FileNotFoundError:
        return
    for name in names:
        if any(fnmatch.fnmatch(name, pat) for pat in LOG_FILES):
            try:
                (local / name).write_bytes(storage.read_bytes(storage.join(run_dir, name)))
            except (FileNotFoundError, IsADirectoryError):
                continue  # a prefix, or gone meanwhile


def push_run_files(local: Path, run_dir: str, rank: int, batches_file: Path) -> None:
    """Upload rank 0's log files and every rank's batch record to the remote run directory
    (each a whole-object PUT: a reader sees the old or the new file)."""
    if rank == 0:
        for p in sorted(local.iterdir()):
            if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in LOG_FILES):
                storage.write_bytes(storage.join(run_dir, p.name), p.read_bytes())
    if batches_file.is_file():
        storage.write_bytes(storage.join(run_dir, "workers", batches_file.name),
                            batches_file.read_bytes())


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    best_checkpoint: Path | str | None     # s3:// URIs for a run directory on object storage
    latest_checkpoint: Path | str | None
    metrics: dict
    return_value: dict | None


def fit(loop: Callable, loop_config: dict, *, run_dir: Path | str, datasets: dict, num_workers: int,
        cpus_per_worker: float, use_gpu: bool, keep_checkpoints: int, max_failures: int,
        board_actor=None, callbacks: list | None = None,
        placement_strategy: str = "PACK") -> FitResult:
    """Run ``loop`` on a TorchTrainer (storage = ``run_dir``, so a second call with the same
    run_dir resumes from its latest checkpoint), keep the best ``keep_checkpoints`` by
    ``score`` plus the latest, and write ``best_checkpoint.json`` / ``latest_checkpoint.json``.
    ``callbacks``: Ray Train callbacks (e.g. Tune's TuneReportCallback inside a sweep trial).
    A run directory on ``s3://`` is Ray Train's storage through a pyarrow S3 filesystem
    configured like every other client (vcc_dist.storage: the AWS variables)."""
    if storage.is_remote(run_dir):
        fs, parent = storage.pyarrow_filesystem(str(storage.parent(run_dir)))
        where = {"storage_path": parent, "storage_filesystem": fs}
    else:
        where = {"storage_path": str(Path(run_dir).parent)}
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker},
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=storage.basename(run_dir), **where,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints,
                                               checkpoint_score_attribute="score",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks or None),
        datasets=datasets,
        # the streams' own execution options (preserve_order above all): by default Ray Train
        # replaces them with those of the DataContext current where it splits the datasets,
        # which is not the driver's, so blocks reached the ranks in the order read tasks
        # finished. With one read task at a time that was the plan's order; with several (more
        # CPUs, more hosts) the same seed and world size gave other batches (measured: other
        # losses on two hosts than on one)
        dataset_config=DataConfig(execution_options={
            name: ds.context.execution_options for name, ds in datasets.items()}),
    )
    try:
        result = trainer.fit()
    finally:
        if board_actor is not None:
            ray.kill(board_actor)
    def where_is(ck) -> Path | str:
        return storage.s3_uri(ck.path) if storage.is_remote(run_dir) else Path(ck.path)

    latest = where_is(result.checkpoint) if result.checkpoint else None
    best = None
    if result.best_checkpoints:
        ck, _ = max(result.best_checkpoints, key=lambda cm: cm[1].get("score", -math.inf))
        best = where_is(ck)
    for name, p in (("best", best), ("latest", latest)):
        if p is not None:
            storage.write_json(storage.join(run_dir, f"{name}_checkpoint.json"), {"path": str(p)})
    return FitResult(best, latest, dict(result.metrics or {}), result.return_value)


def new_board_name(tag: str) -> str:
    return f"vcc-{tag}-board-{uuid.uuid4().hex[:12]}"


@dataclass
class RunStart:
    cfg: Any                 # the config with run_dir resolved and epochs covering max_steps
    run_dir: Path | str      # a local directory, or an s3:// URI
    prep: Any                # loaded from a local directory (the driver's copy)
    prep_location: str       # where the workers read the prep (``<run_dir>/prep``)
    total_steps: int
    optim: OptimConfig       # resolved: total_steps and warmup_steps set
    board: str               # the position board's name
    board_actor: Any


class ResourcePlanError(ConfigError):
    """The workers would take the resources the data stream needs (the run would hang)."""


def check_resource_plan(num_workers: int, cpus_per_worker: float, use_gpu: bool,
                        resources: dict[str, float], data_cpus: float = 1.0) -> None:
    """Refuse a plan under which Ray Data gets no CPU: its read tasks take one whole CPU
    each, so the workers' reservation must leave ``data_cpus`` free, or training waits
    forever for its first batch. GPU workers need that many GPUs."""
    cpus = float(resources.get("CPU", 0))
    need = num_workers * cpus_per_worker
    if need + data_cpus > cpus + 1e-9:
        fit_cpw = (cpus - data_cpus) / num_workers if cpus > data_cpus else 0
        hint = (f"e.g. cpus_per_worker={fit_cpw:g} (--set cpus_per_worker={fit_cpw:g})"
                if fit_cpw >= 0.1 else f"e.g. num_workers={max(1, int(cpus - data_cpus))}")
        raise ResourcePlanError(
            f"{num_workers} workers x {cpus_per_worker:g} CPUs = {need:g} of the cluster's "
            f"{cpus:g} CPUs leaves {max(cpus - need, 0):g} for the data stream, which needs "
            f"{data_cpus:g} (its read tasks take one whole CPU each): the run would wait forever "
            f"for data. Lower num_workers or cpus_per_worker ({hint}), or add CPUs to Ray")
    if use_gpu and resources.get("GPU", 0) < num_workers:
        raise ResourcePlanError(
            f"use_gpu with {num_workers} workers needs {num_workers} GPUs; the cluster has "
            f"{resources.get('GPU', 0):g}. Lower num_workers or set use_gpu=false")


def _check_inputs(cfg) -> None:
    """Cheap checks of the input paths before anything is written."""
    if not storage.exists(storage.join(cfg.corpus, "corpus.json")):
        raise FileNotFoundError(f"corpus {cfg.corpus!r} is not a corpus directory (no "
                                "corpus.json); convert h5ad files with jobs/convert.py first")
    for key in ("split", "gene_table"):
        v = getattr(cfg, key, None)
        if v and not storage.exists(v):
            raise FileNotFoundError(f"{key} file {v!r} does not exist")


def cached_prep(prep_dir: Path, key: dict, load: Callable):
    """The prep cached in ``prep_dir`` if it was made for ``key``, else None."""
    try:
        if json.loads((prep_dir / "key.json").read_text()) == key:
            return load(prep_dir)
    except (OSError, ValueError, KeyError):
        pass
    return None


PREP_KEY = "key.json"   # written last into a prep: its commit point


def remote_prep(location: str, key: dict, local: Path, load: Callable):
    """The prep stored at ``location`` (object storage) if it was made for ``key``, copied
    into ``local`` and loaded; else None."""
    try:
        if storage.read_json(storage.join(location, PREP_KEY)) != key:
            return None
    except (FileNotFoundError, ValueError):
        return None
    shutil.rmtree(local, ignore_errors=True)
    return load(storage.download_dir(location, local))


def publish_prep(staging: Path, location: str) -> None:
    """Upload a finished prep to ``location``: the old commit point is removed first and the
    new one (``key.json``) uploaded last, so a half-uploaded prep is never taken for a
    complete one."""
    storage.delete_tree(storage.join(location, PREP_KEY))
    storage.upload_dir_last(staging, location, PREP_KEY)


def worker_prep_dir(location: str) -> Path:
    """The prep directory a worker reads: ``location`` itself, or a copy of a remote one in a
    directory of this process (hosts share no path)."""
    if not storage.is_remote(location):
        return Path(location)
    return storage.download_dir(location, tempfile.mkdtemp(prefix="vcc-prep-"))


def begin_run(cfg, prepare: Callable, prep_key: Callable, load_prep: Callable,
              check_resume: Callable, tag: str, progress: bool) -> RunStart:
    """The driver's preamble shared by trainers. In this order, so that a refused run changes
    nothing in the run directory: check the inputs and the hardware; prepare (or reuse the
    cached prep) into a staging directory; refuse a checkpoint made with other inputs; join or
    start Ray and refuse a resource plan that starves the data stream; only then create the
    run directory, move the prep into ``<run_dir>/prep`` and write ``config.json``; finally
    create the stream's position board.

    A run directory on object storage (``s3://...``): the prep is made in a local staging
    directory and uploaded to ``<run_dir>/prep`` (its ``key.json`` last), ``config.json`` and
    the checkpoint pointers are single PUTs, and Ray Train keeps the checkpoints there
    (:func:`fit`); the driver's working copy lives in vcc_dist.storage.scratch_dir.

    ``prepare(cfg, out_dir, progress)`` writes a prep into ``out_dir`` and returns it;
    ``prep_key(cfg)`` identifies a prep; ``load_prep(dir)`` reads one back."""
    remote = storage.is_remote(cfg.run_dir)
    run_dir: Path | str = storage.location(cfg.run_dir) if remote else Path(cfg.run_dir).resolve()
    # absolute input paths: Ray Train runs each worker in its own working directory
    paths = {k: storage.resolved(getattr(cfg, k)) for k in ("corpus", "split", "gene_table")
             if isinstance(getattr(cfg, k, None), str) and getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir), **paths)
    _check_inputs(cfg)
    cfg.check_hardware(cfg.engine)
    # where the prep is kept, and the driver's local copy of it
    local_root = storage.scratch_dir(str(run_dir)) if remote else Path(run_dir)
    final = local_root / "prep"
    prep_location = str(storage.join(run_dir, "prep"))
    key = json.loads(json.dumps(prep_key(cfg), default=str))
    prep = (remote_prep(prep_location, key, final, load_prep) if remote
            else cached_prep(final, key, load_prep))
    staging = None
    try:
        if prep is None:
            local_root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{local_root.name}.prep-",
                                            dir=local_root.parent))
            prep = prepare(cfg, staging, progress=progress)
            atomic_json(staging / PREP_KEY, key)
        latest = latest_checkpoint(run_dir) if remote or Path(run_dir).is_dir() else None
        if latest is not None:
            check_resume(read_manifest(latest), prep)
        ensure_ray()
        check_resource_plan(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu,
                            ray.cluster_resources())
        local_root.mkdir(parents=True, exist_ok=True)
        if staging is not None:
            if remote:
                publish_prep(staging, prep_location)
            if final.exists():
                old = local_root / f".prep-old-{uuid.uuid4().hex[:8]}"
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            staging.rename(final)
            staging = None
            # the prep now lives in ``final``; what it holds in memory only (e.g. ST's set
            # plan) is kept
            prep = dataclasses.replace(prep, dir=final)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    total = cfg.max_steps or cfg.epochs * prep.steps_per_epoch
    if cfg.max_steps:
        cfg = dataclasses.replace(cfg, epochs=max(cfg.epochs,
                                                  math.ceil(cfg.max_steps / prep.steps_per_epoch)))
    storage.write_json(storage.join(run_dir, "config.json"), cfg.to_dict())
    optim = cfg.optim.resolve(total)
    board = new_board_name(tag)
    actor = position_board(board)
    ray.data.DataContext.get_current().enable_progress_bars = bool(progress)
    return RunStart(cfg, run_dir, prep, prep_location, total, optim, board, actor)


__all__ = ["DS_DIR", "DS_TAG", "MANIFEST", "CheckpointMismatch", "FitResult", "LoopHooks",
           "LOG_FILES", "PLACEMENT_STRATEGIES", "PREP_KEY", "ResourcePlanError", "RunSection", "RunStart", "Schedule",
           "atomic_json", "begin_run", "cached_prep", "check_resource_plan", "fit",
           "latest_checkpoint", "publish_prep", "pull_logs", "push_run_files", "remote_prep",
           "resume_location", "worker_loop", "worker_prep_dir"]
