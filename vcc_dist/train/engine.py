"""The one place vcc-dist touches DeepSpeed (docs/design.md §5).

Everything a training loop needs from DeepSpeed goes through this module: the typed
configs (:class:`OptimConfig`, :class:`EngineConfig`), the learning-rate schedule
(:func:`lr_at`, :func:`make_scheduler`), the DeepSpeed JSON config
(:func:`deepspeed_config`), engine construction (:func:`build_engine`) and checkpoint
wrappers (:func:`save_checkpoint`, :func:`load_checkpoint`).

A step with the engine is::

    loss = model_loss(engine(batch))   # one micro-batch
    engine.backward(loss)              # scales by 1/grad_accum_steps, accumulates
    engine.step()                      # optimizer + scheduler step only at accumulation
                                       # boundaries, i.e. once per *optimizer* step

DeepSpeed steps the ``lr_scheduler`` passed to ``deepspeed.initialize`` itself, inside
``engine.step()`` and only at gradient-accumulation boundaries (and not on an fp16 overflow
step), so the loop must never call ``scheduler.step()`` itself. (STATE steps its scheduler
per micro-batch, which decays the LR ``grad_accum_steps`` times too fast.)

CPU: DeepSpeed picks its accelerator once per process, from ``DS_ACCELERATOR`` when set.
When CUDA is unavailable this module sets ``DS_ACCELERATOR=cpu`` before importing
DeepSpeed, and uses the gloo backend; on GPUs the same code uses NCCL.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def _cuda_available() -> bool:
    return torch.cuda.is_available()


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warm-up + cosine decay. Steps count *optimizer* steps, not micro-batches."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # None: min(100, total_steps // 10), at least 1 (resolved with the run's length)
    warmup_steps: int | None = None
    total_steps: int = 0  # 0: the run's length (epochs x steps per epoch, or max_steps)
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"OptimConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))  # JSON lists -> tuple
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps must be > 0, got {self.eps!r}")
        for key in ("warmup_steps", "total_steps", "grad_accum_steps"):
            v = getattr(self, key)
            if (not isinstance(v, int) or isinstance(v, bool)) and not (
                    key == "warmup_steps" and v is None):
                raise TypeError(f"OptimConfig.{key} must be an int, got {v!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0 (or null: derived), got "
                             f"{self.warmup_steps}")
        if self.total_steps < 0:
            raise ValueError(f"OptimConfig.total_steps must be >= 0 (0: the run's length), got "
                             f"{self.total_steps}")
        if self.total_steps and self.warmup_steps is not None \
                and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimConfig.total_steps ({self.total_steps}) must be > warmup_steps "
                f"({self.warmup_steps}); raise total_steps or lower warmup_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"OptimConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"OptimConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")

    @property
    def resolved(self) -> bool:
        return self.total_steps > 0 and self.warmup_steps is not None

    def resolve(self, run_steps: int) -> OptimConfig:
        """The schedule of a run of ``run_steps`` optimizer steps: ``total_steps`` (if 0) is
        the run's length, ``warmup_steps`` (if None) min(100, total // 10) and at least 1;
        warm-up is capped below the total."""
        total = self.total_steps or max(int(run_steps), 2)
        warm = self.warmup_steps if self.warmup_steps is not None else min(100, max(1, total // 10))
        return dataclasses.replace(self, total_steps=total, warmup_steps=min(int(warm), total - 1))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass(frozen=True)
class EngineConfig:
    """How DeepSpeed runs the model.

    precision: "fp32", "bf16", "auto" (bf16 when CUDA is available, else fp32) or "fp16"
    (GPU only: DeepSpeed refuses fp16 on CPU; :meth:`check_hardware` refuses it for CPU workers).
    activation_checkpointing: recorded for the model to apply (DeepSpeed's own config section
    only affects its ``deepspeed.checkpointing`` API, which vcc-dist models do not use).
    offload_optimizer: ZeRO-Offload of optimizer states to CPU (stage >= 1). It uses DeepSpeed's
    ``DeepSpeedCPUAdam``, which compiles the ``cpu_adam`` extension on first use (~2 min once);
    keep it out of tests and CI.
    """

    zero_stage: int = 2
    precision: str = "auto"
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    seed: int = 0
    # torch.set_float32_matmul_precision: "highest" (exact fp32), "high"/"medium" let fp32
    # matmuls use TF32 on GPUs and bf16 on CPUs with AMX/AVX512-BF16 (what STATE's trainer sets:
    # "medium"; 1.4x faster on such CPUs, at bf16 rounding of the matmul inputs)
    matmul_precision: str = "highest"
    # ZeRO communication buckets, in elements (DeepSpeed's default, 5e8, reserves 2 GB per
    # rank in fp32 for the gradient bucket alone: measured in benchmarks/se_speed.py --memory)
    bucket_elements: int = 50_000_000

    def __post_init__(self) -> None:
        if isinstance(self.bucket_elements, bool) or not isinstance(self.bucket_elements, int) \
                or self.bucket_elements < 1:
            raise ValueError(f"EngineConfig.bucket_elements must be a positive integer, got "
                             f"{self.bucket_elements!r}")
        if self.matmul_precision not in ("highest", "high", "medium"):
            raise ValueError(f"EngineConfig.matmul_precision must be 'highest', 'high' or "
                             f"'medium', got {self.matmul_precision!r}")
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            raise ValueError(f"EngineConfig.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"EngineConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("EngineConfig.offload_optimizer needs zero_stage >= 1, got zero_stage=0")
        if not isinstance(self.seed, int):
            raise TypeError(f"EngineConfig.seed must be an int, got {self.seed!r}")

    def check_hardware(self, use_gpu: bool) -> None:
        """Refuse settings the workers' hardware cannot run. ``use_gpu``: whether the workers
        get GPUs (the driver's own hardware does not matter: a CPU-only driver submits GPU
        runs, and a CPU machine loads any checkpoint). Trainers call it on the driver with the
        run's ``use_gpu`` and again in each worker with what the worker sees."""
        if self.precision == "fp16" and not use_gpu:
            raise ValueError(
                "engine.precision='fp16' needs GPU workers (DeepSpeed's CPU accelerator has no "
                "fp16 training); set use_gpu=true, or precision='fp32', 'bf16' or 'auto'")

    @property
    def resolved_precision(self) -> str:
        """The precision actually used: 'auto' becomes bf16 on CUDA, fp32 otherwise."""
        if self.precision == "auto":
            return "bf16" if _cuda_available() else "fp32"
        return self.precision

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- learning-rate schedule

