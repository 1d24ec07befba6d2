"""Predict a challenge submission with a baseline (vcc_dist/infer/baselines.py).

    python jobs/baseline.py --train sim/perturbseq.h5ad --kind cell-mean \\
        --counts sim/pert_counts.csv --out runs/cell_mean.h5ad
    python jobs/baseline.py --train sim/perturbseq.h5ad --split sim/split.toml \\
        --kind context-mean --counts sim/pert_counts.csv --out runs/context_mean.h5ad
    python jobs/baseline.py --train sim/perturbseq.h5ad --split sim/split.toml --kind ridge \\
        --features sim/pert_features.pt --alpha 10 --counts sim/pert_counts.csv --out runs/ridge.h5ad
    python jobs/baseline.py --train sim/perturbseq.h5ad --split sim/split.toml --kind ridge \
        --features transfer onehot --counts sim/pert_counts.csv --out runs/ridge_st.h5ad

Options:
  --train PATH          training h5ad (raw integer counts or log1p); repeat for several files,
                        each is normalised on its own (as cell-eval does per file) then pooled
  --kind NAME           cell-mean     cell-eval 0.8.2's `baseline`: mean of all group means
                                      (controls included) for every perturbed cell
                        context-mean  target context's control cells plus the perturbation's mean
                                      effect in the other contexts
                        ridge         ridge regression of the target context's deltas, fitted on
                                      its few-shot perturbations (context-mean if fewer than 2)
  --counts CSV          cells per perturbation: cell-eval's counts CSV (columns target_gene,n_cells;
                        the --pert-col name; control rows ignored)
  --counts-from H5AD    take the cells per perturbation from a real file's obs (controls excluded;
                        only --context's cells when that file has the context column)
                        Neither: the perturbations of the training data (of --context if given),
                        as `cell-eval baseline` does without a counts CSV.
  --context NAME        target cell context (obs cell_type value); required by context-mean and
                        ridge (default: the held-out context of --split when it names exactly one);
                        for cell-mean it only selects which control cells are appended (default:
                        all training controls, exactly as cell-eval)
  --controls H5AD       control cells of the target context to add effects to and append (default:
                        the training file's controls of --context); needed for a context that has
                        no cells in training
  --split TOML          STATE/cell-load split.toml: its held-out cells (few-shot val/test
                        perturbations, zero-shot contexts' perturbed cells) are removed from the
                        training data first. Read by the same strict reader as the corpus path
                        (vcc_dist.data.splits); keys are matched to obs cell_type by their context
                        part; a split context absent from every --train file is an error
  --features SRC ...    ridge only, instead of PCA of the perturbation's other-context deltas:
                        one .pt file: per-gene feature vectors (torch dict gene -> tensor,
                        STATE's pert_features.pt; perturbations missing from it get the mean);
                        or ST's feature sources, concatenated, exactly as jobs/train_st.py
                        --features builds them from the training data: transfer (context-mean
                        effect from the other contexts), onehot, .pt paths (which must then
                        cover every training perturbation). `--features transfer onehot` gives
                        the ridge the inputs of ST's demo recipe, for a like-for-like report
  --alpha A             ridge only: L2 penalty on standardised features (default 1.0)
  --n-components K      ridge only: principal components of the delta features (default 10)
  --absolute            ridge only: regress the deltas themselves instead of the correction to the
                        context-mean shift
  --use-target-context  context-mean only: also average the target context's own (few-shot) deltas
  --fewshot-weight W    context-mean only: for perturbations seen in the target context use
                        W * own delta + (1 - W) * other-context mean (0..1)
  --seed N              seed of the control-cell sampling (default 0)
  --pert-col, --context-key, --control-label
                        obs column names and control label (defaults target_gene, cell_type,
                        non-targeting); the output uses the same perturbation column
  --out PATH            prediction .h5ad (written to a temporary file beside it, then renamed)
  --no-progress         no progress bars

Prints a JSON summary. Exit status 2 with a one-line "error: ..." on bad input.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from vcc_dist.constants import CONTEXT_KEY, CONTROL_LABEL, PERT_KEY
from vcc_dist.data.splits import SplitError
from vcc_dist.infer.baselines import (
    BASELINES,
    BaselineError,
    exclude_heldout,
    make_baseline,
    pert_counts_from,
    read_adata,
    read_pert_counts,
    read_split,
)
from vcc_dist.metrics.normalize import ExpressionError


def _write_atomic(adata, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="append", required=True, metavar="H5AD")
    p.add_argument("--kind", required=True, choices=sorted(BASELINES))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--counts", metavar="CSV")
    src.add_argument("--counts-from", metavar="H5AD")
    p.add_argument("--context")
    p.add_argument("--controls", metavar="H5AD")
    p.add_argument("--split", metavar="TOML")
    p.add_argument("--features", nargs="+", metavar="SRC")
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--n-components", type=int, default=None)
    p.add_argument("--absolute", action="store_true")
    p.add_argument("--use-target-context", action="store_true")
    p.add_argument("--fewshot-weight", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pert-col", default=PERT_KEY)
    p.add_argument("--context-key", default=CONTEXT_KEY)
    p.add_argument("--control-label", default=CONTROL_LABEL)
    p.add_argument("--out", required=True, metavar="H5AD")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    ridge_only = [o for o, v in (("--features", a.features), ("--alpha", a.alpha),
                                 ("--n-components", a.n_components), ("--absolute", a.absolute))
                  if v not in (None, False)]
    if ridge_only and a.kind != "ridge":
        ap.error(f"{', '.join(ridge_only)} only apply to --kind ridge")
    cm_only = [o for o, v in (("--use-target-context", a.use_target_context),
                              ("--fewshot-weight", a.fewshot_weight)) if v not in (None, False)]
    if cm_only and a.kind != "context-mean":
        ap.error(f"{', '.join(cm_only)} only apply to --kind context-mean")
    if not a.out.endswith(".h5ad"):
        ap.error(f"--out must end in .h5ad, got {a.out!r}")

    t0 = time.perf_counter()
    progress = not a.no_progress
    cols = dict(context_key=a.context_key, pert_col=a.pert_col, control_label=a.control_label)
    try:
        kw = {"progress": progress}
        if a.kind == "ridge":
            # one path: per-gene vectors (legacy); otherwise ST's feature sources
            feats = a.features
            if feats is not None and len(feats) == 1 and feats[0] not in ("transfer", "onehot"):
                feats = feats[0]
            kw.update(features=feats, residual=not a.absolute)
            if a.alpha is not None:
                kw["alpha"] = a.alpha
            if a.n_components is not None:
                kw["n_components"] = a.n_components
        elif a.kind == "context-mean":
            kw.update(use_target_context=a.use_target_context, fewshot_weight=a.fewshot_weight)
        model = make_baseline(a.kind, **kw)

        context = a.context
        split = read_split(a.split) if a.split else None
        held_ctx = split.heldout_contexts() if split else []
        if context is None and len(held_ctx) == 1 and a.kind != "cell-mean":
            context = held_ctx[0]
        train = []
        for path in a.train:
            adata = read_adata(path, f"--train {path}")
            train.append(exclude_heldout(adata, split, **cols) if split else adata)
        if split:
            seen = set()
            for t in train:
                if a.context_key in t.obs.columns:
                    seen |= set(t.obs[a.context_key].astype(str))
            absent = sorted(set(split.context_keys()) - seen)
            if absent:
                raise SplitError(f"--split {a.split} names context(s) {absent} that no --train "
                                 f"file has (obs {a.context_key!r} values: {sorted(seen)[:10]}); "
                                 "fix the split's keys or the --context-key")
        model.fit(train, **cols)
        model.check_context(context, have_controls=a.controls is not None)

        if a.counts:
            counts = read_pert_counts(a.counts, pert_col=a.pert_col, control_label=a.control_label)
        else:
            if a.counts_from:
                sources = [read_adata(a.counts_from, f"--counts-from {a.counts_from}")]
            else:
                sources = train
            counts = {}
            for src in sources:
                obs_has_ctx = a.context_key in src.obs.columns
                for p, n in pert_counts_from(src, pert_col=a.pert_col, control_label=a.control_label,
                                             context=context if obs_has_ctx else None,
                                             context_key=a.context_key).items():
                    counts[p] = counts.get(p, 0) + n
        pred = model.predict(counts, context=context, controls=a.controls, seed=a.seed)
        out = Path(a.out)
        _write_atomic(pred, out)
    except (BaselineError, SplitError, ExpressionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_ctrl = int((pred.obs[a.pert_col] == a.control_label).sum())
    print(json.dumps({
        "out": str(out),
        "kind": a.kind,
        "context": context,
        "n_cells": pred.n_obs,
        "n_perturbed_cells": pred.n_obs - n_ctrl,
        "n_control_cells": n_ctrl,
        "n_perturbations": len(counts),
        "n_genes": pred.n_vars,
        "seconds": round(time.perf_counter() - t0, 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
