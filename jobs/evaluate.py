"""Score a prediction with the Virtual Cell Challenge metrics, exactly as cell-eval 0.8.2 does
(`cell-eval run --profile vcc` + `cell-eval score`), in a fraction of its time.

    python jobs/evaluate.py --real real.h5ad --pred pred.h5ad --baseline baseline.h5ad \\
        --out runs/eval
    ray job submit --working-dir . -- python jobs/evaluate.py --real ... --num-workers 8

Inputs (each an .h5ad, or a summary .npz written by --save-summaries):
  --real PATH            the real (held-out) cells: integer counts or log1p, obs target_gene
                         with control cells
  --pred PATH            the prediction, same genes in the same order, same perturbations
  --baseline PATH        a baseline prediction (e.g. from jobs/baseline.py --kind cell-mean);
                         gives the baseline-scaled overall score
  --baseline-agg PATH    instead of --baseline: a baseline already scored, as our
                         agg_results.json or cell-eval's agg_results.csv

Options:
  --out DIR              output directory (default runs/eval)
  --pert-col NAME        perturbation column in obs (default target_gene)
  --control-label NAME   control label (default non-targeting)
  --fdr-scope SCOPE      perturbation (default; cell-eval >= 0.7: Benjamini-Hochberg within
                         each perturbation) or global (the 2025 challenge-era cell-eval <= 0.6:
                         one BH over every perturbation x gene test of a file)
  --num-workers N        split the perturbations of each file over N Ray tasks (a Ray cluster
                         when RAY_ADDRESS is set or `ray start` ran, else a local one); default
                         1: one process, numba threads over genes
  --save-summaries DIR   also write each file's summary (.npz: pseudobulks and DE) so the real
                         file need not be re-read for the next prediction (Ray Tune trials)
  --no-plot              skip per_perturbation.png
  --quiet                no progress bars

Outputs in --out: results.csv (per perturbation: overlap_at_N = DES,
discrimination_score_l1 = PDS, mae, numbers of real and predicted DE genes, PDS rank, and the
baseline's values), agg_results.json (means; baseline means; scores), baseline_diff.csv
(cell-eval score's table, with a baseline), per_perturbation.png.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.metrics import vcc


def _summary(path, what, a, save_dir):
    path = Path(path)
    if path.suffix == ".npz":
        return vcc.FileSummary.load(path)
    t = time.perf_counter()
    s = vcc.summarize(path, what=what, pert_col=a.pert_col, control_label=a.control_label,
                      num_workers=a.num_workers, progress=not a.quiet)
    print(f"{what}: {len(s.perts)} perturbations, {s.n_control} control cells, "
          f"{len(s.genes)} genes ({'counts, normalised' if s.was_counts else 'log1p'}) in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        out = s.save(save_dir / f"{path.stem}.summary.npz")
        print(f"  summary saved to {out}", file=sys.stderr)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True)
    p.add_argument("--pred", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--baseline")
    g.add_argument("--baseline-agg")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--pert-col", default=PERT_KEY)
    p.add_argument("--control-label", default=CONTROL_LABEL)
    p.add_argument("--fdr-scope", choices=("perturbation", "global"), default="perturbation")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--save-summaries", type=Path)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    t0 = time.perf_counter()
    try:
        real = _summary(a.real, "real", a, a.save_summaries)
        pred = _summary(a.pred, "pred", a, a.save_summaries)
        base = _summary(a.baseline, "baseline", a, a.save_summaries) if a.baseline else None
        ev = vcc.evaluate(real, pred, base, baseline_agg=a.baseline_agg,
                          fdr_scope=a.fdr_scope)
        paths = vcc.write_evaluation(ev, a.out, plot=not a.no_plot)
    except vcc.EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"agg": ev.agg, "baseline_agg": ev.baseline_agg, "score": ev.scores},
                     indent=2))
    print(f"written to {a.out}: {', '.join(p.name for p in paths.values())} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
