"""Pretrain SE (State Embedding) on Ray Train + DeepSpeed ZeRO-3 (vcc_dist/train/se.py).

    python jobs/pretrain_se.py --recipe debug --corpus runs/demo/corpus \\
        --gene-table runs/demo/esm/gene_embeddings.pt --run-dir runs/se_debug
    ray job submit --working-dir . -- python jobs/pretrain_se.py --recipe se600m \\
        --corpus /shared/corpus --gene-table /shared/esm15b/gene_embeddings.pt \\
        --run-dir /shared/runs/se600m --num-workers 16 --use-gpu

Running the same command again resumes the run from its latest checkpoint (same --run-dir);
a worker killed mid-run is replaced and training resumes from the latest checkpoint
(--max-failures).

Every option is listed by --help with its default and accepted values.

Outputs in --run-dir: checkpoint_*/ (DeepSpeed shards + manifest.json + gene_map.npy; the best
by validation loss and the latest are kept), best_checkpoint.json, latest_checkpoint.json,
metrics_train.csv (loss parts, lr, grad norm, cells/s and tokens/s per worker),
metrics_val.csv (validation loss on held-out cells), curves.png, summary.json, config.json,
prep/ (gene table matched to the corpus, genes without an embedding, validation sentences).
Next: python jobs/embed_cells.py --checkpoint <run-dir> --corpus <corpus>
"""

from __future__ import annotations

import json
import sys

import _bootstrap  # noqa: F401  (first: puts the checkout on sys.path)

from jobs._cli import (
    add_overrides,
    add_print_config,
    add_progress,
    add_ray,
    add_recipe,
    add_run_dir,
    add_schedule,
    add_seed,
    add_wandb,
    add_workers,
    connect_ray,
    job_parser,
    wandb_overrides,
)
from vcc_dist.config import parse_overrides
from vcc_dist.train.se import RECIPES, SETrainConfig, se_recipe, train_se


def build_config(a):
    over = parse_overrides(a.set or [], SETrainConfig)
    top = {"corpus": a.corpus, "gene_table": a.gene_table, "run_dir": a.run_dir,
           "num_workers": a.num_workers, "cpus_per_worker": a.cpus_per_worker,
           "epochs": a.epochs, "max_steps": a.max_steps, "checkpoint_every": a.checkpoint_every,
           "max_failures": a.max_failures, "seed": a.seed}
    if a.use_gpu:
        top["use_gpu"] = True
    if a.zero_stage is not None:
        over.setdefault("engine", {})["zero_stage"] = a.zero_stage
    wb = wandb_overrides(a)
    if wb:
        over["wandb"] = {**over.get("wandb", {}), **wb}
    return se_recipe(a.recipe, over, **top)


def parser():
    ap = job_parser(__doc__)
    add_recipe(ap, RECIPES, "debug", "SE", "; --print-config shows the complete config")
    ap.add_argument("--corpus", metavar="DIR",
                    help="the Zarr corpus (jobs/convert.py) (default: the recipe's; required "
                         "unless the recipe sets it)")
    ap.add_argument("--gene-table", metavar="PATH",
                    help="ESM2 gene embeddings: {gene: vector} .pt (jobs/embed_genes.py's "
                         "gene_embeddings.pt, or STATE's format) or its .npz; corpus genes "
                         "without an embedding are reported and left out (required)")
    add_run_dir(ap, "checkpoints, metrics_*.csv, curves.png, wandb/")
    add_workers(ap, "the rest of the node's CPUs build cell sentences in Ray Data")
    add_schedule(ap)
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], metavar="S",
                    help="DeepSpeed ZeRO stage, one of 0, 1, 2, 3; under stage 3 parameters "
                         "are partitioned as they are built (default: the recipe's, else 3 "
                         "with several workers and 0 with one: nothing to shard)")
    add_seed(ap, "cell order, sentences, initialisation")
    add_wandb(ap)
    add_overrides(ap, "optim.lr=1e-4 model.n_layers=8 model.loss=energy model.n_copies=4 "
                      "model.mask_targets=false targets=state_paper data.batch_size=64 "
                      "data.val_fraction=0.01 engine.activation_checkpointing=true "
                      "optim.grad_accum_steps=4")
    add_ray(ap)
    add_print_config(ap)
    add_progress(ap)
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        cfg = build_config(a)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if not connect_ray("pretrain_se", num_cpus=a.num_cpus):
        return 2
    try:
        r = train_se(cfg, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rv = r.return_value or {}
    if r.prep.missing_genes:
        print(f"[pretrain_se] {len(r.prep.missing_genes)} corpus genes had no embedding and were "
              f"left out (list in {r.prep.dir / 'prep.json'})")
    print(f"[pretrain_se] {rv.get('step', '?')} optimizer steps in {r.wall_s:.0f} s; last "
          f"validation {rv.get('last_val')}")
    print(f"[pretrain_se] best checkpoint: {r.best_checkpoint}")
    print(f"[pretrain_se] outputs in {r.run_dir}: metrics_train.csv, metrics_val.csv, curves.png")
    print(f"[pretrain_se] next: python jobs/embed_cells.py --checkpoint {r.run_dir} "
          f"--corpus {cfg.corpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
