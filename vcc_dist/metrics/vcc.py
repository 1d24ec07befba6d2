"""The Virtual Cell Challenge metrics: DES, PDS, MAE and the overall score, as cell-eval 0.8.2
computes them (``cell-eval run --profile vcc`` then ``cell-eval score``).

The work is split in two so that it can be shared:

* ``summarize(adata)`` reduces one file (real or predicted) to what the metrics need: the
  per-perturbation pseudobulks and the DE of every perturbation against the file's own
  controls. A real file's summary does not depend on any prediction: compute it once, save it
  (``FileSummary.save``) and score every Ray Tune trial against it.
* ``compare(real, pred)`` turns two summaries into per-perturbation DES/PDS/MAE (milliseconds),
  ``aggregate`` into the means of cell-eval's ``agg_results.csv``, and ``score`` into
  ``cell-eval score``'s baseline-scaled numbers.

Semantics (docs/cell_eval_0.8.2_semantics.md §4-6, §1.3):

* DES (``overlap_at_N``): genes with float32(fdr) < 0.05 in each file; k = number of real DE
  genes; 0 when k = 0; otherwise |real ∩ top-k predicted by float32 |log2FC|| / k, ties by
  gene order, NaN then +inf first.
* PDS (``discrimination_score_l1``): signed effects (pseudobulk minus the same file's control
  pseudobulk), L1 distance from each predicted effect to every real effect with the
  perturbation's own gene column removed; 1 - rank/T with the rank from ``np.argsort``.
* MAE: mean |pred - real| of the perturbation pseudobulks over all genes.
* pseudobulk = float32(mean in float64) of log1p expression, as polars computes it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist
from tqdm.auto import tqdm

from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.metrics.de import DEResult, bh_fdr, de_against_control, pseudobulk
from vcc_dist.metrics.normalize import ExpressionError, prepare_expression

log = logging.getLogger(__name__)

#: cell-eval's output column names for the three vcc metrics, in its order
DES, MAE, PDS = "overlap_at_N", "mae", "discrimination_score_l1"
METRICS = (DES, MAE, PDS)
#: metrics where lower is better (cell-eval's best_value ZERO); the others are ONE
_BEST_ZERO = {MAE}
SUMMARY_VERSION = 1

#: ``(fn, shared, chunks) -> [fn(shared, chunk) for chunk in chunks]`` run as parallel tasks
#: (default vcc_dist.ray_utils.ray_map); a job passes its own to choose the tasks' placement
#: and record where they ran (jobs/evaluate.py)
ChunkMap = Callable[[Callable[..., Any], Any, Sequence[Any]], list[Any]]


class EvaluationError(ValueError):
    """Inputs that cell-eval would reject (or silently mis-score), with the fix."""


@dataclass
class FileSummary:
    """Everything the VCC metrics need from one file."""

    genes: np.ndarray  # (G,) str, file order
    perts: np.ndarray  # (T,) str, sorted, control excluded
    n_cells: np.ndarray  # (T,)
    n_control: int
    bulk: np.ndarray  # (T, G) pseudobulk (mean log1p) in X's float dtype
    control_bulk: np.ndarray  # (G,)
    lfc: np.ndarray  # (T, G) float64 log2 fold change vs controls
    pvalue: np.ndarray  # (T, G) float64 Wilcoxon p-value vs controls
    control_label: str = CONTROL_LABEL
    was_counts: bool = False
    _fdr: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def effects(self) -> np.ndarray:
        return self.bulk - self.control_bulk

    def de(self, fdr_scope: str = "perturbation") -> DEResult:
        """DE with BH applied; kept per scope, so a cached real summary scored against many
        predictions (Tune trials) sorts its p-values once."""
        if fdr_scope not in self._fdr:
            self._fdr[fdr_scope] = bh_fdr(self.pvalue, fdr_scope)
        return DEResult(self.perts, self.n_cells, self.lfc, self.pvalue,
                        self._fdr[fdr_scope])

    def save(self, path: str | Path) -> Path:
        """Write as .npz (atomic: a temp file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, version=SUMMARY_VERSION, genes=self.genes.astype(str),
                 perts=self.perts.astype(str), n_cells=self.n_cells, n_control=self.n_control,
                 bulk=self.bulk, control_bulk=self.control_bulk, lfc=self.lfc,
                 pvalue=self.pvalue, control_label=self.control_label,
                 was_counts=self.was_counts)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FileSummary:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != SUMMARY_VERSION:
                raise EvaluationError(f"{path}: summary format {int(z['version'])}, expected "
                                      f"{SUMMARY_VERSION}; delete it to recompute")
            return cls(genes=z["genes"].astype(object), perts=z["perts"].astype(object),
                       n_cells=z["n_cells"], n_control=int(z["n_control"]), bulk=z["bulk"],
                       control_bulk=z["control_bulk"], lfc=z["lfc"], pvalue=z["pvalue"],
                       control_label=str(z["control_label"]),
                       was_counts=bool(z["was_counts"]))


