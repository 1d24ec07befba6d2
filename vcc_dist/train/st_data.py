"""What ST training needs from a corpus besides the set stream: training pseudobulks, the
perturbation feature table, and the held-out cells a validation or a prediction works on.

* :func:`group_means` — the mean normalised expression of every training (context,
  perturbation) group, read once from the corpus (capped at ``max_cells`` cells per group,
  sampled with a seed), as a :class:`vcc_dist.data.pseudobulk.GroupMeans`. From it come the
  context-mean prior, the "transfer" features and the cell-mean reference; the maths, the
  feature table (:func:`build_features`, :class:`FeatureTable`) and the context-mean cells live
  in :mod:`vcc_dist.data.pseudobulk`, shared with the AnnData baselines, and are re-exported
  here.
* :func:`heldout_groups` — the cells of one role ("val"/"test") of one context: per
  perturbation, the corpus addresses of its real cells, and the context's control cells,
  chosen by the one held-out rule (:func:`vcc_dist.data.heldout.select_heldout`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from vcc_dist.data.heldout import choose_context, select_heldout
from vcc_dist.data.plans import SetPlan
from vcc_dist.data.pseudobulk import (
    ONEHOT,
    TRANSFER,
    FeatureError,
    FeatureTable,
    GroupMeans,
    build_features,
)
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.splits import TRAIN, has_role

__all__ = [
    "ONEHOT",
    "TRANSFER",
    "FeatureError",
    "FeatureTable",
    "GroupMeans",
    "HeldOut",
    "build_features",
    "corpus_fingerprint",
    "group_means",
    "heldout_groups",
]


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


def group_means(plan: SetPlan, reader: CorpusReader, *, role: str = TRAIN,
                max_cells: int = 2000, seed: int = 0, progress: bool = False) -> GroupMeans:
    """Pseudobulks of the ``role`` cells of every (context, perturbation) group of ``plan``
    (groups split by batch are pooled). Reads at most ``max_cells`` cells per group."""
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
    ``max_controls`` control cells of that context: :func:`vcc_dist.data.heldout.select_heldout`
    on the corpus (a perturbation's candidates are its groups' cells in plan order)."""
    labels = plan.labels
    t = plan.table
    sel = np.array([has_role(r, role) for r in t["role"]], bool) & ~plan.is_control_group
    context = choose_context((labels.contexts[int(c)] for c in t["context"][sel]), role, context)
    ci = labels.contexts.index(context)
    by_pert: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for i in np.flatnonzero(sel & (t["context"].to_numpy() == ci)):
        g = plan.groups[i]
        by_pert.setdefault(int(t["pert"].iat[i]), []).append(g.locate(np.arange(g.n)))
    cand = {labels.perturbations[p]: (np.concatenate([a for a, _ in v]),
                                      np.concatenate([b for _, b in v]))
            for p, v in by_pert.items()}
    pool = plan.pools.get((ci, -1))
    draw = select_heldout({p: rw.size for p, (_, rw) in cand.items()},
                          0 if pool is None else pool.n, context, max_cells=max_cells,
                          max_controls=max_controls, seed=seed)
    cells = [(cand[p][0][k].astype(np.int32), cand[p][1][k].astype(np.int64))
             for p, k in zip(draw.perts, draw.cells)]
    pidx = np.array([labels.perturbations.index(p) for p in draw.perts], np.int64)
    cst, crw = pool.locate(draw.controls)
    return HeldOut(context, ci, list(draw.perts), pidx, cells,
                   (cst.astype(np.int32), crw.astype(np.int64)))
