"""Embed every cell of a corpus with a pretrained SE model (vcc_dist/infer/se_embed.py).

    python jobs/embed_cells.py --checkpoint runs/demo/se --corpus runs/demo/corpus \\
        --h5ad runs/demo/se/cells_state.h5ad
    ray job submit --working-dir . -- python jobs/embed_cells.py \\
        --checkpoint s3://bucket/runs/se600m --corpus s3://bucket/corpus

The embeddings land in the corpus stores as obsm/<key> (AnnData encoding: anndata.read_zarr
shows them), with a manifest naming the checkpoint; ST trains on them with the `demo_se`
recipe of `jobs/train_st.py` (or `--set embeddings=X_se` with any recipe). One Ray task per
store (a GPU each on GPU clusters), spread over the cluster's hosts; a store is written
atomically, a killed job resumes each partial store, and stores already embedded by the same
checkpoint are skipped. Checkpoint, corpus and --h5ad may be s3://bucket/prefix (endpoint and
credentials from the standard AWS variables): a store in object storage is committed by an
upload with its metadata last (vcc_dist/data/embeddings.py), and each store's embedding
manifest records the Ray node that wrote it.

Every option is listed by --help with its default and accepted values.
"""

from __future__ import annotations

import json
import sys

import _bootstrap  # noqa: F401  (first: puts the checkout on sys.path)

from jobs._cli import add_progress, add_ray, connect_ray, job_parser
from vcc_dist.data.embeddings import EmbeddingError, export_anndata
from vcc_dist.infer.se_embed import embed_corpus


def parser():
    ap = job_parser(__doc__)
    ap.add_argument("--checkpoint", required=True, metavar="PATH",
                    help="an SE run directory of jobs/pretrain_se.py (then --which picks the "
                         "checkpoint) or one of its checkpoint_* directories (required)")
    ap.add_argument("--which", choices=["best", "latest"], default="best",
                    help="which checkpoint of a run directory: best or latest (default: best)")
    ap.add_argument("--corpus", required=True, metavar="DIR",
                    help="the Zarr corpus to embed (any corpus with the same gene symbols; a "
                         "directory or s3://bucket/prefix) (required)")
    ap.add_argument("--key", default="X_se", metavar="NAME",
                    help="obsm key the embeddings are stored under in every store "
                         "(default: X_se)")
    ap.add_argument("--no-dataset-part", action="store_true",
                    help="store only the L2-normalised cell part (output_dim values), not the "
                         "cell + dataset embedding (default: off: both)")
    ap.add_argument("--h5ad", metavar="PATH",
                    help="also write one .h5ad with obs and obsm[--obsm-key], for scanpy (a "
                         "path or s3://...) (default: none)")
    ap.add_argument("--obsm-key", default="X_state", metavar="NAME",
                    help="obsm key in the --h5ad file (default: X_state, STATE's name)")
    ap.add_argument("--with-X", action="store_true",
                    help="include the raw counts as X in the --h5ad file (default: off)")
    ap.add_argument("--batch-size", type=int, default=256, metavar="N",
                    help="cells per forward pass (default: 256)")
    ap.add_argument("--overwrite", action="store_true",
                    help="recompute stores that already hold this checkpoint's embeddings "
                         "(default: off: they are skipped)")
    ap.add_argument("--serial", action="store_true",
                    help="embed in this process, without Ray (default: off: one Ray task per "
                         "store)")
    ap.add_argument("--cpus-per-task", type=float, default=1.0, metavar="C",
                    help="CPUs per Ray task (default: 1)")
    add_ray(ap)
    add_progress(ap)
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if not a.serial and not connect_ray("embed_cells", num_cpus=a.num_cpus):
        return 2
    try:
        res = embed_corpus(a.checkpoint, a.corpus, key=a.key, which=a.which,
                           batch_size=a.batch_size, with_dataset=not a.no_dataset_part,
                           overwrite=a.overwrite, parallel="serial" if a.serial else "ray",
                           cpus_per_task=a.cpus_per_task, progress=not a.no_progress)
    except (ValueError, FileNotFoundError, EmbeddingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = f", {res['cells_per_s']:.0f} cells/s" if res["cells_per_s"] else ""
    print(f"[embed_cells] {res['cells']:,} cells in {len(res['embedded'])} store(s) embedded "
          f"({res['dim']}-d, {res['seconds']:.1f} s{rate}); {len(res['skipped'])} store(s) "
          f"already up to date -> obsm/{a.key} in {a.corpus}")
    if a.h5ad:
        p = export_anndata(a.corpus, a.key, a.h5ad, obsm_key=a.obsm_key, with_X=a.with_X)
        print(f"[embed_cells] AnnData with obsm[{a.obsm_key!r}]: {p}")
    print(json.dumps({k: v for k, v in res.items() if k not in ("embedded", "skipped")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
