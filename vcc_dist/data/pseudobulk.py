"""Training pseudobulks, the context-mean prior, and perturbation features built from them:
one implementation for the AnnData path (``vcc_dist.infer.baselines``) and the corpus path
(``vcc_dist.train.st_data``, ST's features and validation baselines).

* :class:`GroupMeans` — the mean normalised expression (log1p space) of the training cells of
  every (context, perturbation) group, ``[C, P, G]``; a perturbation's *delta* in a context is
  its mean minus that context's control mean.
* The **context-mean prior** (:meth:`GroupMeans.context_mean`): the effect of ``p`` in target
  context ``c`` is the unweighted mean of ``p``'s deltas over the *other* contexts where it
  was seen (a context is one vote whatever its cell count); a perturbation seen in no other
  context gets the "average perturbation": the mean of that effect over the perturbations that
  have one. :func:`context_mean_cells` turns effects into predicted cells: control cells of the
  target context drawn with replacement (seeded) plus the effect, clipped at 0.
* :class:`FeatureTable` / :func:`build_features` — perturbation features per (context,
  perturbation), ``[C, P, D]``. Sources, concatenated in the order given:

  - ``"onehot"``: the perturbation's unit vector (the same in every context);
  - a ``.pt`` path: STATE's ``{gene: vector}`` file (e.g. ESM2 features, ``jobs/embed_genes.py``);
    a perturbation missing from the file is an error;
  - ``"transfer"``: the context-mean effect of the perturbation in that context, handed to a
    model as an input. Leave-one-context-out matters: in a training context the feature never
    contains that context's own effect, so a model learns to map other contexts' effects to
    this context's response, which is exactly what it must do in the held-out context.

  The control perturbation gets zeros from "transfer" (its effect is zero by definition).
  ST (``vcc_dist.train.st``) and the ridge baseline (``features=("transfer", "onehot")``) build
  their features with this one function, so a report compares models on the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ONEHOT, TRANSFER = "onehot", "transfer"
FEATURE_KINDS = (ONEHOT, TRANSFER)


class FeatureError(ValueError):
    """A perturbation feature source that cannot be used."""


# ---------------------------------------------------------------------------------------------
# training pseudobulks and the context-mean prior
# ---------------------------------------------------------------------------------------------


@dataclass
class ContextMeanEffect:
    """The context-mean prior for one target context (:meth:`GroupMeans.context_mean`)."""

    effect: np.ndarray           # [P, G] float64; the average perturbation where not ``seen``
    seen: np.ndarray             # [P] bool: p was seen in at least one contributing context
    average: np.ndarray | None   # [G] mean of ``effect[seen]``; None when nothing was seen


@dataclass
class GroupMeans:
    """Mean normalised expression of the training cells per (context, perturbation).

    ``means[c, p]`` (float64, ``[C, P, G]``) is NaN where the group has no training cells;
    ``n_cells[c, p]`` the cells it has (the corpus path's means use at most ``max_cells`` of
    them)."""

    means: np.ndarray
    n_cells: np.ndarray
    control_index: int
    _totals: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False)

    @property
    def seen(self) -> np.ndarray:
        return self.n_cells > 0

    def deltas(self) -> np.ndarray:
        """Effect of every seen group: its mean minus the context's control mean (NaN where
        unseen or where the context has no training controls)."""
        ctrl = self.means[:, self.control_index, :]
        return self.means - ctrl[:, None, :]

    def usable(self) -> np.ndarray:
        """``[C, P]``: groups whose delta enters the context-mean prior (seen, finite delta,
        not the control)."""
        ok = np.isfinite(self.deltas()).all(axis=2) & self.seen
        ok[:, self.control_index] = False
        return ok

    def _sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(usable [C, P], usable deltas with 0 elsewhere [C, P, G], their sum over contexts
        [P, G], their count [P]); computed once, so every target context costs O(P G)."""
        if self._totals is None:
            ok = self.usable()
            dz = np.where(ok[:, :, None], self.deltas(), 0.0)
            self._totals = (ok, dz, dz.sum(axis=0), ok.sum(axis=0))
        return self._totals

    def context_mean(self, target: int | None) -> ContextMeanEffect:
        """The context-mean prior for context index ``target``: per perturbation the mean of
        its deltas over the contexts other than ``target`` where it was seen (over every
        context when ``target`` is None: a context outside training, or counting the target's
        own deltas as one more vote); the average perturbation where there are none."""
        ok, dz, tot, cnt = self._sums()
        if target is None:
            s, n = tot, cnt
        else:
            if not 0 <= target < dz.shape[0]:
                raise IndexError(f"context index {target} out of range for {dz.shape[0]} "
                                 "contexts")
            s, n = tot - dz[target], cnt - ok[target]
        seen = n > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            eff = s / n[:, None]
        avg = eff[seen].mean(axis=0) if seen.any() else None
        eff[~seen] = 0.0 if avg is None else avg
        return ContextMeanEffect(eff, seen, avg)

    def transfer(self) -> np.ndarray:
        """``[C, P, G]`` float32: the context-mean effect of p in every context c (from the
        seen contexts other than c; the average perturbation where p was seen nowhere else);
        0 for the control."""
        C, P, G = self.means.shape
        out = np.empty((C, P, G), np.float32)
        for c in range(C):
            out[c] = self.context_mean(c).effect
        out[:, self.control_index, :] = 0.0
        return out

    def cell_mean(self) -> np.ndarray:
        """cell-eval's baseline vector in this space: the unweighted mean over perturbations
        (control included) of each perturbation's mean over all its training cells."""
        w = self.n_cells.astype(np.float64)
        with np.errstate(invalid="ignore"):
            pooled = (np.nan_to_num(self.means) * w[:, :, None]).sum(0) / w.sum(0)[:, None]
        seen = w.sum(0) > 0
        return pooled[seen].mean(axis=0).astype(np.float32)


