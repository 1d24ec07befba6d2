"""Write and validate Virtual Cell Challenge prediction files (challenge-format .h5ad).

A prediction goes through ``cell-eval prep`` (which packs it for upload) and is then scored by
``cell-eval run --profile vcc`` against the held-out real cells. Both fail late, or worse score
something else than intended, on inputs that are easy to produce by accident. This module
writes files that pass, and checks a file before it is uploaded or evaluated, reporting every
problem at once with the number of cells, genes and perturbations affected, a few examples and
the fix (docs/cell_eval_0.8.2_semantics.md §2.2, §2.4, §2.6, §9).

What ``cell-eval prep`` 0.8.2 checks (and ``validate_submission`` reports the same way):

* the perturbation column exists (``pert_col_missing``) and holds the control label
  (``missing_control``);
* the genes equal the gene list (read headerless: the first line is a gene). Missing or extra
  genes are an error (``gene_mismatch``); the same genes in another order are reordered by prep
  (``gene_order``, a warning); a list whose length is not 18,080 is only warned about
  (``gene_count``);
* at most 200,000 cells (``too_many_cells``).

What prep passes through and ``cell-eval run`` then crashes on or mis-scores (errors here):

* explicitly stored zeros in a sparse X (``explicit_zeros``): numba-mwu, the rank-sum test of
  cell-eval's DE step, raises "X must not contain explicit zero entries". Prep keeps them, and
  its float64 -> float32 cast can create new ones from tiny values (``underflow_zeros``);
* NaN (``nan_values``: passes cell-eval's counts/log1p guess, then numba-mwu raises), infinite
  values (``inf_values``), negative values (``negative_values``: the log1p guess or the sparse
  rank test raises), and non-integer data whose maximum reaches 15 (``not_log1p_range``: neither
  counts nor log1p, rejected by the log1p guess);
* duplicate (cell, gene) entries in a sparse matrix (``duplicate_entries``): the rank test does
  not sum them and silently miscounts;
* perturbation categories with no cells (``unused_categories``): pdex iterates over the
  categories and an empty group makes numba-mwu raise "must have at least one row";
* empty or NaN labels (``empty_labels``): they become a perturbation named "" or "nan";
* duplicate gene names (``duplicate_genes``): cell-eval compares genes by position, and the
  PDS metric drops every column named like the perturbation;
* perturbation labels that differ from the real file's, control included
  (``pert_set_mismatch``: cell-eval run raises "Perturbation mismatch"), and, against the
  challenge's expected-counts CSV, missing or extra perturbations and perturbations with more
  or fewer cells than expected (``pert_set_mismatch``, ``cell_count_mismatch``); against the
  real file, perturbations with more or fewer cells than it has (``cell_count_mismatch``;
  controls excluded, as in the counts CSV);
* genes in another order than the real file's when prep will not reorder them (``gene_order``
  as an error: cell-eval run compares ``var_names`` position by position).

Warnings (prep or cell-eval quietly fixes or accepts them, but they are worth knowing about):
``wrong_dtype`` (float16 / float64 / integer X, cast to float32), ``integer_counts`` (all
values integers: cell-eval treats X as raw counts and log-normalises it to the file's median
total), ``matrix_format`` (dense X, or CSC), ``unsorted_indices``, ``gene_order``,
``gene_count``.

X is read in blocks of rows (about ``CHUNK_VALUES`` stored values at a time) straight from the
HDF5 file, so a 200,000 x 18,080 float32 CSR file validates without being densified or loaded
whole.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.infer.counts import parse_pert_counts
from vcc_dist.metrics.normalize import (
    FRACTION_EPS,
    LOG1P_MAX,
    ExpressionError,
    as_float_matrix,
    inspect_matrix,
)

#: cell-eval prep's defaults (``EXPECTED_GENE_DIM``, ``MAX_CELL_DIM``)
EXPECTED_GENES = 18080
MAX_CELLS = 200_000
#: stored values of X read at once while validating (64 MiB of float32)
CHUNK_VALUES = 1 << 24
#: how many names a message lists
N_EXAMPLES = 10

ERROR = "error"
WARNING = "warning"

#: every problem code with its default severity and meaning
PROBLEM_CODES: dict[str, tuple[str, str]] = {
    "pert_col_missing": (ERROR, "the perturbation column is not in obs"),
    "missing_control": (ERROR, "no control cells"),
    "empty_labels": (ERROR, "cells with an empty or NaN perturbation label"),
    "unused_categories": (ERROR, "perturbation categories with 0 cells"),
    "too_many_cells": (ERROR, "more cells than cell-eval prep accepts"),
    "duplicate_genes": (ERROR, "a gene name occurs more than once"),
    "gene_mismatch": (ERROR, "genes missing from or extra to the gene list / real file"),
    "gene_order": (WARNING, "same genes, other order (error when nothing will reorder them)"),
    "gene_count": (WARNING, "gene count differs from the challenge's 18,080"),
    "nan_values": (ERROR, "NaN values in X"),
    "inf_values": (ERROR, "infinite values in X"),
    "negative_values": (ERROR, "negative values in X"),
    "not_log1p_range": (ERROR, "non-integer values reaching 15: neither counts nor log1p"),
    "explicit_zeros": (ERROR, "explicitly stored zeros in a sparse X"),
    "underflow_zeros": (ERROR, "float64 values that become stored zeros in float32"),
    "duplicate_entries": (ERROR, "duplicate (cell, gene) entries in a sparse X"),
    "unsorted_indices": (WARNING, "sparse indices not sorted within rows"),
    "wrong_dtype": (WARNING, "X is not float32 (error when not numeric)"),
    "integer_counts": (WARNING, "X holds integers: cell-eval will log-normalise it"),
    "matrix_format": (WARNING, "X is dense or CSC rather than CSR"),
    "pert_set_mismatch": (ERROR, "perturbations differ from the expected / real ones"),
    "cell_count_mismatch": (ERROR, "cells per perturbation differ from the expected counts / "
                            "real file"),
}


class SubmissionError(ValueError):
    """A prediction file cannot be written or would fail (or be mis-scored by) cell-eval."""


# ----------------------------------------------------------------------------- report

@dataclass
class Problem:
    """One finding: ``code`` (see ``PROBLEM_CODES``), severity "error" or "warning", a message
    naming the problem, how much it affects, examples and the fix."""

    code: str
    severity: str
    message: str
    count: int = 0  # values / cells / genes / perturbations affected (see the message)
    examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.severity.upper()} [{self.code}] {self.message}"


@dataclass
class SubmissionReport:
    """Everything ``validate_submission`` found in one prediction file."""

    path: str | None
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True iff there is no error (warnings allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def codes(self) -> set[str]:
        return {p.code for p in self.problems}

    def add(self, code: str, message: str, *, count: int = 0,
            examples: Sequence[str] = (), severity: str | None = None) -> None:
        sev = severity or PROBLEM_CODES[code][0]
        self.problems.append(Problem(code, sev, message, int(count), [str(e) for e in examples]))

    def raise_if_errors(self) -> None:
        """Raise ``SubmissionError`` listing every error (nothing when ``ok``)."""
        if not self.ok:
            head = f"{self.path or 'prediction'}: {len(self.errors)} error(s)"
            raise SubmissionError("\n".join([head] + [f"  {p}" for p in self.errors]))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok,
                "n_errors": len(self.errors), "n_warnings": len(self.warnings),
                "stats": self.stats,
                "problems": [{"code": p.code, "severity": p.severity, "message": p.message,
                              "count": p.count, "examples": p.examples}
                             for p in self.problems]}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def __str__(self) -> str:
        s = self.stats
        lines = [f"Submission {self.path or '(in memory)'}"]
        if "n_cells" in s:
            lines.append(
                f"  {s['n_cells']:,} cells x {s['n_genes']:,} genes; "
                f"{s.get('n_perts', '?')} perturbations + {s.get('n_control', '?')} control "
                f"cells")
        if "dtype" in s:
            rng = (f", values in [{s['min']:.4g}, {s['max']:.4g}]"
                   if s.get("min") is not None else "")
            kind = {True: " (integer counts)", False: " (log1p)"}.get(s.get("is_counts"), "")
            lines.append(f"  X: {s['dtype']} {s['format']}, {s['n_stored']:,} stored "
                         f"values{rng}{kind}")
        for p in self.errors + self.warnings:
            lines.append(f"  {p}")
        verdict = "OK" if self.ok else "NOT OK"
        lines.append(f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} "
                     f"warning(s)")
        return "\n".join(lines)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def _names(items: Sequence, n: int = N_EXAMPLES) -> str:
    items = list(items)
    shown = ", ".join(repr(str(x)) for x in items[:n])
    return shown + (f", ... ({len(items) - n:,} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------- inputs

def read_gene_list(genes: str | os.PathLike | Sequence[str]) -> list[str]:
    """A gene list as cell-eval prep reads it: a sequence of names, or a file whose first
    field of each line is a gene (``pl.read_csv(has_header=False)``: **the first line is a
    gene, not a header**; blank lines are skipped)."""
    if isinstance(genes, (str, os.PathLike)):
        with open(genes, newline="") as f:
            out = [row[0] for row in csv.reader(f) if row and row[0] != ""]
    else:
        out = [str(g) for g in genes]
    dup = pd.Index(out)[pd.Index(out).duplicated()].unique()
    if len(dup):
        raise SubmissionError(f"the gene list names {len(dup)} gene(s) more than once: "
                              f"{_names(dup)}")
    return out


def read_expected_counts(counts: str | os.PathLike | pd.DataFrame, pert_col: str = PERT_KEY,
                         control_label: str = CONTROL_LABEL) -> pd.Series:
    """Expected cells per perturbation (control rows dropped) from a CSV or DataFrame with a
    perturbation column (``pert_col`` or ``target_gene``) and ``n_cells``, as cell-eval
    baseline's counts file."""
    d = parse_pert_counts(counts, pert_cols=(pert_col, PERT_KEY), control_label=control_label,
                          error=SubmissionError)
    return pd.Series(list(d.values()), index=list(d.keys()), name="n_cells", dtype=np.int64)


