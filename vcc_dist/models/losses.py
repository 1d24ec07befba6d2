"""Set losses for ST (State Transition): energy distance, Sinkhorn, MSE, and their combination.

Model-agnostic: every loss takes a predicted set ``x`` [B, S, G] and a target set ``y``
[B, S', G] (B sets, S / S' cells per set, G features: genes or embedding dims) and returns one
value per set, [B]. ``st_loss`` combines the main loss and an optional gene-decoder loss with
weights that come from config, and returns a ``LossRecord`` (total plus named parts; STYLE
habit 6).

Energy-distance convention (matched to geomloss 0.3.1, ``SamplesLoss("energy")``, which is what
STATE trains with): with uniform weights over the cells of each set and k(a, b) = -||a - b||_2,

    energy_distance(x, y) = 1/2 * ||alpha - beta||_k^2
                          = E||x - y|| - 1/2 E||x - x'|| - 1/2 E||y - y'||
                          = 1/2 * (2 E||x - y|| - E||x - x'|| - E||y - y'||),

each expectation the V-statistic mean over all pairs, i = j included (those pairs add 0). This is
half of the textbook (Székely) energy distance. geomloss clamps each distance at sqrt(1e-8) = 1e-4
(so its value for identical sets is ~1e-4/S, not 0); we use exact distances instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossKind = Literal["energy", "sinkhorn", "mse"]
LOSS_KINDS: tuple[str, ...] = ("energy", "sinkhorn", "mse")
WEIGHT_KEYS: tuple[str, ...] = ("main", "decoder")


def _check_sets(x: Tensor, y: Tensor, *, same_size: bool = False) -> None:
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(
            f"sets must be 3-D [B, S, G]; got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"x {tuple(x.shape)} and y {tuple(y.shape)} must agree on B (dim 0) and G (dim 2)"
        )
    if same_size and x.shape[1] != y.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same set size")


def _safe_sqrt(d2: Tensor) -> Tensor:
    """sqrt with gradient 0 (not inf/NaN) where the squared distance is 0 (the i = j pairs)."""
    positive = d2 > 0
    return torch.where(positive, torch.where(positive, d2, torch.ones_like(d2)).sqrt(), 0.0)


def _pairwise_distances(a: Tensor, b: Tensor, chunk_features: int | None) -> Tensor:
    """Euclidean distances [B, N, M]; with ``chunk_features`` the squared distances are summed
    over feature chunks of that width, then square-rooted (bounds the width of each cdist call
    for wide outputs such as G = 18,080 genes)."""
    if chunk_features is None:
        return torch.cdist(a, b)
    if chunk_features < 1:
        raise ValueError(f"chunk_features must be a positive int or None; got {chunk_features}")
    d2 = None
    for start in range(0, a.shape[-1], chunk_features):
        part = torch.cdist(a[..., start : start + chunk_features], b[..., start : start + chunk_features])
        part = part * part
        d2 = part if d2 is None else d2 + part
    return _safe_sqrt(d2)


def _self_distances(a: Tensor, chunk_features: int | None) -> Tensor:
    """Distances within one set with the i = j pairs set to exactly 0. cdist's matmul path
    (||a||^2 + ||b||^2 - 2ab, used for sets of more than 25 cells) leaves float32 rounding on the
    diagonal that the square root inflates (~0.1 for 2,000 genes of CP10k-scale values), which
    would bias the loss; the mask is a multiplication, so the gradient there is 0 too."""
    off_diagonal = 1.0 - torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    return _pairwise_distances(a, a, chunk_features) * off_diagonal


def energy_distance(x: Tensor, y: Tensor, *, chunk_features: int | None = None) -> Tensor:
    """Energy distance per set, geomloss's convention (see the module docstring): [B].

    ``x`` [B, S, G] predicted set, ``y`` [B, S', G] target set (S' may differ from S).
    ``chunk_features``: compute squared distances over feature chunks of this width (same value
    as unchunked, up to float rounding).
    """
    _check_sets(x, y)
    d_xy = _pairwise_distances(x, y, chunk_features).mean(dim=(1, 2))
    d_xx = _self_distances(x, chunk_features).mean(dim=(1, 2))
    d_yy = _self_distances(y, chunk_features).mean(dim=(1, 2))
    return d_xy - 0.5 * d_xx - 0.5 * d_yy


def sinkhorn_loss(x: Tensor, y: Tensor, *, blur: float = 0.05, p: int = 2) -> Tensor:
    """Debiased Sinkhorn divergence per set through geomloss (optional dependency): [B].

    Install with ``pip install 'vcc-dist[sinkhorn]'``.
    """
    _check_sets(x, y)
    try:
        from geomloss import SamplesLoss
    except ImportError as err:  # optional extra, named so the fix is obvious
        raise ImportError(
            "sinkhorn_loss needs the 'geomloss' package: pip install 'vcc-dist[sinkhorn]' "
            "(or pip install geomloss)"
        ) from err
    return SamplesLoss("sinkhorn", p=p, blur=blur)(x, y)


def mse_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per set, mean over cells and genes: [B]. Sets must be the same shape
    (cell i of the prediction is paired with cell i of the target)."""
    _check_sets(x, y, same_size=True)
    return ((x - y) ** 2).mean(dim=(1, 2))