def context_mean_cells(controls: np.ndarray | sp.spmatrix, effects: np.ndarray,
                       counts: Sequence[int], rng: np.random.Generator
                       ) -> Iterator[np.ndarray]:
    """Context-mean predicted cells, one dense float32 ``(counts[i], G)`` block per
    perturbation in order: control cells (rows of ``controls``, drawn with replacement by
    ``rng``, one ``rng.integers`` call per perturbation) plus ``effects[i]`` (cast to
    float32), clipped at 0. Blocks are yielded one at a time (bounded memory)."""
    n_ctrl = controls.shape[0]
    if n_ctrl == 0:
        raise ValueError("context_mean_cells: no control cells to start from; pass the target "
                         "context's control cells")
    if len(effects) != len(counts):
        raise ValueError(f"context_mean_cells: {len(effects)} effects but {len(counts)} "
                         "cell counts; pass one of each per perturbation")
    for eff, n in zip(effects, counts):
        idx = rng.integers(0, n_ctrl, size=int(n))
        rows = controls[idx]
        dense = np.array(rows.toarray() if sp.issparse(rows) else rows, np.float32)
        dense += np.asarray(eff).astype(np.float32)
        np.maximum(dense, 0, out=dense)
        yield dense


# ---------------------------------------------------------------------------------------------
# perturbation features
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureTable:
    """Perturbation features per (context, perturbation): ``table[c, p]`` is ``[D]``."""

    table: np.ndarray  # [C, P, D] float32
    sources: list[dict[str, Any]]

    @property
    def dim(self) -> int:
        return int(self.table.shape[2])

    def manifest(self) -> dict[str, Any]:
        return {"dim": self.dim, "shape": list(self.table.shape), "sources": self.sources}


def build_features(sources: tuple[str, ...] | list[str], contexts: list[str],
                   perturbations: list[str], means: GroupMeans | None = None) -> FeatureTable:
    """The ``[C, P, D]`` table of ``sources`` (see the module docstring), concatenated."""
    from vcc_dist.models.features import PerturbationFeatures  # torch: heavy, only here

    if not sources:
        raise FeatureError("no perturbation feature source given; use 'onehot', 'transfer' or "
                           "a STATE {gene: vector} .pt file")
    C, P = len(contexts), len(perturbations)
    parts, meta = [], []
    for src in sources:
        if src == ONEHOT:
            f = PerturbationFeatures.one_hot(list(perturbations))
            parts.append(np.broadcast_to(f.matrix.numpy(), (C, P, f.dim)))
            meta.append({"kind": ONEHOT, "dim": f.dim})
        elif src == TRANSFER:
            if means is None:
                raise FeatureError("'transfer' features need the training pseudobulks")
            tr = means.transfer()
            parts.append(tr)
            meta.append({"kind": TRANSFER, "dim": int(tr.shape[2])})
        else:
            path = Path(src)
            if not path.is_file():
                raise FeatureError(f"perturbation feature source {src!r} is neither 'onehot', "
                                   "'transfer' nor an existing .pt file")
            try:
                f = PerturbationFeatures.from_file(path, list(perturbations))
            except ValueError as e:
                raise FeatureError(str(e)) from None
            parts.append(np.broadcast_to(f.matrix.numpy(), (C, P, f.dim)))
            meta.append({"kind": "file", **f.to_manifest()})
    table = np.concatenate([np.asarray(p, np.float32) for p in parts], axis=2)
    return FeatureTable(np.ascontiguousarray(table), meta)