# ----------------------------------------------------------------------------- writing

def write_submission(X, target_gene: Sequence[str], genes: Sequence[str],
                     out_path: str | os.PathLike, *,
                     gene_list: str | os.PathLike | Sequence[str] | None = None,
                     control_label: str = CONTROL_LABEL, max_cells: int | None = MAX_CELLS,
                     pert_col: str = PERT_KEY, compression: str | None = None) -> Path:
    """Write a challenge-format prediction .h5ad and return its path.

    ``X`` (cells x genes, dense or sparse; integer counts or log1p values) is stored as a
    float32 CSR matrix in canonical form without explicitly stored zeros; NaN, infinite,
    negative or out-of-range values raise ``SubmissionError``. obs holds only ``pert_col``
    (string categorical, observed labels only) with obs_names "0".."n-1"; var's index is the
    gene names. With ``gene_list`` (names, or a headerless one-gene-per-line file) the columns
    are reordered to it; missing or extra genes raise. Control cells must be present and at
    most ``max_cells`` rows (None disables). The file is written under a temporary name in the
    same directory and renamed into place, so an interrupted write leaves no file at
    ``out_path``.
    """
    out_path = Path(out_path)
    labels = pd.Series(target_gene, dtype=object).reset_index(drop=True)
    genes = [str(g) for g in genes]
    n, g = X.shape
    if len(labels) != n:
        raise SubmissionError(f"{len(labels):,} labels for {n:,} rows of X")
    if len(genes) != g:
        raise SubmissionError(f"{len(genes):,} gene names for {g:,} columns of X")
    empty = labels.isna() | (labels.astype(str).str.strip() == "")
    if empty.any():
        raise SubmissionError(f"{int(empty.sum()):,} cells have an empty or NaN label (rows "
                              f"{_names(np.flatnonzero(empty.to_numpy()))}); label or drop "
                              "them")
    labels = labels.astype(str)
    if not (labels == control_label).any():
        raise SubmissionError(f"no control cells labelled {control_label!r}; cell-eval needs "
                              "them (PDS and DES compare against the prediction's controls)")
    if max_cells is not None and max_cells >= 0 and n > max_cells:
        raise SubmissionError(f"{n:,} cells exceed the limit of {max_cells:,} (cell-eval "
                              "prep's max cell count)")
    gidx = pd.Index(genes)
    if gidx.has_duplicates:
        raise SubmissionError(f"duplicate gene names: {_names(gidx[gidx.duplicated()].unique())}")
    if gene_list is not None:
        order = read_gene_list(gene_list)
        if order != genes:
            have, want = set(genes), set(order)
            missing = [x for x in order if x not in have]
            extra = [x for x in genes if x not in want]
            if missing or extra:
                raise SubmissionError(
                    f"genes do not match the gene list: {len(missing):,} missing "
                    f"({_names(missing)}), {len(extra):,} extra ({_names(extra)})")
            cols = gidx.get_indexer(order)
        else:
            cols = None
        genes = order
    else:
        cols = None

    try:
        # a private CSR copy: as_float_matrix canonicalises sparse input in place
        x = as_float_matrix(sp.csr_matrix(X, copy=True) if sp.issparse(X) else X)
        if x.dtype != np.float32:
            x = x.astype(np.float32)  # casting float64 may underflow to stored zeros
        if not sp.issparse(x):
            x = sp.csr_matrix(x)  # keeps nonzeros only
        inspect_matrix(x, "X")
    except ExpressionError as e:
        raise SubmissionError(str(e)) from None
    x.eliminate_zeros()  # explicit zeros crash cell-eval's DE step
    if cols is not None:
        x = x[:, cols]
    x.sort_indices()

    obs = pd.DataFrame({pert_col: pd.Categorical(labels.to_numpy())},
                       index=pd.Index(np.arange(n).astype(str)))
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    adata = ad.AnnData(X=x, obs=obs, var=var)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp.h5ad")
    try:
        adata.write_h5ad(tmp, compression=compression)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


