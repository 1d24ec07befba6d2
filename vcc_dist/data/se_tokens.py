"""SE cell sentences, built from raw counts in Ray Data ``map_batches`` (docs/design.md §4).

For each cell of a packed batch of the cell stream (raw CSR counts over the corpus vocabulary,
plus ``total_counts``), :class:`SETokenizer` builds what :class:`vcc_dist.models.se.SEModel`
reads:

- ``gene_ids`` [C, k]: the cell's top-k expressed genes (rows of the SE gene table; genes
  without an ESM2 embedding are never used), highest count first, ties broken by a seeded
  random key (fresh per batch in training; a fixed per-gene key in eval, so embeddings do not
  depend on batch composition); ``-1`` pads cells with fewer than k expressed genes.
- ``expr`` [C, k]: each gene's ``log1p(target_sum * count / total)``, a monotone function of its
  share of the cell's counts (the soft-binning input; O(1) values suit the bin MLP better than
  raw shares of ~1e-4).
- ``target_ids`` [T] with T = P + N + S: P genes drawn among the expressed, N among the
  unexpressed (covered) genes, then the S genes shared by the whole batch; ``target_weight``
  [T] is 0 where a cell has too few expressed/unexpressed genes to fill its draw.
- ``target`` [C, T]: the targets' ``log1p`` expression in each copy; ``depth`` [C] read depth.
- C = ``n_copies``: copy 0 is the cell; copies 1.. keep each count with probability
  ``p ~ U(min_downsample, 1)`` (binomial thinning), for the energy-distance objective.

With ``mask_targets`` (default) no target gene appears in that cell's sentence: the model must
infer it from the others. ``mask_targets=False`` is STATE's behaviour (it builds a mask and
never applies it), kept only as an explicit option.

Randomness comes from ``numpy.random.default_rng([seed, epoch, step])`` per batch: a resumed
run rebuilds identical sentences for the same batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vcc_dist.data.streams import unpack_batches
from vcc_dist.models.se import SEConfig

# SEConfig fields the tokeniser reads (a checkpoint's tokenisation is these plus the gene map)
SENTENCE_FIELDS = ("sentence_len", "n_expressed", "n_unexpressed", "n_shared", "mask_targets",
                   "n_copies", "min_downsample", "target_sum")


class SETokenizer:
    """See the module docstring. ``gene_map`` [n_vocab] int: the corpus vocabulary index ->
    gene-table row, -1 for genes without an embedding."""

    def __init__(self, cfg: SEConfig, gene_map: np.ndarray, seed: int = 0):
        self.cfg = cfg
        self.gene_map = np.asarray(gene_map, np.int64)
        self.covered = np.flatnonzero(self.gene_map >= 0)
        if self.covered.size == 0:
            raise ValueError("no corpus gene has an embedding: check the gene table")
        if self.covered.size < cfg.n_shared:
            raise ValueError(f"n_shared={cfg.n_shared} exceeds the {self.covered.size} genes "
                             "that have an embedding")
        self.seed = int(seed)
        # eval tie-break: a fixed random key per vocabulary gene
        self.fixed_key = np.random.default_rng([self.seed, 7]).random(self.gene_map.size)

    def __call__(self, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray,
                 totals: np.ndarray, *, epoch: int = 0, step: int = 0,
                 train: bool = True) -> dict[str, np.ndarray]:
        cfg = self.cfg
        n = int(indptr.size - 1)
        k, P, N, S = cfg.sentence_len, cfg.n_expressed, cfg.n_unexpressed, cfg.n_shared
        C = cfg.n_copies if train else 1
        T = P + N + S
        rng = np.random.default_rng([self.seed, int(epoch), int(step)])
        out = {"gene_ids": np.full((n, C, k), -1, np.int32),
               "expr": np.zeros((n, C, k), np.float32),
               "depth": np.zeros((n, C), np.float32)}
        if train:
            out.update(target_ids=np.full((n, T), -1, np.int32),
                       target_weight=np.zeros((n, T), np.float32),
                       target=np.zeros((n, C, T), np.float32))
            shared = (rng.choice(self.covered, S, replace=False) if S else
                      np.zeros(0, np.int64))
        for i in range(n):
            a, z = int(indptr[i]), int(indptr[i + 1])
            g, c = np.asarray(indices[a:z], np.int64), np.asarray(counts[a:z], np.float64)
            total = float(totals[i]) if totals is not None else float(c.sum())
            keep = (self.gene_map[g] >= 0) & (c > 0)
            g, c = g[keep], c[keep]
            if train:
                tg = self._targets(rng, g, shared, out, i)
            for j in range(C):
                if j == 0:
                    cj, tot = c, total
                else:
                    p = rng.uniform(cfg.min_downsample, 1.0)
                    cj = rng.binomial(c.astype(np.int64), p).astype(np.float64)
                    # the copy's depth: the total thinned like the counts we see
                    tot = total * (cj.sum() / max(c.sum(), 1.0))
                tot = max(tot, 1.0)
                out["depth"][i, j] = tot
                if train:
                    val = np.zeros(self.gene_map.size, np.float32)  # sparse lookup via dense row
                    val[g] = np.log1p(cfg.target_sum * cj / tot)
                    out["target"][i, j] = np.where(tg >= 0, val[np.maximum(tg, 0)], 0.0)
                sel = cj > 0
                gs, cs = g[sel], cj[sel]
                if train and cfg.mask_targets:
                    m = ~np.isin(gs, tg)
                    gs, cs = gs[m], cs[m]
                key = rng.random(gs.size) if train else self.fixed_key[gs]
                order = np.lexsort((key, -cs))[:k]
                m = order.size
                out["gene_ids"][i, j, :m] = self.gene_map[gs[order]]
                out["expr"][i, j, :m] = np.log1p(cfg.target_sum * cs[order] / tot)
        if train:  # target_ids hold vocabulary indices until here
            t = out["target_ids"]
            out["target_ids"] = np.where(t >= 0, self.gene_map[np.maximum(t, 0)], -1).astype(np.int32)
        return out

    def _targets(self, rng, g: np.ndarray, shared: np.ndarray, out: dict, i: int) -> np.ndarray:
        """Draw cell i's targets (vocabulary indices; -1 = none) and set their weights."""
        cfg = self.cfg
        P, N = cfg.n_expressed, cfg.n_unexpressed
        tg = np.full(P + N + shared.size, -1, np.int64)
        cand = np.setdiff1d(g, shared, assume_unique=False)
        pe = rng.choice(cand, min(P, cand.size), replace=False) if cand.size else cand
        tg[:pe.size] = pe
        if N:
            # unexpressed: rejection-sample covered genes not expressed in the cell
            draw = rng.choice(self.covered, min(self.covered.size, 2 * N + 16), replace=False)
            draw = draw[~np.isin(draw, g) & ~np.isin(draw, shared)][:N]
            tg[P:P + draw.size] = draw
        tg[P + N:] = shared
        out["target_ids"][i] = tg
        out["target_weight"][i] = tg >= 0
        return tg


