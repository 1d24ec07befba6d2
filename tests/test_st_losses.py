"""ST losses (energy distance, MSE, LossRecord) and perturbation features. Fast, CPU only."""

import itertools

import pytest
import torch

from vcc_dist.constants import CONTROL_LABEL
from vcc_dist.models.features import PerturbationFeatures
from vcc_dist.models.losses import (
    LossRecord,
    energy_distance,
    mse_loss,
    sinkhorn_loss,
    st_loss,
)


def _energy_loop(x, y):
    """Direct O(S^2) reference in float64, geomloss's convention:
    E||x-y|| - 1/2 E||x-x'|| - 1/2 E||y-y'|| (V-statistic, i = j included)."""
    out = []
    for xb, yb in zip(x.double(), y.double()):
        mean = lambda a, b: sum(torch.linalg.norm(u - v) for u, v in itertools.product(a, b)) / (
            len(a) * len(b)
        )
        out.append(mean(xb, yb) - 0.5 * mean(xb, xb) - 0.5 * mean(yb, yb))
    return torch.stack(out)


@pytest.mark.parametrize("b,s,s2,g", [(1, 4, 4, 3), (3, 5, 7, 6), (2, 8, 3, 11)])
def test_energy_matches_double_loop(b, s, s2, g):
    gen = torch.Generator().manual_seed(b * 100 + s)
    x = torch.randn(b, s, g, generator=gen, dtype=torch.float64)
    y = torch.randn(b, s2, g, generator=gen, dtype=torch.float64) + 0.3
    got = energy_distance(x, y)
    assert got.shape == (b,)
    torch.testing.assert_close(got, _energy_loop(x, y), rtol=1e-10, atol=1e-10)


def test_energy_zero_for_identical_and_positive_for_shifted():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, generator=gen)
    assert energy_distance(x, x.clone()).abs().max() < 1e-5
    shifted = energy_distance(x, x + 2.0)
    assert (shifted > 0.5).all()


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_energy_chunked_equals_unchunked(chunk):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 20, generator=gen)
    y = torch.randn(3, 9, 20, generator=gen) + 0.5
    torch.testing.assert_close(
        energy_distance(x, y, chunk_features=chunk), energy_distance(x, y), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="chunk_features"):
        energy_distance(x, y, chunk_features=0)


@pytest.mark.parametrize("chunk", [None, 4])
def test_energy_gradients_flow_and_are_finite(chunk):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    y = torch.randn(2, 6, 8, generator=gen)
    energy_distance(x, y, chunk_features=chunk).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_energy_chunked_gradients_match_unchunked():
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 5, 12, generator=gen)
    y = torch.randn(2, 4, 12, generator=gen)
    grads = []
    for chunk in (None, 5):
        x = x0.clone().requires_grad_(True)
        energy_distance(x, y, chunk_features=chunk).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_energy_matches_geomloss():
    from geomloss import SamplesLoss

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 10, 7, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 13, 7, generator=gen, dtype=torch.float64) + 0.4
    ref = SamplesLoss("energy", backend="tensorized")(x, y)
    # geomloss clamps each distance at 1e-4; the diagonals add at most ~1e-4 / S
    torch.testing.assert_close(energy_distance(x, y), ref, rtol=0, atol=1e-4)


def test_sinkhorn_runs_and_orders():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 3, generator=gen)
    near, far = sinkhorn_loss(x, x + 0.1), sinkhorn_loss(x, x + 3.0)
    assert near.shape == (2,) and (far > near).all()


def test_mse_per_set():
    x = torch.zeros(2, 3, 4)
    y = torch.ones(2, 3, 4)
    y[1] *= 2
    torch.testing.assert_close(mse_loss(x, y), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="same set size"):
        mse_loss(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))


