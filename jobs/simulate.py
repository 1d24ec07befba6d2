#!/usr/bin/env python
"""Simulate a Perturb-seq dataset (the stand-in for Virtual Cell Challenge data).

    python jobs/simulate.py --preset tiny --out /tmp/sim_tiny
    python jobs/simulate.py --preset small --out /tmp/sim_small --seed 3 --set n_cells=20000
    python jobs/simulate.py --preset tiny --out /tmp/sim_ct --split-files-by cell_type

The model and every output format are described in ``vcc_dist/data/simulate.py``.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse
import dataclasses
import json

from vcc_dist.data.simulate import (
    FIELD_DOCS,
    SIM_PRESETS,
    SimConfig,
    parse_overrides,
    sim_config,
    simulate,
)


def _epilog() -> str:
    defaults = SimConfig()
    lines = [
        "outputs (in --out):",
        "  perturbseq.h5ad            raw counts (CSR), obs: target_gene guide_id batch cell_type",
        "                             (or perturbseq_<value>.h5ad with --split-files-by)",
        "  proteins.fasta             Ensembl-style peptide FASTA, 1-4 isoforms per gene",
        "  pert_features.pt           torch dict {gene_symbol: FloatTensor(feature_dim)}",
        "  split.toml                 STATE/cell-load split, one held-out (few-shot) context",
        "  pert_counts.csv            target_gene,n_cells,median_umi_per_cell (held-out test perts)",
        "  truth.npz, sim_config.json true parameters and the exact config",
        "",
        "presets (values that differ from the SimConfig defaults):",
    ]
    for name, kw in SIM_PRESETS.items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in kw.items()))
    lines += ["", "config keys for --set KEY=VALUE (default, meaning):"]
    for f in dataclasses.fields(SimConfig):
        default = getattr(defaults, f.name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        lines.append(f"  {f.name} (default {shown!r}): {FIELD_DOCS.get(f.name, '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Simulate a realistic CRISPRi Perturb-seq dataset with its split, features and FASTA.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="tiny", choices=sorted(SIM_PRESETS),
                    help="size preset (default: tiny)")
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, 0)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config key (repeatable); tuples are comma-separated")
    ap.add_argument("--split-files-by", choices=["cell_type", "batch"], default=None,
                    help="write one h5ad per cell type or batch instead of one file")
    ap.add_argument("--order", choices=["shuffled", "grouped"], default=None,
                    help="row order of the h5ad (default: shuffled, like real files)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    try:
        overrides = parse_overrides(args.overrides)
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.split_files_by is not None:
            overrides["split_files_by"] = args.split_files_by
        if args.order is not None:
            overrides["order"] = args.order
        cfg = sim_config(args.preset, **overrides)
    except ValueError as e:
        ap.error(str(e))

    out = simulate(cfg, args.out, progress=not args.no_progress)
    summary = {
        "out_dir": str(out.out_dir),
        "h5ad": [str(p) for p in out.h5ad_paths],
        "fasta": str(out.fasta_path),
        "pert_features": str(out.features_path),
        "split": str(out.split_path),
        "pert_counts": str(out.pert_counts_path),
        "truth": str(out.truth_path),
        "config": str(out.config_path),
        "n_cells": out.n_cells,
        "n_genes": out.n_genes,
        "nnz": out.nnz,
        "density": round(out.density, 4),
        "n_isoforms": out.n_isoforms,
        "heldout_context": out.heldout_context,
        "seconds": round(out.seconds, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
