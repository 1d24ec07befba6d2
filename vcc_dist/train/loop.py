"""What every vcc-dist trainer shares (ST and SE): recipes and overrides, the per-worker
training loop with exact-resume checkpoints, and the Ray Train driver.

The per-worker loop (:func:`worker_loop`) is the part worth sharing: for each epoch, rank 0
tells the stream's position board which epoch to play and which batches to skip (after a
restart), then every rank consumes its shard, steps the DeepSpeed engine, logs from rank 0,
and at every ``checkpoint_every`` optimizer steps and at each epoch's end runs the
trainer's validation (collective), saves every rank's DeepSpeed shard plus a manifest and
reports the checkpoint to Ray with its ranking ``score``. The trainer supplies a
:class:`LoopHooks`: the step (micro-batch -> loss), the validation, the manifest and the
resume check.

Checkpoint layout (one directory, merged by Ray from every rank's files)::

    deepspeed/state/...     DeepSpeed's sharded model/optimizer/scheduler state
    manifest.json           kind, the trainer's manifest, config, trainer state, val metrics
    <extra files>           whatever the trainer's ``write_files`` adds (rank 0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcc_dist.config import from_dict_checked  # noqa: F401  (re-exported)
from vcc_dist.fileio import atomic_json, json_default  # noqa: F401  (re-exported)

MANIFEST = "manifest.json"
DS_DIR, DS_TAG = "deepspeed", "state"


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the data, features or config it is used with."""


# ---------------------------------------------------------------------------------------------
# configs, recipes, files
# ---------------------------------------------------------------------------------------------


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section")  # noqa: TRY004
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


def merge(base: dict, over: dict) -> dict:
    """Nested dict merge (``over`` wins; sections merge key by key)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_dict(recipe: str | os.PathLike, named: dict[str, dict], overrides: dict | None,
                top: dict[str, Any]) -> dict[str, Any]:
    """A named recipe or a JSON/YAML recipe file, merged with nested ``overrides`` and
    top-level values; checks that ``corpus`` and ``run_dir`` are set."""
    if str(recipe) in named:
        base = json.loads(json.dumps(named[str(recipe)]))
    else:
        path = Path(recipe)
        if not path.is_file():
            raise ValueError(f"recipe {str(recipe)!r} is neither a named recipe {tuple(named)} "
                             "nor a file")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            base = yaml.safe_load(text)
        else:
            base = json.loads(text)
        if not isinstance(base, dict):
            raise ValueError(f"recipe file {path} must hold a mapping of options")
    d = merge(base, overrides or {})
    d = merge(d, {k: v for k, v in top.items() if v is not None})
    missing = [k for k in ("corpus", "run_dir") if not d.get(k)]
    if missing:
        raise ValueError(f"the config needs {missing} (e.g. --corpus, --run-dir)")
    return d


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory (None if there is none)."""
    found = [p for p in Path(run_dir).glob("checkpoint_*") if (p / MANIFEST).is_file()]
    return max(found, key=lambda p: p.name) if found else None


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
                run_name: str, config: dict, wandb: dict, optim: dict) -> dict | None:
    """Train with resume from ``ray.train.get_checkpoint()``; see the module docstring.
    Returns rank 0's summary (None on other ranks)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from vcc_dist.data.plans import StreamPosition
    from vcc_dist.data.streams import set_board
    from vcc_dist.train.engine import load_checkpoint, save_checkpoint
    from vcc_dist.train.runlog import RunLogger, WandbConfig

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_path = Path(run_dir)
    workers = run_path / "workers"
    workers.mkdir(parents=True, exist_ok=True)
    # observability (and the kill-a-worker tests): each rank's process id
    (workers / f"rank{rank}.pid").write_text(str(os.getpid()))

    state = {"epoch": 0, "consumed": [], "step": 0, "best_score": None}
    resumed = False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            man = json.loads((Path(d) / MANIFEST).read_text())
            if hooks.check_resume is not None:
                hooks.check_resume(man)
            client = load_checkpoint(engine, Path(d) / DS_DIR, tag=DS_TAG)
            state = dict(client["trainer"])
            resumed = True

    logger = RunLogger(run_path, run_name=run_name, config=config,
                       wandb=WandbConfig.from_dict(wandb), enabled=rank == 0,
                       resume_step=state["step"] if resumed else None)
    if rank == 0 and resumed:
        print(f"[{hooks.tag}] resumed from step {state['step']} (epoch {state['epoch']}, "
              f"{len(state['consumed'])} batches of it done)", flush=True)

    step = int(state["step"])
    last_val: dict[str, float] = {}

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
                atomic_json(Path(tmp) / MANIFEST, {
                    "kind": hooks.kind, **hooks.manifest, "train_config": config,
                    "optim": optim, "trainer_state": trainer_state, "val_metrics": last_val,
                    "saved_at": time.time()})
            metrics["score"] = score
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def record(obj: dict) -> None:
        if sched.record_batches:
            with open(workers / "batches.jsonl", "a") as fh:
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
        checkpoint(epoch, [])  # end of epoch: validate and keep
    logger.summary(step=step, best_val_score=state["best_score"],
                   wall_s=time.perf_counter() - t_start,
                   **{f"val_{k}": v for k, v in last_val.items()})
    png = logger.finish(baselines=hooks.baselines or None)
    if rank == 0:
        return {"step": step, "best_val_score": state["best_score"], "last_val": last_val,
                "curves": str(png) if png else None}
    return None


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    best_checkpoint: Path | None
    latest_checkpoint: Path | None
    metrics: dict
    return_value: dict | None


def fit(loop: Callable, loop_config: dict, *, run_dir: Path, datasets: dict, num_workers: int,
        cpus_per_worker: float, use_gpu: bool, keep_checkpoints: int, max_failures: int,
        board_actor=None, callbacks: list | None = None) -> FitResult:
    """Run ``loop`` on a TorchTrainer (storage = ``run_dir``, so a second call with the same
    run_dir resumes from its latest checkpoint), keep the best ``keep_checkpoints`` by
    ``score`` plus the latest, and write ``best_checkpoint.json`` / ``latest_checkpoint.json``.
    ``callbacks``: Ray Train callbacks (e.g. Tune's TuneReportCallback inside a sweep trial)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints,
                                               checkpoint_score_attribute="score",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks or None),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    finally:
        if board_actor is not None:
            ray.kill(board_actor)
    latest = Path(result.checkpoint.path) if result.checkpoint else None
    best = None
    if result.best_checkpoints:
        ck, _ = max(result.best_checkpoints, key=lambda cm: cm[1].get("score", -math.inf))
        best = Path(ck.path)
    for name, p in (("best", best), ("latest", latest)):
        if p is not None:
            atomic_json(run_dir / f"{name}_checkpoint.json", {"path": str(p)})
    return FitResult(best, latest, dict(result.metrics or {}), result.return_value)


