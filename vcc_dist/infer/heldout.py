"""Score the baselines on a split's held-out cells with the challenge metrics.

The held-out "real" file is what the challenge hands the scorer: the held-out context's cells
of the held-out perturbations (a split's few-shot val + test, or every perturbation of a
zero-shot context) plus that context's control cells. Every baseline is fitted on the rest,
predicts the same perturbations with the same cell counts, and is scored against the real
file; the overall score uses the cell-mean baseline as reference, as ``cell-eval score`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from vcc_dist.constants import CONTEXT_KEY, CONTROL_LABEL, PERT_KEY
from vcc_dist.infer.baselines import (
    exclude_heldout,
    load_split,
    make_baseline,
    pert_counts_from,
)
from vcc_dist.metrics import vcc

KINDS = ("cell-mean", "context-mean", "ridge")


def heldout_real(adata: ad.AnnData, heldout: dict, *, context_key: str = CONTEXT_KEY,
                 pert_col: str = PERT_KEY, control_label: str = CONTROL_LABEL
                 ) -> tuple[str, ad.AnnData]:
    """(context, real AnnData) for a split with exactly one held-out context."""
    if len(heldout) != 1:
        raise ValueError(f"expected one held-out context in the split, got {sorted(heldout)}")
    ctx, perts = next(iter(heldout.items()))
    c = adata.obs[context_key].astype(str).to_numpy()
    p = adata.obs[pert_col].astype(str).to_numpy()
    held = (p != control_label) if perts is None else np.isin(p, sorted(perts))
    keep = (c == ctx) & (held | (p == control_label))
    if not (keep & (p != control_label)).any():
        raise ValueError(f"the split holds out nothing of context {ctx!r} in this data")
    real = adata[keep].copy()
    real.obs[pert_col] = real.obs[pert_col].astype(str)
    return ctx, real


def score_baselines(h5ads, split_path, out_dir, *, kinds=KINDS, features=None,
                    seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Fit each baseline on the training cells, predict the held-out cells, score them.
    Writes real.h5ad, <kind>.h5ad, results_<kind>.csv and scores.csv/json to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [ad.read_h5ad(h) for h in h5ads]
    full = ad.concat(files, join="inner", index_unique="-") if len(files) > 1 else files[0]
    heldout = load_split(split_path)
    ctx, real = heldout_real(full, heldout)
    train = exclude_heldout(full, heldout)
    counts = pert_counts_from(real)
    real.write_h5ad(out / "real.h5ad")
    real_s = vcc.summarize(real, what="real")
    summaries, rows = {}, []
    for kind in kinds:
        kw = {"features": features} if (kind == "ridge" and features) else {}
        model = make_baseline(kind, **kw).fit(train)
        pred = model.predict(counts, context=ctx, seed=seed)
        pred.write_h5ad(out / f"{kind}.h5ad")
        summaries[kind] = vcc.summarize(pred, what=kind)
    ref = summaries.get("cell-mean")
    for kind, s in summaries.items():
        ev = vcc.evaluate(real_s, s, ref)
        ev.results.to_csv(out / f"results_{kind}.csv", index=False)
        row = {"baseline": kind, **{m: ev.agg[m] for m in vcc.METRICS}}
        if ev.scores is not None:
            row["score"] = 100 * ev.scores["avg_score"]
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "scores.csv", index=False)
    # scores.json marks the stage complete (jobs/main.py): written last, and atomically
    tmp = out / "scores.json.tmp"
    tmp.write_text(json.dumps({
        "context": ctx, "n_perturbations": len(counts), "n_real_cells": int(real.n_obs),
        "scores": rows}, indent=2) + "\n")
    tmp.replace(out / "scores.json")
    return table


def score_predictions(real_path, preds: dict, perts=None, *, reference: str = "cell-mean"
                      ) -> list[dict]:
    """Score prediction files (name -> .h5ad) against one real file, all restricted to
    ``perts`` (plus controls) when given; the score uses ``preds[reference]`` as its 0 (the
    challenge's cell-mean reference). Rows: model, DES, PDS, MAE, score (x 100)."""
    def restrict(a):
        lab = a.obs[PERT_KEY].astype(str).to_numpy()
        keep = (lab == CONTROL_LABEL) | (np.isin(lab, sorted(perts)) if perts is not None
                                         else True)
        return a[keep].copy()

    if reference not in preds:
        raise ValueError(f"the reference {reference!r} is not among the predictions "
                         f"{sorted(preds)}")
    real_s = vcc.summarize(restrict(ad.read_h5ad(real_path)), what="real")
    sums = {k: vcc.summarize(restrict(ad.read_h5ad(p)), what=k) for k, p in preds.items()}
    ref = vcc.evaluate(real_s, sums[reference]).agg
    rows = []
    for k, s in sums.items():
        ev = vcc.evaluate(real_s, s, baseline_agg=ref)
        rows.append({"model": k, "DES": float(ev.agg["overlap_at_N"]),
                     "PDS": float(ev.agg["discrimination_score_l1"]),
                     "MAE": float(ev.agg["mae"]), "score": 100 * float(ev.scores["avg_score"])})
    return rows