@dataclass
class LossRecord:
    """What a loss hands the trainer: ``total`` (scalar, the one to backpropagate) and ``parts``
    (name -> unweighted scalar, each a mean over sets) for logging."""

    total: Tensor
    parts: dict[str, Tensor]


def set_loss(x: Tensor, y: Tensor, *, kind: str, chunk_features: int | None = None) -> Tensor:
    """One of the set losses by name: [B]."""
    if kind == "energy":
        return energy_distance(x, y, chunk_features=chunk_features)
    if chunk_features is not None:
        warnings.warn(f"chunk_features={chunk_features} is ignored for loss kind {kind!r}", stacklevel=2)
    if kind == "sinkhorn":
        return sinkhorn_loss(x, y)
    if kind == "mse":
        return mse_loss(x, y)
    raise ValueError(f"loss kind {kind!r} is not one of {LOSS_KINDS}")


def st_loss(
    pred: Tensor,
    target: Tensor,
    *,
    kind: str = "energy",
    weights: dict[str, float],
    pred_genes: Tensor | None = None,
    target_genes: Tensor | None = None,
    chunk_features: int | None = None,
) -> LossRecord:
    """ST loss: weights["main"] * mean_B loss(pred, target) + weights["decoder"] * mean_B
    loss(pred_genes, target_genes) when a gene decoder's output is given.

    ``weights`` keys: "main" (required) and "decoder" (required when ``pred_genes`` is given).
    The same ``kind`` is used for both parts. ``parts`` holds the unweighted means.
    """
    unknown = sorted(set(weights) - set(WEIGHT_KEYS))
    if unknown:
        raise ValueError(f"unknown loss weight key(s) {unknown}; allowed keys are {WEIGHT_KEYS}")
    if "main" not in weights:
        raise ValueError(f"weights must contain 'main'; got {weights}")
    if (pred_genes is None) != (target_genes is None):
        raise ValueError("pred_genes and target_genes must be given together (or both left None)")

    parts = {"main": set_loss(pred, target, kind=kind, chunk_features=chunk_features).mean()}
    total = weights["main"] * parts["main"]
    if pred_genes is not None:
        if "decoder" not in weights:
            raise ValueError("pred_genes given but weights has no 'decoder' key; add weights['decoder']")
        parts["decoder"] = set_loss(
            pred_genes, target_genes, kind=kind, chunk_features=chunk_features
        ).mean()
        total = total + weights["decoder"] * parts["decoder"]
    elif "decoder" in weights:
        warnings.warn("weights['decoder'] is ignored: no pred_genes/target_genes given", stacklevel=2)
    return LossRecord(total=total, parts=parts)