def new_board_name(tag: str) -> str:
    return f"vcc-{tag}-board-{uuid.uuid4().hex[:12]}"


@dataclass
class RunStart:
    cfg: Any                 # the config with run_dir resolved and epochs covering max_steps
    run_dir: Path
    prep: Any
    total_steps: int
    optim: Any               # OptimConfig with total_steps set
    board: str               # the position board's name
    board_actor: Any


def begin_run(cfg, prepare: Callable, check_resume: Callable, tag: str,
              progress: bool) -> RunStart:
    """The driver's preamble shared by trainers: resolve and record the run directory and
    config, prepare (cached), derive the step budget, refuse a checkpoint made with other
    inputs *before* any worker starts, join or start Ray, and create the stream's position
    board."""
    import ray

    from vcc_dist.data.streams import position_board
    from vcc_dist.ray_utils import ensure_ray

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # absolute input paths: Ray Train runs each worker in its own working directory
    paths = {k: str(Path(getattr(cfg, k)).resolve()) for k in ("corpus", "split", "gene_table")
             if isinstance(getattr(cfg, k, None), str) and getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir), **paths)
    atomic_json(run_dir / "config.json", cfg.to_dict())
    prep = prepare(cfg, progress=progress)
    total = cfg.max_steps or cfg.epochs * prep.steps_per_epoch
    if cfg.max_steps:
        cfg = dataclasses.replace(cfg, epochs=max(cfg.epochs,
                                                  math.ceil(cfg.max_steps / prep.steps_per_epoch)))
    optim = cfg.optim_config(total)
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        check_resume(json.loads((latest / MANIFEST).read_text()), prep)
    ensure_ray()
    board = new_board_name(tag)
    actor = position_board(board)
    ray.data.DataContext.get_current().enable_progress_bars = bool(progress)
    return RunStart(cfg, run_dir, prep, total, optim, board, actor)


__all__ = ["CheckpointMismatch", "FitResult", "LoopHooks", "Schedule", "atomic_json", "fit",
           "from_dict_checked", "latest_checkpoint", "merge", "parse_overrides", "recipe_dict",
           "worker_loop"]
