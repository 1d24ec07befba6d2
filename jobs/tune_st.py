"""Ray Tune sweep of ST hyperparameters against the challenge score (vcc_dist/tune/sweep.py).

    python jobs/tune_st.py --space default --recipe demo --corpus runs/demo/corpus \\
        --split runs/demo/sim/split.toml --run-dir runs/tune_demo --num-samples 16
    ray job submit --working-dir . -- python jobs/tune_st.py --space default \\
        --corpus /shared/corpus --split /shared/split.toml --run-dir /shared/runs/tune \\
        --num-samples 32 --trial-workers 1 --gpus-per-trial 1 --wandb auto
    python jobs/train_st.py --recipe runs/tune_demo/best_recipe.json --run-dir runs/st_best
    AWS_ENDPOINT_URL=http://minio:9000 python jobs/tune_st.py --space demo --recipe demo \\
        --corpus s3://vcc/corpus --split s3://vcc/split.toml --run-dir s3://vcc/sweeps/demo

Every trial trains ST (Ray Train + DeepSpeed, its own checkpoints in <run-dir>/trials/<id>)
with the base recipe plus sampled values, and is scored by the overall challenge score on the
split's validation perturbations (DES, PDS and MAE are reported with it). ASHA stops poor
trials early; Optuna proposes new ones. A crashed trial is recorded and the sweep goes on.

Every option is listed by --help with its default and accepted values; --help also lists
the search spaces and the knobs each one samples.

Outputs in --run-dir: trials.csv (status, validations, best score and its DES/PDS/MAE, sampled
values, run directory, error per trial), best_recipe.json (accepted by jobs/train_st.py
--recipe), sweep.png (score by trial and against each parameter), summary.json, trials/<id>/
(each trial's ST run) and Tune's own state (for --resume).

--run-dir may be on object storage (s3://bucket/prefix/sweep; endpoint and credentials from
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, which every
Ray node must also have): Tune's state, every trial's run and checkpoints and the outputs above
are kept there and nowhere else, and --resume restores the sweep from there;
jobs/train_st.py --recipe reads its best_recipe.json from there too.
"""

from __future__ import annotations

import dataclasses
import sys

import _bootstrap  # noqa: F401  (first: puts the checkout on sys.path)

from jobs._cli import (
    add_overrides,
    add_progress,
    add_ray,
    add_recipe,
    add_wandb,
    connect_ray,
    job_parser,
    one_of,
    wandb_overrides,
)
from vcc_dist.config import parse_overrides
from vcc_dist.storage import StorageError
from vcc_dist.train.st import RECIPES, STTrainConfig
from vcc_dist.tune.sweep import (
    SCHEDULERS,
    SEARCHERS,
    SPACES,
    SweepConfig,
    can_restore,
    run_sweep,
)

#: SweepConfig's defaults, shown in --help
DEFAULTS = {f.name: f.default for f in dataclasses.fields(SweepConfig)
            if f.default is not dataclasses.MISSING}


def build_config(a):
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
                       space=a.space, overrides=parse_overrides(a.set or [], STTrainConfig),
                       wandb=wandb_overrides(a), **kw)


def spaces_help() -> str:
    return "; ".join(f"{name} ({', '.join(knobs)})" for name, knobs in SPACES.items())


