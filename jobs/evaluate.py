"""Score a prediction with the Virtual Cell Challenge metrics, exactly as cell-eval 0.8.2 does
(`cell-eval run --profile vcc` + `cell-eval score`), in a fraction of its time.

    python jobs/evaluate.py --real real.h5ad --pred pred.h5ad --baseline baseline.h5ad \\
        --out runs/eval
    ray job submit --working-dir . -- python jobs/evaluate.py --real s3://b/real.h5ad \\
        --pred s3://b/pred.h5ad --out s3://b/runs/eval --num-workers 8

Inputs (each an .h5ad, or a summary .npz written by --save-summaries; each a local path or an
s3:// URI, downloaded to the scratch directory $VCC_DIST_SCRATCH first):
  --real PATH            the real (held-out) cells: integer counts or log1p, obs target_gene
                         with control cells
  --pred PATH            the prediction, same genes in the same order, same perturbations
  --baseline PATH        a baseline prediction (e.g. from jobs/baseline.py --kind cell-mean);
                         gives the baseline-scaled overall score
  --baseline-agg PATH    instead of --baseline: a baseline already scored, as our
                         agg_results.json or cell-eval's agg_results.csv

Options:
  --out DIR              output directory or s3:// prefix (default runs/eval)
  --pert-col NAME        perturbation column in obs (default target_gene)
  --control-label NAME   control label (default non-targeting)
  --fdr-scope SCOPE      perturbation (default; cell-eval >= 0.7: Benjamini-Hochberg within
                         each perturbation) or global (the 2025 challenge-era cell-eval <= 0.6:
                         one BH over every perturbation x gene test of a file)
  --num-workers N        split the perturbations of each file over N Ray tasks, spread over
                         the cluster's hosts (scheduling strategy SPREAD; the data travel
                         through Ray's object store, no shared file system needed) on the
                         cluster of RAY_ADDRESS or `ray start`, else a local one; the numbers
                         do not depend on N; default 1: one process, numba threads over genes
  --save-summaries DIR   also write each file's summary (.npz: pseudobulks and DE), to a
                         directory or s3:// prefix, so the real file need not be re-read for
                         the next prediction (Ray Tune trials)
  --no-plot              skip per_perturbation.png
  --quiet                no progress bars

Outputs in --out: results.csv (per perturbation: overlap_at_N = DES,
discrimination_score_l1 = PDS, mae, numbers of real and predicted DE genes, PDS rank, and the
baseline's values), baseline_diff.csv (cell-eval score's table, with a baseline),
per_perturbation.png, and agg_results.json (means; baseline means; scores; node_ids: the Ray
nodes that computed the DE, or the driver's when Ray is running with N = 1), written last. On
s3:// each is written locally and uploaded as one whole object, agg_results.json last: its
presence means the others are complete.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _bootstrap  # noqa: F401
import ray

from jobs._cli import connect_ray
from vcc_dist import storage
from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.metrics import vcc
from vcc_dist.ray_utils import SpreadMap

AGG_FILE = "agg_results.json"


def local_input(uri: str, what: str) -> str:
    """``uri`` itself, or for s3:// a copy in the scratch directory (downloaded under a
    temporary name and renamed: a concurrent evaluation never reads a partial copy)."""
    if not storage.is_remote(uri):
        return uri
    local = storage.scratch_dir(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.dl")
    try:
        storage.download_file(uri, tmp)
        os.replace(tmp, local)
    except FileNotFoundError:
        raise vcc.EvaluationError(
            f"{what}: {uri} does not exist; check the URI, or write it first (jobs/predict.py "
            "--out / --real-out, jobs/evaluate.py --save-summaries)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return str(local)


def upload(local: Path, uri: str) -> None:
    """One file to ``uri`` as one whole object."""
    storage.upload_file(local, uri)


def _summary(uri: str, what: str, a, mapper: SpreadMap | None):
    path = Path(local_input(uri, what))
    if path.suffix == ".npz":
        return vcc.FileSummary.load(path)
    t = time.perf_counter()
    s = vcc.summarize(path, what=what, pert_col=a.pert_col, control_label=a.control_label,
                      num_workers=a.num_workers, progress=not a.quiet, map_chunks=mapper)
    print(f"{what}: {len(s.perts)} perturbations, {s.n_control} control cells, "
          f"{len(s.genes)} genes ({'counts, normalised' if s.was_counts else 'log1p'}) in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    if a.save_summaries is not None:
        name = f"{path.stem}.summary.npz"
        dest = storage.join(a.save_summaries, name)
        if storage.is_remote(a.save_summaries):
            local = storage.scratch_dir(str(dest))
            local.parent.mkdir(parents=True, exist_ok=True)
            upload(s.save(local), str(dest))
        else:
            Path(a.save_summaries).mkdir(parents=True, exist_ok=True)
            s.save(dest)
        print(f"  summary saved to {dest}", file=sys.stderr)
    return s


def write_outputs(ev: vcc.Evaluation, out: str, plot: bool) -> list[str]:
    """vcc.write_evaluation into ``out``, or for s3:// into a scratch directory and then
    uploaded file by file, agg_results.json last. Returns the names written."""
    if not storage.is_remote(out):
        return list(vcc.write_evaluation(ev, out, plot=plot))
    base = storage.scratch_dir(out)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".evaluate-", dir=base))
    try:
        paths = vcc.write_evaluation(ev, tmp, plot=plot)
        names = sorted(paths, key=lambda n: n == AGG_FILE)  # stable: agg_results.json last
        for name in names:
            upload(paths[name], str(storage.join(out, name)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


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
    p.add_argument("--save-summaries")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    mapper = None
    if a.num_workers > 1:
        if not connect_ray("evaluate"):
            return 2
        mapper = SpreadMap()
    t0 = time.perf_counter()
    try:
        for where in (a.out, a.save_summaries):
            if where and storage.is_remote(where) and not storage.bucket_exists(where):
                raise vcc.EvaluationError(
                    f"bucket {storage.split_s3(where)[0]!r} of {where} does not exist; create "
                    "it, or fix the URI or AWS_ENDPOINT_URL")
        real = _summary(a.real, "real", a, mapper)
        pred = _summary(a.pred, "pred", a, mapper)
        base = _summary(a.baseline, "baseline", a, mapper) if a.baseline else None
        base_agg = local_input(a.baseline_agg, "baseline-agg") if a.baseline_agg else None
        ev = vcc.evaluate(real, pred, base, baseline_agg=base_agg, fdr_scope=a.fdr_scope)
        if mapper is not None and mapper.node_ids:
            ev.node_ids = sorted(mapper.node_ids)
        elif ray.is_initialized():
            ev.node_ids = [ray.get_runtime_context().get_node_id()]
        names = write_outputs(ev, a.out, plot=not a.no_plot)
    except (vcc.EvaluationError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"agg": ev.agg, "baseline_agg": ev.baseline_agg, "score": ev.scores},
                     indent=2))
    print(f"written to {a.out}: {', '.join(names)} ({time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
