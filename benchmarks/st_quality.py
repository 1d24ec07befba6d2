"""ST prediction quality against the baselines, with the challenge metrics, on the simulator's
context-generalisation split (the main job's data).

    python jobs/main.py --out runs/demo          # simulate, convert, baselines (once)
    python benchmarks/st_quality.py --run runs/demo --workdir bench_data/st_quality

What it does, in one run:
1. trains ST variants with ``jobs/train_st.py --recipe demo`` (same data, same steps):
   - ``st``: the demo recipe: features [transfer, onehot], input residual, and the
     transfer features added to the output (the model learns a correction to the
     context-mean shift, starting from it);
   - ``st-no-shift``: the same features as inputs only (no shortcut to the output);
   - ``st-onehot``: one-hot perturbation features only (STATE's setup; input residual);
   - ``st-on-se``: ST on SE cell embeddings (``--recipe demo_se``: sets of embeddings in,
     embeddings out, a gene decoder to genes). Before it, the SE pipeline runs once:
     ESM2 gene embeddings of the simulator's protein FASTA with a tiny random ESM2 (no
     weights can be downloaded here: the gene tokens are random but distinct, so SE learns
     from co-expression alone), ``jobs/pretrain_se.py --recipe demo``, and
     ``jobs/embed_cells.py`` into the main job's corpus (``obsm/X_se``);
   each run keeps its best checkpoint by the validation score (the split's ``val``
   perturbations of the held-out context);
2. predicts the held-out context's ``test`` perturbations (``jobs/predict.py``) with their
   real cell counts, from that context's control cells;
3. scores every model and the main job's baselines (cell-mean, context-mean, ridge: their
   prediction files from ``<run>/baselines``) against the same real cells, restricted to the
   ``test`` perturbations (the validation ones chose the checkpoint, so they are left out),
   with the overall score against cell-mean, exactly as cell-eval 0.8.2 computes it.

Results go to benchmarks/results/st_quality.json (appended) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (train_st recipe, overrides)
    "st": ("demo", []),
    "st-no-shift": ("demo", ["model.feature_shift=false", "model.zero_init_output=false"]),
    "st-onehot": ("demo", ["features=[\"onehot\"]", "model.feature_shift=false",
                           "model.zero_init_output=false"]),
    "st-on-se": ("demo_se", []),
}
DEFAULT_VARIANTS = ["st", "st-no-shift", "st-onehot"]


def _se_pipeline(run: Path, work: Path, seed: int) -> dict:
    """Gene table (tiny ESM2) -> SE pretraining -> cell embeddings in the corpus; timings."""
    t = {}
    esm = work / "se_esm"
    t["embed_genes_s"] = _run(["jobs/embed_genes.py", "--fasta", str(run / "sim" / "proteins.fasta"),
                               "--tiny-model", str(work / "se_esm_model"), "--out", str(esm),
                               "--no-progress"])
    se = work / f"se_seed{seed}"
    t["pretrain_se_s"] = _run(["jobs/pretrain_se.py", "--recipe", "demo", "--corpus",
                               str(run / "corpus"), "--gene-table", str(esm / "gene_embeddings.pt"),
                               "--run-dir", str(se), "--seed", str(seed), "--wandb", "disabled",
                               "--no-progress"])
    t["embed_cells_s"] = _run(["jobs/embed_cells.py", "--checkpoint", str(se), "--corpus",
                               str(run / "corpus"), "--no-progress"])
    return t


def _run(args: list[str]) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    if p.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return time.perf_counter() - t


def _restrict(adata, perts):
    import numpy as np

    lab = adata.obs["target_gene"].astype(str).to_numpy()
    keep = np.isin(lab, sorted(perts)) | (lab == "non-targeting")
    out = adata[keep].copy()
    out.obs["target_gene"] = out.obs["target_gene"].astype(str)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="the main job's run directory")
    ap.add_argument("--workdir", default="bench_data/st_quality")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="extra train_st overrides for all")
    ap.add_argument("--results", default=str(ROOT / "benchmarks/results/st_quality.json"))
    a = ap.parse_args(argv)

    import anndata as ad

    from vcc_dist.data.splits import SplitSpec
    from vcc_dist.metrics import vcc

    run, work = Path(a.run).resolve(), Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    split = run / "sim" / "split.toml"
    spec = SplitSpec.from_toml(split)
    if len(spec.fewshot) != 1:
        raise SystemExit(f"{split}: expected one [fewshot] context (the simulator's split)")
    (ctx_key, roles), = spec.fewshot.items()
    test = set(roles["test"])
    real = _restrict(ad.read_h5ad(run / "baselines" / "real.h5ad"), test)
    real_s = vcc.summarize(real, what="real test")
    files = {k: run / "baselines" / f"{k}.h5ad" for k in ("cell-mean", "context-mean", "ridge")}
    timings = {}
    se_times = _se_pipeline(run, work, a.seed) if "st-on-se" in a.variants else None
    for v in a.variants:
        rd = work / f"{v}_seed{a.seed}"
        recipe, over = VARIANTS[v]
        timings[v] = _run(["jobs/train_st.py", "--recipe", recipe, "--corpus", str(run / "corpus"),
                           "--split", str(split), "--run-dir", str(rd), "--seed", str(a.seed),
                           "--wandb", "disabled", "--no-progress", "--set", *over, *a.set])
        pred = rd / "pred_test.h5ad"
        _run(["jobs/predict.py", "--checkpoint", str(rd), "--split", str(split), "--role", "test",
              "--out", str(pred), "--no-progress", "--seed", str(a.seed)])
        files[v] = pred
    summaries = {k: vcc.summarize(_restrict(ad.read_h5ad(f), test), what=k)
                 for k, f in files.items()}
    ref = vcc.evaluate(real_s, summaries["cell-mean"]).agg
    rows = []
    for k, s in summaries.items():
        ev = vcc.evaluate(real_s, s, baseline_agg=ref)
        rows.append({"model": k, "DES": ev.agg["overlap_at_N"],
                     "PDS": ev.agg["discrimination_score_l1"], "MAE": ev.agg["mae"],
                     "score": 100 * float(ev.scores["avg_score"]),
                     "train_s": timings.get(k)})
    hdr = f"{'model':<14}{'DES':>8}{'PDS':>8}{'MAE':>9}{'score':>8}"
    print(f"held-out context {ctx_key}: {len(test)} test perturbations, "
          f"{int((real.obs['target_gene'] != 'non-targeting').sum())} real cells")
    print(hdr)
    for r in rows:
        print(f"{r['model']:<14}{r['DES']:8.3f}{r['PDS']:8.3f}{r['MAE']:9.4f}{r['score']:8.1f}")
    rec = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(),
           "command": "python benchmarks/st_quality.py " + " ".join(argv or sys.argv[1:]),
           "run": str(run), "context": ctx_key, "n_test_perturbations": len(test),
           "seed": a.seed, "rows": rows, "se_pipeline_s": se_times}
    res = Path(a.results)
    old = json.loads(res.read_text()) if res.exists() else []
    res.write_text(json.dumps(old + [rec], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
