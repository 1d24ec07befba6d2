"""What ST training needs from a corpus besides the set stream: training pseudobulks, the
perturbation feature table, and the held-out cells a validation or a prediction works on.

* :func:`group_means` — the mean normalised expression of every training (context,
  perturbation) group, read once from the corpus (capped at ``max_cells`` cells per group,
  sampled with a seed). From it come the "transfer" features and the cell-mean reference.
* :class:`FeatureTable` — perturbation features per (context, perturbation): ``[C, P, D]``.
  Sources, concatenated in the order given:

  - ``"onehot"``: the perturbation's unit vector (the same in every context);
  - a ``.pt`` path: STATE's ``{gene: vector}`` file (e.g. ESM2 features, ``jobs/embed_genes.py``);
    a perturbation missing from the file is an error;
  - ``"transfer"``: the perturbation's mean effect (pseudobulk minus the context's control
    pseudobulk, log1p space) over the *other* training contexts where it was seen — the
    context-mean baseline's effect, handed to the model as an input. Leave-one-context-out
    matters: in a training context the feature never contains that context's own effect, so
    the model learns to map other contexts' effects to this context's response, which is
    exactly what it must do in the held-out context. A perturbation seen in no other context
    gets the average effect over all perturbations (as the context-mean baseline does).

  The control perturbation gets zeros from "transfer" (its effect is zero by definition).
* :func:`heldout_groups` — the cells of one role ("val"/"test") of one context: per
  perturbation, the corpus addresses of its real cells, and the context's control cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vcc_dist.data.plans import SetPlan
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.splits import TRAIN, has_role

ONEHOT, TRANSFER = "onehot", "transfer"


class FeatureError(ValueError):
    """A perturbation feature source that cannot be used."""


def corpus_fingerprint(reader: CorpusReader) -> str:
    """A short hash of what a trained model depends on in a corpus: its stores (names, source
    checksums, cell counts) and gene vocabulary. Checkpoints record it; loading against
    another corpus fails with the difference spelled out (vcc_dist.train.st)."""
    m = reader.manifest
    key = json.dumps({"stores": [[s.name, s.source_checksum, s.n_cells] for s in m.stores],
                      "genes": list(m.genes)})
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# training pseudobulks
# ---------------------------------------------------------------------------------------------


@dataclass
class GroupMeans:
    """Mean normalised expression of the training cells per (context, perturbation).

    ``means[c, p]`` (float64, ``[C, P, G]``) is NaN where the group has no training cells;
    ``n_cells[c, p]`` the cells it has (the means use at most ``max_cells`` of them)."""

    means: np.ndarray
    n_cells: np.ndarray
    control_index: int

    @property
    def seen(self) -> np.ndarray:
        return self.n_cells > 0

    def deltas(self) -> np.ndarray:
        """Effect of every seen group: its mean minus the context's control mean (NaN where
        unseen or where the context has no training controls)."""
        ctrl = self.means[:, self.control_index, :]
        return self.means - ctrl[:, None, :]

    def transfer(self) -> np.ndarray:
        """``[C, P, G]`` float32: mean effect of p over the seen contexts other than c; the
        average effect over all perturbations where p was seen nowhere else; 0 for control."""
        d = self.deltas()
        ok = np.isfinite(d).all(axis=2) & self.seen
        ok[:, self.control_index] = False
        dz = np.where(ok[:, :, None], d, 0.0)
        tot, cnt = dz.sum(axis=0), ok.sum(axis=0)  # over contexts: [P, G], [P]
        C, P, G = d.shape
        out = np.empty((C, P, G), np.float32)
        avg = dz.sum(axis=(0, 1)) / max(int(ok.sum()), 1)  # the average perturbation
        for c in range(C):
            n = cnt - ok[c]
            s = tot - dz[c]
            with np.errstate(invalid="ignore", divide="ignore"):
                m = s / n[:, None]
            m[n == 0] = avg
            out[c] = m
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


def group_means(plan: SetPlan, reader: CorpusReader, *, role: str = TRAIN,
                max_cells: int = 2000, seed: int = 0, progress: bool = False) -> GroupMeans:
    """Pseudobulks of the ``role`` cells of every (context, perturbation) group of ``plan``
    (groups split by batch are pooled). Reads at most ``max_cells`` cells per group."""
    from tqdm.auto import tqdm

    labels = plan.labels
    C, P, G = len(labels.contexts), len(labels.perturbations), reader.n_genes
    sums = np.zeros((C, P, G), np.float64)
    used = np.zeros((C, P), np.int64)
    n_cells = np.zeros((C, P), np.int64)
    t = plan.table
    rows = [i for i, r in enumerate(t["role"]) if has_role(r, role)]
    rng = np.random.default_rng(seed)
    for i in tqdm(rows, desc="pseudobulks", unit="group", disable=not progress):
        c, p = int(t["context"].iat[i]), int(t["pert"].iat[i])
        g = plan.groups[i]
        n_cells[c, p] += g.n
        take = min(g.n, max_cells)
        k = np.arange(g.n) if take == g.n else np.sort(rng.choice(g.n, take, replace=False))
        st, row = g.locate(k)
        for a in range(0, k.size, 4096):
            x = reader.dense(reader.read_many(st[a:a + 4096], row[a:a + 4096], normalize=True))
            sums[c, p] += x.sum(axis=0, dtype=np.float64)
        used[c, p] += k.size
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / used[:, :, None]
    means[used == 0] = np.nan
    return GroupMeans(means, n_cells, labels.control_index)


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
    from vcc_dist.models.features import PerturbationFeatures

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


# ---------------------------------------------------------------------------------------------
# held-out cells
# ---------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """Cells of the ``role`` groups of one context (corpus addresses), and its controls."""

    context: str
    context_index: int
    perts: list[str]            # in corpus label order
    pert_index: np.ndarray      # [P_h]
    cells: list[tuple[np.ndarray, np.ndarray]]  # per pert: (store ids, rows)
    control: tuple[np.ndarray, np.ndarray]      # (store ids, rows) of the context's controls

    def counts(self) -> dict[str, int]:
        return {p: int(c[1].size) for p, c in zip(self.perts, self.cells)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def heldout_groups(plan: SetPlan, role: str, *, context: str | None = None,
                   max_cells: int | None = None, max_controls: int | None = None,
                   seed: int = 0) -> HeldOut:
    """The ``role`` cells of ``context`` (default: the one context holding ``role`` groups)
    per perturbation, capped at ``max_cells`` per perturbation (seeded sample), and up to
    ``max_controls`` control cells of that context."""
    labels = plan.labels
    t = plan.table
    sel = np.array([has_role(r, role) for r in t["role"]], bool) & ~plan.is_control_group
    if not sel.any():
        raise ValueError(f"the split has no {role!r} perturbations")
    ctxs = sorted({labels.contexts[int(c)] for c in t["context"][sel]})
    if context is None:
        if len(ctxs) != 1:
            raise ValueError(f"the {role!r} perturbations span contexts {ctxs}; name one "
                             "(context=...)")
        context = ctxs[0]
    if context not in ctxs:
        raise ValueError(f"context {context!r} has no {role!r} perturbations; contexts with "
                         f"some: {ctxs}")
    ci = labels.contexts.index(context)
    rng = np.random.default_rng(seed)
    by_pert: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for i in np.flatnonzero(sel & (t["context"].to_numpy() == ci)):
        g = plan.groups[i]
        by_pert.setdefault(int(t["pert"].iat[i]), []).append(g.locate(np.arange(g.n)))
    pidx = np.array(sorted(by_pert), np.int64)
    cells = []
    for p in pidx:
        st = np.concatenate([a for a, _ in by_pert[int(p)]])
        rw = np.concatenate([b for _, b in by_pert[int(p)]])
        if max_cells is not None and rw.size > max_cells:
            k = np.sort(rng.choice(rw.size, max_cells, replace=False))
            st, rw = st[k], rw[k]
        cells.append((st.astype(np.int32), rw.astype(np.int64)))
    pool = plan.pools.get((ci, -1))
    if pool is None or pool.n == 0:
        raise ValueError(f"context {context!r} has no control cells in the corpus; a "
                         "prediction starts from the target context's controls")
    k = np.arange(pool.n)
    if max_controls is not None and pool.n > max_controls:
        k = np.sort(rng.choice(pool.n, max_controls, replace=False))
    cst, crw = pool.locate(k)
    return HeldOut(context, ci, [labels.perturbations[int(p)] for p in pidx], pidx, cells,
                   (cst.astype(np.int32), crw.astype(np.int64)))
