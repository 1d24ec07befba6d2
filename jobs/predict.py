"""Predict held-out perturbations of a context with a trained ST model, as a challenge
submission (vcc_dist/infer/st_predict.py), then score it with jobs/evaluate.py.

    python jobs/predict.py --checkpoint runs/st_demo --corpus runs/demo/corpus \\
        --split runs/demo/sim/split.toml --role test --out runs/st_demo/pred_test.h5ad
    python jobs/predict.py --checkpoint runs/st_demo/checkpoint_... --context hepg2 \\
        --counts pert_counts.csv --out pred.h5ad        # the challenge's counts file
    python jobs/evaluate.py --real real.h5ad --pred pred.h5ad --baseline cell-mean.h5ad

The prediction streams: sets of the context's control cells (``cell_set_len`` per set, many
sets per forward pass) go through the model, and each pass's cells are appended to the file;
the file is written under a temporary name and renamed when complete.

Every option is listed by --help with its default and accepted values.
"""

from __future__ import annotations

import sys
import time

import _bootstrap  # noqa: F401  (first: puts the checkout on sys.path)
import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from jobs._cli import add_progress, job_parser
from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.data.plans import SetStreamConfig
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.streams import set_plan
from vcc_dist.infer.counts import parse_pert_counts
from vcc_dist.infer.st_predict import load_st_checkpoint, predict_context
from vcc_dist.train.st_data import heldout_groups


def _real_file(corpus, held, path, genes):
    """The held-out real cells (raw counts) and the context's controls, as an h5ad."""
    r = CorpusReader(corpus, genes=genes, normalize=False)
    blocks, labels = [], []
    for p, (st, rw) in zip(held.perts, held.cells):
        blocks.append(sp.csr_matrix(r.dense(r.read_many(st, rw))))
        labels += [p] * rw.size
    cst, crw = held.control
    blocks.append(sp.csr_matrix(r.dense(r.read_many(cst, crw))))
    labels += [CONTROL_LABEL] * crw.size
    x = sp.vstack(blocks, format="csr").astype(np.float32)
    obs = pd.DataFrame({PERT_KEY: pd.Categorical(labels)},
                       index=pd.Index(np.arange(len(labels)).astype(str)))
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    a.write_h5ad(path)
    return path


def parser():
    ap = job_parser(__doc__)
    ap.add_argument("--checkpoint", required=True, metavar="PATH",
                    help="a checkpoint_* directory of jobs/train_st.py, or its run directory "
                         "(then --which picks the checkpoint) (required)")
    ap.add_argument("--which", choices=["best", "latest"], default="best",
                    help="which checkpoint of a run directory: best or latest (default: best)")
    ap.add_argument("--corpus", metavar="DIR",
                    help="where the context's control cells come from (default: the training "
                         "corpus recorded in the checkpoint)")
    ap.add_argument("--context", metavar="NAME",
                    help="the target cell context (default: with --split, the one holding the "
                         "--role perturbations; required with --counts)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--counts", metavar="CSV",
                   help="perturbations and cell counts, the challenge's target_gene,n_cells "
                        "file (this or --split is required)")
    g.add_argument("--split", metavar="TOML",
                   help="take the split's --role perturbations of the context, with their real "
                        "cell counts in the corpus (this or --counts is required)")
    ap.add_argument("--role", default="test", metavar="R",
                    help="with --split: test, val or val,test (default: test)")
    ap.add_argument("--out", required=True, metavar="PATH",
                    help="the submission .h5ad: log1p values, float32 CSR, controls included "
                         "(required)")
    ap.add_argument("--real-out", metavar="PATH",
                    help="with --split: also write those perturbations' real cells and the "
                         "context's controls (raw counts), to score against (default: none)")
    ap.add_argument("--sets-per-batch", type=int, default=32, metavar="N",
                    help="sets of control cells per forward pass (default: 32)")
    ap.add_argument("--seed", type=int, default=0, metavar="N",
                    help="control-cell sampling seed (default: 0)")
    add_progress(ap)
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)

    t0 = time.perf_counter()
    try:
        loaded = load_st_checkpoint(a.checkpoint, a.which)
        corpus = a.corpus or loaded.manifest.train_config["corpus"]
        context = a.context
        held = None
        if a.split:
            plan, _ = set_plan(corpus, SetStreamConfig(), a.split)
            held = heldout_groups(plan, a.role, context=context)
            context, counts = held.context, held.counts()
        else:
            if not context:
                raise ValueError("--counts needs --context (the target cell context)")
            counts = parse_pert_counts(a.counts)
        print(f"[predict] {loaded.path}: {len(counts)} perturbations, "
              f"{sum(counts.values()):,} cells in context {context!r}")
        out = predict_context(loaded, corpus, context, dict(counts), a.out,
                              sets_per_batch=a.sets_per_batch, seed=a.seed,
                              progress=not a.no_progress)
        if a.real_out and held is not None:
            _real_file(corpus, held, a.real_out, loaded.genes)
            print(f"[predict] real cells: {a.real_out}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[predict] submission: {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
