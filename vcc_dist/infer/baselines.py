"""Baseline predictors for the Virtual Cell Challenge, all behind one interface.

Every baseline is fitted on a training AnnData (raw integer counts or log1p values) and predicts
a file in cell-eval's input format for a list of perturbations with their cell counts::

    model = make_baseline("context-mean").fit(train)
    pred = model.predict(read_pert_counts("pert_counts.csv"), context="jurkat")
    pred.write_h5ad("pred.h5ad")          # or jobs/baseline.py, which writes atomically

Common contract
---------------
* Normalisation: each training file (and an explicit ``controls`` file) is turned into what
  cell-eval sees with :func:`vcc_dist.metrics.normalize.prepare_expression`: integer counts are
  median-total normalised per file and log1p-transformed (bit-identical to cell-eval), log1p
  input is kept. Several training files are normalised one by one, then pooled.
* Output: log1p space, ``X`` float32 CSR with no explicit zeros and no negative values; obs
  ``target_gene`` (string categorical; the perturbation column name given to ``fit``); the rows
  of each perturbation in ``counts`` order, named ``p.0, p.1, ...`` as cell-eval's baseline
  names them, then the control cells (labelled with the control label, original obs names);
  var = the training var. That is a complete challenge submission.
* ``counts``: perturbation -> number of cells, a dict, a DataFrame or a CSV path with columns
  ``target_gene,n_cells`` (cell-eval's counts CSV; :func:`read_pert_counts`), control rows
  dropped as cell-eval does. :func:`pert_counts_from` takes them from a real file's obs.
* ``context``: the target cell context (obs ``cell_type``). ``controls``: an AnnData (or h5ad
  path) with control cells of that context; default: the training file's control cells of the
  context (all training control cells when ``context`` is None, cell-mean only).
* Pseudobulks: float64 means of the normalised log1p expression per (context, perturbation)
  group; a perturbation's *delta* in a context is its pseudobulk minus the pseudobulk of that
  context's control cells (controls of the same file normalisation, so file effects cancel).

Baselines
---------
``CellMeanBaseline`` ("cell-mean")
    Exactly ``cell-eval baseline`` 0.8.2 (docs/cell_eval_0.8.2_semantics.md §7): the unweighted
    mean of all group means of the normalised training file *including the control group*
    (float32 group means, then a float32 mean over groups, like polars + numpy there; cell-eval's
    polars group order is random, so its vector varies by ~1 ulp and so can ours against it),
    ``n_cells`` identical rows per perturbation, then the training control cells in file order.
    It ignores contexts; ``context`` only selects which control cells are appended.

``ContextMeanBaseline`` ("context-mean", the "context-mean shift")
    A cell of perturbation ``p`` in target context ``c`` is a control cell of ``c`` (drawn with
    replacement, seeded) plus ``p``'s effect, clipped at 0. The effect is the unweighted mean of
    ``p``'s deltas over the training contexts where ``p`` was seen, excluding ``c`` (a context
    is one vote whatever its cell count: contexts, not cells, are the unit of transfer). Options:
    ``use_target_context=True`` counts ``c`` as one more context; ``fewshot_weight=w`` blends
    ``w * delta_c + (1 - w) * transfer`` where ``p`` was seen in ``c``. A perturbation seen in no
    usable context gets the mean effect over all perturbations (the "average perturbation").

``RidgeDeltaBaseline`` ("ridge")
    Learns the target context's specificity from its few-shot perturbations (those seen in
    ``c`` in training). Features per perturbation: by default its transfer delta (mean over the
    other contexts), projected on the top ``n_components`` principal components fitted on the
    transfer deltas of all training perturbations; or given per-gene feature vectors (a dict
    gene -> vector or STATE's ``pert_features.pt``); or ST's features, ``features=("transfer",
    "onehot")`` (any list of "transfer", "onehot" and .pt paths): the target context's row of
    the table ST's demo recipe trains on, built by the same function
    (:func:`vcc_dist.data.pseudobulk.build_features`) from the training data, so a report
    compares ridge and ST on the same inputs (a .pt path in such a list must cover every
    training perturbation, as for ST). Features are standardised with the mean and sd over the
    training perturbations. Targets: by default (``residual=True``) the few-shot
    deltas *minus* the context-mean effect, so the model predicts a correction to the
    context-mean shift and large ``alpha`` falls back to context-mean plus the average
    correction; ``residual=False`` regresses the deltas themselves. Ridge with an unpenalised
    intercept, closed form in numpy (:func:`ridge_fit`; scikit-learn is deliberately not a
    dependency of the package). A perturbation without features (no transfer delta, or no
    vector) gets the mean feature vector (zeros after standardisation). Cells are then drawn
    as in context-mean. With fewer than 2 usable few-shot perturbations it warns and falls back
    to context-mean.

``read_split`` / ``exclude_heldout`` drop the held-out cells named in a STATE/cell-load
``split.toml`` (the simulator's files contain every perturbation in every context) so that a
baseline never trains on what it is scored on. The split is read and applied by the same code
as the corpus path's (:class:`vcc_dist.data.splits.SplitSpec`: strict, clear errors), and the
context-mean prior, its predicted cells and the ``("transfer", "onehot")`` features come from
:mod:`vcc_dist.data.pseudobulk`, the code ST uses on a corpus.
"""

