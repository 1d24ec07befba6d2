"""Differential expression of every perturbation against one shared control group.

What cell-eval 0.8.2 computes through pdex (``mode="ref"``; docs/cell_eval_0.8.2_semantics.md
§3), bit for bit, but with the controls ranked once instead of once per perturbation:

* **Wilcoxon rank-sum**, two-sided, normal approximation with tie and continuity correction.
  pdex pools each perturbation's values with all control values per gene and sorts them again
  for every perturbation. Here each gene's nonzero control values are sorted once
  (``ControlIndex``); a perturbation's U statistic and tie term come from merging its own
  sorted nonzeros into them (binary search when the perturbation is much smaller), with the
  zero block handled analytically. U and the tie term are integers or half-integers, exact
  in float64 whatever the summation order, and the final p-value expression is pdex's own
  (same operation order, libm ``erfc``), so p-values are identical.
* **log2 fold change** of ``expm1(mean log1p)`` (pert over control), means taken with the
  same numpy/scipy call pdex makes on the same storage (CSR or dense), ``expm1`` in the
  matrix dtype through libm (numba), ``log2`` in float64; 0/0 -> 0, one-sided zeros -> ±inf.
* **Benjamini-Hochberg** within each perturbation over all genes (``fdr_scope="perturbation"``,
  cell-eval >= 0.7), or over all perturbation x gene tests of the file at once
  (``fdr_scope="global"``, the pdex 0.1 / cell-eval <= 0.6 behaviour of the 2025 challenge).

numba is used (it is pdex's and scanpy's engine too) because the per-gene merge is a loop
over variable-length runs that numpy cannot vectorise without materialising every pair, and
because bit-identical fold changes need libm's float32 ``expm1f``, which numpy does not call.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba as nb
import numpy as np
import scipy.sparse as sp

from vcc_dist.metrics.normalize import available_threads

FDR_SCOPES = ("perturbation", "global")


# ---------------------------------------------------------------------------- kernels

@nb.njit(cache=True, nogil=True)
def _csr_to_csc_values(indptr, indices, data, n_cols):
    """CSR (rows of one group) -> CSC column pointers and values (zeros dropped), values not
    yet sorted. A counting scatter: what scipy's tocsc does, minus the copies and the row
    indices the rank test does not need."""
    counts = np.zeros(n_cols + 1, np.int64)
    for k in range(indptr[-1]):
        if data[k] != 0:
            counts[indices[k] + 1] += 1
    col_ptr = np.cumsum(counts)
    fill = col_ptr[:-1].copy()
    out = np.empty(col_ptr[-1], data.dtype)
    for i in range(indptr.shape[0] - 1):
        for k in range(indptr[i], indptr[i + 1]):
            v = data[k]
            if v != 0:
                c = indices[k]
                out[fill[c]] = v
                fill[c] += 1
    return col_ptr, out


@nb.njit(cache=True, nogil=True)
def _sort_columns_bits(indptr, bits):
    """Sort each column of non-negative floats through their IEEE bit patterns (a uint view:
    same order for values >= 0, and integer comparisons are cheaper than NaN-aware float
    ones)."""
    for j in range(indptr.shape[0] - 1):
        bits[indptr[j]:indptr[j + 1]].sort()


@nb.njit(cache=True, nogil=True)
def _tie_terms(indptr, data_sorted, out):
    """sum(t^3 - t) over runs of equal values in each sorted column."""
    for j in range(indptr.shape[0] - 1):
        s = 0.0
        i = indptr[j]
        end = indptr[j + 1]
        while i < end:
            k = i + 1
            while k < end and data_sorted[k] == data_sorted[i]:
                k += 1
            t = float(k - i)
            s += t * t * t - t
            i = k
        out[j] = s


@nb.njit(cache=True)
def _mwu_p(u1, n_a, n_b, tie_term):
    # pdex 0.3 / numba-mwu 0.2 two-sided asymptotic p-value: same expressions, same order
    n = n_a + n_b
    u2 = n_a * n_b - u1
    mu = n_a * n_b / 2.0
    denom = float(n) * float(n - 1)
    var_inner = (n + 1.0) - tie_term / denom
    s_sq = n_a * n_b / 12.0 * var_inner
    if s_sq <= 0.0:
        return 1.0
    s = math.sqrt(s_sq)
    u = max(u1, u2)
    numerator = u - mu
    numerator -= 0.5
    z = numerator / s
    p = 0.5 * math.erfc(z / math.sqrt(2.0)) * 2.0
    p = min(p, 1.0)
    p = max(p, 0.0)
    return p


@nb.njit(cache=True, nogil=True)
def _mwu_vs_control(g_indptr, g_data, n_a, r_indptr, r_data, r_tie, n_b, u_out, p_out):
    """Per gene: U statistic of the group (sorted nonzero CSC values g_*) against the control
    (sorted nonzero CSC values r_*, per-gene tie term r_tie), and the two-sided p-value.
    Values must be > 0 (zeros are implicit). Serial and GIL-free: callers run several
    perturbations in threads (numba's default threading layer is not re-entrant)."""
    for j in range(g_indptr.shape[0] - 1):
        gs = g_indptr[j]
        ge = g_indptr[j + 1]
        rs = r_indptr[j]
        re = r_indptr[j + 1]
        nnz_a = ge - gs
        nnz_b = re - rs
        if nnz_a + nnz_b == 0:
            u_out[j] = n_a * n_b / 2.0
            p_out[j] = 1.0
            continue
        zero_a = n_a - nnz_a
        zero_b = n_b - nnz_b
        # zeros of a tie with zeros of b; nonzeros of a beat zeros of b
        u = 0.5 * zero_a * zero_b + float(nnz_a) * zero_b
        tie = r_tie[j]
        k = rs
        i = gs
        bsearch = nnz_a * 8 < nnz_b
        while i < ge:
            v = g_data[i]
            i2 = i + 1
            while i2 < ge and g_data[i2] == v:
                i2 += 1
            ca = float(i2 - i)
            if bsearch:
                k = k + np.searchsorted(r_data[k:re], v)
            else:
                while k < re and r_data[k] < v:
                    k += 1
            k2 = k
            while k2 < re and r_data[k2] == v:
                k2 += 1
            cb = float(k2 - k)
            u += ca * (float(k - rs) + 0.5 * cb)
            t = ca + cb
            tie += (t * t * t - t) - (cb * cb * cb - cb)
            i = i2
            k = k2
        nz = float(zero_a + zero_b)
        tie += nz * nz * nz - nz
        u_out[j] = u
        p_out[j] = _mwu_p(u, n_a, n_b, tie)


@nb.njit(cache=True, nogil=True)
def _expm1_same_dtype(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = np.expm1(x[i])  # float32 in -> libm expm1f, as pdex's numba kernel
    return out


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _log2_ratio(x, y):
    out = np.empty(x.shape[0], dtype=np.float64)
    for i in range(x.shape[0]):
        r = np.log2((x[i] + 0.0) / (y[i] + 0.0))
        out[i] = 0.0 if np.isnan(r) else r
    return out


# ---------------------------------------------------------------------------- helpers

def _mean_like_pdex(m) -> np.ndarray:
    """Column means with the same call pdex makes (csr_matrix.mean or ndarray.mean)."""
    return np.asarray(m.mean(axis=0)).ravel()


def expm1_like_pdex(mean: np.ndarray) -> np.ndarray:
    return _expm1_same_dtype(np.ascontiguousarray(mean))


def log2_fold_change(target_bulk: np.ndarray, ref_bulk: np.ndarray) -> np.ndarray:
    return _log2_ratio(np.ascontiguousarray(target_bulk), np.ascontiguousarray(ref_bulk))


def _sorted_csc(m, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, per-column sorted nonzero values) of a csr_matrix or ndarray block of
    non-negative values.

    float32: one sort of 64-bit keys (column << 32 | the value's IEEE bits, which order like
    the values for x >= 0) gives column order and value order at once; numpy sorts 64-bit
    integers with vectorised (AVX-512/AVX2) code, ~2x faster than scatter + per-column sort.
    float64: a counting scatter into columns, then a per-column sort of the uint64 bits (numba).
    """
    m = sp.csr_matrix(m)
    data = np.ascontiguousarray(m.data, dtype=dtype)
    n_cols = m.shape[1]
    if data.dtype == np.float32:
        idx = m.indices
        if (data == 0).any():
            keep = data != 0
            idx, data = idx[keep], data[keep]
        keys = (idx.astype(np.uint64) << np.uint64(32)) | data.view(np.uint32)
        keys.sort()
        indptr = np.zeros(n_cols + 1, np.int64)
        np.cumsum(np.bincount(idx, minlength=n_cols), out=indptr[1:])
        return indptr, keys.astype(np.uint32).view(np.float32)
    if data.dtype != np.float64:
        raise TypeError(f"expression must be float32 or float64, got {data.dtype} "
                        "(vcc_dist.metrics.normalize.as_float_matrix converts it)")
    indptr, data = _csr_to_csc_values(m.indptr, m.indices, data, n_cols)
    _sort_columns_bits(indptr, data.view(np.uint64))
    return indptr, data


@dataclass
class ControlIndex:
    """The control cells of one file, prepared once: each gene's sorted nonzero values, their
    tie terms, the control pseudobulk (expm1 of mean log1p, matrix dtype)."""

    n_cells: int
    indptr: np.ndarray
    data: np.ndarray
    tie: np.ndarray
    bulk: np.ndarray

    @classmethod
    def build(cls, ctrl) -> ControlIndex:
        dtype = ctrl.dtype
        indptr, data = _sorted_csc(ctrl, dtype)
        tie = np.zeros(len(indptr) - 1)
        _tie_terms(indptr, data, tie)
        bulk = expm1_like_pdex(_mean_like_pdex(ctrl))
        return cls(ctrl.shape[0], indptr, data, tie, bulk)


def wilcoxon_vs_control(index: ControlIndex, group) -> tuple[np.ndarray, np.ndarray]:
    """U statistic (the group's) and two-sided p-value per gene of ``group`` (cells x genes,
    csr_matrix or ndarray, values >= 0) against the indexed controls."""
    g_indptr, g_data = _sorted_csc(group, index.data.dtype)
    n_genes = len(g_indptr) - 1
    if n_genes != len(index.indptr) - 1:
        raise ValueError(f"group has {n_genes} genes, the controls {len(index.indptr) - 1}")
    u = np.empty(n_genes)
    p = np.empty(n_genes)
    _mwu_vs_control(g_indptr, g_data, int(group.shape[0]), index.indptr, index.data,
                    index.tie, int(index.n_cells), u, p)
    return u, p


def _bh_last_axis(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg along the last axis with exactly the operations of
    ``scipy.stats.false_discovery_control(p, axis=-1)`` (sort, p * (m / i), reverse running
    minimum, unsort, clip; ``tests/test_wilcoxon.py`` checks equality). Written out because
    importing scipy.stats costs ~0.4 s in every evaluation process (each Ray Tune trial
    starts one) for these five lines."""
    m = p.shape[-1]
    if p.size <= 1 or m <= 1:
        return p.copy()
    order = np.argsort(p, axis=-1)
    q = np.take_along_axis(p, order, axis=-1)
    q *= m / np.arange(1, m + 1, dtype=q.dtype)
    np.minimum.accumulate(q[..., ::-1], out=q[..., ::-1], axis=-1)
    np.put_along_axis(q, order, q.copy(), axis=-1)
    return np.clip(q, 0.0, 1.0)


def bh_fdr(p: np.ndarray, scope: str = "perturbation") -> np.ndarray:
    """Benjamini-Hochberg over each row (``perturbation``) or over the whole array
    (``global``), as pdex applies ``scipy.stats.false_discovery_control``."""
    if scope not in FDR_SCOPES:
        raise ValueError(f"fdr_scope must be one of {FDR_SCOPES}, got {scope!r}")
    p = np.asarray(p, np.float64)
    if p.size == 0:
        return p.copy()
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("p-values must lie in [0, 1]")
    if scope == "global":
        return _bh_last_axis(p.ravel()).reshape(p.shape)
    return _bh_last_axis(p)


@dataclass
class DEResult:
    """DE of each perturbation (rows, in ``targets`` order) against the file's controls."""

    targets: np.ndarray  # (T,) str
    n_cells: np.ndarray  # (T,) cells per perturbation
    lfc: np.ndarray  # (T, G) float64 log2 fold change
    pvalue: np.ndarray  # (T, G) float64
    fdr: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))  # (T, G)
    pseudobulk: np.ndarray | None = None  # (T, G) mean expression, X's dtype
    control_pseudobulk: np.ndarray | None = None  # (G,)

    def significant(self, alpha: float = 0.05) -> np.ndarray:
        """cell-eval's test: float32(fdr) < 0.05 (its DE tables are cast to Float32)."""
        return self.fdr.astype(np.float32) < np.float32(alpha)


