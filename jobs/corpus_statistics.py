"""Statistics report of a corpus: per-gene CSV, plots of gene means and perturbation deltas,
and a summary (cells, genes, perturbations, controls, cells per perturbation).

    python jobs/corpus_statistics.py --corpus runs/demo/corpus --out runs/demo/statistics
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from vcc_dist.data.corpus import CorpusError
from vcc_dist.report.statistics import write_statistics_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="corpus directory (from jobs/convert.py)")
    p.add_argument("--out", required=True, help="directory for the report files")
    a = p.parse_args(argv)
    try:
        o = write_statistics_report(a.corpus, a.out)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(open(o.summary_md).read().split("\n\n![")[0])
    print(f"\nreport written to {a.out}: {o.gene_csv.name}, {o.gene_mean_png.name}, "
          f"{o.delta_png.name}, {o.cells_png.name}, {o.summary_md.name}, {o.summary_json.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
