"""Wilcoxon rank-sum (Mann-Whitney U) of many groups against one shared reference group.

Every perturbation is tested against the same control cells. A reference implementation ranks
the combined sample for every (perturbation, gene) pair; here the controls are sorted once per
gene and each perturbation's U statistic and tie correction come from binary searches into
that sorted reference: O(n_pert_cells * log n_controls) per gene instead of
O((n_pert + n_controls) * log(...)).

All genes of a chunk are handled in one vectorised call: column ``j`` is shifted by
``j * stride`` (stride > the value range) so that one flat ``searchsorted`` over the
column-major sorted reference answers every column at once.

The statistics are exactly those of ``scipy.stats.mannwhitneyu(x, y, alternative="two-sided",
method="asymptotic", use_continuity=True)``; ``tests/test_wilcoxon.py`` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special


@dataclass
class SortedReference:
    """The reference group (n_ref cells x n_genes), each gene's values sorted, flattened with
    per-gene offsets, plus each gene's tie term sum(t^3 - t) within the reference."""

    flat: np.ndarray  # (n_genes * n_ref,) float64, column j shifted by j * stride, sorted
    n_ref: int
    n_genes: int
    lo: float  # every value tested against this reference must lie in [lo, hi]
    hi: float
    ref_tie_term: np.ndarray  # (n_genes,)

    @property
    def stride(self) -> float:
        return 2.0 * max(self.hi - self.lo, 1.0) + 1.0

    @classmethod
    def build(cls, ref: np.ndarray, value_range: tuple[float, float] | None = None
              ) -> SortedReference:
        """``value_range`` bounds the values of the reference *and* of every group tested
        against it (for log1p expression: (0, max over both files)); default: the reference's
        own range, widened to [min(0, lo), 2 * hi + 1]."""
        ref = np.asarray(ref, np.float64)
        if ref.ndim != 2 or ref.shape[0] == 0:
            raise ValueError(f"reference must be a non-empty 2-D array (cells x genes), got "
                             f"shape {ref.shape}")
        if not np.isfinite(ref).all():
            raise ValueError("reference holds NaN or infinite values")
        n_ref, g = ref.shape
        if value_range is None:
            value_range = (min(0.0, float(ref.min())), 2.0 * float(ref.max()) + 1.0)
        lo, hi = map(float, value_range)
        if ref.min() < lo or ref.max() > hi:
            raise ValueError(f"reference values outside value_range {value_range}")
        out = cls(flat=np.empty(0), n_ref=n_ref, n_genes=g, lo=lo, hi=hi,
                  ref_tie_term=np.zeros(g))
        out.flat = out.shift(np.sort(ref, axis=0))
        out.ref_tie_term = _tie_term_sorted(out.flat, g, n_ref)
        return out

    def shift(self, x: np.ndarray) -> np.ndarray:
        """Per-gene offsets applied to a (cells x genes) block, column-major flattened; values
        keep their order within a gene and genes never interleave."""
        x = np.asarray(x, np.float64)
        if x.size and (x.min() < self.lo or x.max() > self.hi):
            raise ValueError(f"values outside the reference's value_range [{self.lo}, "
                             f"{self.hi}]; build the reference with a wider value_range")
        return (x - self.lo + np.arange(self.n_genes) * self.stride).T.ravel()


def _tie_term_sorted(flat_sorted: np.ndarray, n_genes: int, n_per_gene: int) -> np.ndarray:
    """sum over tie groups of (t^3 - t), per gene, for column-major flattened sorted values."""
    if flat_sorted.size == 0:
        return np.zeros(n_genes)
    starts = np.flatnonzero(np.r_[True, flat_sorted[1:] != flat_sorted[:-1]])
    t = np.diff(np.r_[starts, flat_sorted.size]).astype(np.float64)
    gene = starts // n_per_gene
    return np.bincount(gene, weights=t**3 - t, minlength=n_genes)


def ranksum_vs_reference(ref: SortedReference, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """U statistic of x (n_x cells x genes) against the reference, and the tie term of the
    combined sample, per gene.

    U_x = #{(i, j): x_i > y_j} + 0.5 #{(i, j): x_i == y_j}; the tie term is
    sum over distinct values v of (t_v^3 - t_v) with t_v counted in x and y together.
    """
    x = np.asarray(x, np.float64)
    n_x, g = x.shape
    if g != ref.n_genes:
        raise ValueError(f"x has {g} genes, the reference {ref.n_genes}")
    xs = ref.shift(x)
    xs.sort()  # sorted per gene too, since the offsets keep genes apart
    left = np.searchsorted(ref.flat, xs, side="left")
    right = np.searchsorted(ref.flat, xs, side="right")
    gene = np.repeat(np.arange(g), n_x)
    below = left - gene * ref.n_ref  # reference values < x_i within the gene
    equal = right - left
    u = np.bincount(gene, weights=below + 0.5 * equal, minlength=g)
    # tie term of the combined sample: reference ties + corrections where x adds to a value
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    cx = np.diff(np.r_[starts, xs.size]).astype(np.float64)
    cy = equal[starts].astype(np.float64)
    t = cx + cy
    delta = (t**3 - t) - (cy**3 - cy)
    tie = ref.ref_tie_term + np.bincount(gene[starts], weights=delta, minlength=g)
    return u, tie


def mannwhitney_pvalue(u: np.ndarray, n_x: int, n_y: int, tie: np.ndarray) -> np.ndarray:
    """Two-sided asymptotic p-value with tie and continuity correction (scipy's formula).

    Where every value is tied (zero variance) the p-value is 1, as in scipy.
    """
    n = n_x + n_y
    mu = n_x * n_y / 2.0
    u_big = np.maximum(u, n_x * n_y - u)
    var = n_x * n_y / 12.0 * ((n + 1) - tie / (n * (n - 1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u_big - mu - 0.5) / np.sqrt(var)
    p = 2.0 * special.ndtr(-z)
    return np.clip(p, 0.0, 1.0)