def gene_map_for(vocab: list[str], table_genes: list[str]) -> tuple[np.ndarray, list[str]]:
    """(gene_map [n_vocab], missing genes): vocabulary index -> row of ``table_genes``."""
    pos = {gname: i for i, gname in enumerate(table_genes)}
    gm = np.array([pos.get(gname, -1) for gname in vocab], np.int64)
    return gm, [gname for gname, r in zip(vocab, gm) if r < 0]


class SESentences:
    """Ray Data ``map_batches`` transform of the SE cell stream: packed batches of raw counts ->
    one row per cell with its sentence (``train=False``: no targets, no copies, for embedding
    and validation sentences that must not change)."""

    def __init__(self, cfg: SEConfig, gene_map: np.ndarray, seed: int = 0, train: bool = True,
                 dataset_of_store: np.ndarray | None = None):
        self.tok = SETokenizer(cfg, gene_map, seed)
        self.train = train
        self.dataset_of_store = dataset_of_store

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one output row (the stream's block size target is derived from it)."""
        c = self.tok.cfg
        C = c.n_copies if self.train else 1
        T = c.n_targets if self.train else 0
        return C * c.sentence_len * 8 + C * 4 + T * (8 + 4 * C) + 40

    def __call__(self, batch: dict[str, np.ndarray]):
        for d in unpack_batches(batch):
            cells = d["cells"]
            data = np.asarray(cells["data"])
            out: dict[str, Any] = self.tok(cells["indptr"], cells["indices"], data,
                                           cells["totals"], epoch=int(d["epoch"]),
                                           step=int(d["step"]), train=self.train)
            st = np.asarray(d["store"], np.int32)
            out["store"], out["row"] = st, np.asarray(d["row"], np.int64)
            out["dataset"] = (self.dataset_of_store[st] if self.dataset_of_store is not None
                              else st).astype(np.int32)
            n = st.size
            out["step"] = np.full(n, d["step"], np.int64)
            out["epoch"] = np.full(n, d["epoch"], np.int32)
            yield out


__all__ = ["SENTENCE_FIELDS", "SESentences", "SETokenizer", "gene_map_for"]
