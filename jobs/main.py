"""The main job: the whole vcc-dist path on simulated data, on an embedded local Ray.

    python jobs/main.py --out runs/demo                 # README command one (via `make demo`)
    ray job submit --working-dir . -- python jobs/main.py --out /shared/runs/demo

Stages (each skipped when its output already exists and is valid, so a rerun resumes):

1. simulate   a VCC-shaped Perturb-seq data set (h5ad per cell context, protein FASTA,
              perturbation features, STATE split file)            -> <out>/sim/
2. convert    h5ad -> chunked Zarr corpus, one Ray task per input  -> <out>/corpus/
3. validate   the corpus against its sources (sampled rows)
4. statistics per-gene CSV, plots, summary                          -> <out>/statistics/
5. baselines  cell-mean, context-mean and ridge fitted on the training cells, predicting the
              split's held-out context, scored with the challenge metrics (DES, PDS, MAE,
              score vs cell-mean, exactly as cell-eval 0.8.2)    -> <out>/baselines/

6. esm        ESM2 gene embeddings of the simulated protein FASTA (a tiny random ESM2 built
              here: no weights can be downloaded)                -> <out>/esm/
7. se         SE pretraining (Ray Train + DeepSpeed ZeRO-3)      -> <out>/se/
8. embed      SE cell embeddings into the corpus (obsm/X_se) and an AnnData with
              obsm["X_state"]                                    -> <out>/se/cells_state.h5ad
9. st         ST on genes (the demo recipe: the context-mean shift plus a learned correction)
                                                                 -> <out>/st/
10. st_se     ST on SE embeddings with a gene decoder            -> <out>/st_se/
11. tune      a small Ray Tune sweep of ST (ASHA + Optuna) against the validation score
                                                                 -> <out>/tune/
12. predict   every model predicts the held-out context's test perturbations, scored with the
              baselines on the same cells                        -> <out>/predictions/

and a report with the tables and plots: <out>/report.md. ``--quick`` uses the debug recipes
(seconds per stage: tests); ``--until STAGE`` stops after a stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import _bootstrap  # noqa: F401

N_STAGES = 12
STAGES = ("simulate", "convert", "validate", "statistics", "baselines", "esm", "se", "embed",
          "st", "st_se", "tune", "predict")

#: per mode: the recipes of the training stages and the sweep
MODES = {
    "full": {"se": ("demo", {}), "st": ("demo", {}), "st_se": ("demo_se", {}),
             "tune": {"recipe": "demo", "space": "demo", "num_samples": 4, "max_steps": 60,
                      "checkpoint_every": 20}},
    "quick": {"se": ("debug", {"max_steps": 6}), "st": ("debug", {}),
              "st_se": ("debug", {"embeddings": "X_se"}),
              "tune": {"recipe": "debug", "space": "debug", "num_samples": 2, "max_steps": 4,
                       "checkpoint_every": 2}},
}


def _say(msg: str) -> None:
    print(msg, flush=True)


def stage_simulate(out: Path, preset: str, seed: int, overrides: dict, split_by: str,
                   progress: bool):
    from vcc_dist.data.simulate import sim_config, simulate

    cfg = sim_config(preset, seed=seed, split_files_by=split_by, **overrides)
    sim = out / "sim"
    cfg_path = sim / "sim_config.json"
    h5ads = sorted(sim.glob("perturbseq*.h5ad"))
    if cfg_path.exists() and h5ads:
        try:
            same = json.loads(cfg_path.read_text()) == json.loads(json.dumps(asdict(cfg)))
        except (json.JSONDecodeError, TypeError):
            same = False
        if same:
            _say(f"[1/{N_STAGES}] simulate: up to date, skipped ({len(h5ads)} h5ad files in {sim})")
            return h5ads
    _say(f"[1/{N_STAGES}] simulate: preset {preset!r} -> {sim}")
    t0 = time.perf_counter()
    res = simulate(cfg, sim, progress=progress)
    _say(f"      {res.n_cells:,} cells x {res.n_genes:,} genes, {res.n_contexts} contexts, "
         f"{res.n_perturbations} perturbations, held-out context {res.heldout_context!r} "
         f"({time.perf_counter() - t0:.1f}s)")
    _say(f"      outputs: {', '.join(p.name for p in res.h5ad_paths)}, {res.fasta_path.name}, "
         f"{res.features_path.name}, {res.split_path.name} in {sim}")
    return list(res.h5ad_paths)


def stage_convert(out: Path, h5ads, num_cpus: int | None, progress: bool, n_top_genes: int):
    from data_conversion import ConvertConfig, convert_corpus
    from vcc_dist.data.corpus import CorpusError, load_manifest
    from vcc_dist.ray_utils import ensure_ray

    corpus = out / "corpus"
    cfg = ConvertConfig(inputs=tuple(str(p) for p in h5ads), out=str(corpus), progress=progress,
                        n_top_genes=n_top_genes)
    try:
        m = load_manifest(corpus)
        if (m.options == cfg.stored_options() and m.status == "complete"
                and sorted(s.source for s in m.stores) == sorted(str(Path(p).resolve()) for p in h5ads)):
            _say(f"[2/{N_STAGES}] convert: corpus complete, skipped ({corpus})")
            return m
    except CorpusError:
        pass
    _say(f"[2/{N_STAGES}] convert: {len(h5ads)} h5ad file(s) -> {corpus} (one Ray task per file)")
    ensure_ray(num_cpus=num_cpus)
    m = convert_corpus(cfg)
    s = m.summary
    _say(f"      {s['n_cells']:,} cells, {s['n_genes']:,} genes, {s['n_stores']} stores, "
         f"{s['n_highly_variable']} highly variable genes; outputs: {corpus}/corpus.json, "
         f"{corpus}/stores/")
    return m


def stage_validate(out: Path) -> None:
    from data_conversion import validate_corpus

    rep = validate_corpus(out / "corpus", sample_rows=100)
    _say(f"[3/{N_STAGES}] validate: {'OK' if rep.ok else 'INVALID'} ({rep.checks} checks)")
    if not rep.ok:
        _say(rep.text())
        raise SystemExit(1)


def stage_statistics(out: Path):
    from vcc_dist.report.statistics import write_statistics_report

    o = write_statistics_report(out / "corpus", out / "statistics")
    _say(f"[4/{N_STAGES}] statistics: {o.summary['perturbations']} perturbations, "
         f"{o.summary['controls']:,} controls, median "
         f"{o.summary['cells_per_perturbation']['median']:.0f} cells per perturbation; "
         f"outputs in {out / 'statistics'}")
    return o


def stage_baselines(out: Path, h5ads, sim_dir: Path):
    from vcc_dist.infer.heldout import score_baselines

    dst = out / "baselines"
    done = dst / "scores.json"
    if done.exists():
        _say(f"[5/{N_STAGES}] baselines: up to date, skipped ({dst})")
        return json.loads(done.read_text())
    _say(f"[5/{N_STAGES}] baselines: fit on training cells, predict the held-out context, score")
    features = sim_dir / "pert_features.pt"
    score_baselines(h5ads, sim_dir / "split.toml", dst,
                    features=features if features.exists() else None)
    rep = json.loads(done.read_text())
    best = max(rep["scores"], key=lambda r: r.get("score", 0))
    _say(f"[5/{N_STAGES}] baselines: context {rep['context']}, {rep['n_perturbations']} held-out "
         f"perturbations; best {best['baseline']} (score {best.get('score', 0):.1f}); "
         f"outputs in {dst}")
    return rep


def _up_to_date(run_dir: Path, cfg: dict) -> bool:
    """A training run finished with this config (best checkpoint recorded, same config)."""
    try:
        old = json.loads((run_dir / "config.json").read_text())
        return (run_dir / "best_checkpoint.json").is_file() and old == json.loads(
            json.dumps(cfg))
    except (OSError, ValueError):
        return False


def stage_esm(out: Path, progress: bool) -> Path:
    from vcc_dist.esm.embed import EmbedConfig, embed_genes
    from vcc_dist.esm.model import save_tiny_esm2

    esm = out / "esm"
    table = esm / "gene_embeddings.pt"
    if (esm / "manifest.json").is_file() and table.is_file():
        _say(f"[6/{N_STAGES}] esm: up to date, skipped ({table})")
        return table
    model = next((esm / "model").glob("esm2_*_tiny.pt"), None) if (esm / "model").is_dir() else None
    model = model or save_tiny_esm2(esm / "model")
    _say(f"[6/{N_STAGES}] esm: ESM2 gene embeddings of {out / 'sim' / 'proteins.fasta'} with a tiny "
         f"random ESM2 ({model.name}; use jobs/embed_genes.py --model for real weights)")
    r = embed_genes(EmbedConfig(inputs=str(out / "sim" / "proteins.fasta"), model_path=str(model),
                                out=str(esm), corpus=str((out / "corpus").resolve()), progress=progress))
    _say(f"      {r.n_genes:,} genes from {r.n_isoforms:,} isoforms, {r.embed_dim}-d, "
         f"{r.tokens_per_s:,.0f} tokens/s; outputs: {table}")
    return table


def stage_se(out: Path, mode: dict, table: Path, progress: bool):
    from vcc_dist.train.se import se_recipe, train_se

    recipe, over = mode["se"]
    cfg = se_recipe(recipe, {"wandb": {"group": out.name}}, corpus=str((out / "corpus").resolve()),
                    gene_table=str(table.resolve()), run_dir=str((out / "se").resolve()), **over)
    if _up_to_date(out / "se", cfg.to_dict()):
        _say(f"[7/{N_STAGES}] se: up to date, skipped ({out / 'se'})")
        return
    _say(f"[7/{N_STAGES}] se: SE pretraining, recipe {recipe!r} (DeepSpeed ZeRO stage "
         f"{cfg.engine_config().zero_stage}, {cfg.num_workers} worker(s)) -> {out / 'se'}")
    r = train_se(cfg, progress=progress)
    rv = r.return_value or {}
    _say(f"      {rv.get('step')} steps in {r.wall_s:.0f} s, validation loss "
         f"{rv.get('last_val', {}).get('loss', float('nan')):.4f}; outputs: {r.run_dir} "
         "(checkpoints, metrics_*.csv, curves.png)")


def stage_embed(out: Path, progress: bool) -> None:
    from vcc_dist.data.embeddings import export_anndata
    from vcc_dist.infer.se_embed import embed_corpus

    res = embed_corpus(out / "se", out / "corpus", key="X_se", progress=progress)
    h5 = out / "se" / "cells_state.h5ad"
    if res["embedded"] or not h5.exists():
        export_anndata(out / "corpus", "X_se", h5)
    if res["embedded"]:
        _say(f"[8/{N_STAGES}] embed: {res['cells']:,} cells embedded ({res['dim']}-d, "
             f"{res['cells_per_s']:,.0f} cells/s) -> obsm/X_se in {out / 'corpus'}; AnnData: {h5}")
    else:
        _say(f"[8/{N_STAGES}] embed: up to date, skipped (obsm/X_se in {out / 'corpus'}; {h5})")


def stage_st(out: Path, name: str, k: int, recipe: str, over: dict, progress: bool):
    from vcc_dist.train.st import st_recipe, train_st

    run = (out / name).resolve()
    cfg = st_recipe(recipe, {"wandb": {"group": out.name}, **over},
                    corpus=str((out / "corpus").resolve()), split=str((out / "sim" / "split.toml").resolve()),
                    run_dir=str(run))
    if _up_to_date(run, cfg.to_dict()):
        _say(f"[{k}/{N_STAGES}] {name}: up to date, skipped ({run})")
        return
    what = "ST on SE embeddings" if cfg.embeddings else "ST on genes"
    _say(f"[{k}/{N_STAGES}] {name}: {what}, recipe {recipe!r} -> {run}")
    r = train_st(cfg, progress=progress)
    rv = r.return_value or {}
    _say(f"      {rv.get('step')} steps in {r.wall_s:.0f} s; best validation score "
         f"{rv.get('best_val_score')} (context-mean on the same cells: "
         f"{r.prep.baselines.get('context-mean', {}).get('score')}); outputs: {run}")


def stage_tune(out: Path, mode: dict, progress: bool):
    from vcc_dist.tune.sweep import SweepConfig, run_sweep

    t = dict(mode["tune"])
    run = (out / "tune").resolve()
    if (run / "summary.json").is_file():
        _say(f"[11/{N_STAGES}] tune: up to date, skipped ({run})")
        return json.loads((run / "summary.json").read_text())
    cfg = SweepConfig(corpus=str((out / "corpus").resolve()), split=str((out / "sim" / "split.toml").resolve()),
                      run_dir=str(run), wandb={"group": f"{out.name}-tune"}, **t)
    _say(f"[11/{N_STAGES}] tune: {cfg.num_samples} trials, space {cfg.space!r}, ASHA + Optuna "
         f"-> {run}")
    res = run_sweep(cfg, progress=progress)
    st = res.trials["status"].value_counts().to_dict()
    _say(f"      {len(res.trials)} trials {st}, best score "
         f"{(res.best or {}).get('best_score')}; outputs: {run}/trials.csv, sweep.png, "
         f"best_recipe.json")
    return json.loads((run / "summary.json").read_text())


def stage_predict(out: Path, progress: bool) -> list[dict]:
    """Every trained model predicts the held-out context's test perturbations; models and
    baselines are scored on those cells (the validation perturbations chose checkpoints)."""
    from vcc_dist.data.plans import SetStreamConfig
    from vcc_dist.data.streams import set_plan
    from vcc_dist.infer.heldout import score_predictions
    from vcc_dist.infer.st_predict import load_st_checkpoint, predict_context
    from vcc_dist.train.st_data import heldout_groups

    dst = out / "predictions"
    dst.mkdir(parents=True, exist_ok=True)
    plan, _ = set_plan(out / "corpus", SetStreamConfig(), out / "sim" / "split.toml")
    held = heldout_groups(plan, "test")
    ctx, counts = held.context, held.counts()
    test = sorted(counts)
    real = out / "baselines" / "real.h5ad"
    files = {k: out / "baselines" / f"{k}.h5ad" for k in ("cell-mean", "context-mean", "ridge")}
    models = {"ST (genes)": out / "st", "ST on SE": out / "st_se"}
    tune_best = out / "tune" / "summary.json"
    if tune_best.is_file():
        best = json.loads(tune_best.read_text()).get("best")
        if best:
            models["ST, best Tune trial"] = Path(best["run_dir"])
    from vcc_dist.infer.st_predict import resolve_checkpoint

    for name, run in models.items():
        try:  # a Tune trial stopped early has checkpoints but no best_checkpoint.json
            ck = str(resolve_checkpoint(run, "best"))
        except FileNotFoundError:
            continue
        pred = dst / f"{run.name}.h5ad"
        stamp = dst / f"{run.name}.checkpoint"
        if not (pred.is_file() and stamp.is_file() and stamp.read_text() == ck):
            loaded = load_st_checkpoint(ck)
            predict_context(loaded, out / "corpus", ctx, counts, pred, progress=progress)
            stamp.write_text(ck)
        files[name] = pred
    rows = score_predictions(real, files, set(test))
    (dst / "scores.json").write_text(json.dumps({"context": ctx, "perturbations": test,
                                                 "rows": rows}, indent=1) + "\n")
    best = max(rows, key=lambda r: r["score"])
    _say(f"[12/{N_STAGES}] predict: {len(test)} test perturbations of {ctx!r} "
         f"({sum(counts.values()):,} cells); best {best['model']} (score {best['score']:.1f}); "
         f"outputs in {dst}")
    return rows


def _model_table(rows: list[dict], ctx: str, n: int) -> str:
    lines = [f"## Models and baselines on the held-out context `{ctx}`: {n} test perturbations",
             "", "The split's validation perturbations chose the checkpoints, so only the test "
             "perturbations are scored here; score = cell-eval score x 100 against cell-mean.",
             "", "| model | DES | PDS | MAE | score |", "|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["score"]):
        lines.append(f"| {r['model']} | {r['DES']:.3f} | {r['PDS']:.3f} | {r['MAE']:.4f} | "
                     f"{r['score']:.1f} |")
    return "\n".join(lines + [""])


def _training_section(out: Path, tune: dict | None) -> str:
    lines = ["## Training", ""]
    for name, title in (("se", "SE pretraining"), ("st", "ST on genes"), ("st_se", "ST on SE")):
        png = out / name / "curves.png"
        if png.is_file():
            lines += [f"### {title} (`{name}/`)", "", f"![{title}]({name}/curves.png)", ""]
    if tune:
        lines += ["### Tune sweep (`tune/`)", "",
                  f"{tune['trials']} trials ({tune['by_status']}); best trial "
                  f"`{(tune.get('best') or {}).get('trial_id')}`, validation score "
                  f"{(tune.get('best') or {}).get('best_score', float('nan')):.3f}; all trials: "
                  "`tune/trials.csv`; "
                  "best config: `tune/best_recipe.json` (`jobs/train_st.py --recipe` takes it).",
                  "", "![sweep](tune/sweep.png)", ""]
    return "\n".join(lines)


def _baseline_table(rep: dict) -> str:
    lines = [f"## Baselines on the held-out context `{rep['context']}`", "",
             f"{rep['n_perturbations']} perturbations, {rep['n_real_cells']:,} real cells; "
             "challenge metrics exactly as cell-eval 0.8.2; score = cell-eval score x 100 "
             "against the cell-mean baseline.", "",
             "| baseline | DES | PDS | MAE | score |", "|---|---:|---:|---:|---:|"]
    for r in rep["scores"]:
        lines.append(f"| {r['baseline']} | {r['overlap_at_N']:.3f} | "
                     f"{r['discrimination_score_l1']:.3f} | {r['mae']:.4f} | "
                     f"{r.get('score', float('nan')):.1f} |")
    return "\n".join(lines + ["", "Per-perturbation values: `baselines/results_<baseline>.csv`.",
                              ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (default: %(default)s)")
    p.add_argument("--preset", default="small",
                   help="simulator preset: tiny, small, medium, vcc (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a simulator setting, e.g. --set n_cells=5000 (repeatable)")
    p.add_argument("--split-files-by", default="cell_type", choices=["cell_type", "batch", ""],
                   help="one h5ad per cell type (default), per batch, or one file ('')")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs for the embedded local Ray (default: all)")
    p.add_argument("--n-top-genes", type=int, default=None,
                   help="highly variable genes to flag (default: min(2000, genes / 4))")
    p.add_argument("--quick", action="store_true",
                   help="debug recipes and a 2-trial sweep (seconds per stage; for tests)")
    p.add_argument("--until", choices=STAGES, default="predict",
                   help="stop after this stage (default: run all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        return _run(a)
    except ValueError as e:  # ConversionError, CorpusError, bad settings: the message says the fix
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a) -> int:
    from vcc_dist.data.simulate import parse_overrides
    from vcc_dist.ray_utils import ensure_ray

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mode = MODES["quick" if a.quick else "full"]
    last = STAGES.index(a.until)
    # the dashboard: Tune's early stops release Train placement groups only with it running
    ensure_ray(num_cpus=a.num_cpus, include_dashboard=last >= STAGES.index("tune"))
    h5ads = stage_simulate(out, a.preset, a.seed, parse_overrides(a.set), a.split_files_by,
                           not a.no_progress)
    import h5py

    with h5py.File(h5ads[0], "r") as f:
        n_genes = int(f["X"].attrs["shape"][1])
    # 2,000 HVGs is the convention at ~18k genes; small simulated gene spaces keep a quarter
    n_top = a.n_top_genes or min(2000, max(n_genes // 4, 1))
    progress = not a.no_progress
    stage_convert(out, h5ads, a.num_cpus, progress, n_top)
    stage_validate(out)
    stats = stage_statistics(out)
    base = stage_baselines(out, h5ads, out / "sim")
    rows, tune = None, None
    k = STAGES.index("baselines")
    if last > k:
        table = stage_esm(out, progress)
    if last > k + 1:
        stage_se(out, mode, table, progress)
    if last > k + 2:
        stage_embed(out, progress)
    if last > k + 3:
        stage_st(out, "st", 9, *mode["st"], progress)
    if last > k + 4:
        stage_st(out, "st_se", 10, *mode["st_se"], progress)
    if last > k + 5:
        tune = stage_tune(out, mode, progress)
    if last > k + 6:
        rows = stage_predict(out, progress)
    rel = lambda q: Path(q).relative_to(out)
    report = out / "report.md"
    parts = ["# vcc-dist run report", "",
             f"Simulated data: `{rel(out / 'sim')}`; corpus: `{rel(out / 'corpus')}` "
             f"({stats.summary['cells']:,} cells x {stats.summary['genes']:,} genes).", ""]
    if rows:
        sc = json.loads((out / "predictions" / "scores.json").read_text())
        parts.append(_model_table(rows, sc["context"], len(sc["perturbations"])))
    parts.append(_baseline_table(base))
    if last > k + 1:
        parts.append(_training_section(out, tune))
    parts.append(open(stats.summary_md).read().replace("](", "](statistics/").split("\n", 1)[1])
    report.write_text("\n".join(parts))
    _say(f"done in {time.perf_counter() - t0:.0f}s; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
