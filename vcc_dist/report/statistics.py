"""Corpus statistics report: per-gene CSV, distribution plots, and a summary.

Reads only corpus.json and each store's small ``uns`` tables (condition index and pseudobulks),
never X, so it takes seconds at any corpus size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from anndata.io import read_elem

from vcc_dist import constants as K
from vcc_dist.data.corpus import load_manifest, store_path


@dataclass
class StatisticsOutputs:
    gene_csv: Path
    gene_mean_png: Path
    delta_png: Path
    cells_png: Path
    summary_json: Path
    summary_md: Path
    summary: dict


def condition_tables(corpus_dir: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """All (context, perturbation) conditions of a corpus with their cell counts, and their
    pseudobulks (mean log1p-CP10k per gene), merged across stores by cell-weighted mean."""
    m = load_manifest(corpus_dir)
    frames, sums = [], []
    for s in m.stores:
        uns = zarr.open_group(str(store_path(corpus_dir, s)), mode="r")["uns"]
        conds = read_elem(uns["vcc_dist_conditions"])
        pb = uns["vcc_dist_pseudobulk"][:].astype(np.float64)
        n = (conds["stop"] - conds["start"]).to_numpy()
        frames.append(pd.DataFrame({K.CONTEXT_KEY: conds[K.CONTEXT_KEY].astype(str),
                                    K.PERT_KEY: conds[K.PERT_KEY].astype(str), "n_cells": n}))
        sums.append(pb * n[:, None])
    df = pd.concat(frames, ignore_index=True)
    total = np.concatenate(sums) if sums else np.zeros((0, len(m.genes)))
    codes = df.groupby([K.CONTEXT_KEY, K.PERT_KEY], sort=False).ngroup().to_numpy()
    first = pd.Series(np.arange(len(df))).groupby(codes).first().to_numpy()
    merged = np.zeros((len(first), total.shape[1]))
    np.add.at(merged, codes, total)
    cells = np.bincount(codes, weights=df["n_cells"].to_numpy(), minlength=len(first))
    out = pd.DataFrame({K.CONTEXT_KEY: df[K.CONTEXT_KEY].to_numpy()[first],
                        K.PERT_KEY: df[K.PERT_KEY].to_numpy()[first],
                        "n_cells": cells.astype(np.int64)})
    return out, merged / np.maximum(cells, 1)[:, None]


def perturbation_deltas(conds: pd.DataFrame, pb: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Pseudobulk of each perturbation minus its context's control pseudobulk."""
    ctrl = conds[K.PERT_KEY] == K.CONTROL_LABEL
    ctrl_of = {c: i for i, c in zip(conds.index[ctrl], conds.loc[ctrl, K.CONTEXT_KEY])}
    rows, deltas = [], []
    for i, r in conds[~ctrl].iterrows():
        j = ctrl_of.get(r[K.CONTEXT_KEY])
        if j is None:
            continue  # a context without controls has no deltas
        rows.append(i)
        deltas.append(pb[i] - pb[j])
    return conds.loc[rows].reset_index(drop=True), (np.stack(deltas) if deltas else
                                                    np.zeros((0, pb.shape[1])))