def parser():
    ap = job_parser(__doc__)
    d = DEFAULTS
    ap.add_argument("--space", default=d["space"], metavar="NAME",
                    help=f"search space, one of: {spaces_help()} (default: {d['space']})")
    add_recipe(ap, RECIPES, d["recipe"], "base ST", " (jobs/train_st.py --print-config shows one)")
    ap.add_argument("--corpus", metavar="DIR", help="the Zarr corpus (required)")
    ap.add_argument("--split", metavar="TOML",
                    help="split file; it must have validation perturbations (required)")
    ap.add_argument("--run-dir", metavar="DIR",
                    help="the sweep directory: trials/<id>/ hold each trial's ST run (shared "
                         "storage on a cluster), or s3://bucket/prefix/sweep on object "
                         "storage (AWS_ENDPOINT_URL and the AWS credential variables, on every "
                         "Ray node) (required)")
    ap.add_argument("--num-samples", type=int, metavar="N",
                    help=f"trials (default: {d['num_samples']})")
    ap.add_argument("--max-concurrent", type=int, metavar="N",
                    help="trials at once; 0 = what the cluster's CPUs (one left for Ray Data) "
                         "and GPUs hold at --trial-workers x --cpus/gpus-per-trial "
                         f"(default: {d['max_concurrent']})")
    ap.add_argument("--trial-workers", type=int, metavar="N",
                    help=f"Ray Train workers per trial (default: {d['trial_workers']})")
    ap.add_argument("--cpus-per-trial", type=float, metavar="C",
                    help=f"CPUs per trial worker (default: {d['cpus_per_trial']})")
    ap.add_argument("--gpus-per-trial", type=float, metavar="G",
                    help=f"GPUs per trial worker (default: {d['gpus_per_trial']})")
    ap.add_argument("--scheduler", choices=SCHEDULERS, metavar="S",
                    help=f"trial scheduler, one of {one_of(SCHEDULERS)}; asha stops poor "
                         f"trials at validations (default: {d['scheduler']})")
    ap.add_argument("--grace-period", type=int, metavar="N",
                    help="ASHA: validations before a trial can be stopped "
                         f"(default: {d['grace_period']})")
    ap.add_argument("--max-t", type=int, metavar="N",
                    help="ASHA: most validations per trial; 0 = the trial's own number "
                         f"(default: {d['max_t']})")
    ap.add_argument("--searcher", choices=SEARCHERS, metavar="S",
                    help=f"how trials are proposed, one of {one_of(SEARCHERS)} (optuna = TPE) "
                         f"(default: {d['searcher']})")
    ap.add_argument("--max-steps", type=int, metavar="N",
                    help="optimizer steps per trial; 0 = the recipe's epochs "
                         f"(default: {d['max_steps']})")
    ap.add_argument("--checkpoint-every", type=int, metavar="N",
                    help="validate every N optimizer steps (ASHA's rungs); 0 = the recipe's "
                         f"(default: {d['checkpoint_every']})")
    ap.add_argument("--resume", action="store_true",
                    help="restore the sweep in --run-dir (Tuner.restore): finished trials are "
                         "kept, unfinished ones resume from their checkpoints (default: off; a "
                         "--run-dir that holds a sweep is refused without it)")
    add_wandb(ap)
    add_overrides(ap, "engine.zero_stage=3 (applied to every trial)")
    ap.add_argument("--seed", type=int, metavar="N",
                    help=f"searcher and training seed (default: {d['seed']})")
    add_ray(ap)
    add_progress(ap)
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        cfg = build_config(a)
        cfg.base_config()  # a bad recipe, space or override fails here, before Ray starts
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        exists = can_restore(cfg.run_dir)
    except (StorageError, OSError) as e:  # OSError: pyarrow's S3 errors
        print(f"error: cannot read {cfg.run_dir}: {e}", file=sys.stderr)
        return 2
    if not a.resume and exists:
        print(f"error: {cfg.run_dir} already holds a sweep: pass --resume to continue it, or "
              "choose a new --run-dir", file=sys.stderr)
        return 2
    if not connect_ray("tune_st", num_cpus=a.num_cpus, include_dashboard=True):
        return 2
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
        print(f"[tune_st] best recipe: {res.best_recipe} -> python jobs/train_st.py "
              f"--recipe {res.best_recipe} --run-dir <new run dir>")
    print(f"[tune_st] outputs in {res.run_dir}: trials.csv, sweep.png, summary.json")
    return 0 if res.best else 1


if __name__ == "__main__":
    sys.exit(main())
