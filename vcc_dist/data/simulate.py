"""Realistic Perturb-seq simulator: the stand-in for the Virtual Cell Challenge data.

Real VCC data cannot be downloaded here, so every part of vcc-dist is tested and demonstrated on
files written by this module. They have the layout of real files (a CRISPRi Perturb-seq h5ad with
raw UMI counts, an Ensembl-style peptide FASTA, STATE's perturbation-feature ``.pt`` and its
cell-load ``split.toml``) and a generative model rich enough that model quality differences mean
something: the "context-mean shift" baseline (target context's controls plus the perturbation's
mean effect in the other contexts) is strong but not perfect, because part of every effect is
modulated per context in a way that is shared across perturbations (learnable from the few-shot
perturbations of the held-out context) and part is idiosyncratic.

Generative model (all parameters drawn from ``config.seed``; see :class:`SimConfig` for the knobs)
------------------------------------------------------------------------------------------------
Genes ``g``, contexts (cell types) ``c``, batches ``b`` (nested in contexts), perturbations ``p``
(one target gene each), response modules ``m``, latent programs ``k``.

* Gene baseline: ``log w_g ~ N(0, gene_log_mean_sd)`` plus, for a ``high_expr_fraction`` of genes
  ("ribosomal/mitochondrial"), a ``+N(high_expr_shift, 1)`` bump; ``log p_g = log_softmax(log w)``
  is the relative expression. Heavy-tailed: the top 1% of genes take roughly a quarter of the UMIs.
* Dispersion: NB inverse overdispersion ``theta_g = theta_median * exp(theta_mean_slope * z_g +
  N(0, theta_sd))`` with ``z_g`` the standardised log mean (low-expressed genes are noisier).
* Contexts: ``logit_cg = log p_g + N(0, context_noise_sd)`` (dense) ``+ N(0, context_marker_sd)``
  on a ``context_marker_fraction`` of genes (sparse strong markers), plus the context's mean
  program activity. Each context has its own median library size (``context_library_sd``).
* Batches: small per-gene log factors ``N(0, batch_gene_sd)`` and a library-size scale
  (``batch_library_sd``).
* Latent programs (cell-to-cell heterogeneity): ``n_programs`` sparse gene loadings ``W_kg``
  (``program_gene_fraction`` of genes, ``N(0, program_loading_sd)``); each cell draws scores
  ``s_ik ~ N(0, 1)`` and gets ``s_i @ W`` added to its logits.
* Response modules: ``n_modules`` sparse gene sets (``module_gene_fraction``) with signed
  loadings ``L_mg`` (mostly one sign per module, magnitude ~``module_loading_scale``); responsive
  genes are drawn with a bias towards expressed genes (``response_expression_bias``), never among
  the very highly expressed ones.
* Gene function: every gene ``g`` has a latent function vector ``z_g`` (0 to ``max_modules_per_pert``
  non-zero signed module weights) and a strength ``s_g``: a ``near_null_fraction`` of targets are
  near-null (strength below ``near_null_max_strength``), the rest log-uniform in
  ``[strength_min, strength_max]`` (stratified over the targets, so every dataset spans the range). ``pert_features.pt`` is a noisy random projection of
  ``(z_g, log s_g)``, so a model that uses features can generalise to unseen perturbations.
* Effect of knocking down gene ``g_p`` in context ``c`` (a logit shift, ``effects`` in truth.npz)::

      D_pc = s_p * a_pc * ( sum_m z_pm * gain_cm * L^c_m  +  priv_p * mask_cp  +  (z_p @ B) @ W )

  ``gain_cm`` (``context_module_gain_sd``, lognormal) is shared by all perturbations in a context
  (the learnable context-specific modulation); ``L^c_m`` switches ``context_gene_switch_fraction``
  of a module's genes off in context ``c`` and adds as many context-only genes; ``priv_p`` is a
  handful of private genes (``private_gene_fraction``; per-context switches as above and a per-gene
  lognormal jitter of sd ``pert_context_gain_sd``); ``B`` maps modules onto latent programs
  (``program_shift_sd``: effects along the natural axes of variation); ``a_pc``
  (``pert_context_gain_sd``, lognormal) is idiosyncratic per (perturbation, context).
  ``D`` is soft-capped, ``D <- effect_max * tanh(D / effect_max)`` (at most ~20-fold by default),
  and entries below 1e-3 in magnitude are dropped (kept sparse). Strong perturbations also lower
  library size (``pert_library_sd``).
* Guides: 2-4 per target (``min_guides``..``max_guides``), knockdown efficiency
  ``U(guide_efficiency_min, guide_efficiency_max)``, escaper fraction
  ``U(escaper_fraction_min, escaper_fraction_max)`` per guide. An escaper cell has no knockdown and
  no downstream effect. Other cells: the target's rate is multiplied by
  ``(1 - efficiency) * exp(N(0, knockdown_cell_sd))`` (capped at 1) and ``D_pc`` is scaled by a
  per-cell response ``efficiency / mean efficiency * Gamma(mean 1, cv response_cv)``.
* Counts: ``mu_ig = L_i * softmax_g(logit_i)``, ``L_i = median_b * exp(N(0, library_size_sd))``,
  ``x_ig ~ NB(mu_ig, theta_g)`` (the Gamma-Poisson mixture; sampled exactly by inverse CDF for
  small means and by Gamma then Poisson for large ones), all float32 and vectorised.
* Cells: contexts get about equal shares of ``n_cells`` (exact total); in each context a
  ``control_fraction`` (jittered) are non-targeting controls, the rest go to the perturbations with
  Gamma(``cells_per_group_shape``) weights and at least ``min_cells_per_group`` each. Every
  perturbation is present in every context, the held-out one included (the split says which are
  train, val or test there). Guides and batches are drawn per cell.

Determinism: the same config gives byte-identical outputs. Randomness is drawn from independent
streams (model parameters, cell plan, one stream per chunk of :func:`chunk_rows` rows of cells
(~400k matrix entries: cache-sized, 16 rows at 18,080 genes), FASTA, features, split), so the
counts do not depend on ``block_rows`` (the write granularity) either.

Outputs (in ``out_dir``): ``perturbseq.h5ad`` (or ``perturbseq_<value>.h5ad`` per cell type or
batch), ``proteins.fasta``, ``pert_features.pt``, ``split.toml``, ``pert_counts.csv``,
``truth.npz`` and ``sim_config.json``; see :func:`simulate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem
from tqdm.auto import tqdm

from vcc_dist import config
from vcc_dist.constants import (
    BATCH_KEY,
    CONTEXT_KEY,
    CONTROL_LABEL,
    GENE_ID_KEY,
    GUIDE_KEY,
    PERT_KEY,
)

__all__ = [
    "FIELD_DOCS",
    "SIM_PRESETS",
    "CellPlan",
    "SimConfig",
    "SimModel",
    "SimOutputs",
    "build_model",
    "cell_barcodes",
    "chunk_rows",
    "gene_features",
    "iter_count_blocks",
    "load_sim_config",
    "load_truth",
    "make_split",
    "parse_overrides",
    "plan_cells",
    "sample_counts",
    "sim_config",
    "simulate",
    "truth_effects",
    "write_fasta",
]


#: Default context names (cell lines of the Replogle / STATE data), then ``ctx<i>``.
DEFAULT_CONTEXT_NAMES = ("k562", "rpe1", "jurkat", "hepg2", "hek293t", "h1")

H5AD_STEM = "perturbseq"
FASTA_NAME = "proteins.fasta"
FEATURES_NAME = "pert_features.pt"
SPLIT_NAME = "split.toml"
PERT_COUNTS_NAME = "pert_counts.csv"
TRUTH_NAME = "truth.npz"
CONFIG_NAME = "sim_config.json"

# True effects below this magnitude (log scale) are dropped (keeps them sparse; invisible anyway).
_EFFECT_FLOOR = 1e-3

# UniProt/Swiss-Prot amino-acid composition (percent).
_AA = "ARNDCQEGHILKMFPSTWYV"
_AA_FREQ = np.array(
    [8.25, 5.53, 4.06, 5.45, 1.37, 3.93, 6.75, 7.07, 2.27, 5.96,
     9.66, 5.84, 2.42, 3.86, 4.70, 6.56, 5.34, 1.08, 2.92, 6.87]
)

# Random-stream ids (spawn keys).
_S_MODEL, _S_PLAN, _S_CELLS, _S_FASTA, _S_FEATURES, _S_SPLIT = 1, 2, 3, 4, 5, 6

_X_DTYPES = ("float32", "float64", "int32", "int64")
_ORDERS = ("shuffled", "grouped")
_SPLIT_BY = ("", CONTEXT_KEY, BATCH_KEY)
_COMPRESSIONS = ("", "gzip", "lzf")


def chunk_rows(n_genes: int) -> int:
    """Rows of cells per random stream: counts of rows ``[j*R, (j+1)*R)`` come from stream ``j``
    alone, so any block size gives the same counts. ``R`` is the power of two nearest to 400k
    matrix entries (cache-sized numpy passes), clamped to [8, 256]: 16 at 18,080 genes."""
    return int(min(256, max(8, 2 ** round(math.log2(400_000 / n_genes)))))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

#: One line of documentation per config field (used by ``jobs/simulate.py --help``).
FIELD_DOCS: dict[str, str] = {
    "name": "preset name the config came from (provenance only)",
    "seed": "master random seed; same config -> byte-identical outputs",
    "n_cells": "exact number of cells over all contexts",
    "n_genes": "number of genes (columns)",
    "n_contexts": "number of cell contexts (cell types)",
    "n_perturbations": "number of perturbed target genes (each present in every context)",
    "n_batches_per_context": "technical batches per context (batch names are <context>_b<i>)",
    "context_names": "comma-separated context names (default: k562,rpe1,jurkat,hepg2,hek293t,h1,ctx6..)",
    "control_fraction": "mean fraction of non-targeting control cells per context",
    "cells_per_group_shape": "Gamma shape of the (context, perturbation) cell-count weights (lower = more variable)",
    "min_cells_per_group": "minimum cells per (context, perturbation) and per context's controls",
    "min_guides": "minimum guides per target",
    "max_guides": "maximum guides per target",
    "n_control_guides": "number of non-targeting guides",
    "guide_efficiency_min": "lower bound of per-guide knockdown efficiency",
    "guide_efficiency_max": "upper bound of per-guide knockdown efficiency",
    "escaper_fraction_min": "lower bound of per-guide escaper fraction (no knockdown, no effect)",
    "escaper_fraction_max": "upper bound of per-guide escaper fraction",
    "knockdown_cell_sd": "per-cell log-normal noise of the target's residual expression",
    "response_cv": "coefficient of variation of the per-cell downstream response",
    "library_size_median": "median UMIs per cell",
    "library_size_sd": "per-cell log-normal sd of library size",
    "context_library_sd": "log sd of per-context median library size",
    "batch_library_sd": "log sd of per-batch library-size scale",
    "gene_log_mean_sd": "sd of per-gene log relative expression (controls sparsity)",
    "high_expr_fraction": "fraction of very highly expressed genes",
    "high_expr_shift": "mean log shift of the very highly expressed genes",
    "theta_median": "median NB inverse overdispersion theta",
    "theta_sd": "log sd of theta around its mean trend",
    "theta_mean_slope": "slope of log theta on standardised log mean (>0: low-expressed genes noisier)",
    "context_noise_sd": "dense per-gene log shift sd between contexts",
    "context_marker_fraction": "fraction of genes that are strong markers of a context",
    "context_marker_sd": "log shift sd of context marker genes",
    "context_program_sd": "sd of per-context mean program activity",
    "batch_gene_sd": "per-gene log factor sd of a batch",
    "n_programs": "latent programs (cell-to-cell heterogeneity)",
    "program_gene_fraction": "fraction of genes loaded on each program",
    "program_loading_sd": "sd of program loadings",
    "n_modules": "response modules (gene sets triggered by perturbations)",
    "module_gene_fraction": "fraction of genes in each module",
    "module_loading_scale": "typical absolute loading of a module gene (log scale)",
    "response_expression_bias": "responsive genes drawn with weight exp(bias * standardised log mean)",
    "max_modules_per_pert": "maximum modules triggered by one perturbation (0..this)",
    "private_gene_fraction": "fraction of genes hit privately by a perturbation",
    "private_effect_sd": "sd of private effects (log scale)",
    "program_shift_sd": "sd of the module -> latent-program coupling (effects along programs)",
    "near_null_fraction": "fraction of perturbations with near-null downstream effects",
    "near_null_max_strength": "strength upper bound of near-null perturbations",
    "strength_min": "lower bound of (log-uniform) perturbation strength",
    "strength_max": "upper bound of (log-uniform) perturbation strength",
    "context_module_gain_sd": "log sd of per-(context, module) effect gain (learnable modulation)",
    "context_gene_switch_fraction": "fraction of module/private genes switched off (and added) per context",
    "pert_context_gain_sd": "log sd of per-(perturbation, context) effect gain (idiosyncratic)",
    "pert_library_sd": "sd of perturbation effect on log library size (scaled by strength)",
    "effect_max": "soft cap on |effect| (log scale): D <- effect_max * tanh(D / effect_max)",
    "target_rank_min": "targets are drawn among genes with expression rank in [min, max) (fractions)",
    "target_rank_max": "see target_rank_min",
    "feature_dim": "dimension of pert_features.pt vectors",
    "feature_noise_sd": "noise sd of the features relative to their signal",
    "protein_length_median": "median canonical protein length (residues)",
    "protein_length_max": "maximum protein length (residues)",
    "max_isoforms": "maximum protein isoforms per gene (1..this)",
    "fasta_missing_fraction": "fraction of genes with no protein in the FASTA",
    "heldout_context": "held-out context of the split ('' = last context)",
    "n_fewshot": "perturbations seen in the held-out context (training)",
    "n_val": "validation perturbations in the held-out context (rest are test)",
    "dataset_name": "dataset name used in split.toml",
    "x_dtype": "dtype of X: float32 (integer-valued, default), float64, int32, int64",
    "order": "row order: shuffled (like real files) or grouped (by context, perturbation, batch, guide)",
    "split_files_by": "'' for one file, or cell_type / batch for one h5ad per value",
    "block_rows": "rows per write to the h5ad (bounds memory; does not change contents)",
    "compression": "h5py compression of X: '' (none), gzip or lzf",
}


@dataclass(frozen=True)
class SimConfig:
    """Complete, validated simulator configuration (see the module docstring for the model)."""

    name: str = "custom"
    seed: int = 0
    # --- sizes ---
    n_cells: int = 1500
    n_genes: int = 200
    n_contexts: int = 3
    n_perturbations: int = 12
    n_batches_per_context: int = 2
    context_names: tuple[str, ...] = ()
    # --- cell composition and guides ---
    control_fraction: float = 0.15
    cells_per_group_shape: float = 4.0
    min_cells_per_group: int = 5
    min_guides: int = 2
    max_guides: int = 4
    n_control_guides: int = 8
    guide_efficiency_min: float = 0.60
    guide_efficiency_max: float = 0.95
    escaper_fraction_min: float = 0.05
    escaper_fraction_max: float = 0.15
    knockdown_cell_sd: float = 0.25
    response_cv: float = 0.3
    # --- expression ---
    library_size_median: float = 2000.0
    library_size_sd: float = 0.35
    context_library_sd: float = 0.15
    batch_library_sd: float = 0.08
    gene_log_mean_sd: float = 1.5
    high_expr_fraction: float = 0.01
    high_expr_shift: float = 2.5
    theta_median: float = 4.0
    theta_sd: float = 0.5
    theta_mean_slope: float = 0.3
    context_noise_sd: float = 0.15
    context_marker_fraction: float = 0.05
    context_marker_sd: float = 1.5
    context_program_sd: float = 0.3
    batch_gene_sd: float = 0.05
    n_programs: int = 6
    program_gene_fraction: float = 0.05
    program_loading_sd: float = 0.3
    # --- perturbation effects ---
    n_modules: int = 6
    module_gene_fraction: float = 0.03
    module_loading_scale: float = 0.8
    response_expression_bias: float = 0.7
    max_modules_per_pert: int = 3
    private_gene_fraction: float = 0.005
    private_effect_sd: float = 0.6
    program_shift_sd: float = 0.3
    near_null_fraction: float = 0.18
    near_null_max_strength: float = 0.03
    strength_min: float = 0.1
    strength_max: float = 2.0
    context_module_gain_sd: float = 0.35
    context_gene_switch_fraction: float = 0.1
    pert_context_gain_sd: float = 0.15
    pert_library_sd: float = 0.1
    effect_max: float = 3.0
    target_rank_min: float = 0.01
    target_rank_max: float = 0.4
    # --- gene features and proteins ---
    feature_dim: int = 64
    feature_noise_sd: float = 0.7
    protein_length_median: int = 380
    protein_length_max: int = 1500
    max_isoforms: int = 4
    fasta_missing_fraction: float = 0.0
    # --- split ---
    heldout_context: str = ""
    n_fewshot: int = 3
    n_val: int = 2
    dataset_name: str = "sim"
    # --- output ---
    x_dtype: str = "float32"
    order: str = "shuffled"
    split_files_by: str = ""
    block_rows: int = 2048
    compression: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.context_names, list):
            object.__setattr__(self, "context_names", tuple(self.context_names))
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            t = hints[f.name]
            if t is int and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                _bad(f.name, v, "must be an integer")
            if t is float and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))):
                _bad(f.name, v, "must be a number")
            if t is float and not math.isfinite(float(v)):
                _bad(f.name, v, "must be finite")
            if t is str and not isinstance(v, str):
                _bad(f.name, v, "must be a string")
        for name in ("n_cells", "n_genes", "n_contexts", "n_perturbations", "n_batches_per_context",
                     "min_cells_per_group", "min_guides", "n_control_guides", "feature_dim",
                     "protein_length_median", "protein_length_max", "max_isoforms", "block_rows"):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "must be >= 1")
        for name in ("n_programs", "n_modules", "max_modules_per_pert", "n_fewshot", "n_val", "seed"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        for name in ("response_expression_bias", "library_size_sd", "context_library_sd", "batch_library_sd", "gene_log_mean_sd",
                     "theta_sd", "context_noise_sd", "context_marker_sd", "context_program_sd",
                     "batch_gene_sd", "program_loading_sd", "private_effect_sd", "program_shift_sd",
                     "context_module_gain_sd", "pert_context_gain_sd", "pert_library_sd",
                     "knockdown_cell_sd", "feature_noise_sd", "high_expr_shift", "response_cv"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        for name in ("control_fraction",):
            if not 0 < getattr(self, name) < 0.9:
                _bad(name, getattr(self, name), "must be in (0, 0.9)")
        for name in ("high_expr_fraction", "context_marker_fraction", "program_gene_fraction",
                     "module_gene_fraction", "private_gene_fraction", "near_null_fraction",
                     "context_gene_switch_fraction", "fasta_missing_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                _bad(name, getattr(self, name), "must be in [0, 1]")
        if self.n_genes < 20:
            _bad("n_genes", self.n_genes, "must be >= 20 (modules, markers and targets need room)")
        if self.n_genes > 9_999_999:
            _bad("n_genes", self.n_genes, "must be < 10,000,000 (gene id width)")
        if self.n_perturbations > int((self.target_rank_max - self.target_rank_min) * self.n_genes):
            _bad("n_perturbations", self.n_perturbations,
                 f"must be <= (target_rank_max - target_rank_min) * n_genes = "
                 f"{int((self.target_rank_max - self.target_rank_min) * self.n_genes)}; "
                 "raise n_genes or widen the target rank window")
        if not 0 <= self.target_rank_min < self.target_rank_max <= 1:
            _bad("target_rank_min", (self.target_rank_min, self.target_rank_max),
                 "need 0 <= target_rank_min < target_rank_max <= 1")
        if self.max_guides < self.min_guides:
            _bad("max_guides", self.max_guides, f"must be >= min_guides={self.min_guides}")
        if not 0 < self.guide_efficiency_min <= self.guide_efficiency_max < 1:
            _bad("guide_efficiency_min", (self.guide_efficiency_min, self.guide_efficiency_max),
                 "need 0 < guide_efficiency_min <= guide_efficiency_max < 1")
        if not 0 <= self.escaper_fraction_min <= self.escaper_fraction_max < 1:
            _bad("escaper_fraction_min", (self.escaper_fraction_min, self.escaper_fraction_max),
                 "need 0 <= escaper_fraction_min <= escaper_fraction_max < 1")
        if not 0 < self.strength_min <= self.strength_max:
            _bad("strength_min", (self.strength_min, self.strength_max),
                 "need 0 < strength_min <= strength_max")
        if not 0 <= self.near_null_max_strength < self.strength_min:
            _bad("near_null_max_strength", self.near_null_max_strength,
                 f"must be in [0, strength_min={self.strength_min})")
        if self.library_size_median < 10:
            _bad("library_size_median", self.library_size_median, "must be >= 10")
        if self.theta_median <= 0:
            _bad("theta_median", self.theta_median, "must be > 0")
        if self.effect_max <= 0:
            _bad("effect_max", self.effect_max, "must be > 0")
        if self.module_loading_scale <= 0:
            _bad("module_loading_scale", self.module_loading_scale, "must be > 0")
        if self.cells_per_group_shape <= 0:
            _bad("cells_per_group_shape", self.cells_per_group_shape, "must be > 0")
        if self.protein_length_max < 50 or self.protein_length_median > self.protein_length_max:
            _bad("protein_length_max", self.protein_length_max,
                 f"must be >= 50 and >= protein_length_median={self.protein_length_median}")
        if self.context_names:
            if len(self.context_names) != self.n_contexts:
                _bad("context_names", self.context_names,
                     f"needs exactly n_contexts={self.n_contexts} names")
            if len(set(self.context_names)) != len(self.context_names):
                _bad("context_names", self.context_names, "names must be unique")
            for n in self.context_names:
                if not isinstance(n, str) or not n or not all(ch.isalnum() or ch in "_-" for ch in n):
                    _bad("context_names", self.context_names,
                         "names must be non-empty and use only letters, digits, '_' and '-' "
                         "(they become file names and split.toml keys)")
        names = self.contexts()
        if self.heldout_context and self.heldout_context not in names:
            _bad("heldout_context", self.heldout_context, f"must be one of {list(names)} (or '' for the last)")
        if self.n_fewshot + self.n_val >= self.n_perturbations:
            _bad("n_fewshot", self.n_fewshot,
                 f"n_fewshot + n_val must be < n_perturbations={self.n_perturbations} "
                 "so that at least one test perturbation remains")
        if self.x_dtype not in _X_DTYPES:
            _bad("x_dtype", self.x_dtype, f"must be one of {list(_X_DTYPES)}")
        if self.order not in _ORDERS:
            _bad("order", self.order, f"must be one of {list(_ORDERS)}")
        if self.split_files_by not in _SPLIT_BY:
            _bad("split_files_by", self.split_files_by, f"must be one of {list(_SPLIT_BY)}")
        if self.compression not in _COMPRESSIONS:
            _bad("compression", self.compression, f"must be one of {list(_COMPRESSIONS)}")
        if not self.dataset_name or not all(ch.isalnum() or ch in "_-" for ch in self.dataset_name):
            _bad("dataset_name", self.dataset_name, "must be non-empty letters, digits, '_' or '-'")
        # every group needs its minimum number of cells
        need = self.n_contexts * (self.n_perturbations + 1) * self.min_cells_per_group
        if self.n_cells < need:
            _bad("n_cells", self.n_cells,
                 f"must be >= n_contexts * (n_perturbations + 1) * min_cells_per_group = {need}; "
                 "raise n_cells or lower min_cells_per_group")

    # --- derived names ---
    def contexts(self) -> tuple[str, ...]:
        """Context (cell type) names, in context-index order."""
        if self.context_names:
            return tuple(self.context_names)
        names = list(DEFAULT_CONTEXT_NAMES[: self.n_contexts])
        names += [f"ctx{i}" for i in range(len(names), self.n_contexts)]
        return tuple(names)

    def heldout(self) -> str:
        """The held-out context's name."""
        return self.heldout_context or self.contexts()[-1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> SimConfig:
        """Inverse of :func:`dataclasses.asdict` (also accepts JSON-decoded dicts)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SimConfig: unknown keys {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        if "context_names" in d:
            d["context_names"] = tuple(d["context_names"])
        return cls(**d)


def _bad(key: str, value, fix: str) -> typing.NoReturn:
    raise ValueError(f"SimConfig.{key}={value!r}: {fix}")


SIM_PRESETS: dict[str, dict] = {
    # ~1 s; used by almost every test of the project.
    "tiny": dict(
        n_cells=1500, n_genes=200, n_contexts=3, n_perturbations=12, n_batches_per_context=2,
        library_size_median=2000.0, n_programs=4, n_modules=6, n_fewshot=3, n_val=2,
        n_control_guides=4, block_rows=512, module_gene_fraction=0.05,
    ),
    "small": dict(
        n_cells=15000, n_genes=2000, n_contexts=4, n_perturbations=40, n_batches_per_context=3,
        library_size_median=5000.0, n_programs=6, n_modules=12, n_fewshot=8, n_val=6,
        n_control_guides=8,
    ),
    # Same genes, perturbations and block size as vcc (same peak memory), 11x fewer cells.
    "medium": dict(
        n_cells=20000, n_genes=18080, n_contexts=4, n_perturbations=150, n_batches_per_context=6,
        library_size_median=45000.0, n_programs=8, n_modules=30, n_fewshot=30, n_val=30,
        n_control_guides=20, min_cells_per_group=3,
    ),
    # The Virtual Cell Challenge training file's size.
    "vcc": dict(
        n_cells=221273, n_genes=18080, n_contexts=4, n_perturbations=150, n_batches_per_context=6,
        library_size_median=45000.0, n_programs=8, n_modules=30, n_fewshot=30, n_val=30,
        n_control_guides=20,
    ),
}


def sim_config(preset: str = "tiny", **overrides) -> SimConfig:
    """The named preset's config with ``overrides`` applied (validated)."""
    if preset not in SIM_PRESETS:
        raise ValueError(f"unknown simulator preset {preset!r}; valid presets: {sorted(SIM_PRESETS)}")
    known = {f.name for f in dataclasses.fields(SimConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown SimConfig keys {unknown}; valid keys: {sorted(known)}")
    kw = dict(SIM_PRESETS[preset])
    kw["name"] = preset
    kw.update(overrides)
    return SimConfig(**kw)


def parse_overrides(pairs: Sequence[str]) -> dict:
    """Parse ``["key=value", ...]`` into typed SimConfig overrides (for command lines): the
    project's one override parser (vcc_dist.config.parse_overrides, keys checked against
    SimConfig), then each value coerced to its field's type (``1_000`` is an int, ``a,b`` a
    tuple)."""
    hints = typing.get_type_hints(SimConfig)
    out = config.parse_overrides(list(pairs), SimConfig)
    for key, v in out.items():
        t = hints[key]
        raw = v if isinstance(v, str) else json.dumps(v)
        try:
            if t is int:
                val = int(raw.replace("_", "")) if isinstance(v, str) else int(v)
            elif t is float:
                val = float(raw) if isinstance(v, str) else float(v)
            elif t is str:
                val = raw if isinstance(v, str) else str(v)
            else:  # tuple[str, ...]
                val = (tuple(s.strip() for s in v.split(",") if s.strip()) if isinstance(v, str)
                       else tuple(str(x) for x in v))
        except (TypeError, ValueError):
            raise ValueError(f"SimConfig.{key}={raw!r}: cannot parse as {getattr(t, '__name__', t)}") from None
        out[key] = val
    return out


# --------------------------------------------------------------------------------------------
# Model parameters
# --------------------------------------------------------------------------------------------


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _gene_names(n: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(5, len(str(n)))
    symbols = np.array([f"GENE{i + 1:0{w}d}" for i in range(n)])
    ids = np.array([f"ENSG{i + 1:011d}" for i in range(n)])
    return symbols, ids


@dataclass
class SimModel:
    """All true parameters of one simulated dataset (built by :func:`build_model`)."""

    config: SimConfig
    gene_symbols: np.ndarray  # (G,) str
    gene_ids: np.ndarray  # (G,) str, Ensembl-like, no version
    contexts: tuple[str, ...]
    batch_names: np.ndarray  # (nB,) str, "<context>_b<i>"
    batch_context: np.ndarray  # (nB,) int
    log_p: np.ndarray  # (G,) float32 baseline log relative expression
    theta: np.ndarray  # (G,) float32 NB inverse overdispersion
    context_logit: np.ndarray  # (C, G) float32 basal logits per context (no batch)
    batch_logit: np.ndarray  # (nB, G) float32 basal logits per batch (context + batch factor)
    batch_log_library: np.ndarray  # (nB,) float32 log median library size
    program_loadings: np.ndarray  # (K, G) float32
    gene_module_weights: np.ndarray  # (G, M) float32 latent gene function
    gene_strength: np.ndarray  # (G,) float32
    context_module_gain: np.ndarray  # (C, M) float32
    pert_gene: np.ndarray  # (P,) int gene index of each target
    pert_near_null: np.ndarray  # (P,) bool
    pert_context_gain: np.ndarray  # (P, C) float32
    pert_library_shift: np.ndarray  # (P,) float32 log library shift (full response)
    effects: sp.csr_matrix  # (P*C, G) float32 logit shift, row p*C + c (excludes the knockdown)
    guide_ids: np.ndarray  # (nGuides,) str; controls last
    guide_pert: np.ndarray  # (nGuides,) int; -1 for controls
    guide_efficiency: np.ndarray  # (nGuides,) float32; 0 for controls
    guide_escape: np.ndarray  # (nGuides,) float32; 0 for controls
    pert_guides: list  # per perturbation: array of guide indices
    control_guides: np.ndarray  # guide indices of the non-targeting guides

    @property
    def pert_symbols(self) -> np.ndarray:
        return self.gene_symbols[self.pert_gene]

    @property
    def n_perts(self) -> int:
        return len(self.pert_gene)


def build_model(config: SimConfig) -> SimModel:
    """Draw every true parameter of the dataset from ``config`` (deterministic)."""
    cfg = config
    rng = _rng(cfg.seed, _S_MODEL)
    G, C, P, K, M = cfg.n_genes, cfg.n_contexts, cfg.n_perturbations, cfg.n_programs, cfg.n_modules
    f32 = np.float32
    symbols, ids = _gene_names(G)
    contexts = cfg.contexts()

    # --- gene baseline and dispersion ---
    log_w = rng.normal(0.0, cfg.gene_log_mean_sd, G)
    hi = rng.random(G) < cfg.high_expr_fraction
    log_w[hi] += rng.normal(cfg.high_expr_shift, 1.0, int(hi.sum()))
    log_p = log_w - _logsumexp(log_w)
    z = (log_w - log_w.mean()) / (log_w.std() + 1e-12)
    theta = cfg.theta_median * np.exp(cfg.theta_mean_slope * z + rng.normal(0.0, cfg.theta_sd, G))
    theta = np.clip(theta, 0.2, 500.0)

    # --- latent programs ---
    W = np.zeros((K, G))
    for k in range(K):
        on = rng.random(G) < cfg.program_gene_fraction
        W[k, on] = rng.normal(0.0, cfg.program_loading_sd, int(on.sum()))

    # --- contexts ---
    ctx_logit = np.empty((C, G))
    for c in range(C):
        shift = rng.normal(0.0, cfg.context_noise_sd, G)
        mk = rng.random(G) < cfg.context_marker_fraction
        shift[mk] += rng.normal(0.0, cfg.context_marker_sd, int(mk.sum()))
        prog_mean = rng.normal(0.0, cfg.context_program_sd, K)
        ctx_logit[c] = log_p + shift + prog_mean @ W
    ctx_log_lib = math.log(cfg.library_size_median) + rng.normal(0.0, cfg.context_library_sd, C)

    # --- batches (nested in contexts) ---
    nb = cfg.n_batches_per_context
    batch_names = np.array([f"{contexts[c]}_b{j + 1}" for c in range(C) for j in range(nb)])
    batch_context = np.repeat(np.arange(C), nb)
    batch_logit = ctx_logit[batch_context] + rng.normal(0.0, cfg.batch_gene_sd, (C * nb, G))
    batch_log_lib = ctx_log_lib[batch_context] + rng.normal(0.0, cfg.batch_library_sd, C * nb)

    # --- response modules ---
    # Responsive genes are drawn with a bias towards expressed genes (as detectable DE genes are).
    # The very highly expressed genes (ribosomal/mitochondrial-like) are not in response sets: a
    # 10-fold change of a gene holding 10% of the UMIs would rescale the whole transcriptome.
    resp_w = np.exp(cfg.response_expression_bias * np.clip(z, -3.0, 3.0))
    resp_w[hi] = 0.0
    resp_w /= resp_w.sum()
    mod_genes, mod_load = [], []
    for m in range(M):
        size = max(3, int(rng.binomial(G, cfg.module_gene_fraction)))
        genes = np.sort(rng.choice(G, size=size, replace=False, p=resp_w))
        sign = rng.choice([-1.0, 1.0])
        mag = cfg.module_loading_scale * np.exp(rng.normal(0.0, 0.4, size))
        flip = np.where(rng.random(size) < 0.2, -1.0, 1.0)
        mod_genes.append(genes)
        mod_load.append(sign * flip * mag)
    # module -> program coupling (effects along the natural axes of variation)
    B = np.where(rng.random((M, K)) < 0.3, rng.normal(0.0, cfg.program_shift_sd, (M, K)), 0.0)

    # --- latent gene function (every gene, so features exist for every gene) ---
    gz = np.zeros((G, M))
    if M > 0 and cfg.max_modules_per_pert > 0:
        kmax = min(cfg.max_modules_per_pert, M)
        probs = np.array([0.10, 0.40, 0.35, 0.15] + [0.05] * max(0, kmax - 3))[: kmax + 1]
        probs /= probs.sum()
        n_mod = rng.choice(len(probs), size=G, p=probs)
        picks = np.argsort(rng.random((G, M)), axis=1)[:, :kmax]  # distinct modules per gene
        w = rng.choice([-1.0, 1.0], size=(G, kmax)) * np.exp(rng.normal(0.0, 0.3, (G, kmax)))
        w[np.arange(kmax)[None, :] >= n_mod[:, None]] = 0.0
        np.put_along_axis(gz, picks, w, axis=1)
    log_s = rng.uniform(math.log(cfg.strength_min), math.log(cfg.strength_max), G)
    strength = np.exp(log_s)

    # --- perturbation targets among reasonably expressed genes ---
    order = np.argsort(-log_p, kind="stable")
    lo = int(math.floor(cfg.target_rank_min * G))
    hi_r = max(lo + P, int(math.ceil(cfg.target_rank_max * G)))
    pert_gene = np.sort(rng.choice(order[lo:hi_r], size=P, replace=False))
    n_null = int(round(cfg.near_null_fraction * P))
    if cfg.near_null_fraction > 0:
        n_null = max(1, n_null)
    near_null = np.zeros(P, bool)
    near_null[rng.choice(P, size=n_null, replace=False)] = True
    strength[pert_gene[near_null]] = rng.uniform(0.0, cfg.near_null_max_strength, n_null)
    # the others: stratified log-uniform, so every dataset spans weak to strong evenly
    n_act = P - n_null
    strata = (rng.permutation(n_act) + rng.random(n_act)) / max(n_act, 1)
    lo_s, hi_s = math.log(cfg.strength_min), math.log(cfg.strength_max)
    strength[pert_gene[~near_null]] = np.exp(lo_s + strata * (hi_s - lo_s))

    # --- context modulation ---
    ctx_mod_gain = np.exp(rng.normal(0.0, cfg.context_module_gain_sd, (C, M)))
    pert_ctx_gain = np.exp(rng.normal(0.0, cfg.pert_context_gain_sd, (P, C)))
    # per-context module loadings L^c (genes switched off, context-only genes added)
    Lc = np.zeros((C, M, G))
    for m in range(M):
        genes, load = mod_genes[m], mod_load[m]
        n_extra = int(rng.binomial(len(genes), cfg.context_gene_switch_fraction))
        for c in range(C):
            keep = rng.random(len(genes)) >= cfg.context_gene_switch_fraction
            Lc[c, m, genes[keep]] = load[keep]
            if n_extra:
                extra = rng.choice(G, size=n_extra, replace=False, p=resp_w)
                ext = extra[Lc[c, m, extra] == 0]
                Lc[c, m, ext] = rng.choice(load, size=len(ext)) * rng.choice([-1.0, 1.0], size=len(ext))
    # private genes per perturbation
    priv = np.zeros((P, G))
    for p in range(P):
        n_priv = 1 + int(rng.binomial(G, cfg.private_gene_fraction))
        genes = rng.choice(G, size=n_priv, replace=False, p=resp_w)
        priv[p, genes] = rng.normal(0.0, cfg.private_effect_sd, n_priv)

    zp = gz[pert_gene]  # (P, M)
    sp_ = strength[pert_gene]  # (P,)
    prog_shift = zp @ B  # (P, K)
    rows = []
    for c in range(C):
        mask = rng.random((P, G)) >= cfg.context_gene_switch_fraction
        jitter = np.exp(rng.normal(0.0, cfg.pert_context_gain_sd, (P, G)))  # per-gene private jitter
        d = (zp * ctx_mod_gain[c]) @ Lc[c] + priv * mask * jitter + prog_shift @ W
        d *= (sp_ * pert_ctx_gain[:, c])[:, None]
        d = cfg.effect_max * np.tanh(d / cfg.effect_max)  # soft cap: products of lognormals have long tails
        rows.append(d.astype(f32))
    # rows ordered p*C + c
    D = np.stack(rows, axis=1).reshape(P * C, G)
    D[np.abs(D) < _EFFECT_FLOOR] = 0.0
    effects = sp.csr_matrix(D)
    effects.eliminate_zeros()
    del D, rows, Lc
    pert_lib = -sp_ * np.abs(rng.normal(0.0, cfg.pert_library_sd, P))

    # --- guides ---
    guide_ids, guide_pert, eff, esc, pert_guides = [], [], [], [], []
    for p in range(P):
        ng = int(rng.integers(cfg.min_guides, cfg.max_guides + 1))
        start = len(guide_ids)
        for j in range(ng):
            guide_ids.append(f"{symbols[pert_gene[p]]}_g{j + 1}")
            guide_pert.append(p)
        eff.extend(rng.uniform(cfg.guide_efficiency_min, cfg.guide_efficiency_max, ng))
        esc.extend(rng.uniform(cfg.escaper_fraction_min, cfg.escaper_fraction_max, ng))
        pert_guides.append(np.arange(start, start + ng))
    start = len(guide_ids)
    for j in range(cfg.n_control_guides):
        guide_ids.append(f"{CONTROL_LABEL}_{j + 1:03d}")
        guide_pert.append(-1)
        eff.append(0.0)
        esc.append(0.0)

    return SimModel(
        config=cfg,
        gene_symbols=symbols,
        gene_ids=ids,
        contexts=contexts,
        batch_names=batch_names,
        batch_context=batch_context,
        log_p=log_p.astype(f32),
        theta=theta.astype(f32),
        context_logit=ctx_logit.astype(f32),
        batch_logit=batch_logit.astype(f32),
        batch_log_library=batch_log_lib.astype(f32),
        program_loadings=W.astype(f32),
        gene_module_weights=gz.astype(f32),
        gene_strength=strength.astype(f32),
        context_module_gain=ctx_mod_gain.astype(f32),
        pert_gene=pert_gene.astype(np.int64),
        pert_near_null=near_null,
        pert_context_gain=pert_ctx_gain.astype(f32),
        pert_library_shift=pert_lib.astype(f32),
        effects=effects,
        guide_ids=np.array(guide_ids),
        guide_pert=np.array(guide_pert, dtype=np.int64),
        guide_efficiency=np.array(eff, dtype=f32),
        guide_escape=np.array(esc, dtype=f32),
        pert_guides=pert_guides,
        control_guides=np.arange(start, len(guide_ids)),
    )


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + math.log(float(np.exp(x - m).sum()))


# --------------------------------------------------------------------------------------------
# Cell plan (labels of every cell; small integer arrays)
# --------------------------------------------------------------------------------------------


@dataclass
class CellPlan:
    """Labels of every cell, in file row order."""

    context: np.ndarray  # (n,) int16 context index
    pert: np.ndarray  # (n,) int32 perturbation index, -1 = control
    batch: np.ndarray  # (n,) int32 global batch index
    guide: np.ndarray  # (n,) int32 global guide index
    escaper: np.ndarray  # (n,) bool

    @property
    def n_cells(self) -> int:
        return len(self.context)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing exactly to ``total``, proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, float)
    q = total * w / w.sum()
    n = np.floor(q).astype(np.int64)
    rem = total - int(n.sum())
    if rem > 0:
        n[np.argsort(-(q - n), kind="stable")[:rem]] += 1
    return n


def plan_cells(config: SimConfig, model: SimModel) -> CellPlan:
    """Assign every cell its context, perturbation, guide, batch and escaper flag (deterministic)."""
    cfg = config
    rng = _rng(cfg.seed, _S_PLAN)
    C, P, nb, mn = cfg.n_contexts, cfg.n_perturbations, cfg.n_batches_per_context, cfg.min_cells_per_group
    n_ctx = _apportion(cfg.n_cells - C * (P + 1) * mn, np.exp(rng.normal(0.0, 0.1, C))) + (P + 1) * mn
    ctx_l, pert_l, batch_l, guide_l = [], [], [], []
    for c in range(C):
        n_c = int(n_ctx[c])
        frac = cfg.control_fraction * math.exp(rng.normal(0.0, 0.1))
        n_ctrl = int(np.clip(round(frac * n_c), mn, n_c - P * mn))
        n_pert = mn + _apportion(n_c - n_ctrl - P * mn, rng.gamma(cfg.cells_per_group_shape, 1.0, P))
        counts = np.concatenate([[n_ctrl], n_pert])
        labels = np.repeat(np.arange(-1, P), counts)
        batch_w = rng.dirichlet(np.full(nb, 10.0))
        ctx_l.append(np.full(n_c, c, np.int16))
        pert_l.append(labels.astype(np.int32))
        batch_l.append((c * nb + rng.choice(nb, size=n_c, p=batch_w)).astype(np.int32))
        g = np.empty(n_c, np.int32)
        for p in range(-1, P):
            sel = labels == p
            pool = model.control_guides if p < 0 else model.pert_guides[p]
            gw = rng.dirichlet(np.full(len(pool), 5.0))
            g[sel] = pool[rng.choice(len(pool), size=int(sel.sum()), p=gw)]
        guide_l.append(g)
    context = np.concatenate(ctx_l)
    pert = np.concatenate(pert_l)
    batch = np.concatenate(batch_l)
    guide = np.concatenate(guide_l)
    escaper = rng.random(len(guide)) < model.guide_escape[guide]
    if cfg.order == "grouped":
        perm = np.lexsort((guide, batch, pert, context))
    else:
        perm = rng.permutation(len(guide))
    return CellPlan(context[perm], pert[perm], batch[perm], guide[perm], escaper[perm])


def cell_barcodes(n: int, seed: int = 0) -> np.ndarray:
    """``n`` unique 10x-like barcodes ``<16 x ACGT>-1`` (a bijective 32-bit hash of the row number)."""
    if n > 2**32:
        raise ValueError(f"at most 2**32 barcodes, asked for {n}")
    m32 = np.uint64(0xFFFFFFFF)
    x = (np.arange(n, dtype=np.uint64) + np.uint64((0x6A09E667 + seed * 0x9E3779B9) & 0xFFFFFFFF)) & m32
    # murmur3 finaliser: every step is a bijection on 32-bit words
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x85EBCA6B)) & m32
    x ^= x >> np.uint64(13)
    x = (x * np.uint64(0xC2B2AE35)) & m32
    x ^= x >> np.uint64(16)
    shifts = np.arange(15, -1, -1, dtype=np.uint64) * np.uint64(2)
    codes = ((x[:, None] >> shifts[None, :]) & np.uint64(3)).astype(np.uint8)
    letters = np.ascontiguousarray(np.frombuffer(b"ACGT", dtype=np.uint8)[codes])
    return np.char.add(letters.view("S16").ravel().astype(str), "-1")


# --------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------


def _nb_sample(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray,
               mu_cut: float = 16.0, dense_steps: int = 6) -> np.ndarray:
    """Exact NB(mu, theta) samples for a (n, G) float32 mean matrix; theta is per column.

    Small means (<= mu_cut): inverse CDF from one uniform per entry (zeros cost one comparison;
    the first ``dense_steps`` counts are resolved without compaction, the tail with it). Larger
    means: the Gamma-Poisson mixture. Returns int32 (n, G).

    (Boolean-mask indexing is ~10x slower than ``flatnonzero`` + ``take`` in numpy, hence the
    index arrays everywhere.)
    """
    n, G = mu.shape
    N = mu.size
    flat_mu = mu.reshape(-1)
    th = np.broadcast_to(theta, (n, G)).reshape(-1)
    u = rng.random(N, dtype=np.float32)
    out = np.zeros(N, dtype=np.int32)
    p = flat_mu / th
    np.log1p(p, out=p)
    p *= -th
    np.exp(p, out=p)  # P(X = 0)
    small = flat_mu <= np.float32(mu_cut)
    nz = u >= p
    nz &= small
    idx = np.flatnonzero(nz)
    if idx.size:
        uu = u.take(idx)
        pp = p.take(idx)
        cdf = pp.copy()
        tt = th.take(idx)
        q = flat_mu.take(idx)
        q /= q + tt
        cnt = np.ones(idx.size, np.int32)
        tmp = np.empty_like(pp)
        for k in range(dense_steps):
            # P(k+1) = P(k) * q * (k + theta) / (k + 1)
            np.add(tt, np.float32(k), out=tmp)
            tmp *= q
            tmp *= np.float32(1.0 / (k + 1))
            pp *= tmp
            cdf += pp
            if k + 1 < dense_steps:
                cnt += uu >= cdf
        out[idx] = cnt
        sel = np.flatnonzero(uu >= cdf)
        k = dense_steps
        while sel.size:
            idx, uu, pp, cdf, q, tt = (a.take(sel) for a in (idx, uu, pp, cdf, q, tt))
            pp *= q * ((k + tt) * np.float32(1.0 / (k + 1)))
            cdf += pp
            k += 1
            done = uu < cdf
            done |= pp < 1e-30  # float32 round-off guard far in the tail
            out[idx[done]] = k
            sel = np.flatnonzero(~done)
    np.logical_not(small, out=small)
    big = np.flatnonzero(small)
    if big.size:
        t = th.take(big)
        out[big] = rng.poisson(rng.standard_gamma(t) * (flat_mu.take(big) / t))
    return out.reshape(n, G)


def _chunk_counts(model: SimModel, plan: CellPlan, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts of row chunk ``j`` as CSR pieces ``(indptr, indices, counts, totals)``."""
    cfg = model.config
    f32 = np.float32
    R = chunk_rows(cfg.n_genes)
    r0, r1 = j * R, min((j + 1) * R, plan.n_cells)
    n = r1 - r0
    G = cfg.n_genes
    C = cfg.n_contexts
    rng = _rng(cfg.seed, _S_CELLS, j)
    ctx = plan.context[r0:r1].astype(np.int64)
    pert = plan.pert[r0:r1].astype(np.int64)
    batch = plan.batch[r0:r1]
    guide = plan.guide[r0:r1]
    resp = (pert >= 0) & ~plan.escaper[r0:r1]

    # draws (fixed order)
    scores = rng.standard_normal((n, cfg.n_programs), dtype=f32)
    lib_noise = rng.standard_normal(n, dtype=f32)
    shape = 1.0 / max(cfg.response_cv, 1e-6) ** 2
    gam = rng.standard_gamma(shape, n).astype(f32) / f32(shape) if cfg.response_cv > 0 else np.ones(n, f32)
    kd_noise = rng.standard_normal(n, dtype=f32)

    logit = np.take(model.batch_logit, batch, axis=0)  # (n, G) float32
    if cfg.n_programs:
        logit += scores @ model.program_loadings
    eff = model.guide_efficiency[guide]
    mean_eff = f32(0.5 * (cfg.guide_efficiency_min + cfg.guide_efficiency_max))
    mult = np.where(resp, eff / mean_eff * gam, f32(0.0)).astype(f32)
    log_lib = model.batch_log_library[batch] + f32(cfg.library_size_sd) * lib_noise
    ri = np.flatnonzero(resp)
    if ri.size:
        pp = pert[ri]
        sub = model.effects[pp * C + ctx[ri]]  # CSR rows of the responders' (pert, context)
        per_row = np.diff(sub.indptr)
        flat_idx = np.repeat(ri * G, per_row)
        flat_idx += sub.indices
        flat_logit = logit.reshape(-1)
        flat_logit[flat_idx] += sub.data * np.repeat(mult[ri], per_row)  # no duplicates per row
        # knockdown of the target
        resid = np.minimum((1.0 - eff[ri]) * np.exp(f32(cfg.knockdown_cell_sd) * kd_noise[ri]), 1.0)
        logit[ri, model.pert_gene[pp]] += np.log(resid).astype(f32)
        log_lib[ri] += model.pert_library_shift[pp] * mult[ri]
    # mu = L * softmax(logit); logits are log relative expression plus bounded shifts (no overflow)
    np.exp(logit, out=logit)
    scale = np.exp(log_lib) / logit.sum(axis=1)
    logit *= scale.astype(f32)[:, None]
    counts = _nb_sample(rng, logit, model.theta)

    flat = counts.reshape(-1)
    nzi = np.flatnonzero(flat != 0)
    indptr = np.searchsorted(nzi, np.arange(n + 1, dtype=np.int64) * G)
    indices = nzi.astype(np.int32)  # n * G < 2**31 (<= 256 rows, < 10^7 genes)
    indices -= np.repeat(np.arange(n, dtype=np.int32) * np.int32(G), np.diff(indptr))
    data = flat.take(nzi)
    totals = counts.sum(axis=1, dtype=np.int64)
    return indptr, indices, data, totals


def sample_counts(model: SimModel, plan: CellPlan, start: int, stop: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Raw counts of rows ``[start, stop)`` as CSR (``config.x_dtype``) and per-cell totals.

    ``start`` must be a multiple of :func:`chunk_rows` (counts are tied to fixed row chunks).
    """
    R = chunk_rows(model.config.n_genes)
    if start % R:
        raise ValueError(f"start={start} must be a multiple of chunk_rows(n_genes)={R}")
    stop = min(stop, plan.n_cells)
    dtype = np.dtype(model.config.x_dtype)
    ptrs, inds, datas, tots = [], [], [], []
    offset = 0
    for j in range(start // R, -(-stop // R)):
        indptr, indices, data, totals = _chunk_counts(model, plan, j)
        r0 = j * R
        keep = min(stop - r0, len(totals))
        if keep < len(totals):
            indptr = indptr[: keep + 1]
            indices = indices[: indptr[-1]]
            data = data[: indptr[-1]]
            totals = totals[:keep]
        ptrs.append(indptr[(1 if ptrs else 0):] + offset)
        offset += int(indptr[-1])
        inds.append(indices)
        datas.append(data.astype(dtype, copy=False))
        tots.append(totals)
    n = stop - start
    X = sp.csr_matrix(
        (np.concatenate(datas), np.concatenate(inds), np.concatenate(ptrs).astype(np.int64)),
        shape=(n, model.config.n_genes),
    )
    return X, np.concatenate(tots)


def iter_count_blocks(model: SimModel, plan: CellPlan, block_rows: int | None = None
                      ) -> Iterator[tuple[int, sp.csr_matrix, np.ndarray]]:
    """Yield ``(start_row, csr_block, totals)`` over all cells, ``block_rows`` (rounded up to a
    multiple of :func:`chunk_rows`) rows at a time."""
    br = block_rows or model.config.block_rows
    R = chunk_rows(model.config.n_genes)
    br = max(R, -(-br // R) * R)
    for start in range(0, plan.n_cells, br):
        X, tot = sample_counts(model, plan, start, start + br)
        yield start, X, tot


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _obs_frame(model: SimModel, plan: CellPlan, rows: np.ndarray, barcodes: np.ndarray) -> pd.DataFrame:
    def cat(values: np.ndarray) -> pd.Categorical:
        return pd.Categorical(values, categories=np.unique(values))

    pert_labels = np.append(model.pert_symbols, CONTROL_LABEL)  # index -1 -> control
    return pd.DataFrame(
        {
            PERT_KEY: cat(pert_labels[plan.pert[rows]]),
            GUIDE_KEY: cat(model.guide_ids[plan.guide[rows]]),
            BATCH_KEY: cat(model.batch_names[plan.batch[rows]]),
            CONTEXT_KEY: cat(np.asarray(model.contexts)[plan.context[rows]]),
        },
        index=pd.Index(barcodes[rows], name=None),
    )


class H5adWriter:
    """Writes one h5ad file: obs/var up front, X appended in row blocks (anndata's own API)."""

    def __init__(self, path: Path, obs: pd.DataFrame, var: pd.DataFrame, compression: str):
        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self.f = h5py.File(self.tmp, "w")
        self.f.attrs["encoding-type"] = "anndata"
        self.f.attrs["encoding-version"] = "0.1.0"
        write_elem(self.f, "obs", obs)
        write_elem(self.f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(self.f, key, {})
        self.kw: dict = dict(chunks=(1 << 16,), indptr_dtype=np.int64)
        if compression:
            self.kw["compression"] = compression
        self.ds = None
        self.n_rows = 0
        self.nnz = 0

    def append(self, X: sp.csr_matrix) -> None:
        if X.shape[0] == 0:
            return
        if self.ds is None:
            write_elem(self.f, "X", X, dataset_kwargs=self.kw)
            self.ds = sparse_dataset(self.f["X"])
        else:
            self.ds.append(X)
        self.n_rows += X.shape[0]
        self.nnz += X.nnz

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def write_fasta(model: SimModel, path: str | os.PathLike) -> int:
    """Write the isoform peptide FASTA (Ensembl pep format, 60 residues a line). Returns #isoforms."""
    cfg = model.config
    rng = _rng(cfg.seed, _S_FASTA)
    G = cfg.n_genes
    lengths = np.exp(rng.normal(math.log(cfg.protein_length_median), 0.6, G))
    lengths = np.clip(np.round(lengths), 50, cfg.protein_length_max).astype(np.int64)
    if cfg.protein_length_max > 1022 and G >= 20 and not (lengths > 1022).any():
        long_ = rng.choice(G, size=max(1, G // 100), replace=False)
        lengths[long_] = rng.integers(1023, cfg.protein_length_max + 1, len(long_))
    missing = rng.random(G) < cfg.fasta_missing_fraction
    n_iso = 1 + np.minimum(rng.choice(4, size=G, p=[0.35, 0.30, 0.20, 0.15]), cfg.max_isoforms - 1)
    freq = _AA_FREQ / _AA_FREQ.sum()
    total = int(lengths.sum() + 200 * n_iso.sum())
    pool = np.frombuffer(_AA.encode(), np.uint8)[rng.choice(20, size=total, p=freq)].tobytes().decode()
    pos = 0
    lines: list[str] = []
    prot = 0
    chroms = rng.integers(1, 23, G)
    starts = rng.integers(1_000_000, 200_000_000, G)
    for g in range(G):
        if missing[g]:
            continue
        L = int(lengths[g])
        seq = "M" + pool[pos: pos + L - 1]
        pos += L - 1
        # exons of ~20-150 residues
        cuts = [0]
        while cuts[-1] < L:
            cuts.append(min(L, cuts[-1] + int(rng.integers(20, 150))))
        exons = [seq[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        isoforms = [seq]
        for _ in range(int(n_iso[g]) - 1):
            ex = list(exons)
            if len(ex) > 2 and rng.random() < 0.7:  # drop 1-2 internal exons
                n_drop = min(len(ex) - 2, int(rng.integers(1, 3)))
                drop = set(rng.choice(np.arange(1, len(ex) - 1), size=n_drop, replace=False).tolist())
                ex = [e for i, e in enumerate(ex) if i not in drop]
            else:  # alternative C-terminal exon
                tail_len = int(rng.integers(15, 80))
                ex = ex[:-1] + [pool[pos: pos + tail_len]]
                pos += tail_len
            iso = "".join(ex)[: cfg.protein_length_max]
            if len(iso) < 30:
                iso = seq
            isoforms.append(iso)
        gsym, gid = model.gene_symbols[g], model.gene_ids[g]
        end = int(starts[g]) + 3 * L + int(rng.integers(1000, 50000))
        for iso in isoforms:
            prot += 1
            lines.append(
                f">ENSP{prot:011d}.1 pep chromosome:SIM:{chroms[g]}:{starts[g]}:{end}:1 "
                f"gene:{gid}.1 transcript:ENST{prot:011d}.1 gene_biotype:protein_coding "
                f"transcript_biotype:protein_coding gene_symbol:{gsym}"
            )
            lines.extend(iso[i: i + 60] for i in range(0, len(iso), 60))
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return prot


def gene_features(model: SimModel) -> np.ndarray:
    """(G, feature_dim) float32 features: noisy projection of each gene's latent function and strength."""
    cfg = model.config
    rng = _rng(cfg.seed, _S_FEATURES)
    s = np.log(np.maximum(model.gene_strength.astype(float), 1e-3))
    s = (s - s.mean()) / (s.std() + 1e-12)
    latent = np.concatenate([model.gene_module_weights.astype(float), s[:, None]], axis=1)
    Q = rng.normal(0.0, 1.0, (latent.shape[1], cfg.feature_dim))
    signal = latent @ Q
    signal /= signal.std() + 1e-12
    feats = signal + cfg.feature_noise_sd * rng.normal(0.0, 1.0, signal.shape)
    return (feats / feats.std()).astype(np.float32)


def write_features(model: SimModel, path: str | os.PathLike) -> None:
    """``torch.save`` of ``{gene_symbol: FloatTensor(feature_dim)}`` for every gene."""
    import torch  # heavy, and only this writer needs it: simulation itself is numpy

    feats = torch.from_numpy(gene_features(model))
    torch.save({str(s): feats[i].clone() for i, s in enumerate(model.gene_symbols)}, path)


def make_split(model: SimModel) -> dict[str, list[str]]:
    """Held-out context split: ``{"fewshot": [...], "val": [...], "test": [...]}`` (symbols)."""
    cfg = model.config
    rng = _rng(cfg.seed, _S_SPLIT)
    perm = rng.permutation(model.n_perts)
    sym = model.pert_symbols
    fs = sorted(sym[perm[: cfg.n_fewshot]].tolist())
    val = sorted(sym[perm[cfg.n_fewshot: cfg.n_fewshot + cfg.n_val]].tolist())
    test = sorted(sym[perm[cfg.n_fewshot + cfg.n_val:]].tolist())
    return {"fewshot": fs, "val": val, "test": test}


def write_split_toml(model: SimModel, split: Mapping[str, list[str]], out_dir: Path, path: Path) -> None:
    cfg = model.config
    name = cfg.dataset_name

    def arr(xs: list[str]) -> str:
        return "[" + ", ".join(json.dumps(x) for x in xs) + "]"

    text = (
        "# Written by vcc_dist.data.simulate (STATE / cell-load split format).\n"
        f"# Held-out context {cfg.heldout()!r}: few-shot (training) perturbations there: "
        f"{', '.join(split['fewshot']) or '-'}\n"
        "[datasets]\n"
        f"{name} = {json.dumps(str(out_dir.resolve()))}\n\n"
        "[training]\n"
        f'{name} = "train"\n\n'
        "[zeroshot]\n\n"
        "[fewshot]\n\n"
        f'[fewshot."{name}.{cfg.heldout()}"]\n'
        f"val = {arr(split['val'])}\n"
        f"test = {arr(split['test'])}\n"
    )
    path.write_text(text)


def write_truth(model: SimModel, plan: CellPlan, split: Mapping[str, list[str]], path: Path) -> None:
    cfg = model.config
    C, P = cfg.n_contexts, model.n_perts
    coo = model.effects.tocoo()
    n_cells = np.zeros((C, P), np.int64)
    is_p = plan.pert >= 0
    np.add.at(n_cells, (plan.context[is_p].astype(np.int64), plan.pert[is_p].astype(np.int64)), 1)
    n_ctrl = np.bincount(plan.context[~is_p].astype(np.int64), minlength=C)
    np.savez_compressed(
        path,
        gene_symbols=model.gene_symbols,
        gene_ids=model.gene_ids,
        contexts=np.array(model.contexts),
        batch_names=model.batch_names,
        batch_context=model.batch_context,
        perturbations=model.pert_symbols,
        pert_gene_index=model.pert_gene,
        strength=model.gene_strength[model.pert_gene],
        near_null=model.pert_near_null,
        module_weights=model.gene_module_weights[model.pert_gene],
        context_module_gain=model.context_module_gain,
        pert_context_gain=model.pert_context_gain,
        log_p=model.log_p,
        context_logit=model.context_logit,
        theta=model.theta,
        effect_pert=(coo.row // C).astype(np.int32),
        effect_context=(coo.row % C).astype(np.int16),
        effect_gene=coo.col.astype(np.int32),
        effect_value=coo.data.astype(np.float32),
        guide_ids=model.guide_ids,
        guide_pert=model.guide_pert,
        guide_efficiency=model.guide_efficiency,
        guide_escape_fraction=model.guide_escape,
        n_cells=n_cells,
        n_cells_control=n_ctrl,
        heldout_context=np.array(cfg.heldout()),
        split_fewshot=np.array(split["fewshot"], dtype=str),
        split_val=np.array(split["val"], dtype=str),
        split_test=np.array(split["test"], dtype=str),
    )


def load_truth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load ``truth.npz`` (a directory is taken to mean its ``truth.npz``) into a dict."""
    p = Path(path)
    if p.is_dir():
        p = p / TRUTH_NAME
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def truth_effects(truth: Mapping[str, np.ndarray]) -> np.ndarray:
    """Dense ``(P, C, G)`` float32 true logit shifts (full response, excluding the knockdown)."""
    P, C, G = len(truth["perturbations"]), len(truth["contexts"]), len(truth["gene_symbols"])
    out = np.zeros((P, C, G), np.float32)
    out[truth["effect_pert"], truth["effect_context"], truth["effect_gene"]] = truth["effect_value"]
    return out


# --------------------------------------------------------------------------------------------
# Main entry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimOutputs:
    """Where :func:`simulate` wrote its files, and what they hold."""

    out_dir: Path
    h5ad_paths: tuple[Path, ...]
    fasta_path: Path
    features_path: Path
    split_path: Path
    pert_counts_path: Path
    truth_path: Path
    config_path: Path
    n_cells: int
    n_genes: int
    nnz: int
    n_contexts: int
    n_perturbations: int
    n_isoforms: int
    heldout_context: str
    seconds: float = field(compare=False, default=0.0)

    @property
    def density(self) -> float:
        return self.nnz / (self.n_cells * self.n_genes)


def simulate(config: SimConfig, out_dir: str | os.PathLike, progress: bool = True) -> SimOutputs:
    """Simulate a Perturb-seq dataset and write it into ``out_dir`` (created if needed).

    Writes ``perturbseq.h5ad`` (or ``perturbseq_<value>.h5ad`` per ``split_files_by`` value;
    stale ``perturbseq*.h5ad`` files in ``out_dir`` are removed), ``proteins.fasta``,
    ``pert_features.pt``, ``split.toml``, ``pert_counts.csv``, ``truth.npz`` and
    ``sim_config.json``. Each h5ad is written as ``<name>.partial`` and renamed when complete.
    """
    t0 = time.perf_counter()
    cfg = config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg)
    plan = plan_cells(cfg, model)
    n = plan.n_cells
    barcodes = cell_barcodes(n, cfg.seed)
    var = pd.DataFrame({GENE_ID_KEY: model.gene_ids}, index=pd.Index(model.gene_symbols, name=None))

    # which file each row goes to
    if cfg.split_files_by == CONTEXT_KEY:
        values = list(model.contexts)
        file_of_row = plan.context.astype(np.int64)
    elif cfg.split_files_by == BATCH_KEY:
        values = list(model.batch_names)
        file_of_row = plan.batch.astype(np.int64)
    else:
        values = [""]
        file_of_row = np.zeros(n, np.int64)
    names = [f"{H5AD_STEM}_{v}.h5ad" if v else f"{H5AD_STEM}.h5ad" for v in values]
    paths = tuple(out / nm for nm in names)
    for stale in [*out.glob(f"{H5AD_STEM}*.h5ad"), *out.glob(f"{H5AD_STEM}*.h5ad.partial")]:
        if stale not in paths:
            stale.unlink()
    file_rows = [np.flatnonzero(file_of_row == i) for i in range(len(values))]
    writers = [
        H5adWriter(paths[i], _obs_frame(model, plan, file_rows[i], barcodes), var, cfg.compression)
        for i in range(len(values))
    ]
    totals = np.zeros(n, np.int64)
    nnz = 0
    try:
        with tqdm(total=n, unit="cell", desc="simulate", disable=not progress, mininterval=1.0) as bar:
            for start, X, tot in iter_count_blocks(model, plan, cfg.block_rows):
                stop = start + X.shape[0]
                totals[start:stop] = tot
                nnz += X.nnz
                if len(writers) == 1:
                    writers[0].append(X)
                else:
                    f_rows = file_of_row[start:stop]
                    for i, w in enumerate(writers):
                        sel = np.flatnonzero(f_rows == i)
                        if sel.size:
                            w.append(X[sel])
                bar.update(X.shape[0])
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise

    fasta_path = out / FASTA_NAME
    n_iso = write_fasta(model, fasta_path)
    features_path = out / FEATURES_NAME
    write_features(model, features_path)
    split = make_split(model)
    split_path = out / SPLIT_NAME
    write_split_toml(model, split, out, split_path)

    # pert_counts.csv for the held-out context's test perturbations
    h = model.contexts.index(cfg.heldout())
    sym_to_p = {s: i for i, s in enumerate(model.pert_symbols)}
    rows = []
    for s in split["test"]:
        sel = (plan.context == h) & (plan.pert == sym_to_p[s])
        rows.append((s, int(sel.sum()), float(np.median(totals[sel]))))
    pc_path = out / PERT_COUNTS_NAME
    pd.DataFrame(rows, columns=[PERT_KEY, "n_cells", "median_umi_per_cell"]).to_csv(pc_path, index=False)

    truth_path = out / TRUTH_NAME
    write_truth(model, plan, split, truth_path)
    config_path = out / CONFIG_NAME
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return SimOutputs(
        out_dir=out.resolve(),
        h5ad_paths=paths,
        fasta_path=fasta_path,
        features_path=features_path,
        split_path=split_path,
        pert_counts_path=pc_path,
        truth_path=truth_path,
        config_path=config_path,
        n_cells=n,
        n_genes=cfg.n_genes,
        nnz=nnz,
        n_contexts=cfg.n_contexts,
        n_perturbations=cfg.n_perturbations,
        n_isoforms=n_iso,
        heldout_context=cfg.heldout(),
        seconds=time.perf_counter() - t0,
    )


def load_sim_config(path: str | os.PathLike) -> SimConfig:
    """Load ``sim_config.json`` (a directory is taken to mean its ``sim_config.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    return SimConfig.from_dict(json.loads(p.read_text()))
