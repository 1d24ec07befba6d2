"""ST model architecture: shapes, set equivariance, dropout behaviour, size, config contract."""

import pytest
import torch
import torch.nn.functional as F

from vcc_dist.models.st import (
    STConfig,
    STModel,
    count_parameters,
    parameter_breakdown,
    st_preset,
)

G, P, B, S = 20, 12, 2, 6


def _inputs(cfg: STConfig, per_cell: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctrl = torch.rand(B, S, cfg.input_dim, generator=g)
    pert = torch.randn(*((B, S) if per_cell else (B,)), cfg.pert_dim, generator=g)
    return ctrl, pert


@pytest.mark.parametrize("residual", ["hidden", "input", "none"])
def test_gene_output_shape_and_relu(residual):
    torch.manual_seed(0)
    cfg = st_preset("debug", G, P, residual=residual)
    out = STModel(cfg).eval()(*_inputs(cfg))
    assert set(out) == {"pred"}
    assert out["pred"].shape == (B, S, G)
    assert (out["pred"] >= 0).all()


def test_relu_off_allows_negative_gene_outputs():
    torch.manual_seed(0)
    cfg = st_preset("debug", G, P, relu=False, residual="none")
    pred = STModel(cfg).eval()(*_inputs(cfg))["pred"]
    assert (pred < 0).any()


def test_embedding_output_and_gene_decoder():
    torch.manual_seed(0)
    cfg = st_preset("debug", G, P, output_space="embedding", embed_dim=16)
    out = STModel(cfg).eval()(*_inputs(cfg))
    assert set(out) == {"pred"} and out["pred"].shape == (B, S, 16)
    assert (out["pred"] < 0).any()  # no ReLU on embeddings by default

    cfg = st_preset("debug", G, P, output_space="embedding", embed_dim=16, gene_decoder=True)
    out = STModel(cfg).eval()(*_inputs(cfg))
    assert out["pred"].shape == (B, S, 16)
    assert out["pred_genes"].shape == (B, S, G)
    assert (out["pred_genes"] >= 0).all()


@pytest.mark.parametrize("per_cell", [False, True])
def test_permutation_equivariance(per_cell):
    torch.manual_seed(0)
    cfg = st_preset("debug", G, P, n_batches=3)
    model = STModel(cfg).eval()
    ctrl, pert = _inputs(cfg, per_cell=per_cell)
    batch = torch.randint(0, 3, (B, S) if per_cell else (B,))
    perm = torch.randperm(S)
    with torch.no_grad():
        ref = model(ctrl, pert, batch)["pred"]
        got = model(ctrl[:, perm], pert[:, perm] if per_cell else pert,
                    batch[:, perm] if per_cell else batch)["pred"]
    torch.testing.assert_close(got, ref[:, perm], atol=1e-5, rtol=0)


def test_causal_attention_would_break_equivariance(monkeypatch):
    torch.manual_seed(0)
    cfg = st_preset("debug", G, P)
    model = STModel(cfg).eval()
    ctrl, pert = _inputs(cfg)
    perm = torch.arange(S - 1, -1, -1)
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, dropout_p=0.0, is_causal=False: sdpa(q, k, v, is_causal=True))
    with torch.no_grad():
        ref = model(ctrl, pert)["pred"]
        got = model(ctrl[:, perm], pert)["pred"]
    assert (got - ref[:, perm]).abs().max() > 1e-4


def test_dropout_only_in_training():
    torch.manual_seed(0)
    cfg = st_preset("debug", G, P, attn_dropout=0.5)
    model = STModel(cfg)
    ctrl, pert = _inputs(cfg)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(ctrl, pert)["pred"], model(ctrl, pert)["pred"])
        model.train()
        assert not torch.equal(model(ctrl, pert)["pred"], model(ctrl, pert)["pred"])


def test_state_sm_parameter_count():
    # The figure: 37.8M trainable parameters at 2000 genes and 5120-d ESM2 features.
    model = STModel(st_preset("state_sm", 2000, 5120))
    assert round(count_parameters(model) / 1e6, 1) == 37.8
    assert parameter_breakdown(model) == {
        "pert_encoder": 5120 * 672 + 672 + 3 * (672 * 672 + 672),
        "basal_encoder": 2000 * 672 + 672,
        "blocks": 4 * (4 * 672 * 672 + 3 * 672 * 2688 + 2 * 672),
        "final_norm": 672,
        "project_out": 3 * (672 * 672 + 672) + 672 * 2000 + 2000,
    }


@pytest.mark.parametrize("overrides, key", [
    ({"hidden_dim": 30, "n_heads": 4}, "hidden_dim"),
    ({"residual": "delta"}, "residual"),
    ({"output_space": "latent"}, "output_space"),
    ({"output_space": "embedding"}, "embed_dim"),
    ({"gene_decoder": True}, "gene_decoder"),
    ({"attn_dropout": 1.0}, "attn_dropout"),
    ({"n_layers": 0}, "n_layers"),
    ({"hiden_dim": 8}, "hiden_dim"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        st_preset("debug", G, P, **overrides)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="state_xl.*state_sm"):
        st_preset("state_xl", G, P)


def test_forward_input_errors():
    cfg = st_preset("debug", G, P)
    model = STModel(cfg)
    ctrl, pert = _inputs(cfg)
    with pytest.raises(ValueError, match="pert_dim"):
        model(ctrl, pert[:, :-1])
    with pytest.raises(ValueError, match="n_batches"):
        model(ctrl, pert, torch.zeros(B, dtype=torch.long))


@pytest.mark.parametrize("name", ["debug", "state_sm"])
def test_config_round_trip(name):
    import json
    cfg = st_preset(name, G, P, output_space="embedding", embed_dim=8, gene_decoder=True, n_batches=2)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert STConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        STConfig.from_dict({**d, "bogus": 1})
