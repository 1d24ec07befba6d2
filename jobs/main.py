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

and a report linking every output: <out>/report.md. Later stages (gene embeddings, SE, ST,
Tune) are added by their issues.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import _bootstrap  # noqa: F401


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
            _say(f"[1/5] simulate: up to date, skipped ({len(h5ads)} h5ad files in {sim})")
            return h5ads
    _say(f"[1/5] simulate: preset {preset!r} -> {sim}")
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
                and sorted(s.source for s in m.stores) == sorted(str(p) for p in h5ads)):
            _say(f"[2/5] convert: corpus complete, skipped ({corpus})")
            return m
    except CorpusError:
        pass
    _say(f"[2/5] convert: {len(h5ads)} h5ad file(s) -> {corpus} (one Ray task per file)")
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
    _say(f"[3/5] validate: {'OK' if rep.ok else 'INVALID'} ({rep.checks} checks)")
    if not rep.ok:
        _say(rep.text())
        raise SystemExit(1)


def stage_statistics(out: Path):
    from vcc_dist.report.statistics import write_statistics_report

    o = write_statistics_report(out / "corpus", out / "statistics")
    _say(f"[4/5] statistics: {o.summary['perturbations']} perturbations, "
         f"{o.summary['controls']:,} controls, median "
         f"{o.summary['cells_per_perturbation']['median']:.0f} cells per perturbation; "
         f"outputs in {out / 'statistics'}")
    return o


def stage_baselines(out: Path, h5ads, sim_dir: Path):
    from vcc_dist.infer.heldout import score_baselines

    dst = out / "baselines"
    done = dst / "scores.json"
    if done.exists():
        _say(f"[5/5] baselines: up to date, skipped ({dst})")
        return json.loads(done.read_text())
    _say("[5/5] baselines: fit on training cells, predict the held-out context, score")
    features = sim_dir / "pert_features.pt"
    score_baselines(h5ads, sim_dir / "split.toml", dst,
                    features=features if features.exists() else None)
    rep = json.loads(done.read_text())
    best = max(rep["scores"], key=lambda r: r.get("score", 0))
    _say(f"[5/5] baselines: context {rep['context']}, {rep['n_perturbations']} held-out "
         f"perturbations; best {best['baseline']} (score {best.get('score', 0):.1f}); "
         f"outputs in {dst}")
    return rep


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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        return _run(a)
    except ValueError as e:  # ConversionError, CorpusError, bad settings: the message says the fix
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a) -> int:
    from vcc_dist.data.simulate import parse_overrides

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    h5ads = stage_simulate(out, a.preset, a.seed, parse_overrides(a.set), a.split_files_by,
                           not a.no_progress)
    import h5py

    with h5py.File(h5ads[0], "r") as f:
        n_genes = int(f["X"].attrs["shape"][1])
    # 2,000 HVGs is the convention at ~18k genes; small simulated gene spaces keep a quarter
    n_top = a.n_top_genes or min(2000, max(n_genes // 4, 1))
    stage_convert(out, h5ads, a.num_cpus, not a.no_progress, n_top)
    stage_validate(out)
    stats = stage_statistics(out)
    base = stage_baselines(out, h5ads, out / "sim")
    rel = lambda q: Path(q).relative_to(out)
    report = out / "report.md"
    report.write_text("\n".join([
        "# vcc-dist run report", "",
        f"Simulated data: `{rel(out / 'sim')}`; corpus: `{rel(out / 'corpus')}` "
        f"({stats.summary['cells']:,} cells x {stats.summary['genes']:,} genes).", "",
        _baseline_table(base),
        open(stats.summary_md).read().replace("](", "](statistics/").split("\n", 1)[1],
    ]))
    _say(f"done in {time.perf_counter() - t0:.0f}s; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
