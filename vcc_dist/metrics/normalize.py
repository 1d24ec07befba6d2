"""Expression input checks and cell-eval's per-file normalisation.

cell-eval 0.8.2 decides per file whether X holds counts or log1p values (any stored value with
a fractional part above 1e-3 means "already log1p") and normalises counts with scanpy's
``normalize_total`` (target = the file's median total) followed by natural ``log1p``.
``log_normalize`` reproduces that bit for bit (docs/cell_eval_0.8.2_semantics.md §2.2-2.3)
without mutating its input and without importing scanpy at run time: scanpy's own function
works in place on an AnnData and pulls a large dependency into every evaluation worker.

The exactness details that matter:

* CSR: per-cell totals accumulate in float64 in row order and are stored in X's dtype; the
  target is the median over *all* cells. Dense and CSC: totals are ``x.sum(axis=1)`` in X's
  dtype and the median is over cells with a positive total only.
* scale ``s = total / median`` in X's dtype, zeros replaced by 1, then ``x / s`` (not
  ``x * median / total``), then ``np.log1p`` on the same dtype.
* integer dtypes become float32 first; float64 stays float64; float16 becomes float32.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba as nb
import numpy as np
import scipy.sparse as sp

#: cell-eval's thresholds (``guess_is_lognorm``): fractional part that marks a non-integer
#: value, and the largest value accepted as log1p expression.
FRACTION_EPS = 1e-3
LOG1P_MAX = 15.0


class ExpressionError(ValueError):
    """An expression matrix cannot be evaluated; the message names the problem and the fix."""


@dataclass(frozen=True)
class MatrixCheck:
    """What ``inspect_matrix`` found."""

    is_counts: bool  # integer-valued (cell-eval will normalise it)
    n_explicit_zeros: int
    min_value: float
    max_value: float


def _stored_values(x) -> np.ndarray:
    return x.data if sp.issparse(x) else np.asarray(x)


def as_float_matrix(x):
    """csr_matrix (for any sparse input) or a C-ordered ndarray, float16 -> float32, integer
    dtypes -> float32 (what scanpy does before normalising); float32/64 kept."""
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        if x.indptr.dtype != x.indices.dtype:
            # h5ad writers may mix int64 indptr with int32 indices; scipy's kernels need one
            idx = np.int64 if x.nnz >= 2**31 else np.int32
            x.indptr = x.indptr.astype(idx, copy=False)
            x.indices = x.indices.astype(idx, copy=False)
        if not x.has_canonical_format:
            # duplicate entries would be summed by scipy but miscounted by rank tests
            x.sum_duplicates()
    else:
        x = np.ascontiguousarray(x)
    dt = x.dtype
    if dt == np.float16 or dt.kind in "iub":
        x = x.astype(np.float32)
    elif dt.kind != "f":
        raise ExpressionError(f"expression matrix has dtype {dt}; expected a numeric dtype")
    return x


@nb.njit(cache=True, nogil=True)
def _scan(vals, eps, n_chunks):
    """One pass: non-finite count, NaN count, min, max, any fractional part > eps (np.modf's
    fractional part is x - trunc(x), exact), stored zeros."""
    n = vals.shape[0]
    step = (n + n_chunks - 1) // n_chunks
    bad = np.zeros(n_chunks, np.int64)
    nan = np.zeros(n_chunks, np.int64)
    lo = np.full(n_chunks, np.inf)
    hi = np.full(n_chunks, -np.inf)
    frac = np.zeros(n_chunks, np.bool_)
    zeros = np.zeros(n_chunks, np.int64)
    for c in range(n_chunks):
        for i in range(c * step, min(n, (c + 1) * step)):
            v = vals[i]
            if not np.isfinite(v):
                bad[c] += 1
                if np.isnan(v):
                    nan[c] += 1
                continue
            lo[c] = min(lo[c], v)
            hi[c] = max(hi[c], v)
            if v == 0:
                zeros[c] += 1
            elif v - np.trunc(v) > eps:
                frac[c] = True
    return bad.sum(), nan.sum(), lo.min(), hi.max(), frac.any(), zeros.sum()


def inspect_matrix(x, what: str = "X") -> MatrixCheck:
    """Validate values the way cell-eval would fail on them, with a clear message instead.

    Raises ``ExpressionError`` for NaN/inf, negative values and log1p-looking data whose
    maximum reaches 15 (counts that are not integers, or normalised but not log-transformed).
    """
    vals = _stored_values(x)
    if vals.size == 0:
        return MatrixCheck(True, 0, 0.0, 0.0)
    flat = vals.reshape(-1) if vals.flags.c_contiguous else np.ravel(vals)
    eps = flat.dtype.type(FRACTION_EPS)
    parts = _in_threads(lambda a, b: _scan(flat[a:b], eps, 16), flat.size)
    n_bad = sum(int(r[0]) for r in parts)
    n_nan = sum(int(r[1]) for r in parts)
    lo = min(float(r[2]) for r in parts)
    hi = max(float(r[3]) for r in parts)
    has_frac = any(bool(r[4]) for r in parts)
    n_zeros = sum(int(r[5]) for r in parts)
    if n_bad:
        raise ExpressionError(
            f"{what} holds {n_nan} NaN and {n_bad - n_nan} infinite values; "
            "cell-eval's Wilcoxon test cannot rank them. Replace them (e.g. np.nan_to_num) "
            "before evaluating.")
    lo, hi = float(lo), float(hi)
    if sp.issparse(x) and x.nnz < np.prod(x.shape):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if lo < 0:
        raise ExpressionError(
            f"{what} has negative values (min {lo:.4g}); expression must be counts or "
            "log1p-normalised values >= 0. Clip predictions at 0 (np.maximum(x, 0)).")
    is_counts = not has_frac
    if not is_counts and hi >= LOG1P_MAX:
        raise ExpressionError(
            f"{what} has non-integer values up to {hi:.4g}: that is neither integer counts "
            f"nor log1p expression (which stays below {LOG1P_MAX}). Pass raw integer counts "
            "or log1p(normalised counts).")
    n_zeros = int(n_zeros) if sp.issparse(x) else 0
    return MatrixCheck(is_counts, n_zeros, lo, hi)


def available_threads() -> int:
    """CPUs this process may use (affinity), capped by NUMBA_NUM_THREADS."""
    return max(1, min(len(os.sched_getaffinity(0)), nb.config.NUMBA_NUM_THREADS))


def _in_threads(fn, n: int, *args):
    """Run ``fn(start, stop, *args)`` over ``n`` items split into one contiguous range per
    available CPU (the numba kernels release the GIL); returns the list of results."""
    k = max(1, min(available_threads(), n // 1_000_000 + 1))
    bounds = np.linspace(0, n, k + 1).astype(np.int64)
    if k == 1:
        return [fn(0, n, *args)]
    with ThreadPoolExecutor(k) as pool:
        return list(pool.map(lambda i: fn(bounds[i], bounds[i + 1], *args), range(k)))


@nb.njit(cache=True, nogil=True)
def _csr_row_totals(indptr, data, out, start, stop):
    # float64 accumulator in row order, stored in data's dtype: scanpy's _normalize_csr
    for i in range(start, stop):
        s = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            s += data[k]
        out[i] = s


@nb.njit(cache=True, nogil=True)
def _csr_divide_rows(indptr, data, scale, start, stop):
    # x / s per row in data's dtype: the same IEEE division scanpy's
    # data / np.repeat(s, np.diff(indptr)) performs, without the nnz-sized repeat array
    for i in range(start, stop):
        s = scale[i]
        for k in range(indptr[i], indptr[i + 1]):
            data[k] = data[k] / s


def log_normalize(x, median_of_positive: bool | None = None, copy: bool = True):
    """scanpy ``normalize_total`` (median target) + ``log1p`` on a copy, as cell-eval does for
    integer input. ``x`` is a csr_matrix or ndarray from ``as_float_matrix``.

    ``median_of_positive``: scanpy takes the median over all cells for CSR input and over
    cells with a positive total for dense or CSC input (default: by ``x``'s storage; pass True
    for a matrix that was CSC in the file). ``copy=False`` overwrites ``x``'s values."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, copy=copy)
        totals = np.zeros(x.shape[0], dtype=x.dtype)
        _in_threads(lambda a, b: _csr_row_totals(x.indptr, x.data, totals, a, b),
                    x.shape[0])
        target = np.median(totals[totals > 0] if median_of_positive else totals)
        scale = totals / target
        scale = scale + (scale == 0)
        scale = scale.astype(x.dtype)
        _in_threads(lambda a, b: _csr_divide_rows(x.indptr, x.data, scale, a, b), x.shape[0])
        np.log1p(x.data, out=x.data)
        return x
    if copy:
        x = np.array(x, copy=True)
    totals = x.sum(axis=1)
    target = np.median(totals[totals > 0])
    scale = totals / target
    scale = scale + (scale == 0)
    np.true_divide(x, scale[:, None], out=x)
    np.log1p(x, out=x)
    return x


def prepare_expression(x, what: str = "X", drop_explicit_zeros: bool = True,
                       copy: bool = True):
    """Input matrix -> (log1p expression as cell-eval sees it, MatrixCheck).

    Explicitly stored zeros are dropped (cell-eval's DE step refuses them; dropping them
    changes no metric) unless ``drop_explicit_zeros=False``. ``copy=False`` lets it
    overwrite ``x`` (for a matrix read from disk only for this).
    """
    was_csc = sp.issparse(x) and x.format == "csc"
    x = as_float_matrix(x)
    check = inspect_matrix(x, what)
    if sp.issparse(x) and check.n_explicit_zeros and drop_explicit_zeros:
        x = x.copy() if copy else x
        x.eliminate_zeros()
        copy = False
    if check.is_counts:
        x = log_normalize(x, median_of_positive=was_csc or None, copy=copy)
    return x, check
