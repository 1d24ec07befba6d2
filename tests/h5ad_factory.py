"""Small hand-made h5ad inputs for conversion tests (every layout and defect we must handle)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def make_adata(n=300, g=50, seed=0, contexts=("A", "B"), perts=("G1", "G2", "G3"),
               batches=("b1", "b2"), control="non-targeting", prefix="GENE", id_prefix="ENSG",
               dtype=np.float32, density=0.4):
    rng = np.random.default_rng(seed)
    x = sp.random(n, g, density=density, format="csr", random_state=seed, dtype=np.float64)
    x.data = np.ceil(x.data * 30)
    x = x.astype(dtype)
    labels = [control, *perts]
    obs = pd.DataFrame({
        "target_gene": pd.Categorical(rng.choice(labels, n)),
        "guide_id": pd.Categorical([f"g{v}" for v in rng.integers(0, 4, n)]),
        "batch": pd.Categorical(rng.choice(list(batches), n)),
        "cell_type": pd.Categorical(rng.choice(list(contexts), n)),
    }, index=[f"cell{seed}_{i}" for i in range(n)])
    var = pd.DataFrame({"gene_id": [f"{id_prefix}{i:05d}" for i in range(g)]},
                       index=[f"{prefix}{i}" for i in range(g)])
    return ad.AnnData(X=x, obs=obs, var=var)


def write(adata, path, fmt="csr", compression=None):
    a = adata.copy()
    if fmt == "csc":
        a.X = sp.csc_matrix(a.X)
    elif fmt == "dense":
        a.X = np.asarray(a.X.todense())
    a.write_h5ad(path, compression=compression)
    return path
