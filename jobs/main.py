"""The main job: the whole vcc-dist path on simulated data, on an embedded local Ray.

    python jobs/main.py --out runs/demo                 # README command one (via `make demo`)
    ray job submit --working-dir . -- python jobs/main.py --out /shared/runs/demo

The stages (vcc_dist/pipeline.py, each skipped when its output is complete and made with the
same settings, so a rerun resumes):

{stages}

and a report with the tables and plots: <out>/report.md. ``--quick`` uses the debug recipes
(seconds per stage: tests); ``--until STAGE`` stops after a stage.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import _bootstrap  # noqa: F401

from data_conversion import ConvertConfig, convert_corpus, validate_corpus
from vcc_dist.data.simulate import parse_overrides
from vcc_dist.pipeline import Conversion, RunContext, main_pipeline

PIPELINE = main_pipeline(Conversion(ConvertConfig, convert_corpus, validate_corpus))

DESCRIPTION = __doc__.format(stages="\n".join(
    textwrap.fill(f"{s.description}" + (f" -> {', '.join(s.outputs)}" if s.outputs else ""),
                  width=92, initial_indent=f"{i:>2}. {s.name:<11}", subsequent_indent=" " * 15)
    for i, s in enumerate(PIPELINE.stages, start=1)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (default: %(default)s)")
    p.add_argument("--preset", default="small",
                   help="simulator preset: tiny, small, medium, vcc (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a simulator setting, e.g. --set n_cells=5000 (repeatable)")
    p.add_argument("--split-files-by", default="cell_type", choices=["cell_type", "batch", ""],
                   help="one h5ad per cell type (default), per batch, or one file ('')")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs for the embedded local Ray (default: all)")
    p.add_argument("--n-top-genes", type=int, default=None,
                   help="highly variable genes to flag (default: min(2000, genes / 4))")
    p.add_argument("--quick", action="store_true",
                   help="debug recipes and a 2-trial sweep (seconds per stage; for tests)")
    p.add_argument("--until", default=PIPELINE.names[-1], metavar="STAGE",
                   help=f"stop after this stage, one of: {', '.join(PIPELINE.names)} "
                        "(default: %(default)s, i.e. all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        PIPELINE.until(a.until)
    except ValueError as e:
        p.error(f"--until: {e}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        ctx = RunContext(out=Path(a.out), preset=a.preset, seed=a.seed,
                         sim_overrides=parse_overrides(a.set), split_files_by=a.split_files_by,
                         num_cpus=a.num_cpus, n_top_genes=a.n_top_genes, quick=a.quick,
                         progress=not a.no_progress)
        PIPELINE.run(ctx, until=a.until)
    except ValueError as e:  # a bad stage name or setting, ConversionError, CorpusError: the
        print(f"error: {e}", file=sys.stderr)  # message says the fix
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
