"""Train an ST (State Transition) model on Ray Train + DeepSpeed (vcc_dist/train/st.py).

    python jobs/train_st.py --recipe demo --corpus runs/demo/corpus \\
        --split runs/demo/sim/split.toml --run-dir runs/st_demo
    ray job submit --working-dir . -- python jobs/train_st.py --recipe state_sm \\
        --corpus /shared/corpus --split /shared/split.toml --run-dir /shared/runs/st \\
        --num-workers 8 --use-gpu

Running the same command again resumes the run from its latest checkpoint (same --run-dir);
a worker killed mid-run is replaced and training resumes from the latest checkpoint
(--max-failures).

Options:
  --recipe NAME|FILE    debug (seconds on CPU), demo (the main job's model), state_sm (STATE's
                        shape), or a JSON/YAML recipe file (e.g. Tune's best_recipe.json)
  --corpus DIR          the Zarr corpus (data_conversion); required unless in the recipe
  --split TOML          STATE/cell-load split file: train/val/test roles; validation uses the
                        held-out context's val perturbations
  --run-dir DIR         checkpoints, metrics_*.csv, curves.png, wandb/ (shared storage on a
                        multi-node cluster)
  --num-workers N       Ray Train workers (default: the recipe's, 1)
  --cpus-per-worker C   CPUs each worker reserves (default 1; the rest feed the data stream)
  --use-gpu             one GPU per worker (bf16 with the default precision "auto")
  --epochs N, --max-steps N, --checkpoint-every N (optimizer steps; 0 = per epoch)
  --max-failures N      worker-group restarts after a failure (default 2)
  --features SRC ...    perturbation features, concatenated: onehot, transfer (the
                        perturbation's mean effect in the other contexts), or {gene: vector}
                        .pt files (e.g. ESM2 from jobs/embed_genes.py)
  --wandb MODE          auto (online if credentials exist, else offline), online, offline,
                        disabled; --wandb-project NAME
  --set KEY=VALUE ...   any other option, dotted into sections, e.g. --set optim.lr=3e-4
                        model.hidden_dim=512 data.control_strategy=batch loss=sinkhorn
                        engine.zero_stage=3 optim.grad_accum_steps=2
  --print-config        print the complete config and exit
  --no-progress         no progress bars

Outputs in --run-dir: checkpoint_*/ (DeepSpeed shards + manifest.json + features.npy; the best
by validation score and the latest are kept), best_checkpoint.json, latest_checkpoint.json,
metrics_train.csv (loss, lr, grad norm, cells/s), metrics_val.csv (DES, PDS, MAE, score vs
cell-mean), curves.png, summary.json, config.json, prep/ (features, validation summaries and
the baselines' validation metrics).
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401


def build_config(a):
    from vcc_dist.train.st import parse_overrides, st_recipe

    over = parse_overrides(a.set or [])
    top = {"corpus": a.corpus, "split": a.split, "run_dir": a.run_dir,
           "num_workers": a.num_workers, "cpus_per_worker": a.cpus_per_worker,
           "epochs": a.epochs, "max_steps": a.max_steps, "checkpoint_every": a.checkpoint_every,
           "max_failures": a.max_failures, "features": a.features, "seed": a.seed}
    if a.use_gpu:
        top["use_gpu"] = True
    if a.wandb or a.wandb_project:
        over.setdefault("wandb", {})
        if a.wandb:
            over["wandb"]["mode"] = a.wandb
        if a.wandb_project:
            over["wandb"]["project"] = a.wandb_project
    return st_recipe(a.recipe, over, **top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--corpus")
    ap.add_argument("--split")
    ap.add_argument("--run-dir")
    ap.add_argument("--num-workers", type=int)
    ap.add_argument("--cpus-per-worker", type=float)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--max-failures", type=int)
    ap.add_argument("--features", nargs="+")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"])
    ap.add_argument("--wandb-project")
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default all)")
    ap.add_argument("--print-config", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    try:
        cfg = build_config(a)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0

    from vcc_dist.ray_utils import ensure_ray
    from vcc_dist.train.st import train_st

    ensure_ray(num_cpus=a.num_cpus)
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
