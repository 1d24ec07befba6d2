"""Pretrain SE (State Embedding) on Ray Train + DeepSpeed ZeRO-3 (vcc_dist/train/se.py).

    python jobs/pretrain_se.py --recipe debug --corpus runs/demo/corpus \\
        --gene-table runs/demo/esm/gene_embeddings.pt --run-dir runs/se_debug
    ray job submit --working-dir . -- python jobs/pretrain_se.py --recipe se600m \\
        --corpus /shared/corpus --gene-table /shared/esm15b/gene_embeddings.pt \\
        --run-dir /shared/runs/se600m --num-workers 16 --use-gpu

Running the same command again resumes the run from its latest checkpoint (same --run-dir);
a worker killed mid-run is replaced and training resumes from the latest checkpoint
(--max-failures).

Options:
  --recipe NAME|FILE    debug (seconds on CPU), demo (the main job's SE), small (a CPU-trainable
                        model), se600m (STATE's SE-600M: bf16, ZeRO-3, activation
                        checkpointing, GPUs), or a JSON/YAML recipe file
  --corpus DIR          the Zarr corpus (data_conversion)
  --gene-table PATH     ESM2 gene embeddings ({gene: vector} .pt, from jobs/embed_genes.py);
                        corpus genes without an embedding are reported and left out
  --run-dir DIR         checkpoints, metrics_*.csv, curves.png, wandb/ (shared storage on a
                        multi-node cluster)
  --num-workers N       Ray Train workers (default 1)
  --cpus-per-worker C   CPUs each worker reserves (default 1; the rest tokenise in Ray Data)
  --use-gpu             one GPU per worker (bf16 with the default precision "auto")
  --epochs N, --max-steps N, --checkpoint-every N (optimizer steps; 0 = per epoch)
  --zero-stage S        DeepSpeed ZeRO stage 0-3 (default 3 with several workers, 0 with one:
                        nothing to shard); under ZeRO-3 parameters are partitioned as built
  --max-failures N      worker-group restarts after a failure (default 2)
  --wandb MODE          auto (online if credentials exist, else offline), online, offline,
                        disabled; --wandb-project NAME
  --set KEY=VALUE ...   any other option, dotted into sections, e.g. --set optim.lr=1e-4
                        model.n_layers=8 model.loss=energy model.n_copies=4
                        model.mask_targets=false targets=state_paper data.batch_size=64
                        data.val_fraction=0.01 engine.activation_checkpointing=true
                        optim.grad_accum_steps=4
  --print-config        print the complete config and exit
  --no-progress         no progress bars

Outputs in --run-dir: checkpoint_*/ (DeepSpeed shards + manifest.json + gene_map.npy; the best
by validation loss and the latest are kept), best_checkpoint.json, latest_checkpoint.json,
metrics_train.csv (loss parts, lr, grad norm, cells/s and tokens/s per worker),
metrics_val.csv (validation loss on held-out cells), curves.png, summary.json, config.json,
prep/ (gene table matched to the corpus, genes without an embedding, validation sentences).
Next: python jobs/embed_cells.py --checkpoint <run-dir> --corpus <corpus>
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401


def build_config(a):
    from vcc_dist.train.loop import parse_overrides
    from vcc_dist.train.se import se_recipe

    over = parse_overrides(a.set or [])
    top = {"corpus": a.corpus, "gene_table": a.gene_table, "run_dir": a.run_dir,
           "num_workers": a.num_workers, "cpus_per_worker": a.cpus_per_worker,
           "epochs": a.epochs, "max_steps": a.max_steps, "checkpoint_every": a.checkpoint_every,
           "max_failures": a.max_failures, "seed": a.seed}
    if a.use_gpu:
        top["use_gpu"] = True
    if a.zero_stage is not None:
        over.setdefault("engine", {})["zero_stage"] = a.zero_stage
    if a.wandb or a.wandb_project:
        over.setdefault("wandb", {})
        if a.wandb:
            over["wandb"]["mode"] = a.wandb
        if a.wandb_project:
            over["wandb"]["project"] = a.wandb_project
    return se_recipe(a.recipe, over, **top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="debug")
    ap.add_argument("--corpus")
    ap.add_argument("--gene-table")
    ap.add_argument("--run-dir")
    ap.add_argument("--num-workers", type=int)
    ap.add_argument("--cpus-per-worker", type=float)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    ap.add_argument("--max-failures", type=int)
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
    from vcc_dist.train.se import train_se

    ensure_ray(num_cpus=a.num_cpus)
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