from __future__ import annotations

import abc
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from vcc_dist.constants import CONTEXT_KEY, CONTROL_LABEL, PERT_KEY
from vcc_dist.data.gene_tables import read_gene_table
from vcc_dist.data.pseudobulk import (
    FEATURE_KINDS,
    FeatureError,
    GroupMeans,
    build_features,
    context_mean_cells,
)
from vcc_dist.data.splits import TRAIN, SplitSpec
from vcc_dist.infer.counts import COUNTS_COL, parse_pert_counts
from vcc_dist.metrics.normalize import ExpressionError, prepare_expression

__all__ = [
    "BASELINES",
    "COUNTS_COL",
    "Baseline",
    "BaselineError",
    "CellMeanBaseline",
    "ContextMeanBaseline",
    "RidgeDeltaBaseline",
    "exclude_heldout",
    "load_pert_features",
    "make_baseline",
    "pert_counts_from",
    "read_adata",
    "read_pert_counts",
    "ridge_fit",
]

log = logging.getLogger(__name__)

#: cell-eval's counts column (``--counts-col``)

PathLike = str | os.PathLike
CountsLike = Mapping[str, int] | pd.DataFrame | PathLike
AnnDataLike = ad.AnnData | PathLike

# rows of the training matrix summed per step (bounded float64 temporaries, progress steps)
_CHUNK_ROWS = 8192


