"""Embed every cell of a corpus with a pretrained SE model (vcc_dist/infer/se_embed.py).

    python jobs/embed_cells.py --checkpoint runs/demo/se --corpus runs/demo/corpus \\
        --h5ad runs/demo/se/cells_state.h5ad
    ray job submit --working-dir . -- python jobs/embed_cells.py \\
        --checkpoint /shared/runs/se600m --corpus /shared/corpus

The embeddings land in the corpus stores as obsm/<key> (AnnData encoding: anndata.read_zarr
shows them), with a manifest naming the checkpoint; ST trains on them with
`jobs/train_st.py --set data.embeddings=X_se model.output_space=embedding ...` (the `se`
recipe). One Ray task per store (a GPU each on GPU clusters); a store is written atomically,
a killed job resumes each partial store, and stores already embedded by the same checkpoint
are skipped.

Options:
  --checkpoint PATH     an SE run directory (its best checkpoint; --which latest) or a
                        checkpoint_* directory of jobs/pretrain_se.py
  --which best|latest   which checkpoint of a run directory (default best)
  --corpus DIR          the Zarr corpus to embed (any corpus with the same gene symbols)
  --key NAME            obsm key in the stores (default X_se)
  --no-dataset-part     store only the L2-normalised cell part (output_dim), not the cell +
                        dataset embedding
  --h5ad PATH           also write one .h5ad with obs and obsm[--obsm-key] for scanpy
  --obsm-key NAME       obsm key in that file (default X_state, STATE's name)
  --with-X              include the raw counts as X in the .h5ad
  --batch-size N        cells per forward pass (default 256)
  --overwrite           recompute stores that already hold this checkpoint's embeddings
  --serial              embed in this process (no Ray)
  --cpus-per-task C     CPUs per Ray task (default 1)
  --num-cpus N          CPUs of the embedded local Ray (default all)
  --no-progress         no progress bar
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--which", choices=["best", "latest"], default="best")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--key", default="X_se")
    ap.add_argument("--no-dataset-part", action="store_true")
    ap.add_argument("--h5ad")
    ap.add_argument("--obsm-key", default="X_state")
    ap.add_argument("--with-X", action="store_true")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--serial", action="store_true")
    ap.add_argument("--cpus-per-task", type=float, default=1.0)
    ap.add_argument("--num-cpus", type=int)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    from vcc_dist.data.embeddings import EmbeddingError, export_anndata
    from vcc_dist.infer.se_embed import embed_corpus

    if not a.serial:
        from vcc_dist.ray_utils import ensure_ray

        ensure_ray(num_cpus=a.num_cpus)
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
