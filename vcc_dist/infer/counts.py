"""Cells per perturbation: cell-eval's counts table (``target_gene,n_cells``), read once for
both the baselines (how many cells to predict) and the submission validator (how many cells a
prediction must have)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vcc_dist.constants import CONTROL_LABEL, PERT_KEY

COUNTS_COL = "n_cells"


def parse_pert_counts(source, *, pert_cols: Sequence[str] = (PERT_KEY,),
                      counts_col: str = COUNTS_COL, control_label: str = CONTROL_LABEL,
                      error: type[Exception] = ValueError) -> dict[str, int]:
    """Perturbation -> number of cells, in the table's order, control rows and perturbations
    with 0 cells dropped.

    ``source``: a dict, a DataFrame (pandas or polars) or a CSV path with a perturbation column
    (the first of ``pert_cols`` present) and ``counts_col``; other columns are ignored. A CSV
    is read as text without NA parsing, so gene symbols such as "NA" stay labels. Problems
    raise ``error`` with a message naming the table and the fix.
    """
    where = "counts"
    if isinstance(source, Mapping):
        df = pd.DataFrame({pert_cols[0]: [str(k) for k in source.keys()],
                           counts_col: list(source.values())})
    elif isinstance(source, pd.DataFrame):
        df = source
    elif hasattr(source, "to_pandas"):  # polars
        df = source.to_pandas()
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        where = f"counts file {p}"
        if not p.is_file():
            raise error(f"{where} does not exist")
        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        except Exception as e:
            raise error(f"{where}: cannot read it as CSV ({e})") from e
    else:
        raise error(f"counts: expected a dict, a DataFrame or a CSV path, got "
                    f"{type(source).__name__}")
    pert_col = next((c for c in pert_cols if c in df.columns), pert_cols[0])
    missing = [c for c in (pert_col, counts_col) if c not in df.columns]
    if missing:
        raise error(
            f"{where} has columns {list(df.columns)} but lacks {missing}; expected columns "
            f"{pert_col!r} (perturbation) and {counts_col!r} (number of cells), as in "
            "cell-eval's counts CSV")
    perts = df[pert_col]
    empty = perts.isna() | (perts.astype(str) == "")
    if empty.any():
        raise error(f"{where}: {int(empty.sum())} rows have no {pert_col!r}")
    perts = perts.astype(str).to_numpy()
    n = pd.to_numeric(df[counts_col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(n) | (n < 0) | (np.modf(np.nan_to_num(n))[0] != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        kind = " (not numeric)" if np.isnan(n[i]) else ""
        raise error(
            f"{where}: {counts_col!r} must hold non-negative integers; row {i} ({perts[i]!r}) "
            f"has {df[counts_col].iloc[i]!r}{kind}")
    dup = pd.Index(perts)[pd.Index(perts).duplicated()].unique()
    if len(dup):
        raise error(f"{where}: perturbations listed more than once: {list(dup[:10])}")
    return {p: int(k) for p, k in zip(perts, n) if p != control_label and k > 0}
