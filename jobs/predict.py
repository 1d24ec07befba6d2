"""Predict held-out perturbations of a context with a trained ST model, as a challenge
submission (vcc_dist/infer/st_predict.py), then score it with jobs/evaluate.py.

    python jobs/predict.py --checkpoint runs/st_demo --corpus runs/demo/corpus \\
        --split runs/demo/sim/split.toml --role test --out runs/st_demo/pred_test.h5ad
    python jobs/predict.py --checkpoint runs/st_demo/checkpoint_... --context hepg2 \\
        --counts pert_counts.csv --out pred.h5ad        # the challenge's counts file
    ray job submit --working-dir . -- python jobs/predict.py \\
        --checkpoint s3://bucket/runs/st --corpus s3://bucket/corpus \\
        --split s3://bucket/split.toml --out s3://bucket/runs/st/pred_test.h5ad \\
        --real-out s3://bucket/runs/st/real_test.h5ad --num-workers 4
    python jobs/evaluate.py --real real.h5ad --pred pred.h5ad --baseline cell-mean.h5ad

Every location (--checkpoint, --corpus, --split, --counts, --out, --real-out) may be a local
path or an s3:// URI (endpoint and credentials from the AWS_* variables, vcc_dist/storage.py).
An s3:// output is written to a local scratch file ($VCC_DIST_SCRATCH) and uploaded as one
whole object when complete, so a partial file never appears there; a local one is written
under a temporary name and renamed.

The prediction streams: sets of the context's control cells (``cell_set_len`` per set, many
sets per forward pass) go through the model, and each pass's cells are appended to the file.
Every set is drawn up front (seeded, in the perturbations' order); with --num-workers N the
sets are cut into N ranges of whole forward passes, predicted by N Ray tasks spread over the
cluster's hosts (scheduling strategy SPREAD; the model and the sampled controls travel through
Ray's object store, so the hosts need no shared file system), and assembled in order: the file
holds the same numbers for every N. Its uns['vcc_dist'] records the checkpoint, the corpus
and node_ids, the Ray nodes that predicted (the driver's with N = 1 when Ray is running).

Every option is listed by --help with its default and accepted values.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import _bootstrap  # noqa: F401  (first: puts the checkout on sys.path)
import anndata as ad
import numpy as np
import pandas as pd
import ray
import scipy.sparse as sp
import torch

from jobs._cli import add_progress, add_ray, connect_ray, job_parser
from vcc_dist import storage
from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.data.plans import SetStreamConfig
from vcc_dist.data.reader import CorpusReader
from vcc_dist.data.streams import set_plan
from vcc_dist.infer.counts import parse_pert_counts
from vcc_dist.infer.st_predict import (
    ContextInputs,
    load_st_checkpoint,
    predict_context,
    predict_set_range,
    set_ranges,
)
from vcc_dist.models.st import STModel
from vcc_dist.train.st_data import HeldOut, heldout_groups

#: where uns records the prediction's provenance
PROVENANCE_KEY = "vcc_dist"


def _real_file(corpus: str, held: HeldOut, path: Path, genes: list[str]) -> Path:
    """The held-out real cells (raw counts) and the context's controls, as an h5ad (written
    under a temporary name and renamed)."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.h5ad")
    try:
        a.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def staged(out: str) -> Iterator[Path]:
    """The local path to write the output ``out`` at: ``out`` itself, or for an s3:// URI a
    file in a fresh scratch directory, uploaded as one whole object when the block completes
    (nothing is uploaded when it raises)."""
    if not storage.is_remote(out):
        yield Path(out)
        return
    dest = str(storage.parent(out))
    base = storage.scratch_dir(dest)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".predict-", dir=base))
    try:
        local = tmp / storage.basename(out)
        yield local
        # one object, uploaded whole (a multipart upload of a large file also appears only
        # when complete)
        storage.upload_file(local, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_counts(source: str) -> dict[str, int]:
    """The challenge's counts CSV (target_gene,n_cells) from a local path or an s3:// URI."""
    if not storage.is_remote(source):
        return parse_pert_counts(source)
    try:
        data = storage.read_bytes(source)
    except FileNotFoundError:
        raise FileNotFoundError(f"counts file {source} does not exist; check the URI or upload "
                                "the target_gene,n_cells CSV there") from None
    # as parse_pert_counts reads a local CSV: text, no NA parsing (a gene named "NA" stays)
    return parse_pert_counts(pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False))


def _predict_part(model: STModel, inputs: ContextInputs, start: int, stop: int,
                  sets_per_batch: int, threads: int) -> tuple[sp.csr_matrix, str]:
    """One Ray task: the predicted cells of sets [start, stop), and the node it ran on."""
    torch.set_num_threads(threads)
    blocks = [sp.csr_matrix(p, dtype=np.float32)
              for p in predict_set_range(model, inputs, start, stop,
                                         sets_per_batch=sets_per_batch)]
    x = (sp.vstack(blocks, format="csr") if blocks
         else sp.csr_matrix((0, inputs.controls.shape[1]), dtype=np.float32))
    return x, ray.get_runtime_context().get_node_id()


