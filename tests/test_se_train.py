"""SE pretraining on a local Ray cluster: 2 workers, DeepSpeed ZeRO-3, checkpoints, resume,
validation loss, and cell embeddings written into the corpus (integration tier)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vcc_dist.train.se import SETrainConfig, se_recipe, train_se

pytestmark = pytest.mark.integration


def _gene_table(corpus, path, drop: int = 5, dim: int = 24):
    """A random {gene: vector} table for the corpus vocabulary, missing ``drop`` genes."""
    from vcc_dist.data.corpus import load_manifest

    genes = list(load_manifest(corpus).genes)
    g = torch.Generator().manual_seed(0)
    torch.save({name: torch.randn(dim, generator=g) for name in genes[drop:]}, path)
    return genes[:drop]


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory, ray_local):
    _, corpus = tiny_corpus
    root = tmp_path_factory.mktemp("se")
    table = root / "genes.pt"
    dropped = _gene_table(corpus, table)
    cfg = se_recipe("debug", {"engine": {"zero_stage": 3}, "wandb": {"mode": "disabled"}},
                    corpus=str(corpus), gene_table=str(table), run_dir=str(root / "run"),
                    num_workers=2, cpus_per_worker=0.5, max_steps=6, checkpoint_every=3,
                    record_batches=True)
    res = train_se(cfg, progress=False)
    return cfg, res, dropped, root


def test_zero3_two_workers_checkpoints_and_validation(trained):
    cfg, res, dropped, _ = trained
    rv = res.return_value
    assert rv["step"] == 6
    assert res.best_checkpoint is not None and res.latest_checkpoint is not None
    man = json.loads((res.latest_checkpoint / "manifest.json").read_text())
    assert man["kind"] == "vcc-dist/se-checkpoint"
    assert man["trainer_state"]["step"] == 6
    assert sorted(man["missing_genes"]) == sorted(dropped)       # reported, excluded
    assert not set(dropped) & set(man["table_genes"])
    assert man["model_config"]["n_datasets"] == len(man["stores"])
    # every rank's ZeRO-3 shard is in the merged checkpoint
    shards = list((res.latest_checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2
    val = pd.read_csv(res.run_dir / "metrics_val.csv")
    assert list(val["step"]) == [3, 6]
    assert np.isfinite(val["loss"]).all() and (val["loss"] > 0).all()
    train = pd.read_csv(res.run_dir / "metrics_train.csv")
    assert {"loss", "loss/expr", "loss/dataset", "lr", "cells_per_s_worker",
            "tokens_per_s_worker"} <= set(train.columns)
    assert (train["tokens_per_s_worker"] > train["cells_per_s_worker"]).all()
    # both workers consumed disjoint batches
    recs = [json.loads(x) for x in (res.run_dir / "workers" / "batches.jsonl").read_text().splitlines()]
    by_rank: dict[int, set] = {}
    for r in recs:
        if r["event"] == "batch":
            by_rank.setdefault(r["rank"], set()).update(r["steps"])
    assert set(by_rank) == {0, 1} and not (by_rank[0] & by_rank[1])
    assert (res.run_dir / "curves.png").is_file()
    # the same seed and world size give the same run: the losses this fixture's run gave
    # before the config/checkpoint refactor (tests/data/debug_losses.json)
    golden = np.array(json.loads((Path(__file__).parent / "data" / "debug_losses.json")
                                 .read_text())["se"])
    assert train["step"].tolist() == golden[:, 0].astype(int).tolist()
    np.testing.assert_allclose(train["loss"].to_numpy(), golden[:, 1], rtol=1e-5)


def test_fp16_trained_checkpoint_loads_on_cpu(trained, tmp_path):
    """A checkpoint trained in fp16 on GPUs must load for embedding on a CPU machine: the
    hardware check belongs to the workers, not to reading a manifest."""
    import shutil

    from vcc_dist.infer.se_embed import load_se_checkpoint

    _, res, _, _ = trained
    ck = tmp_path / "checkpoint_fp16"
    shutil.copytree(res.latest_checkpoint, ck)
    man = json.loads((ck / "manifest.json").read_text())
    man["train_config"]["engine"]["precision"] = "fp16"
    man["train_config"]["use_gpu"] = True
    (ck / "manifest.json").write_text(json.dumps(man))
    loaded = load_se_checkpoint(ck)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.manifest.zero_stage == 3


def test_job_restart_resumes_from_latest(trained):
    cfg, res, _, _ = trained
    import dataclasses

    more = dataclasses.replace(cfg, max_steps=8, checkpoint_every=0)
    r2 = train_se(more, progress=False)
    assert r2.return_value["step"] == 8
    train = pd.read_csv(r2.run_dir / "metrics_train.csv")
    assert train["step"].is_monotonic_increasing              # one curve, no restart from 0
    assert json.loads((r2.latest_checkpoint / "manifest.json").read_text())["trainer_state"]["step"] == 8


def test_resume_refuses_another_gene_table(trained, tmp_path):
    cfg, _, _, root = trained
    import dataclasses

    other = tmp_path / "other.pt"
    _gene_table(cfg.corpus, other, drop=7)
    bad = dataclasses.replace(cfg, gene_table=str(other))
    with pytest.raises(ValueError, match="another gene table"):
        train_se(bad, progress=False)


def test_config_errors(tiny_corpus, tmp_path):
    _, corpus = tiny_corpus
    with pytest.raises(ValueError, match="gene_table"):
        se_recipe("debug", corpus=str(corpus), run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="preset"):
        SETrainConfig(corpus=str(corpus), run_dir=str(tmp_path), gene_table="x", preset="huge")
    with pytest.raises(ValueError, match="unknown option 'engine.zero'"):
        SETrainConfig.from_dict({"corpus": str(corpus), "run_dir": str(tmp_path),
                                 "gene_table": "x", "engine": {"zero": 3}})
    with pytest.raises(ValueError, match="must be a EngineConfig.*from_dict"):
        SETrainConfig(corpus=str(corpus), run_dir=str(tmp_path), gene_table="x",
                      engine={"zero_stage": 3})
    table = tmp_path / "unrelated.pt"
    torch.save({"NOT_A_GENE": torch.zeros(4)}, table)
    from vcc_dist.train.se import prepare

    with pytest.raises(ValueError, match="no gene of the corpus vocabulary"):
        prepare(se_recipe("debug", corpus=str(corpus), gene_table=str(table),
                          run_dir=str(tmp_path / "r")), tmp_path / "prep")


@pytest.fixture(scope="module")
def embedded(trained, tiny_corpus):
    """The trained SE's embeddings written into the corpus (one Ray task per store)."""
    from vcc_dist.infer.se_embed import embed_corpus

    _, res, _, _ = trained
    _, corpus = tiny_corpus
    out = embed_corpus(res.run_dir, corpus, key="X_se_test", batch_size=64, read_rows=100,
                       progress=False)
    return out, res, corpus