def pseudobulk(grp) -> np.ndarray:
    """Mean expression per gene as cell-eval's polars group-by computes it for PDS and MAE:
    summed in float64, divided, rounded to X's dtype."""
    dtype = grp.dtype
    if sp.issparse(grp):
        s = np.asarray(grp.sum(axis=0, dtype=np.float64)).ravel()
    else:
        s = grp.astype(np.float64).sum(axis=0)
    return (s / grp.shape[0]).astype(dtype)


def _one_target(x, rows, index: ControlIndex):
    grp = x[rows]
    bulk = expm1_like_pdex(_mean_like_pdex(grp))
    lfc = log2_fold_change(bulk, index.bulk)
    _, p = wilcoxon_vs_control(index, grp)
    return lfc, p, pseudobulk(grp)


def de_against_control(x, rows_by_target: dict[str, np.ndarray], control_rows: np.ndarray,
                       *, threads: int | None = None,
                       progress=None) -> DEResult:
    """Rank-sum tests, fold changes and pseudobulks of every target's rows against
    ``control_rows``.

    ``x``: csr_matrix or ndarray of log1p expression (values >= 0, no stored zeros);
    row index arrays must be sorted ascending (file order, as pdex slices them). FDR is not
    applied here (``bh_fdr``, or ``FileSummary.de``) so that callers splitting the targets across
    workers can still apply a global BH. Targets run in ``threads`` threads (default: the
    CPUs available); the kernels release the GIL.
    """
    control_rows = np.asarray(control_rows)
    if control_rows.size == 0:
        raise ValueError("no control cells: DE needs the control group")
    ctrl = x[control_rows]
    index = ControlIndex.build(ctrl)
    targets = list(rows_by_target)
    for name in targets:
        if len(rows_by_target[name]) == 0:
            raise ValueError(f"perturbation {name!r} has no cells")
    t, g = len(targets), x.shape[1]
    lfc = np.empty((t, g))
    pv = np.empty((t, g))
    bulk = np.empty((t, g), dtype=x.dtype)
    n_cells = np.array([len(rows_by_target[n]) for n in targets], np.int64)

    def run(i):
        lfc[i], pv[i], bulk[i] = _one_target(x, rows_by_target[targets[i]], index)
        if progress is not None:
            progress.update(1)

    threads = threads or available_threads()
    if threads > 1 and t > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, range(t)))
    else:
        for i in range(t):
            run(i)
    return DEResult(np.asarray(targets, dtype=object), n_cells, lfc, pv, pseudobulk=bulk,
                    control_pseudobulk=pseudobulk(ctrl))
