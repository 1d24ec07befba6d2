"""Train an ST (State Transition) model on Ray Train + DeepSpeed (vcc_dist/train/st.py).

    python jobs/train_st.py --recipe demo --corpus runs/demo/corpus \\
        --split runs/demo/sim/split.toml --run-dir runs/st_demo
    ray job submit --working-dir . -- python jobs/train_st.py --recipe state_sm \\
        --corpus /shared/corpus --split /shared/split.toml --run-dir /shared/runs/st \\
        --num-workers 8 --use-gpu

Running the same command again resumes the run from its latest checkpoint (same --run-dir);
a worker killed mid-run is replaced and training resumes from the latest checkpoint
(--max-failures).

Every option is listed by --help with its default and accepted values.

Outputs in --run-dir: checkpoint_*/ (DeepSpeed shards + manifest.json + features.npy; the best
by validation score and the latest are kept), best_checkpoint.json, latest_checkpoint.json,
metrics_train.csv (loss, lr, grad norm, cells/s), metrics_val.csv (DES, PDS, MAE, score vs
cell-mean), curves.png, summary.json, config.json, prep/ (features, validation summaries and
the baselines' validation metrics).
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
    one_of,
    wandb_overrides,
)
from vcc_dist.config import parse_overrides
from vcc_dist.train.st import RECIPES, STTrainConfig, st_recipe, train_st
from vcc_dist.train.st_data import ONEHOT, TRANSFER


def build_config(a):
    over = parse_overrides(a.set or [], STTrainConfig)
    top = {"corpus": a.corpus, "split": a.split, "run_dir": a.run_dir,
           "num_workers": a.num_workers, "cpus_per_worker": a.cpus_per_worker,
           "epochs": a.epochs, "max_steps": a.max_steps, "checkpoint_every": a.checkpoint_every,
           "max_failures": a.max_failures, "features": a.features, "seed": a.seed}
    if a.use_gpu:
        top["use_gpu"] = True
    wb = wandb_overrides(a)
    if wb:
        over["wandb"] = {**over.get("wandb", {}), **wb}
    return st_recipe(a.recipe, over, **top)


def parser():
    ap = job_parser(__doc__)
    add_recipe(ap, RECIPES, "demo", "ST", " (e.g. a sweep's best_recipe.json); "
               "--print-config shows the complete config")
    ap.add_argument("--corpus", metavar="DIR",
                    help="the Zarr corpus (jobs/convert.py) (default: the recipe's; required "
                         "unless the recipe sets it)")
    ap.add_argument("--split", metavar="TOML",
                    help="STATE/cell-load split file: train/val/test roles; validation scores "
                         "the held-out context's val perturbations (default: the recipe's; "
                         "none = every cell trains, no validation)")
    add_run_dir(ap, "checkpoints, metrics_*.csv, curves.png, wandb/")
    add_workers(ap, "the rest of the node's CPUs feed the data stream")
    add_schedule(ap)
    ap.add_argument("--features", nargs="+", metavar="SRC",
                    help=f"perturbation features, concatenated: {ONEHOT}, {TRANSFER} (the "
                         "perturbation's mean effect in the other training contexts), or "
                         "{gene: vector} .pt files (e.g. jobs/embed_genes.py's "
                         "gene_embeddings.pt); accepted: "
                         f"{one_of((ONEHOT, TRANSFER, 'PATH.pt'))} (default: the recipe's)")
    add_seed(ap)
    add_wandb(ap)
    add_overrides(ap, "optim.lr=3e-4 model.hidden_dim=512 data.control_strategy=batch "
                      "loss=sinkhorn engine.zero_stage=3 optim.grad_accum_steps=2")
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
    if not connect_ray("train_st", num_cpus=a.num_cpus):
        return 2
    try:
        r = train_st(cfg, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rv = r.return_value or {}
    print(f"[train_st] {rv.get('step', '?')} optimizer steps in {r.wall_s:.0f} s; best validation "
          f"score {rv.get('best_val_score')}; last validation {rv.get('last_val')}")
    if r.prep.baselines:
        print("[train_st] baselines on the same validation cells: " + ", ".join(
            f"{k} {v.get('score', 0):.3f}" for k, v in r.prep.baselines.items()))
    print(f"[train_st] best checkpoint: {r.best_checkpoint}")
    print(f"[train_st] outputs in {r.run_dir}: metrics_train.csv, metrics_val.csv, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
