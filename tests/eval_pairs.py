"""Generated real/pred AnnData pairs for the evaluation agreement tests.

Real files hold integer counts from a negative binomial with per-cell library sizes;
perturbations have strong, weak or no effects, knock their own gene down, and a few genes are
zero in a whole group (fold change ±inf) or in every cell (0/0). Predictions come in the forms
models produce: noisy log1p floats (CSR or dense), integer counts, constant rows (like the
cell-mean baseline) and near-copies of the real file.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONTROL = "non-targeting"


def _counts(rng, mu, n, lib_sd=0.3, theta=3.0):
    lib = rng.lognormal(0.0, lib_sd, size=(n, 1))
    m = mu[None, :] * lib
    lam = rng.gamma(theta, m / theta)
    return rng.poisson(lam)


def make_real(seed=0, n_perts=8, n_cells=60, n_ctrl=150, n_genes=120, depth=2.0,
              no_de_perts=2, weak_perts=2, zero_genes=True):
    """Integer counts, obs target_gene; perturbation names are gene names (so PDS drops a
    column); returns (adata, effect matrix in log space)."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i:04d}" for i in range(n_genes)])
    mu = rng.lognormal(np.log(depth), 1.2, size=n_genes)
    pert_genes = rng.choice(n_genes, size=n_perts, replace=False)
    perts = genes[pert_genes]
    blocks, labels = [_counts(rng, mu, n_ctrl)], [CONTROL] * n_ctrl
    for i, p in enumerate(perts):
        logfc = np.zeros(n_genes)
        if i >= no_de_perts:
            strength = 0.4 if i < no_de_perts + weak_perts else 1.5
            hit = rng.choice(n_genes, size=n_genes // 6, replace=False)
            logfc[hit] = rng.normal(0, strength, size=hit.size)
            logfc[pert_genes[i]] = -2.5  # knockdown of its own gene
        x = _counts(rng, mu * np.exp(logfc), n_cells)
        if zero_genes and i >= no_de_perts:
            x[:, pert_genes[(i + 1) % n_perts]] = 0  # a gene absent from this group
        blocks.append(x)
        labels += [p] * n_cells
    x = np.vstack(blocks)
    if zero_genes:
        x[:, -1] = 0  # a gene absent everywhere: 0/0 fold change, p = 1
        x[np.array(labels) == CONTROL, -2] = 0  # absent from controls only: +inf
    order = rng.permutation(x.shape[0])  # cells of a group are not contiguous
    obs = pd.DataFrame({"target_gene": pd.Categorical(np.array(labels)[order])},
                       index=[f"c{i}" for i in range(x.shape[0])])
    a = ad.AnnData(sp.csr_matrix(x[order].astype(np.float32)), obs=obs,
                   var=pd.DataFrame(index=genes))
    return a


def log1p_normalise(a: ad.AnnData) -> np.ndarray:
    x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    tot = x.sum(1, keepdims=True)
    return np.log1p(x / np.maximum(tot, 1) * np.median(tot)).astype(np.float32)


def make_pred(real: ad.AnnData, kind: str, seed=1, noise=0.3) -> ad.AnnData:
    """kinds: noisy_csr, noisy_dense, counts, constant, copy, shuffled_labels, sparse_noisy."""
    rng = np.random.default_rng(seed)
    labels = real.obs["target_gene"].astype(str).to_numpy()
    if kind == "counts":
        x = real.X.toarray()
        x = rng.poisson(x * rng.uniform(0.7, 1.3, size=x.shape)).astype(np.float32)
        xm = sp.csr_matrix(x)
    elif kind == "copy":
        xm = sp.csr_matrix(log1p_normalise(real))
    else:
        lx = log1p_normalise(real)
        if kind == "constant":
            lx = np.repeat(lx.mean(0, keepdims=True), lx.shape[0], axis=0)
            ctrl = labels == CONTROL
            lx[ctrl] = log1p_normalise(real)[ctrl]
        elif kind == "shuffled_labels":
            labels = labels.copy()
            pert = labels != CONTROL
            labels[pert] = rng.permutation(labels[pert])
        elif kind == "sparse_noisy":
            lx = lx * rng.uniform(0.8, 1.2, size=lx.shape)
            lx[rng.random(lx.shape) < 0.2] = 0
        else:
            lx = lx + rng.normal(0, noise, size=lx.shape) * (lx > 0)
        lx = np.clip(lx, 0, None).astype(np.float32)
        xm = lx if kind == "noisy_dense" else sp.csr_matrix(lx)
    obs = pd.DataFrame({"target_gene": labels}, index=[f"p{i}" for i in range(len(labels))])
    return ad.AnnData(xm, obs=obs, var=pd.DataFrame(index=real.var_names.copy()))


def run_cell_eval(real: ad.AnnData, pred: ad.AnnData, outdir, num_threads: int = 1):
    """cell-eval 0.8.2's vcc profile on copies (it normalises in place); returns
    (results pandas DataFrame indexed by perturbation, agg mean dict)."""
    from cell_eval import MetricsEvaluator

    ev = MetricsEvaluator(adata_pred=pred.copy(), adata_real=real.copy(),
                          control_pert=CONTROL, pert_col="target_gene",
                          num_threads=num_threads, outdir=str(outdir))
    res, agg = ev.compute(profile="vcc", break_on_error=True, write_csv=True)
    res = res.to_pandas().set_index("perturbation")
    aggp = agg.to_pandas().set_index("statistic")
    return res, {c: float(aggp.loc["mean", c]) for c in aggp.columns}, agg


def cell_eval_score(agg_user, agg_base) -> dict[str, float]:
    from cell_eval import score_agg_metrics

    df = score_agg_metrics(agg_user, agg_base).to_pandas()
    return dict(zip(df["metric"], df["from_baseline"].astype(float)))