class SpreadRows:
    """A RowSource (vcc_dist.infer.st_predict) over ``num_workers`` Ray tasks placed with
    SPREAD, one contiguous range of forward passes each; yields their rows in set order and
    records the nodes they ran on."""

    def __init__(self, num_workers: int, cpus_per_worker: float) -> None:
        self.num_workers = num_workers
        self.cpus_per_worker = cpus_per_worker
        self.node_ids: set[str] = set()

    def __call__(self, model: STModel, inputs: ContextInputs,
                 sets_per_batch: int) -> Iterator[sp.csr_matrix]:
        task = ray.remote(_predict_part).options(num_cpus=self.cpus_per_worker,
                                                 scheduling_strategy="SPREAD")
        model_ref, inputs_ref = ray.put(model), ray.put(inputs)
        threads = max(1, int(self.cpus_per_worker))
        refs = [task.remote(model_ref, inputs_ref, a, b, sets_per_batch, threads)
                for a, b in set_ranges(inputs.n_sets, sets_per_batch, self.num_workers)]
        for ref in refs:  # in order: the driver holds one part at a time
            x, node = ray.get(ref)
            self.node_ids.add(node)
            yield x


def parser():
    ap = job_parser(__doc__)
    ap.add_argument("--checkpoint", required=True, metavar="PATH",
                    help="a checkpoint_* directory of jobs/train_st.py, or its run directory "
                         "(then --which picks the checkpoint); local or s3:// (required)")
    ap.add_argument("--which", choices=["best", "latest"], default="best",
                    help="which checkpoint of a run directory: best or latest (default: best)")
    ap.add_argument("--corpus", metavar="DIR",
                    help="where the context's control cells come from, local or s3:// "
                         "(default: the training corpus recorded in the checkpoint)")
    ap.add_argument("--context", metavar="NAME",
                    help="the target cell context (default: with --split, the one holding the "
                         "--role perturbations; required with --counts)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--counts", metavar="CSV",
                   help="perturbations and cell counts, the challenge's target_gene,n_cells "
                        "file, local or s3:// (this or --split is required)")
    g.add_argument("--split", metavar="TOML",
                   help="take the split's --role perturbations of the context, with their real "
                        "cell counts in the corpus; local or s3:// (this or --counts is "
                        "required)")
    ap.add_argument("--role", default="test", metavar="R",
                    help="with --split: test, val or val,test (default: test)")
    ap.add_argument("--out", required=True, metavar="PATH",
                    help="the submission .h5ad: log1p values, float32 CSR, controls included; "
                         "local or s3:// (uploaded whole when complete) (required)")
    ap.add_argument("--real-out", metavar="PATH",
                    help="with --split: also write those perturbations' real cells and the "
                         "context's controls (raw counts), to score against; local or s3:// "
                         "(default: none)")
    ap.add_argument("--sets-per-batch", type=int, default=32, metavar="N",
                    help="sets of control cells per forward pass (default: 32)")
    ap.add_argument("--seed", type=int, default=0, metavar="N",
                    help="control-cell sampling seed (default: 0)")
    ap.add_argument("--num-workers", type=int, default=1, metavar="N",
                    help="Ray tasks predicting the sets, spread over the cluster's hosts "
                         "(SPREAD), each a contiguous range of forward passes; the output is "
                         "the same for every N; 1 = in this process, without Ray (default: 1)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                    help="with --num-workers > 1: CPUs each task reserves, and its torch "
                         "threads (default: 1)")
    add_ray(ap)
    add_progress(ap)
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.num_workers < 1:
        print(f"error: --num-workers {a.num_workers}: expected 1 or more", file=sys.stderr)
        return 2
    if a.num_workers > 1 and not connect_ray("predict", num_cpus=a.num_cpus):
        return 2

    t0 = time.perf_counter()
    try:
        for where in (a.out, a.real_out):  # fail before predicting, not at the upload
            if where and storage.is_remote(where) and not storage.bucket_exists(where):
                raise storage.StorageError(
                    f"bucket {storage.split_s3(where)[0]!r} of {where} does not exist; create "
                    "it, or fix the URI or AWS_ENDPOINT_URL")
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
            counts = read_counts(a.counts)
        print(f"[predict] {loaded.path}: {len(counts)} perturbations, "
              f"{sum(counts.values()):,} cells in context {context!r}"
              + (f", {a.num_workers} Ray tasks" if a.num_workers > 1 else ""))
        rows = SpreadRows(a.num_workers, a.cpus_per_worker) if a.num_workers > 1 else None

        def provenance() -> dict:
            if rows is not None:
                nodes = sorted(rows.node_ids)
            elif ray.is_initialized():
                nodes = [ray.get_runtime_context().get_node_id()]
            else:
                nodes = []
            rec = {"checkpoint": str(loaded.path), "corpus": str(corpus), "context": context,
                   "seed": a.seed, "num_workers": a.num_workers}
            if nodes:
                rec["node_ids"] = np.array(nodes, dtype=str)
            return {PROVENANCE_KEY: rec}

        with staged(a.out) as local:
            predict_context(loaded, corpus, context, dict(counts), local,
                            sets_per_batch=a.sets_per_batch, seed=a.seed,
                            progress=not a.no_progress, rows=rows, uns=provenance)
        if rows is not None:
            print(f"[predict] predicted on {len(rows.node_ids)} node(s): "
                  f"{', '.join(sorted(rows.node_ids))}")
        if a.real_out and held is not None:
            with staged(a.real_out) as local:
                _real_file(corpus, held, local, loaded.genes)
            print(f"[predict] real cells: {a.real_out}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[predict] submission: {a.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