# ----------------------------------------------------------------------------- summarize

def _labels(adata, pert_col: str, what: str) -> np.ndarray:
    if pert_col not in adata.obs.columns:
        raise EvaluationError(
            f"{what}: obs has no column {pert_col!r} (columns: {list(adata.obs.columns)[:10]});"
            " pass the perturbation column with pert_col / --pert-col")
    col = adata.obs[pert_col]
    if isinstance(col.dtype, pd.CategoricalDtype):
        unused = set(col.cat.categories) - set(col.unique())
        if unused:
            log.warning("%s: %d unused categories in %r ignored (cell-eval's DE would crash "
                        "on them: remove_unused_categories() before submitting)", what,
                        len(unused), pert_col)
    if col.isna().any() or (col.astype(str) == "").any():
        raise EvaluationError(
            f"{what}: {int(col.isna().sum() + (col.astype(str) == '').sum())} cells have an "
            f"empty or missing {pert_col!r}; cell-eval drops them from DE but counts them as "
            "a perturbation. Label or remove those cells.")
    return col.to_numpy(str)


def _de_chunk(shared, rows_by_target):
    """One Ray task's share of the DE: ``shared`` is (normalised X, control rows)."""
    x, control_rows = shared
    de = de_against_control(x, rows_by_target, control_rows)
    return de.lfc, de.pvalue, de.pseudobulk, de.control_pseudobulk


def summarize(adata, *, pert_col: str = PERT_KEY, control_label: str = CONTROL_LABEL,
              what: str = "file", num_workers: int | None = None,
              progress: bool = False, map_chunks: ChunkMap | None = None) -> FileSummary:
    """Reduce an AnnData (or .h5ad path) to a ``FileSummary``.

    Integer-valued X is median-normalised and log1p-transformed (per file, as cell-eval);
    float X is taken as log1p expression. ``num_workers > 1`` splits the perturbations over
    Ray tasks (the cluster Ray is connected to, or a local one) through ``map_chunks``
    (default vcc_dist.ray_utils.ray_map); results do not depend on either.
    """
    owned = False
    if isinstance(adata, (str, Path)):
        path = Path(adata)
        if not path.exists():
            raise EvaluationError(f"{what}: {path} does not exist")
        adata = ad.read_h5ad(path)
        what = f"{what} {path.name}"
        owned = True  # read only for this: normalise in place
    labels = _labels(adata, pert_col, what)
    if control_label not in set(labels):
        raise EvaluationError(
            f"{what}: no control cells: no {pert_col!r} equals {control_label!r}. Every file "
            "needs its control cells (DES and PDS are computed against them); pass "
            "control_label / --control-label if they are named differently.")
    try:
        x, check = prepare_expression(adata.X, what=what, copy=not owned)
        if owned:
            adata.X = None
    except ExpressionError as e:
        raise EvaluationError(str(e)) from None
    if check.n_explicit_zeros:
        log.warning("%s: %d explicitly stored zeros dropped (cell-eval's DE step refuses "
                    "them; results are unchanged)", what, check.n_explicit_zeros)
    perts, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(perts) + 1))
    rows = {p: order[bounds[i]:bounds[i + 1]] for i, p in enumerate(perts)}  # ascending
    control_rows = rows.pop(control_label)
    targets = [p for p in perts if p != control_label]
    lfc, pv, bulk, ctrl_bulk = _run_de(x, control_rows, {p: rows[p] for p in targets},
                                       num_workers, progress, what, map_chunks)
    return FileSummary(genes=np.asarray(adata.var_names, dtype=object),
                       perts=np.asarray(targets, dtype=object),
                       n_cells=np.array([len(rows[p]) for p in targets], np.int64),
                       n_control=len(control_rows), bulk=bulk, control_bulk=ctrl_bulk,
                       lfc=lfc, pvalue=pv, control_label=control_label,
                       was_counts=check.is_counts)