def test_st_loss_record_combines_weighted_parts():
    gen = torch.Generator().manual_seed(6)
    pred, target = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    pg, tg = torch.randn(2, 4, 9, generator=gen), torch.randn(2, 4, 9, generator=gen)
    rec = st_loss(pred, target, kind="mse", weights={"main": 1.0, "decoder": 0.1},
                  pred_genes=pg, target_genes=tg)
    assert isinstance(rec, LossRecord) and set(rec.parts) == {"main", "decoder"}
    torch.testing.assert_close(rec.parts["main"], mse_loss(pred, target).mean())
    torch.testing.assert_close(rec.parts["decoder"], mse_loss(pg, tg).mean())
    torch.testing.assert_close(rec.total, rec.parts["main"] + 0.1 * rec.parts["decoder"])

    rec = st_loss(pred, target, weights={"main": 2.0})
    assert set(rec.parts) == {"main"}
    torch.testing.assert_close(rec.total, 2.0 * energy_distance(pred, target).mean())

    with pytest.raises(ValueError, match="decoder"):
        st_loss(pred, target, weights={"main": 1.0}, pred_genes=pg, target_genes=tg)
    with pytest.raises(ValueError, match="unknown loss weight"):
        st_loss(pred, target, weights={"main": 1.0, "mian": 1.0})
    with pytest.raises(ValueError, match="not one of"):
        st_loss(pred, target, kind="wasserstein", weights={"main": 1.0})
    with pytest.warns(UserWarning, match="decoder"):
        st_loss(pred, target, weights={"main": 1.0, "decoder": 0.1})


# --- perturbation features ---


def test_one_hot():
    f = PerturbationFeatures.one_hot(["A", "B", CONTROL_LABEL])
    assert f.matrix.dtype == torch.float32 and f.matrix.shape == (3, 3) and f.dim == 3
    torch.testing.assert_close(f.matrix, torch.eye(3))
    assert f.index("B") == 1
    assert f.to_manifest() == {"kind": "one_hot", "source": None, "sha256": None, "dim": 3, "n": 3}
    with pytest.raises(ValueError, match="duplicates"):
        PerturbationFeatures.one_hot(["A", "A"])
    with pytest.raises(KeyError, match="'Z'"):
        f.index("Z")


@pytest.fixture
def feature_file(tmp_path):
    table = {g: torch.full((5,), float(i + 1)) for i, g in enumerate(["G1", "G2", "G3", "G4"])}
    path = tmp_path / "ESM2_pert_features.pt"
    torch.save(table, path)
    return path


def test_from_file_order_dims_and_manifest(feature_file):
    import hashlib

    f = PerturbationFeatures.from_file(feature_file, ["G3", "G1", CONTROL_LABEL])
    assert f.matrix.shape == (3, 5) and f.dim == 5 and f.matrix.dtype == torch.float32
    torch.testing.assert_close(f.matrix[0], torch.full((5,), 3.0))
    torch.testing.assert_close(f.matrix[1], torch.full((5,), 1.0))
    torch.testing.assert_close(f.matrix[f.index(CONTROL_LABEL)], torch.zeros(5))  # control: zeros
    man = f.to_manifest()
    assert man["source"] == str(feature_file) and man["dim"] == 5 and man["n"] == 3
    assert man["sha256"] == hashlib.sha256(feature_file.read_bytes()).hexdigest()


def test_from_file_missing_perturbations_error(feature_file):
    perts = ["G1"] + [f"X{i}" for i in range(15)]
    with pytest.raises(ValueError, match=r"15 of 16 perturbations") as err:
        PerturbationFeatures.from_file(feature_file, perts)
    msg = str(err.value)
    assert "X0" in msg and "X9" in msg and "X10" not in msg and str(feature_file) in msg


def test_from_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        PerturbationFeatures.from_file(tmp_path / "nope.pt", ["G1"])


@pytest.mark.parametrize("chunk", [None, 700])
def test_energy_float32_wide_sets_unbiased(chunk):
    # > 25 cells: cdist takes its matmul path, whose float32 diagonal is not 0
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 40, 2000, generator=gen) * 5
    y = torch.rand(2, 40, 2000, generator=gen) * 5
    ref = energy_distance(x.double(), y.double())
    torch.testing.assert_close(energy_distance(x, y, chunk_features=chunk).double(), ref, rtol=0, atol=5e-4)


def test_sinkhorn_without_geomloss_names_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "geomloss", None)  # makes `import geomloss` fail
    with pytest.raises(ImportError, match="geomloss"):
        sinkhorn_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
