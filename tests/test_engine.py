"""The DeepSpeed engine wrapper: configs, LR schedule, DeepSpeed config, a real CPU engine."""
import math
import os
from itertools import pairwise

import pytest
import torch

from vcc_dist.train.engine import (
    EngineConfig,
    OptimConfig,
    build_engine,
    deepspeed_config,
    load_checkpoint,
    lr_at,
    make_scheduler,
    param_groups,
    save_checkpoint,
)

OPT = OptimConfig(lr=1e-3, warmup_steps=10, total_steps=50, min_lr_ratio=0.1, grad_accum_steps=4)


def test_lr_at_shape():
    assert lr_at(0, OPT) == 0.0
    assert lr_at(OPT.warmup_steps, OPT) == pytest.approx(OPT.lr)
    assert lr_at(OPT.total_steps, OPT) == pytest.approx(OPT.lr * OPT.min_lr_ratio)
    assert lr_at(OPT.total_steps + 100, OPT) == pytest.approx(OPT.lr * OPT.min_lr_ratio)
    warm = [lr_at(s, OPT) for s in range(OPT.warmup_steps + 1)]
    decay = [lr_at(s, OPT) for s in range(OPT.warmup_steps, OPT.total_steps + 1)]
    assert all(a < b for a, b in pairwise(warm))
    assert all(a > b for a, b in pairwise(decay))
    assert lr_at(5, OPT) == pytest.approx(OPT.lr / 2)  # linear warm-up
    mid = (OPT.warmup_steps + OPT.total_steps) // 2  # cosine half-way: mean of peak and floor
    assert lr_at(mid, OPT) == pytest.approx(OPT.lr * (1 + OPT.min_lr_ratio) / 2)
    no_warm = OptimConfig(lr=1.0, warmup_steps=0, total_steps=4)
    assert lr_at(0, no_warm) == 1.0


def test_scheduler_steps_once_per_optimizer_step_with_accumulation():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=OPT.lr)
    sched = make_scheduler(opt, OPT)
    assert opt.param_groups[0]["lr"] == 0.0
    x = torch.randn(8, 3)
    n_opt_steps = 17
    for micro in range(n_opt_steps * OPT.grad_accum_steps):
        (model(x).pow(2).mean() / OPT.grad_accum_steps).backward()
        if (micro + 1) % OPT.grad_accum_steps == 0:  # accumulation boundary
            opt.step()
            opt.zero_grad()
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(n_opt_steps, OPT))


@pytest.mark.parametrize("key,value", [
    ("lr", 0.0), ("weight_decay", -1.0), ("betas", (0.9, 1.0)), ("eps", 0.0),
    ("warmup_steps", -1), ("total_steps", 5), ("min_lr_ratio", 1.5), ("grad_clip", -1.0),
    ("grad_accum_steps", 0),
])
def test_optim_config_errors_name_the_key(key, value):
    kwargs = {"warmup_steps": 10, "total_steps": 50, key: value}
    with pytest.raises(ValueError, match=key):
        OptimConfig(**kwargs)


def test_engine_config_validation():
    with pytest.raises(ValueError, match="zero_stage"):
        EngineConfig(zero_stage=4)
    with pytest.raises(ValueError, match="precision"):
        EngineConfig(precision="fp8")
    with pytest.raises(ValueError, match="offload_optimizer"):
        EngineConfig(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="matmul_precision"):
        EngineConfig(matmul_precision="bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_fp16_refused_for_cpu_workers_and_auto_is_fp32():
    # the check is made against the workers' resources, not at construction (a CPU driver
    # submits GPU runs and loads fp16-trained checkpoints)
    cfg = EngineConfig(precision="fp16")
    cfg.check_hardware(use_gpu=True)
    with pytest.raises(ValueError, match="fp16.*needs GPU workers"):
        cfg.check_hardware(use_gpu=False)
    assert EngineConfig(precision="auto").resolved_precision == "fp32"


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_config_fields(stage, precision):
    cfg = deepspeed_config(EngineConfig(zero_stage=stage, precision=precision),
                           OptimConfig(grad_clip=0.5, grad_accum_steps=3), micro_batch_size=4,
                           world_size=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["gradient_clipping"] == 0.5
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    b = EngineConfig().bucket_elements  # bounded buckets (DeepSpeed's 5e8 reserves 2 GB/rank)
    if stage >= 1:
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == b
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] == b
    if stage == 0:
        assert zero == {"stage": 0}
    assert cfg["bf16"] == {"enabled": precision == "bf16"}
    assert cfg["fp16"] == {"enabled": False}
    assert cfg["steps_per_print"] >= 10**6
    assert cfg["wall_clock_breakdown"] is False


def test_param_groups_exclude_bias_and_norm_from_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 3)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.3
    return x, y


def _inner_step_count(engine) -> int:
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    steps = {int(s["step"]) for s in inner.state.values()}
    assert len(steps) == 1
    return steps.pop()


@pytest.mark.integration
def test_deepspeed_engine_cpu_zero2_train_lr_and_checkpoint(tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    optim = OptimConfig(lr=0.5, weight_decay=0.0, warmup_steps=3, total_steps=10, min_lr_ratio=0.1,
                        grad_clip=1.0, grad_accum_steps=2)
    ecfg = EngineConfig(zero_stage=2, precision="fp32", seed=0)
    torch.manual_seed(0)
    engine, _ = build_engine(torch.nn.Linear(4, 1), ecfg, optim, micro_batch_size=8)
    x, y = _problem()

    def full_loss():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(engine(x), y).item()

    before = full_loss()
    assert engine.get_lr()[0] == 0.0
    for micro in range(20):
        sl = slice((micro % 8) * 8, (micro % 8) * 8 + 8)
        loss = torch.nn.functional.mse_loss(engine(x[sl]), y[sl])
        engine.backward(loss)
        engine.step()
        if (micro + 1) % optim.grad_accum_steps == 0:
            n = (micro + 1) // optim.grad_accum_steps
            assert engine.global_steps == n
            assert engine.get_lr()[0] == pytest.approx(lr_at(n, optim))
    after = full_loss()
    assert after < 0.5 * before
    assert _inner_step_count(engine) == 10

    save_checkpoint(engine, tmp_path / "ckpt", "step10", {"epoch": 3, "note": "hi"})
    params = [p.detach().clone() for p in engine.module.parameters()]

    torch.manual_seed(123)  # a differently initialised fresh model
    fresh, _ = build_engine(torch.nn.Linear(4, 1), ecfg, optim, micro_batch_size=8)
    assert not all(torch.equal(a, b) for a, b in zip(params, fresh.module.parameters()))
    client = load_checkpoint(fresh, tmp_path / "ckpt", "step10")
    assert client["epoch"] == 3 and client["note"] == "hi"
    for a, b in zip(params, fresh.module.parameters()):
        assert torch.equal(a, b)
    assert fresh.global_steps == 10
    assert _inner_step_count(fresh) == 10
    assert fresh.get_lr()[0] == pytest.approx(lr_at(10, optim))
    assert math.isclose(full_loss(), after)
