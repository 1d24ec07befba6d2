"""vcc_dist.esm.model: tiny release-format ESM2 checkpoints through fair-esm's real loader,
residue-only mean pooling, token-budget batching, the long-sequence rule and load errors."""

import argparse
import pickle
import shutil

import numpy as np
import pytest
import torch

from vcc_dist.esm.model import (
    MAX_RESIDUES,
    ESMLoadError,
    count_tokens,
    embed_sequences,
    file_fingerprint,
    load_esm,
    model_info,
    prepare_sequence,
    regression_path,
    resolve_layer,
    save_tiny_esm2,
    token_batches,
)

AA = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def random_protein(rng, n):
    return "".join(rng.choice(AA, n))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, model, alphabet) of a 2-layer, 32-d ESM2 loaded through fair-esm."""
    path = save_tiny_esm2(tmp_path_factory.mktemp("esm"), seed=0)
    model, alphabet = load_esm(path)
    return path, model, alphabet


def built_esm2(num_layers=2, embed_dim=32, heads=4, seed=0):
    from esm.model.esm2 import ESM2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=heads,
                    alphabet="ESM-1b", token_dropout=True)


def manual_mean(model, alphabet, seq, layer):
    """The reference pooling, written out: one sequence alone, residues 1..L of the layer."""
    _, _, tokens = alphabet.get_batch_converter()([("s", seq)])
    with torch.no_grad():
        reps = model(tokens, repr_layers=[layer])["representations"][layer]
    return reps[0, 1:len(seq) + 1].mean(0).numpy(), reps


# --------------------------------------------------------------------------- checkpoints


def test_tiny_checkpoint_loads_through_fair_esm_loader(tmp_path, monkeypatch):
    import esm.pretrained

    path = save_tiny_esm2(tmp_path, num_layers=3, embed_dim=48, attention_heads=6, seed=7)
    assert path.name == "esm2_t3_48_tiny.pt"
    assert regression_path(path).name == "esm2_t3_48_tiny-contact-regression.pt"
    assert regression_path(path).is_file()

    # release layout: fairseq prefixes, cfg.model a Namespace, regression weights apart
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, map_location="cpu")
        reg = torch.load(regression_path(path), map_location="cpu")
    assert set(raw) == {"model", "cfg"}
    assert isinstance(raw["cfg"]["model"], argparse.Namespace)
    assert raw["cfg"]["model"].encoder_layers == 3
    assert all(k.startswith(("encoder.sentence_encoder.", "encoder.lm_head."))
               for k in raw["model"])
    assert "encoder.sentence_encoder.layers.0.self_attn.rot_emb.inv_freq" in raw["model"]
    assert set(reg["model"]) == {"contact_head.regression.weight", "contact_head.regression.bias"}
    # like the real release files, a plain torch>=2.6 load refuses the pickled Namespace
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu")

    calls = []
    real = esm.pretrained.load_model_and_alphabet_local
    monkeypatch.setattr(esm.pretrained, "load_model_and_alphabet_local",
                        lambda p: calls.append(p) or real(p))
    model, alphabet = load_esm(path)
    assert calls == [str(path)]
    assert not model.training
    built = built_esm2(3, 48, 6, seed=7).state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(built)
    for key in built:
        assert torch.equal(loaded[key], built[key]), key

    info = model_info(model, alphabet, path)
    assert info["name"] == "esm2_t3_48_tiny"
    assert (info["num_layers"], info["embed_dim"], info["attention_heads"]) == (3, 48, 6)
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert info["alphabet_size"] == len(alphabet) == 33
    assert info["file_bytes"] == path.stat().st_size
    assert len(info["sha256"]) == 64 and info["sha256"] == file_fingerprint(path)


def test_tiny_checkpoint_is_deterministic_per_seed(tmp_path):
    a = load_esm(save_tiny_esm2(tmp_path / "a", seed=1))[0].state_dict()
    b = load_esm(save_tiny_esm2(tmp_path / "b", seed=1))[0].state_dict()
    c = load_esm(save_tiny_esm2(tmp_path / "c", seed=2))[0].state_dict()
    key = "layers.0.fc1.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])
    with pytest.raises(ValueError, match="esm2"):
        save_tiny_esm2(tmp_path, name="tiny")
    with pytest.raises(ValueError, match="even head size"):
        save_tiny_esm2(tmp_path, embed_dim=30, attention_heads=10)


def test_fingerprint_covers_head_tail_and_size(tmp_path):
    big = tmp_path / "big.bin"
    data = bytearray(3 * (1 << 20))
    big.write_bytes(bytes(data))
    before = file_fingerprint(big)
    data[len(data) // 2] = 1  # the middle is not read: same fingerprint
    big.write_bytes(bytes(data))
    assert file_fingerprint(big) == before
    data[-1] = 1
    big.write_bytes(bytes(data))
    assert file_fingerprint(big) != before


# --------------------------------------------------------------------------- pooling


def test_pooling_excludes_special_tokens_and_padding(tiny):
    _, model, alphabet = tiny
    rng = np.random.default_rng(0)
    short, long = random_protein(rng, 12), random_protein(rng, 300)
    for layer, idx in ((-1, 2), (1, 1), (0, 0)):
        alone = embed_sequences(model, alphabet, [short], layer=layer)
        # one batch, so `short` is padded to 302 tokens
        padded = embed_sequences(model, alphabet, [long, short], layer=layer, max_tokens=10_000)
        assert alone.dtype == np.float32 and alone.shape == (1, 32)
        np.testing.assert_allclose(padded[1], alone[0], atol=1e-5, rtol=0)
        ref, reps = manual_mean(model, alphabet, short, idx)
        np.testing.assert_allclose(alone[0], ref, atol=1e-5, rtol=0)
    # the check is sensitive: pooling BOS and EOS too would give another vector
    with_special = reps[0].mean(0).numpy()
    assert np.abs(with_special - ref).max() > 1e-3


def test_output_order_and_batch_budget_do_not_matter(tiny):
    _, model, alphabet = tiny
    rng = np.random.default_rng(1)
    seqs = [random_protein(rng, int(n)) for n in rng.integers(1, 90, size=13)]
    seen = []
    big = embed_sequences(model, alphabet, seqs, max_tokens=100_000, progress=seen.append)
    small = embed_sequences(model, alphabet, seqs, max_tokens=60)  # many batches, some oversize
    singles = np.concatenate([embed_sequences(model, alphabet, [s]) for s in seqs])
    np.testing.assert_allclose(big, singles, atol=1e-5, rtol=0)
    np.testing.assert_allclose(small, singles, atol=1e-5, rtol=0)
    assert seen == [len(seqs)]
    seen.clear()
    embed_sequences(model, alphabet, seqs, max_tokens=60, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == len(seqs) and len(seen) > 1
    assert embed_sequences(model, alphabet, []).shape == (0, 32)


def test_embed_sequences_checks_inputs_and_dtype(tmp_path, tiny):
    _, model, alphabet = tiny
    with pytest.raises(ValueError, match="prepare_sequence"):
        embed_sequences(model, alphabet, ["M" * (MAX_RESIDUES + 1)])
    with pytest.raises(ValueError, match="empty"):
        embed_sequences(model, alphabet, ["MK", ""])
    with pytest.raises(ValueError, match="layer=3"):
        embed_sequences(model, alphabet, ["MK"], layer=3)
    assert resolve_layer(-1, 33) == 33 and resolve_layer(-34, 33) == 0
    # a reduced-precision model still returns float32, close to the float32 result
    ref = embed_sequences(model, alphabet, ["MKTAYIAKQRQISFVKSHFSRQ"])
    other, other_alphabet = load_esm(save_tiny_esm2(tmp_path, seed=0))
    bf16 = embed_sequences(other, other_alphabet, ["MKTAYIAKQRQISFVKSHFSRQ"],
                           dtype=torch.bfloat16)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, ref, atol=0.1)


def test_count_tokens():
    assert count_tokens(["MK", "MKT"]) == 2 + 3 + 2 * 2
    assert count_tokens([]) == 0


# --------------------------------------------------------------------------- batching


def test_token_batches_budget_cover_and_oversize():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 400, size=500)
    lengths[[3, 77]] = [2000, 1500]  # over the budget
    budget = 1024
    batches = token_batches(lengths, budget)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(lengths.size))  # every index once
    assert np.all(np.diff(lengths[flat]) <= 0)  # longest first
    for b in batches:
        assert b.dtype.kind == "i"
        if len(b) > 1:
            assert len(b) * (lengths[b].max() + 2) <= budget
    assert [list(b) for b in batches[:2]] == [[3], [77]]
    # greedy: no batch but the last could have taken one more sequence
    for b in batches[:-1]:
        assert (len(b) + 1) * (lengths[b].max() + 2) > budget
    # ties keep input order (stable)
    assert [list(b) for b in token_batches([5, 5, 5, 9], 14)] == [[3], [0, 1], [2]]
    assert token_batches([], 10) == []
    with pytest.raises(ValueError, match="max_tokens"):
        token_batches([3], 0)
    with pytest.raises(ValueError, match="non-negative"):
        token_batches([3, -1], 10)


# --------------------------------------------------------------------------- sequences


def test_prepare_sequence_truncates_or_raises():
    long = "M" + "A" * 1499
    s, cut = prepare_sequence(long)
    assert cut and len(s) == MAX_RESIDUES == 1022 and s == long[:1022]
    s, cut = prepare_sequence("K" * 1022)
    assert not cut and len(s) == 1022
    assert prepare_sequence(" mkt\nay *") == ("MKTAY", False)
    with pytest.raises(ValueError, match="1500 residues"):
        prepare_sequence(long, rule="error")
    assert prepare_sequence("MKT", rule="error") == ("MKT", False)
    with pytest.raises(ValueError, match="rule='tile'"):
        prepare_sequence("MKT", rule="tile")
    with pytest.raises(ValueError, match="outside the ESM alphabet"):
        prepare_sequence("MK*T")
    with pytest.raises(ValueError, match="empty"):
        prepare_sequence("*")


# --------------------------------------------------------------------------- load errors


def test_load_errors_are_clear(tmp_path, tiny):
    path = tiny[0]
    missing = tmp_path / "esm2_t33_650M_UR50D.pt"
    with pytest.raises(ESMLoadError, match="cannot be downloaded") as e:
        load_esm(missing)
    assert str(missing) in str(e.value) and "contact-regression" in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(ESMLoadError, match="folder"):
        load_esm(tmp_path)

    lonely = tmp_path / "esm2_t2_32_lonely.pt"
    shutil.copy(path, lonely)
    with pytest.raises(ESMLoadError, match="esm2_t2_32_lonely-contact-regression.pt is missing"):
        load_esm(lonely)

    shutil.copy(regression_path(path), regression_path(lonely))
    garbage = tmp_path / "esm2_t2_32_garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 40)
    shutil.copy(regression_path(path), regression_path(garbage))
    with pytest.raises(ESMLoadError, match="not an ESM checkpoint: torch.load cannot read it"):
        load_esm(garbage)

    other = tmp_path / "esm2_t2_32_other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    shutil.copy(regression_path(path), regression_path(other))
    with pytest.raises(ESMLoadError, match=r"not an ESM checkpoint \(found \['weights'\]\)"):
        load_esm(other)

    bad_reg = tmp_path / "esm2_t2_32_badreg.pt"
    shutil.copy(path, bad_reg)
    regression_path(bad_reg).write_bytes(b"junk" * 10)
    with pytest.raises(ESMLoadError, match="contact-regression file .* cannot be read"):
        load_esm(bad_reg)

    renamed = tmp_path / "my_protein_model.pt"
    shutil.copy(path, renamed)
    shutil.copy(regression_path(path), regression_path(renamed))
    with pytest.raises(ESMLoadError, match="does not start with 'esm2'") as e:
        load_esm(renamed)
    assert isinstance(e.value.__cause__, KeyError)  # fair-esm's own failure stays chained