# ----------------------------------------------------------------------------- reading X

class _MatrixSource:
    """Stored values of X in blocks of whole rows (CSR, dense) or columns (CSC), from an
    HDF5 file or from memory, without materialising the whole matrix."""

    def __init__(self, x=None, group=None):
        self.data = self.indices = self.indptr = self.dense = None
        if group is not None:  # h5py node of X
            if isinstance(group, h5py.Dataset):
                self.format, self.dense = "dense", group
                self.shape, self.dtype = tuple(group.shape), group.dtype
            else:
                enc = group.attrs.get("encoding-type", group.attrs.get("h5sparse_format", ""))
                enc = enc.decode() if isinstance(enc, bytes) else str(enc)
                self.format = enc.replace("_matrix", "")
                if self.format not in ("csr", "csc"):
                    raise SubmissionError(f"X has an unsupported encoding {enc!r}")
                shape = group.attrs.get("shape", group.attrs.get("h5sparse_shape"))
                self.shape = tuple(int(v) for v in shape)
                self.data, self.indices = group["data"], group["indices"]
                self.indptr = group["indptr"][:]
                self.dtype = self.data.dtype
        else:
            if sp.issparse(x):
                if x.format not in ("csr", "csc"):
                    x = sp.csr_matrix(x)
                self.format = x.format
                self.data, self.indices, self.indptr = x.data, x.indices, np.asarray(x.indptr)
            else:
                x = np.asarray(x)
                self.format, self.dense = "dense", x
            self.shape, self.dtype = tuple(x.shape), x.dtype

    @property
    def n_stored(self) -> int:
        return int(self.indptr[-1]) if self.dense is None else int(np.prod(self.shape))

    def blocks(self, budget: int = CHUNK_VALUES) -> Iterator[tuple]:
        """Yields (values, locate, minor) per block; ``locate(mask)`` gives the (rows, cols)
        of the masked values; ``minor`` is (indptr rebased to 0, indices) for sparse blocks."""
        if self.dense is not None:
            n, g = self.shape
            step = max(1, budget // max(g, 1))
            for r0 in range(0, n, step):
                v = np.asarray(self.dense[r0:r0 + step])

                def locate(mask, r0=r0, g=g):
                    pos = np.flatnonzero(mask)
                    return r0 + pos // g, pos % g

                yield v.reshape(-1), locate, None
            return
        ip = self.indptr
        n_major = len(ip) - 1
        m0 = 0
        while m0 < n_major:
            m1 = int(np.searchsorted(ip, ip[m0] + budget, side="right")) - 1
            m1 = min(max(m1, m0 + 1), n_major)
            a, b = int(ip[m0]), int(ip[m1])
            v = np.asarray(self.data[a:b])
            idx = np.asarray(self.indices[a:b])
            local = ip[m0:m1 + 1] - a

            def locate(mask, m0=m0, local=local, idx=idx):
                pos = np.flatnonzero(mask)
                major = m0 + np.searchsorted(local, pos, side="right") - 1
                minor = idx[pos]
                return (major, minor) if self.format == "csr" else (minor, major)

            yield v, locate, (local, idx)
            m0 = m1


class _Hits:
    """Values matching one condition: how many, in which cells and genes, examples."""

    def __init__(self, shape):
        self.n = 0
        self.rows = np.zeros(shape[0], dtype=bool)
        self.cols = np.zeros(shape[1], dtype=bool)
        self.examples: list[tuple[int, int, float]] = []

    def add(self, mask, values, locate) -> None:
        k = int(np.count_nonzero(mask))
        if not k:
            return
        self.n += k
        r, c = locate(mask)
        self.rows[r] = True
        self.cols[c] = True
        if len(self.examples) < 3:
            vals = values[mask][:3 - len(self.examples)]
            self.examples += list(zip(r[:len(vals)].tolist(), c[:len(vals)].tolist(),
                                      vals.tolist()))


@dataclass
class _Scan:
    dtype: np.dtype
    format: str
    n_stored: int
    hits: dict[str, _Hits]
    n_decimals: int  # values with a fractional part > FRACTION_EPS (cell-eval's rule)
    vmin: float | None
    vmax: float | None  # over finite values
    n_dup: int
    n_unsorted_major: int


def _scan_matrix(src: _MatrixSource, budget: int = CHUNK_VALUES) -> _Scan:
    names = ("nan", "inf", "neg", "big", "zero", "underflow")
    hits = {k: _Hits(src.shape) for k in names}
    numeric = src.dtype.kind in "iufb"
    n_dec, vmin, vmax, n_dup, n_unsorted = 0, np.inf, -np.inf, 0, 0
    sparse = src.dense is None
    if numeric:
        for v, locate, minor in src.blocks(budget):
            if v.size == 0:
                continue
            if v.dtype.kind == "f":
                nan = np.isnan(v)
                inf = np.isinf(v)
                hits["nan"].add(nan, v, locate)
                hits["inf"].add(inf, v, locate)
                finite = ~(nan | inf)
                n_dec += int(np.count_nonzero(np.modf(v)[0] > FRACTION_EPS))
                if finite.any():
                    vmin = min(vmin, float(np.min(v, where=finite, initial=np.inf)))
                    vmax = max(vmax, float(np.max(v, where=finite, initial=-np.inf)))
                hits["neg"].add(finite & (v < 0), v, locate)
                hits["big"].add(finite & (v >= LOG1P_MAX), v, locate)
                if v.dtype == np.float64:
                    hits["underflow"].add((v != 0) & (v.astype(np.float32) == 0), v, locate)
            else:
                vmin, vmax = min(vmin, float(v.min())), max(vmax, float(v.max()))
                hits["neg"].add(v < 0, v, locate)
            if sparse:
                hits["zero"].add(v == 0, v, locate)
                local, idx = minor
                if idx.size > 1:
                    d = np.diff(idx.astype(np.int64))
                    inner = np.ones(d.size, dtype=bool)
                    starts = local[1:-1]
                    starts = starts[(starts > 0) & (starts < idx.size)]
                    inner[starts - 1] = False
                    n_dup += int(np.count_nonzero((d == 0) & inner))
                    bad = (d < 0) & inner
                    if bad.any():
                        n_unsorted += len(np.unique(
                            np.searchsorted(local, np.flatnonzero(bad), side="right")))
    if sparse and src.n_stored < np.prod(src.shape):  # implicit zeros
        vmin, vmax = min(vmin, 0.0), max(vmax, 0.0)
    empty = vmin == np.inf
    return _Scan(src.dtype, src.format, src.n_stored, hits, n_dec,
                 None if empty else vmin, None if empty else vmax, n_dup, n_unsorted)


# ----------------------------------------------------------------------------- validation

def _open_anndata(obj, what: str):
    """(obs, var_names, matrix source, path, h5py file to close or None)."""
    if isinstance(obj, ad.AnnData):
        if obj.isbacked:
            f = h5py.File(obj.filename, "r")
            return obj.obs, obj.var_names, _MatrixSource(group=f["X"]), str(obj.filename), f
        if obj.X is None:
            raise SubmissionError(f"{what} AnnData has no X")
        return obj.obs, obj.var_names, _MatrixSource(x=obj.X), None, None
    path = Path(obj)
    if not path.is_file():
        raise SubmissionError(f"{what} file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SubmissionError(f"cannot read {what} file {path} as HDF5/h5ad: {e}") from None
    try:
        obs = ad.io.read_elem(f["obs"])
        var = ad.io.read_elem(f["var"])
        if "X" not in f:
            raise SubmissionError(f"{what} file {path} has no X")
        src = _MatrixSource(group=f["X"])
    except SubmissionError:
        f.close()
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure means "not an h5ad"
        f.close()
        raise SubmissionError(f"cannot read {what} file {path} as h5ad: {e}") from None
    return obs, var.index, src, str(path), f


def _read_labels_and_genes(obj, pert_col: str):
    """obs[pert_col] (or None) and var names of the real file, without reading X."""
    if isinstance(obj, ad.AnnData):
        return obj.obs.get(pert_col), pd.Index(obj.var_names.astype(str))
    path = Path(obj)
    if not path.is_file():
        raise SubmissionError(f"real file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            obs = ad.io.read_elem(f["obs"])
            var = ad.io.read_elem(f["var"])
    except Exception as e:  # noqa: BLE001
        raise SubmissionError(f"cannot read real file {path} as h5ad: {e}") from None
    return obs.get(pert_col), pd.Index(var.index.astype(str))


def _where(h: _Hits, obs_names, var_names, labels) -> str:
    cells = np.flatnonzero(h.rows)
    genes = np.flatnonzero(h.cols)
    txt = f"{h.n:,} values in {cells.size:,} cells and {genes.size:,} genes"
    if labels is not None:
        perts = pd.unique(labels[cells])
        txt += f" ({len(perts):,} perturbations: {_names(perts, 5)})"
    ex = "; ".join(f"cell {obs_names[r]!r} gene {var_names[c]!r} = {v:.6g}"
                   for r, c, v in h.examples)
    return f"{txt}; e.g. {ex}"


def _check_genes(rep, var_names, gene_list, real_genes, expected_genes):
    names = pd.Index(var_names.astype(str))
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()
        rep.add("duplicate_genes",
                f"{len(dup):,} gene names occur more than once ({_names(dup)}); cell-eval "
                "matches genes by position and PDS drops every column named like the "
                "perturbation. Keep one column per gene (write_submission checks this).",
                count=len(dup), examples=dup[:N_EXAMPLES])
    if expected_genes is not None and expected_genes >= 0:
        n_ref = len(gene_list) if gene_list is not None else len(names)
        what = "the gene list has" if gene_list is not None else "X has"
        if n_ref != expected_genes:
            rep.add("gene_count",
                    f"{what} {n_ref:,} genes, not the challenge's {expected_genes:,}; "
                    "cell-eval prep only warns and adopts the gene list's length. Check that "
                    "this is the intended gene list.", count=n_ref)
    refs = []
    if gene_list is not None:
        refs.append(("the gene list", list(gene_list), WARNING))
    if real_genes is not None:
        # cell-eval run compares var_names position by position; prep's reordering to the
        # gene list only helps when the gene list has the real file's order
        fixed = gene_list is not None and list(gene_list) == list(real_genes)
        if not fixed:
            refs.append(("the real file", list(real_genes), ERROR))
    listed = names.tolist()
    for what, ref, order_sev in refs:
        if listed == ref:
            continue
        ref_set, have = set(ref), set(listed)
        missing = [x for x in ref if x not in have]
        extra = [x for x in listed if x not in ref_set]
        if missing or extra:
            hint = ""
            if what == "the gene list" and missing and ref and missing[0] == ref[0] \
                    and ref[0].lower() in ("gene", "genes", "gene_name", "gene_names",
                                           "symbol", "gene_symbol", PERT_KEY, "index"):
                hint = (f" The gene list's first line {ref[0]!r} looks like a header: "
                        "cell-eval prep reads it as a gene; remove it.")
            rep.add("gene_mismatch",
                    f"genes differ from {what}: {len(missing):,} missing ({_names(missing)}) "
                    f"and {len(extra):,} extra ({_names(extra)}); cell-eval prep raises "
                    f"'Provided gene list does not match'. Predict exactly the listed genes."
                    + hint, count=len(missing) + len(extra),
                    examples=(missing[:N_EXAMPLES] + extra[:N_EXAMPLES]))
        elif len(listed) == len(ref):
            moved = int(np.count_nonzero(np.asarray(listed, dtype=object)
                                         != np.asarray(ref, dtype=object)))
            if order_sev == WARNING:
                msg = (f"genes are {what}'s genes in another order ({moved:,} of "
                       f"{len(ref):,} columns out of place); cell-eval prep reorders them "
                       "(write_submission(..., gene_list=...) writes them in order).")
            else:
                msg = (f"genes are {what}'s genes in another order ({moved:,} of "
                       f"{len(ref):,} columns out of place); cell-eval run compares genes "
                       "position by position and raises. Reorder the columns to the real "
                       "file's order (or prep with a gene list in that order).")
            rep.add("gene_order", msg, count=moved, severity=order_sev)
        # (same set but duplicates make the lengths differ: reported as duplicate_genes)


def _check_labels(rep, obs, pert_col, control_label, max_cells, n_cells):
    """Returns (labels as str ndarray with NaN -> 'nan', per-perturbation counts excluding
    control and empty labels) or (None, None) without a perturbation column."""
    if n_cells > (max_cells if max_cells is not None and max_cells >= 0 else np.inf):
        rep.add("too_many_cells",
                f"{n_cells:,} cells exceed cell-eval prep's maximum of {max_cells:,} "
                f"({n_cells - max_cells:,} too many); prep raises. Predict fewer cells per "
                "perturbation (the expected counts) or fewer control cells.",
                count=n_cells - max_cells)
    if pert_col not in obs.columns:
        rep.add("pert_col_missing",
                f"obs has no column {pert_col!r} (columns: {_names(obs.columns)}); cell-eval "
                "prep raises. Store the perturbation labels there or pass the column name "
                "(--pert-col).")
        return None, None
    col = obs[pert_col]
    as_str = col.to_numpy(dtype=str)  # cell-eval's conversion: NaN -> "nan"
    empty = col.isna().to_numpy() | (col.astype(str).str.strip() == "").to_numpy()
    if empty.any():
        rows = np.flatnonzero(empty)
        rep.add("empty_labels",
                f"{rows.size:,} cells have an empty or NaN label (e.g. cells "
                f"{_names(obs.index[rows], 5)}); cell-eval treats them as a perturbation "
                "named '' or 'nan' that the real file lacks ('Perturbation mismatch'). Label "
                "them or drop them.", count=rows.size, examples=obs.index[rows][:N_EXAMPLES])
    if isinstance(col.dtype, pd.CategoricalDtype):
        used = set(pd.unique(col.dropna()))
        unused = [c for c in col.cat.categories if c not in used]
        if unused:
            rep.add("unused_categories",
                    f"{len(unused):,} categories of {pert_col!r} have no cells "
                    f"({_names(unused)}); pdex iterates over the categories and numba-mwu "
                    "raises on an empty group. Fix: obs[col] = "
                    "obs[col].cat.remove_unused_categories().", count=len(unused),
                    examples=unused[:N_EXAMPLES])
    n_ctrl = int(np.count_nonzero(as_str == control_label))
    if n_ctrl == 0:
        rep.add("missing_control",
                f"no cells labelled {control_label!r} in {pert_col!r}; cell-eval prep raises "
                "and PDS/DES need the prediction's own control cells. Add control cells "
                "(e.g. the real training controls) or pass the right --control-label.")
    counts = pd.Series(as_str[~empty]).value_counts()
    counts = counts[counts.index != control_label]
    rep.stats.update(n_perts=int(counts.size), n_control=n_ctrl)
    return as_str, counts


def _check_counts(rep, counts: pd.Series, expected: pd.Series, *,
                  ref: str = "the expected counts", fix: str = "Predict exactly n_cells cells "
                  "per perturbation.", check_set: bool = True):
    """Cells per perturbation (controls excluded) against ``expected``: one
    ``cell_count_mismatch`` naming every perturbation with more or fewer cells than ``ref``
    (and, with ``check_set``, a ``pert_set_mismatch`` for missing or extra ones)."""
    exp = expected  # zero-cell rows are dropped by read_expected_counts
    missing = [p for p in exp.index if p not in counts.index]
    extra = [p for p in counts.index if p not in exp.index]
    if check_set and (missing or extra):
        rep.add("pert_set_mismatch",
                f"perturbations differ from the expected counts: {len(missing):,} expected "
                f"but absent ({_names(missing)}), {len(extra):,} not expected "
                f"({_names(extra)}). Predict exactly the listed perturbations.",
                count=len(missing) + len(extra),
                examples=missing[:N_EXAMPLES] + extra[:N_EXAMPLES])
    both = exp.index.intersection(counts.index)
    diff = both[counts[both].to_numpy() != exp[both].to_numpy()]
    if len(diff):
        more = [p for p in diff if counts[p] > exp[p]]
        fewer = [p for p in diff if counts[p] < exp[p]]
        word = "expected" if ref == "the expected counts" else "in the real file"
        ex = [f"{p}: {counts[p]:,} predicted vs {exp[p]:,} {word}" for p in diff]
        rep.add("cell_count_mismatch",
                f"{len(diff):,} perturbations have another number of cells than in {ref} "
                f"({len(more):,} more, {len(fewer):,} fewer), e.g. "
                f"{'; '.join(ex[:5])}. {fix}",
                count=len(diff), examples=ex[:N_EXAMPLES])


def _check_real_counts(rep, counts: pd.Series, real_labels, control_label: str) -> None:
    """The prediction's cells per perturbation against the real file's (controls excluded:
    a prediction's controls are usually real training controls, in any number)."""
    if real_labels is None:
        return  # _check_real_perts reports the missing column
    real = pd.Series(real_labels.to_numpy(dtype=str)).value_counts()
    real = real[real.index != control_label]
    _check_counts(rep, counts, real, ref="the real file", check_set=False,
                  fix="Predict as many cells for each perturbation as the real file has "
                  "(real.obs[pert_col].value_counts(); the challenge's counts CSV lists the "
                  "same numbers), e.g. pass those counts to the predict / baseline job.")


def _check_real_perts(rep, labels_str, real_labels, control_label):
    if real_labels is None:
        rep.add("pert_set_mismatch", "the real file has no perturbation column; cannot compare "
                "perturbations (check --pert-col)")
        return
    real_set = set(np.unique(real_labels.to_numpy(dtype=str)))
    pred_set = set(np.unique(labels_str))
    missing, extra = sorted(real_set - pred_set), sorted(pred_set - real_set)
    if missing or extra:
        rep.add("pert_set_mismatch",
                f"perturbation labels differ from the real file's ({control_label!r} "
                f"included): {len(missing):,} in the real file only ({_names(missing)}), "
                f"{len(extra):,} in the prediction only ({_names(extra)}); cell-eval run "
                "raises 'Perturbation mismatch'.", count=len(missing) + len(extra),
                examples=missing[:N_EXAMPLES] + extra[:N_EXAMPLES])


def _check_values(rep, scan: _Scan, obs_names, var_names, labels):
    dt = scan.dtype
    st = rep.stats
    st.update(dtype=str(dt), format=scan.format, n_stored=scan.n_stored,
              min=scan.vmin, max=scan.vmax)
    if dt.kind not in "iufb":
        rep.add("wrong_dtype", f"X has dtype {dt}, not a number type; cell-eval cannot use it. "
                "Store float32 values.", severity=ERROR)
        return
    if dt == np.float16:
        rep.add("wrong_dtype", "X is float16; cell-eval casts it to float32 (lossless). Store "
                "float32 to avoid the surprise.")
    elif dt == np.float64:
        rep.add("wrong_dtype", "X is float64; cell-eval prep casts it to float32 (the "
                "challenge's encoding). Store float32.")
    elif dt.kind in "iub":
        rep.add("wrong_dtype", f"X has integer dtype {dt}; cell-eval casts it to float32 and "
                "treats it as raw counts.")
    h = scan.hits
    w = lambda k: _where(h[k], obs_names, var_names, labels)
    if h["nan"].n:
        rep.add("nan_values", f"X holds NaN: {w('nan')}. cell-eval's rank test (numba-mwu) "
                "raises on NaN. Fix the model output or np.nan_to_num(x, nan=0.0).",
                count=h["nan"].n)
    if h["inf"].n:
        rep.add("inf_values", f"X holds infinite values: {w('inf')}. cell-eval rejects them "
                "(max >= 15) or its rank test fails. Replace them with finite values.",
                count=h["inf"].n)
    if h["neg"].n:
        rep.add("negative_values", f"X has negative values (min {scan.vmin:.4g}): "
                f"{w('neg')}. cell-eval's log1p check (with decimals) or its sparse rank test "
                "raises. Clip at 0 (np.maximum(x, 0)) and then drop the zeros.",
                count=h["neg"].n)
    is_counts = scan.n_decimals == 0
    st["is_counts"] = is_counts
    if not is_counts and h["big"].n:
        rep.add("not_log1p_range", f"X has non-integer values (so cell-eval reads it as "
                f"log1p) reaching {scan.vmax:.4g} >= {LOG1P_MAX:g}: {w('big')}. cell-eval's "
                "guess_is_lognorm raises. Pass integer counts or log1p(normalised counts), "
                "not normalised-but-unlogged values.", count=h["big"].n)
    if is_counts and scan.n_stored and (scan.vmax or 0) > 0:
        rep.add("integer_counts", "every value of X is an integer (within 1e-3): cell-eval "
                "treats X as raw counts and log-normalises each cell to the file's median "
                "total. Right for predicted counts; wrong if X is already log1p.")
    if h["zero"].n:
        rep.add("explicit_zeros", f"X stores explicit zeros: {w('zero')}. cell-eval's DE step "
                "(numba-mwu) raises 'X must not contain explicit zero entries'; cell-eval prep "
                "keeps them. Fix: X.eliminate_zeros() (write_submission does it; no metric "
                "changes).", count=h["zero"].n)
    if h["underflow"].n:
        rep.add("underflow_zeros", f"float64 values too small for float32: "
                f"{w('underflow')}. cell-eval prep's float32 cast stores them as explicit "
                "zeros, which crash its DE step. Cast to float32 yourself and then "
                "X.eliminate_zeros() (write_submission does both).",
                count=h["underflow"].n)
    if scan.n_dup:
        rep.add("duplicate_entries", f"sparse X has {scan.n_dup:,} duplicate (cell, gene) "
                "entries; cell-eval's rank test does not sum them and miscounts. Fix: "
                "X.sum_duplicates().", count=scan.n_dup)
    if scan.n_unsorted_major:
        unit = "rows" if scan.format == "csr" else "columns"
        rep.add("unsorted_indices", f"{scan.n_unsorted_major:,} {unit} of sparse X have "
                "unsorted indices; cell-eval accepts this but sorted is the canonical form. "
                "Fix: X.sort_indices().", count=scan.n_unsorted_major)
    if scan.format == "dense":
        rep.add("matrix_format", "X is dense; cell-eval prep converts it to CSR. Storing CSR "
                "(write_submission does) makes the file far smaller.")
    elif scan.format == "csc":
        rep.add("matrix_format", "X is CSC; prep keeps it and cell-eval handles it, but CSR "
                "is the expected layout (and far faster to read by cell).")


def validate_submission(pred, *, gene_list: str | os.PathLike | Sequence[str] | None = None,
                        expected_counts: str | os.PathLike | pd.DataFrame | None = None,
                        real=None, pert_col: str = PERT_KEY,
                        control_label: str = CONTROL_LABEL,
                        max_cells: int | None = MAX_CELLS,
                        expected_genes: int | None = EXPECTED_GENES,
                        chunk_values: int = CHUNK_VALUES) -> SubmissionReport:
    """Check a prediction (.h5ad path or AnnData) the way cell-eval prep and run would use it.

    ``gene_list``: the challenge's gene names (sequence, or headerless one-per-line file).
    ``expected_counts``: CSV path or DataFrame with ``target_gene`` and ``n_cells`` (control
    rows ignored): the perturbations and cells per perturbation to predict. ``real``: the real
    file (path or AnnData; only obs and var are read), whose perturbation labels (control
    included) and genes must match as cell-eval run requires, and whose cells per perturbation
    (controls excluded) the prediction must have. ``max_cells`` /
    ``expected_genes``: prep's limits (None disables). X is read ``chunk_values`` stored
    values at a time. Returns a ``SubmissionReport``; raises ``SubmissionError`` only when an
    input cannot be read.
    """
    genes_ref = read_gene_list(gene_list) if gene_list is not None else None
    expected = (read_expected_counts(expected_counts, pert_col, control_label)
                if expected_counts is not None else None)
    real_labels = real_genes = None
    if real is not None:
        real_labels, real_genes = _read_labels_and_genes(real, pert_col)

    obs, var_names, src, path, f = _open_anndata(pred, "prediction")
    try:
        rep = SubmissionReport(path)
        n_cells, n_genes = src.shape
        rep.stats.update(n_cells=int(n_cells), n_genes=int(n_genes))
        labels, counts = _check_labels(rep, obs, pert_col, control_label, max_cells, n_cells)
        _check_genes(rep, pd.Index(var_names), genes_ref, real_genes, expected_genes)
        if labels is not None and expected is not None:
            _check_counts(rep, counts, expected)
        if labels is not None and real is not None:
            _check_real_perts(rep, labels, real_labels, control_label)
            _check_real_counts(rep, counts, real_labels, control_label)
        scan = _scan_matrix(src, chunk_values)
        _check_values(rep, scan, np.asarray(obs.index), np.asarray(var_names), labels)
    finally:
        if f is not None:
            f.close()
    return rep