def _run_de(x, control_rows, rows_by_target, num_workers, progress, what, map_chunks=None):
    n = len(rows_by_target)
    if n == 0:
        return np.zeros((0, x.shape[1])), np.zeros((0, x.shape[1])), \
            np.zeros((0, x.shape[1]), x.dtype), pseudobulk(x[control_rows])
    if num_workers and num_workers > 1 and n > 1:
        return _run_de_ray(x, control_rows, rows_by_target, num_workers, map_chunks)
    bar = None
    if progress:
        bar = tqdm(total=n, desc=f"DE {what}", unit="pert")
    try:
        de = de_against_control(x, rows_by_target, control_rows, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return de.lfc, de.pvalue, de.pseudobulk, de.control_pseudobulk


def _run_de_ray(x, control_rows, rows_by_target, num_workers, map_chunks=None):
    if map_chunks is None:
        # Ray is the optional parallel path: metrics only calls the project's one Ray helper,
        # and only here, so importing (and unit-testing) the metrics never loads Ray
        from vcc_dist.ray_utils import ray_map

        map_chunks = ray_map
    names = list(rows_by_target)
    chunks = [names[i::num_workers] for i in range(min(num_workers, len(names)))]
    parts = map_chunks(_de_chunk, (x, control_rows),
                       [{p: rows_by_target[p] for p in c} for c in chunks])
    pos = {p: i for i, p in enumerate(names)}
    lfc = np.empty((len(names), x.shape[1]))
    pv = np.empty_like(lfc)
    bulk = np.empty(lfc.shape, x.dtype)
    for c, (lc, pc, bc, ctrl_bulk) in zip(chunks, parts):
        idx = [pos[p] for p in c]
        lfc[idx], pv[idx], bulk[idx] = lc, pc, bc
    return lfc, pv, bulk, ctrl_bulk


# ----------------------------------------------------------------------------- compare

def _check_pair(real: FileSummary, pred: FileSummary) -> None:
    if len(real.genes) != len(pred.genes) or not np.array_equal(
            real.genes.astype(str), pred.genes.astype(str)):
        missing = sorted(set(real.genes) - set(pred.genes))[:5]
        extra = sorted(set(pred.genes) - set(real.genes))[:5]
        how = ("the same genes in a different order" if not missing and not extra else
               f"missing {missing}, extra {extra}")
        raise EvaluationError(
            f"gene mismatch between real ({len(real.genes)}) and pred ({len(pred.genes)}): "
            f"{how}. cell-eval compares columns by position; write the prediction with "
            "vcc_dist.infer.submission.write_submission(..., gene_list=real genes).")
    if not np.array_equal(real.perts.astype(str), pred.perts.astype(str)):
        a, b = set(real.perts), set(pred.perts)
        raise EvaluationError(
            f"perturbation mismatch: {len(a - b)} only in real (e.g. {sorted(a - b)[:5]}), "
            f"{len(b - a)} only in pred (e.g. {sorted(b - a)[:5]}). cell-eval needs the same "
            "perturbation set in both files.")
    if real.control_label != pred.control_label:
        raise EvaluationError("real and pred summaries use different control labels")


def _des(real_sig, pred_sig, pred_abs_f32) -> np.ndarray:
    out = np.zeros(real_sig.shape[0])
    n_pred = np.zeros(real_sig.shape[0], np.int64)
    for i in range(real_sig.shape[0]):
        r = np.flatnonzero(real_sig[i])
        pv = np.flatnonzero(pred_sig[i])
        n_pred[i] = len(pv)
        k = len(r)
        if k == 0:
            continue
        if len(pv) > k:
            a = pred_abs_f32[i, pv]
            nan = np.isnan(a)
            key = -np.where(nan, 0, a)
            pv = pv[np.lexsort((pv, key, ~nan))][:k]
        out[i] = np.intersect1d(r, pv, assume_unique=True).size / k
    return out, n_pred


def compare(real: FileSummary, pred: FileSummary, *, fdr_scope: str = "perturbation",
            fdr_alpha: float = 0.05) -> pd.DataFrame:
    """Per-perturbation DES, MAE and PDS (cell-eval's ``results.csv`` columns), plus the
    number of real and predicted DE genes and the PDS rank."""
    _check_pair(real, pred)
    t = len(real.perts)
    rde, pde = real.de(fdr_scope), pred.de(fdr_scope)
    rsig, psig = rde.significant(fdr_alpha), pde.significant(fdr_alpha)
    des, n_pred = _des(rsig, psig, np.abs(pde.lfc).astype(np.float32))

    mae = np.array([float(np.mean(np.abs(pred.bulk[i] - real.bulk[i]), dtype=np.float64))
                    for i in range(t)])

    real_eff, pred_eff = real.effects, pred.effects
    genes = real.genes.astype(str)
    rank = np.zeros(t, np.int64)
    full = None
    for i, p in enumerate(real.perts):
        keep = genes != p
        if keep.all():
            if full is None:
                full = cdist(pred_eff, real_eff, "cityblock")
            d = full[i]
        else:
            d = cdist(real_eff[:, keep], pred_eff[i:i + 1, keep], "cityblock").ravel()
        rank[i] = int(np.flatnonzero(np.argsort(d) == i)[0])
    pds = 1.0 - rank / t if t else np.zeros(0)
    return pd.DataFrame({
        "perturbation": real.perts.astype(str), DES: des, MAE: mae, PDS: pds,
        "n_real_de": rsig.sum(1), "n_pred_de": n_pred, "pds_rank": rank,
        "n_cells_real": real.n_cells, "n_cells_pred": pred.n_cells,
    })


def aggregate(results: pd.DataFrame) -> dict[str, float]:
    """Plain mean over perturbations of each metric (the ``mean`` row of agg_results.csv)."""
    return {m: float(results[m].mean()) for m in METRICS}


def score(user: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """``cell-eval score``: MAE as 1 - u/b, DES and PDS as (u - b)/(1 - b); NaN -> 0; clipped
    below at 0 (not above); ``avg_score`` is the plain mean of the three."""
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for m in (MAE, DES, PDS):  # cell-eval's row order: ZERO metrics, then ONE metrics
            u, b = np.float64(user[m]), np.float64(baseline[m])
            s = 1.0 - u / b if m in _BEST_ZERO else (u - b) / (1.0 - b)
            s = 0.0 if np.isnan(s) else s
            out[m] = float(max(s, 0.0))
    out["avg_score"] = float(np.mean([out[MAE], out[DES], out[PDS]]))
    return out


# ----------------------------------------------------------------------------- evaluate

@dataclass
class Evaluation:
    results: pd.DataFrame  # per perturbation
    agg: dict[str, float]
    baseline_results: pd.DataFrame | None = None
    baseline_agg: dict[str, float] | None = None
    scores: dict[str, float] | None = None
    #: the Ray nodes that computed the summaries (provenance; None = not recorded)
    node_ids: list[str] | None = None

    def to_json(self) -> dict:
        d = {"agg": self.agg, "baseline_agg": self.baseline_agg, "score": self.scores,
             "n_perturbations": len(self.results)}
        if self.node_ids is not None:
            d["node_ids"] = list(self.node_ids)
        return d


def load_agg(path: str | Path) -> dict[str, float]:
    """Aggregate metrics from our ``agg_results.json`` or cell-eval's ``agg_results.csv``
    (the ``mean`` row), e.g. a baseline scored once and reused."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path} does not exist")
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        d = d.get("agg", d)
    else:
        df = pd.read_csv(path)
        if "statistic" not in df.columns or "mean" not in set(df["statistic"]):
            raise EvaluationError(f"{path}: not a cell-eval agg_results.csv (no 'mean' row)")
        d = df.set_index("statistic").loc["mean"].to_dict()
    missing = [m for m in METRICS if m not in d]
    if missing:
        raise EvaluationError(f"{path}: metrics {missing} missing (found {sorted(d)})")
    return {m: float(d[m]) for m in METRICS}


def _as_summary(x, what, **kw) -> FileSummary:
    if isinstance(x, FileSummary):
        return x
    if isinstance(x, (str, Path)) and str(x).endswith(".npz"):
        return FileSummary.load(x)
    return summarize(x, what=what, **kw)


def evaluate(real, pred, baseline=None, *, baseline_agg: dict | str | Path | None = None,
             pert_col: str = PERT_KEY,
             control_label: str = CONTROL_LABEL, fdr_scope: str = "perturbation",
             num_workers: int | None = None, progress: bool = False,
             map_chunks: ChunkMap | None = None) -> Evaluation:
    """Score ``pred`` against ``real`` (each an AnnData, .h5ad path, FileSummary or saved
    summary .npz); with ``baseline`` (same kinds) or ``baseline_agg`` (a baseline's aggregate
    metrics: dict, agg_results.json or cell-eval agg_results.csv) also the overall score."""
    kw = dict(pert_col=pert_col, control_label=control_label, num_workers=num_workers,
              progress=progress, map_chunks=map_chunks)
    real_s = _as_summary(real, "real", **kw)
    pred_s = _as_summary(pred, "pred", **kw)
    res = compare(real_s, pred_s, fdr_scope=fdr_scope)
    ev = Evaluation(res, aggregate(res))
    if baseline is not None:
        base_s = _as_summary(baseline, "baseline", **kw)
        ev.baseline_results = compare(real_s, base_s, fdr_scope=fdr_scope)
        ev.baseline_agg = aggregate(ev.baseline_results)
        ev.scores = score(ev.agg, ev.baseline_agg)
    elif baseline_agg is not None:
        ev.baseline_agg = (baseline_agg if isinstance(baseline_agg, dict)
                           else load_agg(baseline_agg))
        ev.scores = score(ev.agg, ev.baseline_agg)
    return ev


def write_evaluation(ev: Evaluation, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """results.csv (per perturbation), baseline_diff.csv (with a baseline),
    per_perturbation.png, then agg_results.json: last, so that its presence means the others
    are complete. Each file is written to a temp name and renamed; the returned paths are in
    that order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}

    def _write(name, text):
        p = out / name
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(p)
        paths[name] = p

    res = ev.results
    if ev.baseline_results is not None:
        b = ev.baseline_results.set_index("perturbation")[list(METRICS)]
        res = res.join(b.add_prefix("baseline_"), on="perturbation")
    _write("results.csv", res.to_csv(index=False))
    if ev.scores is not None:
        rows = "".join(f"{k},{v!r}\n" for k, v in ev.scores.items())
        _write("baseline_diff.csv", "metric,from_baseline\n" + rows)
    if plot:
        paths["per_perturbation.png"] = plot_per_perturbation(ev, out / "per_perturbation.png")
    _write("agg_results.json", json.dumps(ev.to_json(), indent=2) + "\n")
    return paths


def plot_per_perturbation(ev: Evaluation, path: str | Path) -> Path:
    """Three panels (DES, PDS, MAE): each perturbation's value, sorted, with the baseline's
    values for the same perturbations and both means as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = ev.results
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, m, title in zip(axes, (DES, PDS, MAE),
                            ("DES (overlap of DE genes) ↑", "PDS (discrimination) ↑",
                             "MAE of pseudobulk ↓")):
        order = np.argsort(res[m].to_numpy(), kind="stable")
        xs = np.arange(len(order))
        ax.scatter(xs, res[m].to_numpy()[order], s=12, label="prediction", color="C0")
        ax.axhline(ev.agg[m], color="C0", lw=1, ls="--")
        if ev.baseline_results is not None:
            bv = ev.baseline_results[m].to_numpy()[order]
            ax.scatter(xs, bv, s=10, marker="x", color="C3", label="baseline")
        if ev.baseline_agg is not None:
            ax.axhline(ev.baseline_agg[m], color="C3", lw=1, ls="--", label="baseline mean")
        ax.set_title(title)
        ax.set_xlabel("perturbations (sorted by prediction)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    if ev.scores is not None:
        fig.suptitle(f"overall score {100 * ev.scores['avg_score']:.2f} "
                     f"(MAE {ev.scores[MAE]:.3f}, DES {ev.scores[DES]:.3f}, "
                     f"PDS {ev.scores[PDS]:.3f} vs baseline)")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
