"""Guards of the project's contracts (fast, no Ray): every shipped recipe and every named Tune
search space builds down to the model; the typed config tree refuses what it does not know
(with the dotted key) and derived values cannot disagree; the checkpoint manifest is versioned;
a resource plan that would starve the data stream is refused; a refused run changes nothing
on disk."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vcc_dist.checkpoint import (
    FORMAT_VERSION,
    SE_KIND,
    ST_KIND,
    CheckpointError,
    SEManifest,
    STManifest,
    manifest_from_dict,
    resolve_checkpoint,
)
from vcc_dist.config import ConfigError, check_dotted, merge, parse_overrides, set_dotted
from vcc_dist.models.se import SEModel
from vcc_dist.models.st import STModel
from vcc_dist.train import se as se_train
from vcc_dist.train import st as st_train
from vcc_dist.train.engine import EngineConfig, OptimConfig
from vcc_dist.train.loop import ResourcePlanError, check_resource_plan, resume_location
from vcc_dist.tune.sweep import SPACES, SweepConfig

TOP = {"corpus": "corpus", "run_dir": "run"}
#: the base recipe each named space is meant for
SPACE_RECIPE = {"debug": "debug", "demo": "demo", "default": "demo", "se": "demo_se"}


def _complete_st(cfg: st_train.STTrainConfig):
    """The model config as prepare() completes it, on made-up data sizes."""
    n_genes = 50
    over = {"n_genes": n_genes, "pert_dim": 2 * n_genes}
    if cfg.model.n_batches == "auto":
        over["n_batches"] = 3
    if cfg.embeddings:
        over.update(output_space="embedding", embed_dim=16, gene_decoder=True)
    return dataclasses.replace(cfg.model, **over)


def _build_st(cfg: st_train.STTrainConfig) -> int:
    with torch.device("meta"):  # state_sm is 38M parameters: no memory needed to build it
        model = STModel(_complete_st(cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", st_train.RECIPES)
def test_every_st_recipe_builds_down_to_the_model(name):
    cfg = st_train.st_recipe(name, **TOP)
    assert cfg.data.set_size == cfg.model.cell_set_len  # one source of truth
    assert cfg.data.seed == cfg.seed
    assert st_train.STTrainConfig.from_dict(cfg.to_dict()) == cfg  # JSON round trip
    cfg.optim.resolve(100)
    assert _build_st(cfg) > 0


@pytest.mark.parametrize("name", se_train.RECIPES)
def test_every_se_recipe_builds_down_to_the_model(name):
    cfg = se_train.se_recipe(name, gene_table="genes.pt", **TOP)
    assert se_train.SETrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.data.normalize is False and cfg.data.genes == "all"
    mcfg = se_train.model_config_for(cfg, 300, 64, 4)
    with torch.device("meta"):
        model = SEModel(mcfg, torch.zeros(300, 64, device="meta"))
    assert sum(p.numel() for p in model.parameters()) > 0


def _domain_values(spec: tuple) -> list:
    kind, *args = spec
    if kind in ("choice", "grid"):
        return list(args[0])
    if kind in ("loguniform", "uniform"):
        return [args[0], args[1]]
    if kind == "randint":
        return [args[0], args[1] - 1]
    raise AssertionError(kind)


@pytest.mark.parametrize("space", list(SPACES))
def test_every_search_space_value_builds_down_to_the_model(space):
    base = st_train.st_recipe(SPACE_RECIPE[space], **TOP).to_dict()
    for key, spec in SPACES[space].items():
        check_dotted(st_train.STTrainConfig, key)
        for v in _domain_values(spec):
            over: dict = {}
            set_dotted(over, key, v)
            cfg = st_train.STTrainConfig.from_dict(merge(base, over))
            assert cfg.data.set_size == cfg.model.cell_set_len
            assert _build_st(cfg) > 0, (key, v)


def test_search_space_and_override_typos_fail_before_any_trial():
    with pytest.raises(ConfigError, match="search space key 'model.hiden_dim'.*valid options"):
        SweepConfig(corpus="c", split="s", run_dir="r", space={"model.hiden_dim": ("choice", [8])})
    with pytest.raises(ConfigError, match="unknown option 'optim.learning_rate'"):
        SweepConfig(corpus="c", split="s", run_dir="r", space="debug",
                    overrides={"optim": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match="unknown option 'engine.zero'"):
        parse_overrides(["engine.zero=3"], st_train.STTrainConfig)
    assert parse_overrides(["engine.zero_stage=3", "optim.lr=1e-3"], st_train.STTrainConfig) == {
        "engine": {"zero_stage": 3}, "optim": {"lr": 1e-3}}


def test_set_size_has_one_source_of_truth():
    # the training sets, validation and prediction all read model.cell_set_len
    cfg = st_train.st_recipe("debug", parse_overrides(["model.cell_set_len=16"]), **TOP)
    assert cfg.data.set_size == 16 and cfg.model.cell_set_len == 16
    with pytest.raises(ConfigError, match="data.set_size=64 cannot be set.*model.cell_set_len"):
        st_train.st_recipe("debug", parse_overrides(["data.set_size=64"]), **TOP)
    # a value equal to the derived one (an old recipe file) is accepted
    st_train.st_recipe("debug", parse_overrides(["data.set_size=8"]), **TOP)
    with pytest.raises(ConfigError, match="data.seed.*seed="):
        st_train.st_recipe("debug", {"data": {"seed": 5}}, **TOP)
    with pytest.raises(ConfigError, match="model.n_genes.*from the corpus"):
        st_train.st_recipe("debug", {"model": {"n_genes": 5}}, **TOP)
    assert "set_size" not in st_train.st_recipe("debug", **TOP).to_dict()["data"]
    with pytest.raises(ConfigError, match="data.normalize"):
        se_train.se_recipe("debug", {"data": {"normalize": True}}, gene_table="g", **TOP)


def test_section_errors_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"^optim: OptimConfig.lr"):
        st_train.st_recipe("debug", {"optim": {"lr": 0}}, **TOP)
    with pytest.raises(ConfigError, match="model: .*hidden_dim=30 must be divisible"):
        st_train.st_recipe("debug", {"model": {"hidden_dim": 30, "n_heads": 4}}, **TOP)
    with pytest.raises(ConfigError, match="wandb: .*mode"):
        st_train.st_recipe("debug", {"wandb": {"mode": "loud"}}, **TOP)
    with pytest.raises(ConfigError, match="STTrainConfig.optim must be a OptimConfig"):
        st_train.st_recipe("debug", {"optim": 3}, **TOP)


def test_hardware_checks_are_made_against_the_workers():
    # a CPU-only driver builds a GPU fp16 config (it submits it to GPU workers) ...
    cfg = st_train.st_recipe("debug", {"engine": {"precision": "fp16"}, "use_gpu": True}, **TOP)
    cfg.check_hardware(cfg.engine)
    # ... and refuses fp16 for CPU workers, naming the fix
    cpu = dataclasses.replace(cfg, use_gpu=False)
    with pytest.raises(ValueError, match="fp16.*use_gpu=true"):
        cpu.check_hardware(cpu.engine)
    EngineConfig(precision="fp16")  # constructing one never depends on the driver's hardware


def test_optim_schedule_is_derived_once():
    o = OptimConfig(lr=1e-3)
    assert not o.resolved
    r = o.resolve(500)
    assert (r.total_steps, r.warmup_steps) == (500, 50)
    assert OptimConfig(warmup_steps=2).resolve(10).warmup_steps == 2
    assert OptimConfig(total_steps=40).resolve(10).total_steps == 40


@pytest.mark.parametrize("workers,cpw,cpus,ok", [
    (1, 1.0, 2, True), (2, 0.5, 2, True), (2, 1.0, 2, False), (1, 2.0, 2, False),
    (4, 1.0, 16, True), (2, 1.0, 3, True)])
def test_resource_plan_that_starves_the_stream_is_refused(workers, cpw, cpus, ok):
    if ok:
        check_resource_plan(workers, cpw, False, {"CPU": cpus})
    else:
        with pytest.raises(ResourcePlanError, match="data stream.*cpus_per_worker"):
            check_resource_plan(workers, cpw, False, {"CPU": cpus})


def test_gpu_plan_needs_the_gpus():
    with pytest.raises(ResourcePlanError, match="needs 2 GPUs"):
        check_resource_plan(2, 1.0, True, {"CPU": 8, "GPU": 1})


def test_missing_corpus_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "runs" / "st"
    cfg = st_train.st_recipe("debug", corpus=str(tmp_path / "nope"), run_dir=str(run))
    with pytest.raises(FileNotFoundError, match="not a corpus directory.*jobs/convert.py"):
        st_train.train_st(cfg, progress=False)
    assert not run.exists() and not (tmp_path / "runs").exists()


def test_manifest_versions_and_kinds(tmp_path):
    base = {"model_config": {}, "corpus_fingerprint": "f", "train_config": {}}
    # version 1 (no format_version, no zero_stage): the stage as version 1 chose it
    m = manifest_from_dict({"kind": SE_KIND, **base, "train_config": {"num_workers": 2}})
    assert isinstance(m, SEManifest) and m.format_version == 1 and m.zero_stage == 3
    m = manifest_from_dict({"kind": SE_KIND, **base, "train_config": {"num_workers": 1}})
    assert m.zero_stage == 0
    m = manifest_from_dict({"kind": ST_KIND, **base, "train_config": {"engine": {}}})
    assert isinstance(m, STManifest) and m.zero_stage == 2
    m = manifest_from_dict({"kind": ST_KIND, **base, "format_version": FORMAT_VERSION,
                            "zero_stage": 3, "trainer_state": {"step": 7, "consumed": [1, 2]}})
    assert m.step == 7 and m.trainer_state.consumed == (1, 2)
    assert manifest_from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(CheckpointError, match="newer vcc-dist"):
        manifest_from_dict({"kind": ST_KIND, **base, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(CheckpointError, match="unknown checkpoint kind"):
        manifest_from_dict({"kind": "other", **base})
    with pytest.raises(CheckpointError, match="lacks"):
        manifest_from_dict({"kind": ST_KIND})
    # resolution: a run directory without pointer files picks by the manifests' scores
    for name, score in (("checkpoint_a", 0.2), ("checkpoint_b", 0.5), ("checkpoint_c", 0.1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(
            {"kind": ST_KIND, **base, "val_metrics": {"score": score}}))
    (tmp_path / "checkpoint_d").mkdir()  # incomplete: no manifest
    assert resolve_checkpoint(tmp_path, "best").name == "checkpoint_b"
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint_c"
    with pytest.raises(ValueError, match="which="):
        resolve_checkpoint(tmp_path, "first")


def test_run_dir_on_object_storage_keeps_its_uri_and_placement_is_checked():
    cfg = st_train.st_recipe("debug", corpus="s3://bucket/corpus", run_dir="s3://bucket/runs/st")
    # the URI stays whole (Path() would collapse "//") and names the run
    assert cfg.run_dir == "s3://bucket/runs/st" and cfg.run_name == "st"
    assert cfg.corpus == "s3://bucket/corpus"
    assert cfg.placement_strategy == "PACK"
    assert st_train.st_recipe("debug", corpus="c", run_dir="r",
                              placement_strategy="SPREAD").placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match="placement_strategy='spread'.*STRICT_SPREAD"):
        st_train.st_recipe("debug", corpus="c", run_dir="r", placement_strategy="spread")


def test_a_restart_resumes_from_the_newest_complete_checkpoint(tmp_path):
    """Ray Train learns of a checkpoint only at its controller's next poll: a worker group
    restarted right after an upload resumes from the run directory's newer complete checkpoint
    (manifest written last), not Ray's older one, nor from scratch."""
    from ray.train import Checkpoint

    base = {"kind": ST_KIND, "model_config": {}, "corpus_fingerprint": "f", "train_config": {},
            "format_version": FORMAT_VERSION, "zero_stage": 2}
    run = tmp_path / "run"

    def ckpt(name: str, step: int | None) -> str:
        d = run / name
        d.mkdir(parents=True)
        if step is not None:  # None: an upload without its manifest (incomplete)
            (d / "manifest.json").write_text(json.dumps({**base, "trainer_state": {"step": step}}))
        return str(d)

    assert resume_location(None, str(run)) is None  # nothing yet: from scratch
    c4 = ckpt("checkpoint_2026-01-01_00-00-04.000000", 4)
    assert resume_location(None, str(run)) == c4  # Ray knew of none (e.g. a head restart)
    assert resume_location(Checkpoint.from_directory(c4), str(run)) == c4
    c8 = ckpt("checkpoint_2026-01-01_00-00-08.000000", 8)
    assert resume_location(Checkpoint.from_directory(c4), str(run)) == c8  # newer than Ray's
    ckpt("checkpoint_2026-01-01_00-00-12.000000", None)  # incomplete: never resumed from
    assert resume_location(Checkpoint.from_directory(c8), str(run)) == c8
    assert resume_location(None, str(run)) == c8