def lr_at(step: int, cfg: OptimConfig) -> float:
    """LR after ``step`` optimizer steps: linear 0 -> lr over warmup_steps, then cosine decay to
    lr * min_lr_ratio at total_steps, constant afterwards."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not cfg.resolved:
        raise ValueError("OptimConfig is not resolved (total_steps=0 or warmup_steps=None): "
                         "call cfg.resolve(run_steps) first")
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if step >= cfg.total_steps:
        return cfg.lr * cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR giving ``lr_at(n, cfg)`` after n calls to ``step()``. Step it once per
    OPTIMIZER step (DeepSpeed does so itself when given it as ``lr_scheduler``). The optimizer's
    param groups must have ``lr == cfg.lr`` (the lambda is a multiplier of it)."""
    for i, g in enumerate(optimizer.param_groups):
        if not math.isclose(g.get("initial_lr", g["lr"]), cfg.lr):
            raise ValueError(f"optimizer param group {i} has lr={g['lr']}, expected OptimConfig.lr={cfg.lr}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)


# ---------------------------------------------------------------- DeepSpeed config

def deepspeed_config(engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch_size: int,
                     world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config. The optimizer and scheduler are passed as objects to
    ``deepspeed.initialize``, so they are not described here."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    precision = engine_cfg.resolved_precision
    b = int(engine_cfg.bucket_elements)
    zero: dict[str, Any] = {"stage": engine_cfg.zero_stage}
    if engine_cfg.zero_stage >= 1:
        zero.update(reduce_bucket_size=b, allgather_bucket_size=b)
    if engine_cfg.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=b)
    if engine_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": _cuda_available()}
    return {
        "train_batch_size": micro_batch_size * optim_cfg.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": optim_cfg.grad_accum_steps,
        "gradient_clipping": float(optim_cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------- engine

def _ensure_cpu_accelerator() -> None:
    """DeepSpeed caches its accelerator on first use: without CUDA, select the CPU one
    before deepspeed is imported (a user-set DS_ACCELERATOR wins)."""
    if not _cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_process_group() -> None:
    """Under Ray Train the process group already exists (TorchTrainer creates it) and is
    reused. Otherwise start a single-process group on 127.0.0.1 with a free port: gloo on CPU,
    nccl on CUDA."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    backend = "nccl" if _cuda_available() else "gloo"
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for matrices, none for biases and norm/1-d weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Trainers call it before they build the model (the
    weights' initial values come from torch's generator), and :func:`build_engine` calls it
    again, so that the same seed and world size give the same run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_engine(model: torch.nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig,
                 micro_batch_size: int):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warm-up/cosine scheduler.

    Returns ``(engine, scheduler)``; the engine steps the scheduler itself once per optimizer
    step. Seeds python/numpy/torch with ``engine_cfg.seed`` first. Initialises a single-process
    process group when none exists (under Ray Train, the trainer's group is used).
    """
    _ensure_cpu_accelerator()
    import deepspeed
    import torch.distributed as dist

    _ensure_process_group()
    seed_everything(engine_cfg.seed)
    torch.set_float32_matmul_precision(engine_cfg.matmul_precision)

    groups = param_groups(model, optim_cfg.weight_decay)
    if engine_cfg.offload_optimizer:
        from deepspeed.ops.adam import (
            DeepSpeedCPUAdam,  # compiles cpu_adam on first use
        )
        optimizer = DeepSpeedCPUAdam(groups, lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps,
                                     adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps)
    scheduler = make_scheduler(optimizer, optim_cfg)
    config = deepspeed_config(engine_cfg, optim_cfg, micro_batch_size, dist.get_world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    return engine, scheduler


def model_init_context(engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch_size: int):
    """The context to build a model in: under ZeRO-3, ``deepspeed.zero.Init`` partitions each
    parameter as it is created, so no rank ever holds the whole model (at SE-600M the full fp32
    model is 2.2 GB per rank); otherwise a no-op. Needs the process group (Ray Train's)."""
    import contextlib

    if engine_cfg.zero_stage != 3:
        return contextlib.nullcontext()
    _ensure_cpu_accelerator()
    import deepspeed
    import torch.distributed as dist

    _ensure_process_group()
    # deepspeed.comm must wrap the existing torch group first, or zero.Init sees world size 1
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    cfg = deepspeed_config(engine_cfg, optim_cfg, micro_batch_size, dist.get_world_size())
    return deepspeed.zero.Init(config_dict_or_path=cfg)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(engine, directory: str | os.PathLike, tag: str,
                    client_state: dict[str, Any] | None = None) -> Path:
    """Save model, optimizer, scheduler and ``client_state`` under ``directory/tag``.

    Collective: EVERY rank must call it (each writes its own ZeRO shard); under Ray Train each
    rank then reports its directory and Ray merges the shards. Returns ``directory/tag``."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=tag, client_state=dict(client_state or {}))
    return directory / tag


def load_checkpoint(engine, directory: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """Restore model, optimizer and scheduler state from ``directory/tag`` (the latest tag when
    None) into ``engine``; every rank must call it. Returns the saved client_state."""
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {tag!r} in {directory}")
    return dict(client_state or {})


def fp32_state_dict(directory: str | os.PathLike, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 model state of a checkpoint saved by :func:`save_checkpoint` (any ZeRO
    stage, any number of ranks), without a process group: DeepSpeed's own ZeRO-to-fp32
    reconstruction for stages 1-3 (buffers included), the single model file for stage 0."""
    directory = Path(directory)
    if zero_stage == 0:
        sd = torch.load(directory / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    else:
        _ensure_cpu_accelerator()
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        sd = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    return {k: v.float() for k, v in sd.items()}