def write_statistics_report(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            ) -> StatisticsOutputs:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = load_manifest(corpus_dir)
    genes = m.gene_table()
    gene_csv = out / "gene_statistics.csv"
    cols = [K.GENE_ID_KEY, "mean", "max", "min", "nonzero_fraction", "dispersion",
            "dispersions_norm", "highly_variable", "n_cells_expressing", "variance"]
    genes[cols].to_csv(gene_csv, index_label="gene")

    conds, pb = condition_tables(corpus_dir)
    dconds, deltas = perturbation_deltas(conds, pb)

    # -- gene means: distribution + mean/dispersion with HVGs marked
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].hist(genes["mean"], bins=80, color="#4477aa")
    ax[0].set(xlabel="mean log1p(CP10k) expression", ylabel="genes", yscale="log",
              title=f"Gene means ({len(genes)} genes)")
    hv = genes["highly_variable"].to_numpy(bool)
    x = np.log1p(genes["mean_cp10k"])
    y = genes["dispersions_norm"]
    ax[1].scatter(x[~hv], y[~hv], s=3, c="#bbbbbb", label="other")
    ax[1].scatter(x[hv], y[hv], s=3, c="#cc3311", label=f"highly variable ({hv.sum()})")
    ax[1].set(xlabel="log1p(mean CP10k)", ylabel="normalised dispersion",
              title="Highly variable genes (seurat)")
    ax[1].legend(markerscale=4, frameon=False)
    fig.tight_layout()
    gene_mean_png = out / "gene_means.png"
    fig.savefig(gene_mean_png, dpi=120)
    plt.close(fig)

    # -- perturbation deltas (pert pseudobulk - control pseudobulk, per gene)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if deltas.size:
        ax[0].hist(deltas.ravel(), bins=200, color="#228833")
        ax[0].set(yscale="log")
        strength = np.abs(deltas).mean(1)
        ax[1].hist(strength, bins=40, color="#ee7733")
    ax[0].set(xlabel="pert mean - control mean (log1p CP10k)", ylabel="gene x perturbation",
              title=f"Perturbation deltas ({len(dconds)} perturbation x context)")
    ax[1].set(xlabel="mean |delta| over genes", ylabel="perturbation x context",
              title="Effect strength per perturbation")
    fig.tight_layout()
    delta_png = out / "perturbation_deltas.png"
    fig.savefig(delta_png, dpi=120)
    plt.close(fig)

    # -- cells per perturbation, per context
    fig, ax = plt.subplots(figsize=(6, 4))
    pert_cells = conds[conds[K.PERT_KEY] != K.CONTROL_LABEL]
    for ctx, g in pert_cells.groupby(K.CONTEXT_KEY):
        ax.hist(g["n_cells"], bins=30, alpha=0.6, label=str(ctx))
    ax.set(xlabel="cells per perturbation", ylabel="perturbations",
           title="Cells per perturbation by context")
    if len(pert_cells):
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    cells_png = out / "cells_per_perturbation.png"
    fig.savefig(cells_png, dpi=120)
    plt.close(fig)

    per_ctx = []
    for ctx, g in conds.groupby(K.CONTEXT_KEY):
        c = g[g[K.PERT_KEY] == K.CONTROL_LABEL]["n_cells"].sum()
        p = g[g[K.PERT_KEY] != K.CONTROL_LABEL]
        per_ctx.append({"context": ctx, "cells": int(g["n_cells"].sum()), "controls": int(c),
                        "perturbations": len(p),
                        "median_cells_per_perturbation": float(p["n_cells"].median())
                        if len(p) else 0.0})
    pc = pert_cells.groupby(K.PERT_KEY)["n_cells"].sum()
    summary = {
        "corpus": str(corpus_dir),
        "cells": int(m.summary["n_cells"]), "genes": len(m.genes),
        "stores": len(m.stores), "contexts": int(conds[K.CONTEXT_KEY].nunique()),
        "perturbations": int(pc.size),
        "controls": int(conds.loc[conds[K.PERT_KEY] == K.CONTROL_LABEL, "n_cells"].sum()),
        "cells_per_perturbation": {
            "min": int(pc.min()) if pc.size else 0, "median": float(pc.median()) if pc.size else 0,
            "max": int(pc.max()) if pc.size else 0},
        "highly_variable_genes": int(hv.sum()),
        "mean_nonzero_fraction": float(genes["nonzero_fraction"].mean()),
        "per_context": per_ctx,
    }
    summary_json = out / "summary.json"
    summary_json.write_text(json.dumps(summary, indent=1))
    lines = [f"# Corpus statistics: {corpus_dir}", "",
             f"- cells: {summary['cells']:,} in {summary['stores']} store(s)",
             f"- genes: {summary['genes']:,} ({summary['highly_variable_genes']} highly variable)",
             f"- contexts: {summary['contexts']}",
             f"- perturbations: {summary['perturbations']} (+ {summary['controls']:,} control cells)",
             f"- cells per perturbation: min {summary['cells_per_perturbation']['min']}, median "
             f"{summary['cells_per_perturbation']['median']:.0f}, max "
             f"{summary['cells_per_perturbation']['max']}",
             f"- mean fraction of cells expressing a gene: {summary['mean_nonzero_fraction']:.3f}",
             "", "| context | cells | controls | perturbations | median cells/perturbation |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {c['context']} | {c['cells']:,} | {c['controls']:,} | {c['perturbations']} | "
              f"{c['median_cells_per_perturbation']:.0f} |" for c in per_ctx]
    lines += ["", f"![gene means]({gene_mean_png.name})", "",
              f"![perturbation deltas]({delta_png.name})", "",
              f"![cells per perturbation]({cells_png.name})", ""]
    summary_md = out / "summary.md"
    summary_md.write_text("\n".join(lines))
    return StatisticsOutputs(gene_csv, gene_mean_png, delta_png, cells_png, summary_json,
                             summary_md, summary)
