"""Score the baselines on a split's held-out cells with the challenge metrics.

The held-out "real" file is what the challenge hands the scorer: the held-out context's cells
of the held-out perturbations (a split's few-shot val + test, or every perturbation of a
zero-shot context) plus that context's control cells, chosen by the corpus path's rule
(:mod:`vcc_dist.data.heldout`) on the split read by the one split reader
(:class:`vcc_dist.data.splits.SplitSpec`). Every baseline is fitted on the rest,
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
from vcc_dist.data.heldout import heldout_rows
from vcc_dist.data.splits import TEST, VAL, SplitSpec
from vcc_dist.infer.baselines import (
    exclude_heldout,
    make_baseline,
    pert_counts_from,
)
from vcc_dist.metrics import vcc

KINDS = ("cell-mean", "context-mean", "ridge")


def heldout_real(adata: ad.AnnData, split: SplitSpec, *, context: str | None = None,
                 context_key: str = CONTEXT_KEY, pert_col: str = PERT_KEY,
                 control_label: str = CONTROL_LABEL) -> tuple[str, ad.AnnData]:
    """(context, real AnnData): every val and test cell of the held-out context (default: the
    one context holding some) plus all its control cells, in file order. The selection is the
    corpus path's rule (:func:`vcc_dist.data.heldout.heldout_rows`), uncapped."""
    c = adata.obs[context_key].astype(str).to_numpy()
    p = adata.obs[pert_col].astype(str).to_numpy()
    sel = heldout_rows(c, p, split, (VAL, TEST), control_label=control_label, context=context)
    real = adata[sel.all_rows()].copy()
    real.obs[pert_col] = real.obs[pert_col].astype(str)
    return sel.context, real


def score_baselines(h5ads, split_path, out_dir, *, kinds=KINDS, features=None,
                    seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Fit each baseline on the training cells, predict the held-out cells, score them.
    Writes real.h5ad, <kind>.h5ad, results_<kind>.csv and scores.csv/json to ``out_dir``.

    ``features``: the ridge's features (``RidgeDeltaBaseline(features=...)``): None (PCA of the
    other-context effects), a ``{gene: vector}`` .pt path, or ST's feature sources, e.g.
    ``("transfer", "onehot")`` as ST's demo recipe, so the report's ridge and ST see the same
    inputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [ad.read_h5ad(h) for h in h5ads]
    full = ad.concat(files, join="inner", index_unique="-") if len(files) > 1 else files[0]
    split = SplitSpec.from_toml(split_path)
    ctx, real = heldout_real(full, split)
    train = exclude_heldout(full, split)
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
    # scores.json marks the stage complete (vcc_dist.pipeline): written last, and atomically
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
