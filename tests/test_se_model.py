"""SE model and its cell sentences: unit tests (fast, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from vcc_dist.data.se_tokens import SETokenizer, gene_map_for
from vcc_dist.models.se import (
    SEConfig,
    SEModel,
    count_parameters,
    se_loss,
    se_preset,
)

G_VOCAB = 60


def _cfg(**kw) -> SEConfig:
    base = dict(n_genes=50, gene_dim=12, d_model=16, n_layers=2, n_heads=2, d_hid=32,
                output_dim=8, dataset_dim=4, n_datasets=3, decoder_hidden=16, sentence_len=10,
                n_expressed=4, n_unexpressed=3, n_shared=2)
    base.update(kw)
    return SEConfig(**base)


def _gene_map() -> np.ndarray:
    # vocabulary genes 0..59; genes 50..59 have no embedding
    gm = np.arange(G_VOCAB)
    gm[50:] = -1
    return gm


def _csr(rows: list[dict[int, int]]):
    m = sp.lil_matrix((len(rows), G_VOCAB), dtype=np.float32)
    for i, r in enumerate(rows):
        for g, c in r.items():
            m[i, g] = c
    m = m.tocsr()
    return m.indptr, m.indices, m.data, np.asarray(m.sum(1)).ravel()


def test_top_k_order_and_padding():
    tok = SETokenizer(_cfg(n_expressed=0, n_unexpressed=0, n_shared=1, mask_targets=False),
                      _gene_map())
    counts = {g: 100 - g for g in range(15)}          # 15 expressed, distinct counts
    counts[55] = 1000                                 # highest, but has no embedding
    few = {3: 5, 7: 9}
    out = tok(*_csr([counts, few]), train=True)
    ids = out["gene_ids"][:, 0]
    assert ids.shape == (2, 10)
    assert ids[0].tolist() == list(range(10))         # highest counts first; gene 55 excluded
    assert ids[1].tolist() == [7, 3] + [-1] * 8       # padded
    assert (out["expr"][1, 0, 2:] == 0).all()
    e = out["expr"][0, 0]
    assert (np.diff(e) <= 0).all() and e[0] == pytest.approx(np.log1p(1e4 * 100 / sum(counts.values())))


def test_ties_broken_by_seeded_generator():
    cfg = _cfg(sentence_len=5, n_expressed=0, n_unexpressed=0, n_shared=1, mask_targets=False)
    cell = {g: 3 for g in range(30)}                  # 30 tied genes, 5 slots
    picks = {}
    for seed in (0, 1):
        for rep in range(2):
            picks[seed, rep] = SETokenizer(cfg, _gene_map(), seed)(*_csr([cell]), step=4)["gene_ids"][0, 0]
    assert (picks[0, 0] == picks[0, 1]).all()         # same seed, same batch: same sentence
    assert set(picks[0, 0]) != set(picks[1, 0])       # another seed: another choice
    other_step = SETokenizer(cfg, _gene_map(), 0)(*_csr([cell]), step=5)["gene_ids"][0, 0]
    assert set(other_step) != set(picks[0, 0])


def test_masking_removes_targets_from_the_input():
    cfg = _cfg(sentence_len=40, n_expressed=6, n_unexpressed=5, n_shared=4, n_copies=3,
               loss="energy")
    rng = np.random.default_rng(0)
    cells = [{int(g): int(rng.integers(1, 50)) for g in rng.choice(50, 35, replace=False)}
             for _ in range(8)]
    out = SETokenizer(cfg, _gene_map(), 3)(*_csr(cells), step=1)
    T = cfg.n_targets
    assert out["target_ids"].shape == (8, T) and out["target"].shape == (8, 3, T)
    shared = out["target_ids"][:, -4:]
    assert (shared == shared[0]).all()                # the S genes are the batch's
    for i in range(8):
        tg = set(out["target_ids"][i][out["target_weight"][i] > 0].tolist())
        for j in range(3):
            sent = set(out["gene_ids"][i, j][out["gene_ids"][i, j] >= 0].tolist())
            assert not (sent & tg)                    # a target never appears in the input
        expressed = {g for g in cells[i]}
        assert set(out["target_ids"][i, :6].tolist()) <= expressed
        assert not (set(out["target_ids"][i, 6:11].tolist()) & expressed)
        # copy 0 truth = log1p normalised counts of the cell
        g0 = int(out["target_ids"][i, 0])
        assert out["target"][i, 0, 0] == pytest.approx(np.log1p(1e4 * cells[i][g0] / sum(cells[i].values())), rel=1e-5)
        # downsampled copies have fewer counts
        assert (out["depth"][i, 1:] <= out["depth"][i, 0]).all()
    # unmasked (STATE's behaviour): expressed targets stay in the sentence
    out_u = SETokenizer(_cfg(sentence_len=40, n_expressed=6, n_unexpressed=5, n_shared=4,
                             mask_targets=False), _gene_map(), 3)(*_csr(cells), step=1)
    overlap = sum(len(set(out_u["gene_ids"][i, 0].tolist()) & set(out_u["target_ids"][i, :6].tolist()))
                  for i in range(8))
    assert overlap > 0


def test_too_few_genes_get_zero_weight():
    out = SETokenizer(_cfg(), _gene_map())(*_csr([{1: 2}]))
    w = out["target_weight"][0]
    assert w[:4].tolist() == [1, 0, 0, 0]             # one expressed gene for 4 slots
    assert w[4:].all()


def test_gene_map_for_reports_missing():
    gm, missing = gene_map_for(["A", "B", "C"], ["C", "A"])
    assert gm.tolist() == [1, -1, 0] and missing == ["B"]


def test_soft_binning_is_a_convex_combination():
    m = SEModel(_cfg())
    x = torch.linspace(0, 8, 20)
    w = m.softbin.weights(x)
    assert w.shape == (20, 10)
    assert torch.allclose(w.sum(-1), torch.ones(20))
    assert (w >= 0).all()
    assert torch.allclose(m.softbin(x), w @ m.softbin.bins)


def _batch(cfg, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.n_genes, (b, cfg.sentence_len), generator=g)
    ids[:, -3:] = -1
    expr = torch.rand(b, cfg.sentence_len, generator=g) * 5
    tids = torch.randint(0, cfg.n_genes, (b, cfg.n_targets), generator=g)
    return ids, expr, tids, torch.full((b,), 3000.0)


def test_forward_shapes_padding_and_eval_determinism():
    torch.manual_seed(0)
    cfg = _cfg(attn_dropout=0.5, dropout=0.2)
    m = SEModel(cfg, torch.randn(cfg.n_genes, cfg.gene_dim))
    ids, expr, tids, depth = _batch(cfg)
    out = m(ids, expr, tids, depth)
    assert out["pred"].shape == (6, cfg.n_targets)
    assert out["cell"].shape == (6, 8) and out["dataset_logits"].shape == (6, 3)
    assert torch.allclose(out["cell"].norm(dim=-1), torch.ones(6), atol=1e-5)
    m.eval()
    e1, e2 = m.embed(ids, expr), m.embed(ids, expr)
    assert torch.equal(e1, e2)                        # no dropout in eval: identical passes
    assert e1.shape == (6, cfg.embed_dim)
    # padding is ignored: other genes/values in padded slots change nothing
    ids2, expr2 = ids.clone(), expr.clone()
    expr2[:, -3:] = 99.0
    assert torch.allclose(m.embed(ids2, expr2), e1, atol=1e-6)
    m.train()
    assert not torch.equal(m.embed(ids, expr), m.embed(ids, expr))  # dropout on in training


def test_loss_parts_and_backward():
    cfg = _cfg()
    m = SEModel(cfg, torch.randn(cfg.n_genes, cfg.gene_dim))
    ids, expr, tids, depth = _batch(cfg)
    out = m(ids, expr, tids, depth)
    target = torch.rand(6, cfg.n_targets)
    weight = torch.ones(6, cfg.n_targets)
    weight[0, :2] = 0
    ds = torch.tensor([0, 1, 2, 0, 1, 2])
    rec = se_loss(out, target, weight, ds, cfg)
    mse = ((out["pred"] - target) ** 2 * weight).sum() / weight.sum()
    ce = torch.nn.functional.cross_entropy(out["dataset_logits"], ds)
    assert torch.allclose(rec.parts["expr"], mse) and torch.allclose(rec.parts["dataset"], ce)
    assert torch.allclose(rec.total, mse + cfg.dataset_weight * ce)
    rec.total.backward()
    assert m.gene_table.grad is None                  # the ESM2 table is frozen
    assert m.gene_proj[0].weight.grad is not None and m.softbin.bins.grad is not None
    # energy over copies: a perfect prediction has zero distance
    cfg_e = _cfg(loss="energy", n_copies=3)
    out_e = {"pred": target.clone()}
    rec_e = se_loss(out_e, target, weight, None, cfg_e)
    assert float(rec_e.parts["expr"]) == pytest.approx(0.0, abs=1e-5)
    assert float(se_loss({"pred": target + 1}, target, weight, None, cfg_e).parts["expr"]) > 0.5


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = _cfg()
    table = torch.randn(cfg.n_genes, cfg.gene_dim)
    a = SEModel(cfg, table)
    b = SEModel(_cfg(activation_checkpointing=True), table)
    b.load_state_dict(a.state_dict())
    batch = _batch(cfg)
    for m in (a, b):
        m(*batch)["pred"].sum().backward()
    assert torch.allclose(a.blocks[0].qkv.weight.grad, b.blocks[0].qkv.weight.grad, atol=1e-6)


def test_config_errors_and_presets():
    with pytest.raises(ValueError, match="n_copies >= 2"):
        _cfg(loss="energy")
    with pytest.raises(ValueError, match="divisible"):
        _cfg(d_model=15)
    with pytest.raises(ValueError, match="unknown SEConfig override"):
        se_preset("debug", 10, 4, d_modle=3)
    with pytest.raises(ValueError, match="targets"):
        se_preset("debug", 10, 4, targets="x")
    c = se_preset("se600m", 19_790, 5120)
    assert (c.d_model, c.n_layers, c.d_hid, c.output_dim, c.sentence_len) == (2048, 16, 4096, 2048, 2047)
    assert c.n_targets == 1536
    assert se_preset("se600m", 19_790, 5120, targets="state_paper").n_targets == 1280
    # SE-600M: ~0.55-0.65 B trainable parameters (the frozen ESM2 table is a buffer)
    n = count_parameters(c)
    assert 550e6 < n < 650e6, n
