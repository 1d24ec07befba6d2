"""Check a Virtual Cell Challenge prediction (.h5ad) before `cell-eval prep` / upload / scoring.

    python jobs/validate_submission.py pred.h5ad --genes gene_names.csv \\
        --counts pert_counts_Validation.csv [--real real.h5ad] [--json report.json]

Reports every problem at once: what cell-eval prep checks (perturbation column, control cells,
genes vs the gene list, at most 200,000 cells) and what it lets through but cell-eval run
crashes on or mis-scores (explicitly stored zeros, NaN/inf, negative values, non-integer
values >= 15, empty labels, unused categories, duplicate genes or entries), plus the
perturbations and cells per perturbation against the expected counts and the real file.
Each line names the problem code, how many cells/genes/perturbations it affects with
examples, and the fix. X is read in blocks, never densified.

Arguments:
  PRED                   the prediction .h5ad
  --genes PATH           the challenge's gene list: one gene per line, no header (cell-eval
                         prep reads the first line as a gene); genes must match it, in its
                         order (another order is a warning: prep reorders)
  --counts PATH          expected cells per perturbation: CSV with columns target_gene (or
                         the --pert-col name) and n_cells, e.g. the challenge's
                         pert_counts_Validation.csv; control rows are ignored
  --real PATH            a real .h5ad to be scored against: perturbation labels (control
                         included) and genes must match it exactly, as cell-eval run requires,
                         and each perturbation must have as many cells as in it (controls
                         excluded; only its obs and var are read)
  --pert-col NAME        perturbation column in obs (default target_gene)
  --control-label NAME   label of the control cells (default non-targeting)
  --max-cells N          most cells allowed (default 200000, cell-eval prep's limit); -1: no
                         limit
  --expected-genes N     gene count the challenge expects (default 18080); a different count
                         is a warning, as in prep; -1: no check
  --json PATH            also write the report as JSON (ok, stats, problems with code,
                         severity, message, count, examples)
  --quiet                print only the verdict line and the problems

Exit status: 0 when there is no error (warnings allowed), 1 when there are errors, 2 when an
input cannot be read (missing file, not an h5ad, bad counts CSV or gene list).
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.infer.submission import (
    EXPECTED_GENES,
    MAX_CELLS,
    SubmissionError,
    validate_submission,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred", metavar="PRED", help="the prediction .h5ad")
    p.add_argument("--genes", metavar="PATH", help="gene list, one per line, no header")
    p.add_argument("--counts", metavar="PATH", help="expected counts CSV (target_gene, n_cells)")
    p.add_argument("--real", metavar="PATH", help="real .h5ad to be scored against")
    p.add_argument("--pert-col", metavar="NAME", default=PERT_KEY,
                   help="obs column (default %(default)s)")
    p.add_argument("--control-label", metavar="NAME", default=CONTROL_LABEL,
                   help="control label (default %(default)s)")
    p.add_argument("--max-cells", metavar="N", type=int, default=MAX_CELLS,
                   help="most cells allowed, -1: no limit (default %(default)s)")
    p.add_argument("--expected-genes", metavar="N", type=int, default=EXPECTED_GENES,
                   help="expected gene count, -1: no check (default %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="verdict and problems only")
    a = p.parse_args(argv)
    try:
        rep = validate_submission(
            a.pred, gene_list=a.genes, expected_counts=a.counts, real=a.real,
            pert_col=a.pert_col, control_label=a.control_label,
            max_cells=None if a.max_cells < 0 else a.max_cells,
            expected_genes=None if a.expected_genes < 0 else a.expected_genes)
    except (SubmissionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = str(rep)
    if a.quiet:
        text = "\n".join(text.splitlines()[-1 - len(rep.problems):])
    print(text)
    if a.json:
        try:
            rep.to_json(a.json)
        except OSError as e:
            print(f"error: cannot write {a.json}: {e}", file=sys.stderr)
            return 2
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
