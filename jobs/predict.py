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

Options:
  --checkpoint PATH     a checkpoint_* directory, or a run directory (its best checkpoint;
                        --which latest for the latest)
  --corpus DIR          where the context's control cells come from (default: the training
                        corpus recorded in the checkpoint)
  --context NAME        the target context (default: the one holding --role perturbations)
  --counts CSV          perturbations and cell counts (columns target_gene,n_cells), or
  --split TOML --role R the split's R perturbations of the context ("test", "val" or
                        "val,test"), with their real cell counts in the corpus
  --out PATH            the submission .h5ad (log1p values, float32 CSR, controls included)
  --real-out PATH       with --split: also write the real cells of those perturbations and
                        the context's controls (raw counts), to score against
  --sets-per-batch N    sets per forward pass (default 32)
  --seed N              control sampling seed (default 0)
  --no-progress
"""

from __future__ import annotations

import argparse
import sys
import time

import _bootstrap  # noqa: F401


def _real_file(corpus, held, path, genes):
    """The held-out real cells (raw counts) and the context's controls, as an h5ad."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
    from vcc_dist.data.reader import CorpusReader

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--which", choices=["best", "latest"], default="best")
    ap.add_argument("--corpus")
    ap.add_argument("--context")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--counts")
    g.add_argument("--split")
    ap.add_argument("--role", default="test")
    ap.add_argument("--out", required=True)
    ap.add_argument("--real-out")
    ap.add_argument("--sets-per-batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    from vcc_dist.infer.counts import parse_pert_counts
    from vcc_dist.infer.st_predict import load_st_checkpoint, predict_context

    t0 = time.perf_counter()
    try:
        loaded = load_st_checkpoint(a.checkpoint, a.which)
        corpus = a.corpus or loaded.manifest["train_config"]["corpus"]
        context = a.context
        held = None
        if a.split:
            from vcc_dist.data.plans import SetStreamConfig
            from vcc_dist.data.streams import set_plan
            from vcc_dist.train.st_data import heldout_groups

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