class BaselineError(ValueError):
    """Bad input to a baseline; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def read_adata(x: AnnDataLike, what: str = "input") -> ad.AnnData:
    """An AnnData as is, or an .h5ad path read into memory (``BaselineError`` if unreadable)."""
    if isinstance(x, ad.AnnData):
        return x
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise BaselineError(f"{what}: {p} does not exist")
        try:
            return ad.read_h5ad(p)
        except Exception as e:  # h5py/anndata raise many types for a damaged file
            raise BaselineError(f"{what}: cannot read {p} as h5ad ({type(e).__name__}: {e})") from e
    raise BaselineError(f"{what}: expected an AnnData or an .h5ad path, got {type(x).__name__}")


def _labels(adata: ad.AnnData, col: str, what: str) -> np.ndarray:
    if col not in adata.obs.columns:
        raise BaselineError(
            f"{what}: obs has no column {col!r} (columns: {list(adata.obs.columns)}); "
            f"pass the right column name (pert_col / context_key, --pert-col / --context-key)")
    s = adata.obs[col]
    if s.isna().any():
        raise BaselineError(f"{what}: obs[{col!r}] has {int(s.isna().sum())} missing values")
    return s.astype(str).to_numpy()


def read_pert_counts(source: CountsLike, *, pert_col: str = PERT_KEY, counts_col: str = COUNTS_COL,
                     control_label: str = CONTROL_LABEL) -> dict[str, int]:
    """Perturbation -> number of cells, in the table's order, control rows dropped.

    ``source``: a dict, a DataFrame (pandas or polars) or a CSV path with columns ``pert_col``
    and ``counts_col`` (cell-eval's counts CSV: ``target_gene,n_cells``; other columns are
    ignored). Counts must be non-negative integers; perturbations with 0 cells are dropped.
    """
    out = parse_pert_counts(source, pert_cols=(pert_col,), counts_col=counts_col,
                            control_label=control_label, error=BaselineError)
    if not out:
        where = f"counts file {source}" if isinstance(source, (str, os.PathLike)) else "counts"
        raise BaselineError(f"{where}: no perturbation with cells to predict (control rows are dropped)")
    return out


def pert_counts_from(adata: AnnDataLike, *, pert_col: str = PERT_KEY, control_label: str = CONTROL_LABEL,
                     context: str | None = None, context_key: str = CONTEXT_KEY) -> dict[str, int]:
    """Cells per perturbation in a (real) file's obs, controls excluded, sorted by name;
    restricted to one context when ``context`` is given."""
    adata = read_adata(adata, "counts source")
    perts = _labels(adata, pert_col, "counts source")
    if context is not None:
        ctx = _labels(adata, context_key, "counts source")
        if not (ctx == context).any():
            raise BaselineError(f"counts source has no cells of context {context!r} "
                                f"(contexts: {sorted(set(ctx))})")
        perts = perts[ctx == context]
    vals, n = np.unique(perts[perts != control_label], return_counts=True)
    if not len(vals):
        raise BaselineError("counts source has no perturbed cells")
    return {str(p): int(k) for p, k in zip(vals, n)}


def load_pert_features(source: Mapping[str, Any] | PathLike) -> dict[str, np.ndarray]:
    """Per-gene feature vectors as ``{gene: float64 vector}``, all of one length.

    ``source``: a dict gene -> vector (array, list or tensor) or a STATE-style ``.pt`` file
    (``torch.save`` of a dict gene -> 1-D tensor), read by the one reader of that format,
    :func:`vcc_dist.data.gene_tables.read_gene_table`.
    """
    what = "pert features"
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        what = f"pert features {p}"
        try:
            source = read_gene_table(p)
        except FileNotFoundError:
            raise BaselineError(f"{what} does not exist") from None
        except ValueError as e:
            raise BaselineError(f"pert features: {e}") from e
    if not isinstance(source, Mapping) or not source:
        raise BaselineError(f"{what}: expected a non-empty dict gene -> vector, got {type(source).__name__}")
    out: dict[str, np.ndarray] = {}
    dim = None
    for g, v in source.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        a = np.asarray(v, dtype=np.float64).reshape(-1)
        if dim is None:
            dim = a.size
        if a.size != dim or a.size == 0 or not np.isfinite(a).all():
            raise BaselineError(f"{what}: vector of {g!r} has length {a.size} (expected {dim}) "
                                "or non-finite values")
        out[str(g)] = a
    return out


def read_split(path: PathLike) -> SplitSpec:
    """A STATE/cell-load ``split.toml`` read by the one split reader,
    :meth:`vcc_dist.data.splits.SplitSpec.from_toml` (its ``SplitError``, a ``ValueError``,
    names the problem and the fix)."""
    return SplitSpec.from_toml(path)


def exclude_heldout(adata: ad.AnnData, split: SplitSpec, *,
                    context_key: str = CONTEXT_KEY, pert_col: str = PERT_KEY,
                    control_label: str = CONTROL_LABEL) -> ad.AnnData:
    """``adata`` without the cells ``split`` holds out for val or test (role other than
    "train", :meth:`SplitSpec.cell_roles`: few-shot val/test perturbations, zero-shot
    contexts' perturbed cells; control cells are kept); returns ``adata`` itself when nothing
    is dropped, else a copy."""
    if not split.zeroshot and not split.fewshot:
        return adata
    ctx = _labels(adata, context_key, "training data")
    pert = _labels(adata, pert_col, "training data")
    drop = split.cell_roles(ctx, pert, control_label) != TRAIN
    if not drop.any():
        return adata
    log.info("excluding %d held-out cells from training", int(drop.sum()))
    return adata[~drop].copy()


# --------------------------------------------------------------------------------------------
# Training statistics shared by all baselines
# --------------------------------------------------------------------------------------------


def _group_sums(x, codes: np.ndarray, n_groups: int, progress: bool, desc: str) -> np.ndarray:
    """float64 (n_groups, G) sums of the rows of ``x`` per group code."""
    n, g = x.shape
    out = np.zeros((n_groups, g), np.float64)
    starts = range(0, n, _CHUNK_ROWS)
    for s in tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2):
        e = min(n, s + _CHUNK_ROWS)
        ind = sp.csr_matrix((np.ones(e - s), (codes[s:e], np.arange(e - s))), shape=(n_groups, e - s))
        blk = x[s:e].astype(np.float64)
        prod = ind @ blk
        out += prod.toarray() if sp.issparse(prod) else prod
    return out


@dataclass
class _TrainStats:
    var: pd.DataFrame
    pert_col: str
    context_key: str
    control_label: str
    has_context: bool
    x_dtype: np.dtype  # dtype of the normalised training matrix (cell-eval's arithmetic dtype)
    contexts: list[str]  # sorted; [""] without a context column
    group_ctx: np.ndarray  # (K,) str
    group_pert: np.ndarray  # (K,) str
    group_n: np.ndarray  # (K,) int64
    group_sum: np.ndarray  # (K, G) float64
    ctrl_x: sp.csr_matrix  # normalised control cells, float32
    ctrl_ctx: np.ndarray  # (n_ctrl,) str
    ctrl_names: np.ndarray  # (n_ctrl,) obs names

    @property
    def n_genes(self) -> int:
        return self.var.shape[0]

    def group_index(self) -> dict[tuple[str, str], int]:
        return {(c, p): k for k, (c, p) in enumerate(zip(self.group_ctx, self.group_pert))}


def _fit_stats(train, *, context_key: str, pert_col: str, control_label: str,
               need_context: bool, progress: bool) -> _TrainStats:
    files = list(train) if isinstance(train, Sequence) and not isinstance(train, (str, bytes)) else [train]
    if not files:
        raise BaselineError("no training data given")
    var = None
    has_context = None
    dtypes = set()
    sums: dict[tuple[str, str], np.ndarray] = {}
    ns: dict[tuple[str, str], int] = {}
    ctrl_parts, ctrl_ctx, ctrl_names = [], [], []
    for i, f in enumerate(files):
        what = "training data" if len(files) == 1 else f"training file {i + 1}"
        if isinstance(f, (str, os.PathLike)):
            what = f"training file {Path(f).name}"
        a = read_adata(f, what)
        if a.n_obs == 0:
            raise BaselineError(f"{what} has no cells")
        pert = _labels(a, pert_col, what)
        file_has_ctx = context_key in a.obs.columns
        if need_context and not file_has_ctx:
            _labels(a, context_key, what)  # raises with the column list
        if has_context is None:
            has_context = file_has_ctx
        elif has_context != file_has_ctx:
            raise BaselineError(f"{what}: some training files have obs[{context_key!r}] and some do not")
        ctx = _labels(a, context_key, what) if has_context else np.full(a.n_obs, "", dtype=object).astype(str)
        if var is None:
            var = a.var.copy()
        elif not a.var_names.equals(var.index):
            if set(a.var_names) != set(var.index) or not a.var_names.is_unique:
                raise BaselineError(f"{what}: its genes differ from the first training file's")
            a = a[:, var.index]
        if control_label not in set(pert):
            log.warning("%s has no %r control cells", what, control_label)
        try:
            x, _ = prepare_expression(a.X, what)
        except ExpressionError as e:
            raise BaselineError(str(e)) from e
        dtypes.add(x.dtype)
        keys = pd.MultiIndex.from_arrays([ctx, pert])
        codes, uniq = pd.factorize(keys)
        s = _group_sums(x, codes, len(uniq), progress, f"pseudobulks {what}")
        cnt = np.bincount(codes, minlength=len(uniq))
        for k, key in enumerate(uniq):
            key = (str(key[0]), str(key[1]))
            if key in sums:
                sums[key] += s[k]
                ns[key] += int(cnt[k])
            else:
                sums[key] = s[k]
                ns[key] = int(cnt[k])
        is_ctrl = pert == control_label
        if is_ctrl.any():
            cx = x[np.flatnonzero(is_ctrl)]
            cx = sp.csr_matrix(cx, dtype=np.float32) if sp.issparse(cx) else sp.csr_matrix(cx.astype(np.float32))
            cx.eliminate_zeros()
            ctrl_parts.append(cx)
            ctrl_ctx.append(ctx[is_ctrl])
            ctrl_names.append(a.obs_names.to_numpy()[is_ctrl].astype(str))
    keys = sorted(sums)
    g = var.shape[0]
    ctrl_x = sp.vstack(ctrl_parts, format="csr") if ctrl_parts else sp.csr_matrix((0, g), dtype=np.float32)
    names = np.concatenate(ctrl_names) if ctrl_names else np.array([], dtype=str)
    return _TrainStats(
        var=var,
        pert_col=pert_col,
        context_key=context_key,
        control_label=control_label,
        has_context=bool(has_context),
        x_dtype=np.result_type(*dtypes),
        contexts=sorted({c for c, _ in keys}),
        group_ctx=np.array([c for c, _ in keys], dtype=str),
        group_pert=np.array([p for _, p in keys], dtype=str),
        group_n=np.array([ns[k] for k in keys], np.int64),
        group_sum=np.stack([sums[k] for k in keys]) if keys else np.zeros((0, g)),
        ctrl_x=ctrl_x,
        ctrl_ctx=np.concatenate(ctrl_ctx) if ctrl_ctx else np.array([], dtype=str),
        ctrl_names=names,
    )


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------


class Baseline(abc.ABC):
    """Fit on training data, then predict a cell-eval-ready AnnData for given cell counts."""

    #: name used by ``make_baseline`` and ``jobs/baseline.py --kind``
    name: str = ""
    #: whether ``predict`` needs ``context``
    needs_context: bool = False

    def __init__(self, *, progress: bool = False):
        self.progress = progress
        self._stats: _TrainStats | None = None

    # -- fit ----------------------------------------------------------------------------------

    def fit(self, train: AnnDataLike | Sequence[AnnDataLike], *, context_key: str = CONTEXT_KEY,
            pert_col: str = PERT_KEY, control_label: str = CONTROL_LABEL) -> Baseline:
        """Fit on a training AnnData (or h5ad path, or a list of them: each normalised on its
        own, then pooled). X: raw integer counts or log1p values."""
        self._stats = _fit_stats(train, context_key=context_key, pert_col=pert_col,
                                 control_label=control_label, need_context=self.needs_context,
                                 progress=self.progress)
        self._fit_model(self._stats)
        return self

    def _fit_model(self, st: _TrainStats) -> None:
        """Per-baseline state computed once from the training statistics."""

    @property
    def contexts(self) -> list[str]:
        """Training contexts (empty when the training data had no context column)."""
        st = self._fitted()
        return list(st.contexts) if st.has_context else []

    @property
    def var(self) -> pd.DataFrame:
        return self._fitted().var

    def _fitted(self) -> _TrainStats:
        if self._stats is None:
            raise BaselineError(f"{type(self).__name__} is not fitted; call fit(train) first")
        return self._stats

    # -- predict ------------------------------------------------------------------------------

    def predict(self, counts: CountsLike, *, context: str | None = None,
                controls: AnnDataLike | None = None, seed: int = 0) -> ad.AnnData:
        """Predicted cells for ``counts`` (perturbation -> cells) in ``context``, with the
        control cells appended. See the module docstring for the output format."""
        st = self._fitted()
        counts = read_pert_counts(counts, pert_col=st.pert_col, control_label=st.control_label)
        self.check_context(context, have_controls=controls is not None)
        ctrl_x, ctrl_names = self._target_controls(context, controls)
        rng = np.random.default_rng(seed)
        blocks = self._perturbed_rows(counts, context, ctrl_x, rng)
        return self._assemble(counts, blocks, ctrl_x, ctrl_names)

    def check_context(self, context: str | None, *, have_controls: bool = False) -> None:
        """Raise ``BaselineError`` unless ``predict`` can work for ``context`` (a training
        context, or any name when control cells are passed; None where the baseline allows)."""
        st = self._fitted()
        if context is None:
            if self.needs_context:
                known = f"training contexts: {st.contexts}" if st.has_context else \
                    f"the training data has no obs[{st.context_key!r}]"
                raise BaselineError(f"the {self.name} baseline needs the target context "
                                    f"(context=..., --context); {known}")
            return
        if not st.has_context:
            raise BaselineError(f"context {context!r} given but the training data has no "
                                f"obs[{st.context_key!r}] column")
        if context not in st.contexts and not have_controls:
            raise BaselineError(f"unknown context {context!r}; training contexts: {st.contexts} "
                                "(or pass control cells of the new context with controls=...)")

    def _target_controls(self, context: str | None, controls: AnnDataLike | None
                         ) -> tuple[sp.csr_matrix, np.ndarray]:
        st = self._fitted()
        if controls is None:
            sel = np.arange(st.ctrl_x.shape[0]) if context is None else np.flatnonzero(st.ctrl_ctx == context)
            if not sel.size:
                where = "the training data" if context is None else f"context {context!r} of the training data"
                raise BaselineError(f"{where} has no {st.control_label!r} control cells; pass "
                                    "controls=... (--controls)")
            return st.ctrl_x[sel], st.ctrl_names[sel]
        a = read_adata(controls, "controls")
        if not a.var_names.equals(st.var.index):
            missing = st.var.index.difference(a.var_names)
            if len(missing) or not a.var_names.is_unique:
                raise BaselineError(f"controls lack {len(missing)} training genes "
                                    f"(e.g. {list(missing[:5])}) or have duplicate gene names")
            a = a[:, st.var.index]
        keep = np.ones(a.n_obs, bool)
        if st.pert_col in a.obs.columns:
            keep &= _labels(a, st.pert_col, "controls") == st.control_label
        if context is not None and st.context_key in a.obs.columns:
            keep &= _labels(a, st.context_key, "controls") == context
        if not keep.any():
            raise BaselineError(f"controls has no {st.control_label!r} cells"
                                + (f" of context {context!r}" if context is not None else ""))
        try:
            x, _ = prepare_expression(a.X, "controls")
        except ExpressionError as e:
            raise BaselineError(str(e)) from e
        x = sp.csr_matrix(x[np.flatnonzero(keep)], dtype=np.float32)
        x.eliminate_zeros()
        return x, a.obs_names.to_numpy()[keep].astype(str)

    @abc.abstractmethod
    def _perturbed_rows(self, counts: dict[str, int], context: str | None, ctrl_x: sp.csr_matrix,
                        rng: np.random.Generator) -> list[sp.csr_matrix]:
        """One float32 CSR block of ``counts[p]`` rows per perturbation, in ``counts`` order."""

    def _assemble(self, counts: dict[str, int], blocks: list[sp.csr_matrix], ctrl_x: sp.csr_matrix,
                  ctrl_names: np.ndarray) -> ad.AnnData:
        st = self._fitted()
        x = sp.vstack([*blocks, ctrl_x], format="csr").astype(np.float32, copy=False)
        x.sum_duplicates()
        np.maximum(x.data, 0, out=x.data)
        x.eliminate_zeros()
        n_pert = sum(counts.values())
        labels = np.concatenate([np.repeat(np.array(list(counts), dtype=object), list(counts.values())),
                                 np.full(ctrl_x.shape[0], st.control_label, dtype=object)])
        names = pd.Index(np.concatenate([np.array([f"p.{i}" for i in range(n_pert)], dtype=object),
                                         ctrl_names.astype(object)]))
        if not names.is_unique:
            names = pd.Index(ad.utils.make_index_unique(names))
        cats = [*counts, st.control_label]
        obs = pd.DataFrame({st.pert_col: pd.Categorical(labels.astype(str), categories=cats)}, index=names)
        return ad.AnnData(X=x, obs=obs, var=st.var.copy())


def _repeat_row(vec: np.ndarray, n: int) -> sp.csr_matrix:
    """``n`` CSR rows equal to ``vec`` (zeros not stored)."""
    vec = np.asarray(vec, np.float32)
    nz = np.flatnonzero(vec)
    idx = np.int32 if max(n * nz.size, vec.size) < 2**31 else np.int64
    return sp.csr_matrix((np.tile(vec[nz], n), np.tile(nz.astype(idx), n),
                          np.arange(n + 1, dtype=idx) * idx(nz.size)), shape=(n, vec.size))


def group_means_of(st: _TrainStats) -> tuple[GroupMeans, list[str]]:
    """The training pseudobulks as the corpus path's :class:`GroupMeans` (``[C, P, G]`` over
    ``st.contexts`` and the perturbations, control first then sorted, as a corpus orders its
    labels), and that perturbation list."""
    perts = [st.control_label, *sorted(set(st.group_pert) - {st.control_label})]
    ci = {c: i for i, c in enumerate(st.contexts)}
    pi = {p: i for i, p in enumerate(perts)}
    means = np.full((len(st.contexts), len(perts), st.n_genes), np.nan)
    n_cells = np.zeros((len(st.contexts), len(perts)), np.int64)
    for k, (c, p) in enumerate(zip(st.group_ctx, st.group_pert)):
        means[ci[c], pi[p]] = st.group_sum[k] / st.group_n[k]
        n_cells[ci[c], pi[p]] = st.group_n[k]
    return GroupMeans(means, n_cells, 0), perts


# --------------------------------------------------------------------------------------------
# cell-mean (cell-eval baseline)
# --------------------------------------------------------------------------------------------


class CellMeanBaseline(Baseline):
    """cell-eval 0.8.2's ``baseline``: every perturbed cell is the unweighted mean of all
    group means (control group included) of the normalised training data."""

    name = "cell-mean"

    def _fit_model(self, st: _TrainStats) -> None:
        perts, inv = np.unique(st.group_pert, return_inverse=True)
        sums = np.zeros((len(perts), st.n_genes))
        np.add.at(sums, inv, st.group_sum)
        n = np.bincount(inv, weights=st.group_n, minlength=len(perts))
        # polars: float32(mean in float64) per group. cell-eval's ``to_numpy()`` of the polars
        # frame is Fortran-ordered, so numpy's mean over groups runs along contiguous memory
        # (pairwise/unrolled summation, not row by row): same memory order, same rounding.
        means = np.asfortranarray((sums / n[:, None]).astype(st.x_dtype))
        self.vector_ = means.mean(axis=0).astype(np.float32)

    def _perturbed_rows(self, counts, context, ctrl_x, rng):
        return [_repeat_row(self.vector_, n) for n in counts.values()]


# --------------------------------------------------------------------------------------------
# context-mean shift
# --------------------------------------------------------------------------------------------


class _ShiftBaseline(Baseline):
    """Shared by the baselines that add a per-perturbation effect to the target's controls."""

    needs_context = True

    def _fit_model(self, st: _TrainStats) -> None:
        idx = st.group_index()
        means = st.group_sum / st.group_n[:, None]
        self._delta: dict[str, dict[str, np.ndarray]] = {}
        for c in st.contexts:
            k0 = idx.get((c, st.control_label))
            if k0 is None:
                log.warning("context %r has no control cells in training; its perturbations are "
                            "not used for effects", c)
                continue
            self._delta[c] = {p: means[k] - means[k0] for k, (cc, p) in
                              enumerate(zip(st.group_ctx, st.group_pert))
                              if cc == c and p != st.control_label}
        # the same pseudobulk cube as the corpus path: the context-mean prior and the
        # ("transfer", "onehot") features come from vcc_dist.data.pseudobulk
        self._means, self._perts = group_means_of(st)
        self._ctx_index = {c: i for i, c in enumerate(st.contexts)}
        self._cache: dict[Any, Any] = {}

    def deltas(self, context: str) -> dict[str, np.ndarray]:
        """Observed training deltas (pseudobulk minus controls, float64) in ``context``."""
        self._fitted()
        return dict(self._delta.get(context, {}))

    @property
    def pseudobulks(self) -> tuple[GroupMeans, list[str]]:
        """The training pseudobulks as the corpus path's :class:`GroupMeans` over
        :attr:`contexts` and these perturbations (control first, then sorted)."""
        self._fitted()
        return self._means, list(self._perts)

    def _transfer(self, context: str, include_target: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Per perturbation the mean delta over the contexts used for transfer, and the mean of
        those over perturbations (None if there are none)."""
        key = ("transfer", context, include_target)
        if key not in self._cache:
            # a context outside training, or counting the target itself: every context votes
            target = None if include_target else self._ctx_index.get(context)
            cm = self._means.context_mean(target)
            tr = {p: cm.effect[i] for i, p in enumerate(self._perts)
                  if cm.seen[i] and i != self._means.control_index}
            self._cache[key] = (tr, cm.average)
        return self._cache[key]

    @abc.abstractmethod
    def effects(self, perts: Sequence[str], context: str) -> np.ndarray:
        """(len(perts), G) float64 predicted deltas in ``context``."""

    def _perturbed_rows(self, counts, context, ctrl_x, rng):
        eff = self.effects(list(counts), context)
        cells = context_mean_cells(ctrl_x, eff, list(counts.values()), rng)
        return [sp.csr_matrix(b) for b in tqdm(cells, total=len(counts), desc="predict",
                                               unit="pert", disable=not self.progress)]


class ContextMeanBaseline(_ShiftBaseline):
    """Target-context controls plus the perturbation's mean effect in the other contexts."""

    name = "context-mean"

    def __init__(self, *, use_target_context: bool = False, fewshot_weight: float | None = None,
                 progress: bool = False):
        super().__init__(progress=progress)
        if fewshot_weight is not None and not 0.0 <= fewshot_weight <= 1.0:
            raise BaselineError(f"fewshot_weight must be in [0, 1], got {fewshot_weight}")
        self.use_target_context = use_target_context
        self.fewshot_weight = fewshot_weight

    def effects(self, perts: Sequence[str], context: str) -> np.ndarray:
        st = self._fitted()
        include = self.use_target_context and self.fewshot_weight is None
        tr, glob = self._transfer(context, include)
        own = self._delta.get(context, {})
        out = np.zeros((len(perts), st.n_genes))
        n_glob = 0
        for i, p in enumerate(perts):
            t = tr.get(p)
            if self.fewshot_weight is not None and p in own:
                w = self.fewshot_weight
                out[i] = own[p] if t is None else w * own[p] + (1 - w) * t
            elif t is not None:
                out[i] = t
            else:
                n_glob += 1
                if glob is not None:
                    out[i] = glob
        if n_glob:
            if glob is None:
                warnings.warn(f"{self.name}: no perturbation effects outside context {context!r}; "
                              f"{n_glob} perturbation(s) are predicted as unperturbed controls",
                              stacklevel=3)
            else:
                log.info("%d perturbation(s) never seen outside %r get the mean effect", n_glob, context)
        return out


# --------------------------------------------------------------------------------------------
# ridge on pseudobulk deltas
# --------------------------------------------------------------------------------------------


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression ``y ~ x @ W + b`` with an unpenalised intercept, closed form.

    ``x`` (n, d), ``y`` (n, t); returns ``W`` (d, t) and ``b`` (t,). Solves the primal
    ``(Xc'Xc + alpha I) W = Xc'Yc`` when d <= n, else the dual ``W = Xc' (Xc Xc' + alpha I)^-1 Yc``
    (same solution, cheaper for wide features). (numpy rather than scikit-learn, which is not a
    dependency of the package.)
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise BaselineError(f"ridge_fit: bad shapes x {x.shape}, y {y.shape}")
    if alpha < 0:
        raise BaselineError(f"ridge alpha must be >= 0, got {alpha}")
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    n, d = x.shape
    if d <= n:
        a = xc.T @ xc + alpha * np.eye(d)
        w = np.linalg.lstsq(a, xc.T @ yc, rcond=None)[0] if alpha == 0 else np.linalg.solve(a, xc.T @ yc)
    else:
        k = xc @ xc.T + alpha * np.eye(n)
        w = xc.T @ (np.linalg.lstsq(k, yc, rcond=None)[0] if alpha == 0 else np.linalg.solve(k, yc))
    return w, ym - xm @ w


def feature_sources(features: Mapping[str, Any] | PathLike | Sequence[str] | None
                    ) -> tuple[str, ...]:
    """The ST feature sources named by a ridge ``features`` value, or ``()`` when it is per-gene
    vectors (a dict or one ``.pt`` path) or None. Sources: a list/tuple of ``"transfer"``,
    ``"onehot"`` and ``.pt`` paths (ST's ``features``, :func:`vcc_dist.data.pseudobulk.
    build_features`), or the string ``"transfer"`` / ``"onehot"`` alone."""
    if features is None or isinstance(features, Mapping):
        return ()
    if isinstance(features, (str, os.PathLike)):
        return (str(features),) if str(features) in FEATURE_KINDS else ()
    if isinstance(features, Sequence):
        srcs = tuple(str(f) if isinstance(f, os.PathLike) else f for f in features)
        if not srcs or not all(isinstance(f, str) for f in srcs):
            raise BaselineError(f"ridge features {features!r}: give a non-empty list of "
                                "'transfer', 'onehot' or .pt paths (ST's features)")
        return srcs
    raise BaselineError(f"ridge features: expected a dict gene -> vector, a .pt path or a list "
                        f"of ST feature sources, got {type(features).__name__}")


@dataclass
class _RidgeModel:
    w: np.ndarray
    b: np.ndarray
    fewshot: list[str]
    featurize: Any  # perts -> (n, d) standardised features (zeros where unavailable)


class RidgeDeltaBaseline(_ShiftBaseline):
    """Ridge regression from perturbation features to the target context's deltas, fitted on
    its few-shot perturbations; falls back to context-mean with fewer than 2 of them."""

    name = "ridge"

    def __init__(self, alpha: float = 1.0, n_components: int = 10, *,
                 features: Mapping[str, Any] | PathLike | Sequence[str] | None = None,
                 residual: bool = True, progress: bool = False):
        super().__init__(progress=progress)
        if alpha < 0:
            raise BaselineError(f"ridge alpha must be >= 0, got {alpha}")
        if n_components < 1:
            raise BaselineError(f"n_components must be >= 1, got {n_components}")
        self.alpha = float(alpha)
        self.n_components = int(n_components)
        self.residual = residual
        self.feature_sources = feature_sources(features)
        self.features = None if self.feature_sources else features
        self._feats: dict[str, np.ndarray] | None = None
        self._table: np.ndarray | None = None

    def _fit_model(self, st: _TrainStats) -> None:
        super()._fit_model(st)
        if self.feature_sources:
            try:  # the [C, P, D] table ST builds on a corpus, here from the training AnnData
                self._table = build_features(self.feature_sources, list(st.contexts),
                                             self._perts, self._means).table
            except FeatureError as e:
                raise BaselineError(f"ridge features {list(self.feature_sources)}: {e}") from e
        elif self.features is not None and self._feats is None:
            self._feats = load_pert_features(self.features)

    def _base(self, perts: Sequence[str], context: str) -> np.ndarray:
        """Context-mean effects (transfer from the other contexts; mean effect if unseen)."""
        tr, glob = self._transfer(context, False)
        out = np.zeros((len(perts), self._fitted().n_genes))
        for i, p in enumerate(perts):
            v = tr.get(p, glob)
            if v is not None:
                out[i] = v
        return out

    def _featurizer(self, context: str):
        """(function perts -> standardised features, set of perts that have features)."""
        st = self._fitted()
        train_perts = sorted(set(st.group_pert) - {st.control_label})
        if self._table is not None:
            ci = self._ctx_index.get(context)
            if ci is None:  # a context outside training has no few-shot perturbations
                return None, set()
            rows = {p: i for i, p in enumerate(self._perts) if i != self._means.control_index}
            f = self._table[ci].astype(np.float64)
            mu, sd = f[list(rows.values())].mean(0), f[list(rows.values())].std(0)
            sd[sd == 0] = 1.0

            def featurize(perts):
                out = np.zeros((len(perts), mu.size))
                for i, p in enumerate(perts):
                    if p in rows:
                        out[i] = (f[rows[p]] - mu) / sd
                return out

            return featurize, set(rows)
        if self._feats is not None:
            have = [p for p in train_perts if p in self._feats]
            if len(have) < 2:
                return None, set()
            f = np.stack([self._feats[p] for p in have])
            mu, sd = f.mean(0), f.std(0)
            sd[sd == 0] = 1.0
            feats = self._feats

            def featurize(perts):
                out = np.zeros((len(perts), mu.size))
                for i, p in enumerate(perts):
                    if p in feats:
                        out[i] = (feats[p] - mu) / sd
                return out

            return featurize, set(feats)
        tr, _ = self._transfer(context, False)
        have = sorted(tr)
        if len(have) < 2:
            return None, set()
        e = np.stack([tr[p] for p in have])
        mu = e.mean(0)
        _, s, vt = np.linalg.svd(e - mu, full_matrices=False)
        k = int(min(self.n_components, (s > s[0] * 1e-10).sum())) if s.size and s[0] > 0 else 0
        if k == 0:
            return None, set()
        v = vt[:k].T
        scores = (e - mu) @ v
        sd = scores.std(0)
        sd[sd == 0] = 1.0

        def featurize(perts):
            out = np.zeros((len(perts), k))
            for i, p in enumerate(perts):
                if p in tr:
                    out[i] = ((tr[p] - mu) @ v) / sd
            return out

        return featurize, set(have)

    def _model(self, context: str) -> _RidgeModel | None:
        key = ("ridge", context)
        if key in self._cache:
            return self._cache[key]
        featurize, have = self._featurizer(context)
        own = self._delta.get(context, {})
        fewshot = sorted(p for p in own if p in have)
        model = None
        if featurize is None or len(fewshot) < 2:
            src = ("features " + "+".join(self.feature_sources) if self._table is not None
                   else "per-gene feature vectors" if self._feats is not None
                   else "effects in other contexts")
            warnings.warn(
                f"ridge: only {len(fewshot)} few-shot perturbation(s) with {src} in context "
                f"{context!r} (fewer than 2); falling back to the context-mean baseline",
                UserWarning, stacklevel=4)
        else:
            x = featurize(fewshot)
            y = np.stack([own[p] for p in fewshot])
            if self.residual:
                y = y - self._base(fewshot, context)
            w, b = ridge_fit(x, y, self.alpha)
            model = _RidgeModel(w=w, b=b, fewshot=fewshot, featurize=featurize)
            log.info("ridge: fitted on %d few-shot perturbations of %r", len(fewshot), context)
        self._cache[key] = model
        return model

    @property
    def feature_table(self) -> np.ndarray | None:
        """``[C, P, D]`` ST features (``features`` given as sources) over :attr:`contexts` and
        the :attr:`pseudobulks` perturbations; None with other features."""
        self._fitted()
        return self._table

    def fewshot_perts(self, context: str) -> list[str]:
        """The few-shot perturbations the ridge of ``context`` is fitted on ([] on fallback)."""
        m = self._model(context)
        return [] if m is None else list(m.fewshot)

    def effects(self, perts: Sequence[str], context: str) -> np.ndarray:
        self._fitted()
        perts = list(perts)
        base = self._base(perts, context)
        m = self._model(context)
        if m is None:
            return base
        pred = m.featurize(perts) @ m.w + m.b
        return base + pred if self.residual else pred


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

BASELINES: dict[str, type[Baseline]] = {
    CellMeanBaseline.name: CellMeanBaseline,
    ContextMeanBaseline.name: ContextMeanBaseline,
    RidgeDeltaBaseline.name: RidgeDeltaBaseline,
}


def make_baseline(name: str, **kw) -> Baseline:
    """A baseline by name: "cell-mean", "context-mean" or "ridge" (``kw`` go to its constructor)."""
    if name not in BASELINES:
        raise BaselineError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    try:
        return BASELINES[name](**kw)
    except TypeError as e:
        raise BaselineError(f"baseline {name!r}: {e}") from e
