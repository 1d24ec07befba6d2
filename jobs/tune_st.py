"""Ray Tune sweep of ST hyperparameters against the challenge score (vcc_dist/tune/sweep.py).

    python jobs/tune_st.py --space default --recipe demo --corpus runs/demo/corpus \\
        --split runs/demo/sim/split.toml --run-dir runs/tune_demo --num-samples 16
    ray job submit --working-dir . -- python jobs/tune_st.py --space default \\
        --corpus /shared/corpus --split /shared/split.toml --run-dir /shared/runs/tune \\
        --num-samples 32 --trial-workers 1 --gpus-per-trial 1 --wandb auto
    python jobs/train_st.py --recipe runs/tune_demo/best_recipe.json --run-dir runs/st_best

Every trial trains ST (Ray Train + DeepSpeed, its own checkpoints in <run-dir>/trials/<id>)
with the base recipe plus sampled values, and is scored by the overall challenge score on the
split's validation perturbations (DES, PDS and MAE are reported with it). ASHA stops poor
trials early; Optuna proposes new ones. A crashed trial is recorded and the sweep goes on.

Options:
  --space NAME          search space: default (lr, weight decay, hidden size, layers, set
                        size, loss, control matching), se (ST on SE embeddings: + decoder
                        weight), debug (CI: lr, hidden size)
  --recipe NAME|FILE    base ST recipe (default demo; see jobs/train_st.py)
  --corpus DIR, --split TOML   the data (the split must have validation perturbations)
  --run-dir DIR         the sweep directory (shared storage on a cluster)
  --num-samples N       trials (default 16)
  --max-concurrent N    trials at once (default: derived from the cluster's CPUs and GPUs)
  --trial-workers N     Ray Train workers per trial (default 1)
  --cpus-per-trial C    CPUs per trial worker (default 1)
  --gpus-per-trial G    GPUs per trial worker (default 0)
  --scheduler S         asha (default) or fifo; --grace-period N (validations before a trial
                        can be stopped, default 1), --max-t N (most validations per trial)
  --searcher S          optuna (default, TPE) or random
  --max-steps N         optimizer steps per trial (default: the recipe's epochs)
  --checkpoint-every N  validate every N optimizer steps (default: each epoch): ASHA's rungs
  --resume              restore the sweep in --run-dir (Tuner.restore): finished trials are
                        kept, unfinished ones resume from their checkpoints
  --wandb MODE          auto, online, offline, disabled (one wandb run per trial, grouped by
                        the sweep); --wandb-project NAME
  --set KEY=VALUE ...   train_st overrides for every trial (e.g. engine.zero_stage=3)
  --seed N              searcher and training seed (default 0)
  --num-cpus N          CPUs of the embedded local Ray (default all)
  --no-progress         quiet

Outputs in --run-dir: trials.csv (status, validations, best score and its DES/PDS/MAE, sampled
values, run directory, error per trial), best_recipe.json (accepted by jobs/train_st.py
--recipe), sweep.png (score by trial and against each parameter), summary.json, trials/<id>/
(each trial's ST run) and Tune's own state (for --resume).
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401


def build_config(a):
    from vcc_dist.train.loop import parse_overrides
    from vcc_dist.tune.sweep import SweepConfig

    wandb = {}
    if a.wandb:
        wandb["mode"] = a.wandb
    if a.wandb_project:
        wandb["project"] = a.wandb_project
    kw = {k: v for k, v in {
        "num_samples": a.num_samples, "max_concurrent": a.max_concurrent,
        "trial_workers": a.trial_workers, "cpus_per_trial": a.cpus_per_trial,
        "gpus_per_trial": a.gpus_per_trial, "scheduler": a.scheduler, "searcher": a.searcher,
        "max_steps": a.max_steps, "checkpoint_every": a.checkpoint_every,
        "grace_period": a.grace_period, "max_t": a.max_t, "seed": a.seed}.items()
        if v is not None}
    if not (a.corpus and a.split and a.run_dir):
        raise ValueError("--corpus, --split and --run-dir are required")
    return SweepConfig(corpus=a.corpus, split=a.split, run_dir=a.run_dir, recipe=a.recipe,
                       space=a.space, overrides=parse_overrides(a.set or []), wandb=wandb, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="default")
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--corpus")
    ap.add_argument("--split")
    ap.add_argument("--run-dir")
    ap.add_argument("--num-samples", type=int)
    ap.add_argument("--max-concurrent", type=int)
    ap.add_argument("--trial-workers", type=int)
    ap.add_argument("--cpus-per-trial", type=float)
    ap.add_argument("--gpus-per-trial", type=float)
    ap.add_argument("--scheduler", choices=["asha", "fifo"])
    ap.add_argument("--grace-period", type=int)
    ap.add_argument("--max-t", type=int)
    ap.add_argument("--searcher", choices=["optuna", "random"])
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"])
    ap.add_argument("--wandb-project")
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default all)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    try:
        cfg = build_config(a)
        cfg.base_config()  # a bad recipe, space or override fails here, before Ray starts
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    from ray import tune

    if not a.resume and tune.Tuner.can_restore(str(Path(cfg.run_dir).resolve())):
        print(f"error: {cfg.run_dir} already holds a sweep: pass --resume to continue it, or "
              "choose a new --run-dir", file=sys.stderr)
        return 2

    from vcc_dist.ray_utils import ensure_ray
    from vcc_dist.tune.sweep import run_sweep

    ensure_ray(num_cpus=a.num_cpus, include_dashboard=True)
    try:
        res = run_sweep(cfg, progress=not a.no_progress, resume=a.resume)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = res.trials
    counts = t["status"].value_counts().to_dict() if len(t) else {}
    print(f"[tune_st] {len(t)} trials in {res.wall_s:.0f} s: {counts}")
    if res.best:
        print(f"[tune_st] best trial {res.best['trial_id']}: score {res.best['best_score']:.4f} "
              f"(DES {res.best.get('DES')}, PDS {res.best.get('PDS')}, MAE {res.best.get('MAE')})")
        print(f"[tune_st] best recipe: {res.best_recipe} -> python jobs/train_st.py --recipe "
              f"{res.best_recipe} --run-dir <new run dir>")
    print(f"[tune_st] outputs in {res.run_dir}: trials.csv, sweep.png, summary.json")
    return 0 if res.best else 1


if __name__ == "__main__":
    sys.exit(main())