def test_embed_cells_round_trip(embedded, tmp_path):
    import anndata as ad

    from vcc_dist.data.corpus import load_manifest, store_path
    from vcc_dist.data.embeddings import export_anndata
    from vcc_dist.data.reader import CorpusReader
    from vcc_dist.infer.se_embed import embed_corpus, embed_rows, load_se_checkpoint

    out, res, corpus = embedded
    m = load_manifest(corpus)
    assert sorted(out["embedded"]) == sorted(s.name for s in m.stores)
    loaded = load_se_checkpoint(res.run_dir)
    dim = loaded.model.cfg.embed_dim
    assert out["dim"] == dim and out["cells"] == sum(s.n_cells for s in m.stores)
    assert len(out["node_ids"]) == 1  # provenance: the Ray node of every store's task
    # anndata sees obsm[key] with no vcc-dist code; values = a direct forward of the model
    s0 = m.stores[1]
    a = ad.read_zarr(store_path(corpus, s0.name))
    e = np.asarray(a.obsm["X_se_test"])
    assert e.shape == (s0.n_cells, dim)
    reader = CorpusReader(corpus, normalize=False)
    rows = np.array([0, 5, s0.n_cells - 1])
    blk = reader.read(1, rows)
    direct = embed_rows(loaded, blk.indptr, blk.indices, blk.data, blk.totals,
                        loaded.gene_map(m.genes))
    np.testing.assert_allclose(e[rows], direct, rtol=1e-4, atol=1e-5)
    # the cell part is L2-normalised; embedding twice gives identical values (eval determinism)
    cell = e[:, :loaded.model.cfg.output_dim]
    np.testing.assert_allclose(np.linalg.norm(cell, axis=1), 1.0, atol=1e-4)
    again = embed_rows(loaded, blk.indptr, blk.indices, blk.data, blk.totals,
                       loaded.gene_map(m.genes))
    assert np.array_equal(direct, again)
    # a second run skips every store (same checkpoint)
    rerun = embed_corpus(res.run_dir, corpus, key="X_se_test", parallel="serial", progress=False)
    assert rerun["embedded"] == [] and len(rerun["skipped"]) == len(m.stores)
    # AnnData for users: obsm["X_state"]
    h5 = export_anndata(corpus, "X_se_test", tmp_path / "cells.h5ad")
    b = ad.read_h5ad(h5)
    assert b.obsm["X_state"].shape == (out["cells"], dim)


def test_st_trains_on_se_embeddings_and_predicts(embedded, tiny_corpus, tmp_path):
    from vcc_dist.infer.st_predict import load_st_checkpoint, predict_context
    from vcc_dist.train.st import st_recipe, train_st

    _, res, corpus = embedded
    sim, _ = tiny_corpus
    cfg = st_recipe("debug", {"wandb": {"mode": "disabled"}}, corpus=str(corpus),
                    split=str(sim.split_path), run_dir=str(tmp_path / "st_se"),
                    embeddings="X_se_test", max_steps=4, num_workers=1)
    r = train_st(cfg, progress=False)
    man = json.loads((r.latest_checkpoint / "manifest.json").read_text())
    assert man["model_config"]["output_space"] == "embedding"
    assert man["model_config"]["gene_decoder"] is True
    assert man["embeddings"]["key"] == "X_se_test"
    assert man["embeddings"]["dim"] == man["model_config"]["embed_dim"]
    assert np.isfinite(man["val_metrics"]["score"])
    train = pd.read_csv(r.run_dir / "metrics_train.csv")
    assert {"loss/main", "loss/decoder"} <= set(train.columns)
    # prediction: gene-space cells from the held-out context's control embeddings
    loaded = load_st_checkpoint(r.run_dir, "latest")
    ctx = r.prep.val["context"]
    perts = r.prep.val["perts"][:2]
    with pytest.warns(UserWarning, match="validation perturbations of this checkpoint"):
        out = predict_context(loaded, corpus, ctx, {p: 5 for p in perts}, tmp_path / "pred.h5ad")
    import anndata as ad

    a = ad.read_h5ad(out)
    assert a.n_vars == len(r.prep.genes)
    assert (a.obs["target_gene"].astype(str).values[:10] == np.repeat(perts, 5)).all()
