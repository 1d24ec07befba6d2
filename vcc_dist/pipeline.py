"""The main job's pipeline as a table of stages (jobs/main.py is its command line).

    from data_conversion import ConvertConfig, convert_corpus, validate_corpus

    pipeline = main_pipeline(Conversion(ConvertConfig, convert_corpus, validate_corpus))
    ctx = RunContext(out=Path("runs/demo"), preset="tiny", quick=True)
    pipeline.run(ctx)                       # every stage, then <out>/report.md
    pipeline.run(ctx, until="baselines")    # stop after a stage
    pipeline["convert"].done(ctx)           # is its output complete and made with these settings?
    pipeline["convert"].run(ctx)            # one stage alone (its inputs must exist)

(``data_conversion`` is built on top of vcc_dist, which never imports it: the job passes the
conversion functions in.)

A :class:`Stage` is a name, a description, the paths it writes (relative to the run
directory), ``done(ctx)`` (those outputs are complete, valid and made with the context's
settings: :meth:`Pipeline.run` skips the stage then) and ``run(ctx)``. Stages talk through
files in the run directory only, so each runs alone given its inputs, and a rerun resumes
(an interrupted training stage resumes from its latest checkpoint). The stages, in order:

1. simulate   a VCC-shaped Perturb-seq data set (h5ad per cell context, protein FASTA,
              perturbation features, STATE split file)                -> sim/
2. convert    h5ad -> chunked Zarr corpus, one Ray task per input      -> corpus/
3. validate   the corpus against its sources (sampled rows; always runs)
4. statistics per-gene CSV, plots, summary (always runs)               -> statistics/
5. baselines  cell-mean, context-mean and ridge fitted on the training cells, predicting the
              split's held-out context, scored with the challenge metrics -> baselines/
6. esm        ESM2 gene embeddings of the simulated protein FASTA (a tiny random ESM2 built
              here: no weights can be downloaded)                     -> esm/
7. se         SE pretraining (Ray Train + DeepSpeed ZeRO-3)           -> se/
8. embed      SE cell embeddings into the corpus (obsm/X_se) and an AnnData with
              obsm["X_state"]                                         -> se/cells_state.h5ad
9. st         ST on genes (the context-mean shift plus a learned correction) -> st/
10. st_se     ST on SE embeddings with a gene decoder                 -> st_se/
11. tune      a small Ray Tune sweep of ST (ASHA + Optuna) against the validation score -> tune/
12. predict   every model predicts the held-out context's test perturbations, scored with the
              baselines on the same cells (always runs; predictions are cached per
              checkpoint)                                              -> predictions/

:meth:`Pipeline.run` then writes ``report.md`` from the outputs of the stages it covered.

One Tune figure is printed and reported: the best trial *by validation score*, where a
trial's validation score is its best over its validations (``tune/summary.json``); the
predict stage adds that trial's *test* score on the held-out context. Tune's own status
output (which ranks trials by their last result) is off in the main job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from vcc_dist.checkpoint import SE_KIND, open_checkpoint, resolve_checkpoint
from vcc_dist.data.corpus import CorpusError, load_manifest
from vcc_dist.data.embeddings import embedding_status, export_anndata
from vcc_dist.data.plans import SetStreamConfig
from vcc_dist.data.simulate import SimConfig, sim_config, simulate
from vcc_dist.data.streams import set_plan
from vcc_dist.esm.embed import EmbedConfig, embed_genes
from vcc_dist.esm.model import save_tiny_esm2
from vcc_dist.infer.heldout import score_baselines, score_predictions
from vcc_dist.infer.se_embed import embed_corpus, se_identity
from vcc_dist.infer.st_predict import load_st_checkpoint, predict_context
from vcc_dist.ray_utils import ensure_ray
from vcc_dist.report.statistics import write_statistics_report
from vcc_dist.fileio import atomic_json
from vcc_dist.train.se import se_recipe, train_se
from vcc_dist.train.st import st_recipe, train_st
from vcc_dist.train.st_data import heldout_groups
from vcc_dist.tune.sweep import SweepConfig, run_sweep

#: per mode: the recipes of the training stages (recipe, top-level overrides) and the sweep
MODES: dict[str, dict[str, Any]] = {
    "full": {"se": ("demo", {}), "st": ("demo", {}), "st_se": ("demo_se", {}),
             "tune": {"recipe": "demo", "space": "demo", "num_samples": 4, "max_steps": 60,
                      "checkpoint_every": 20}},
    "quick": {"se": ("debug", {"max_steps": 6}), "st": ("debug", {}),
              "st_se": ("debug", {"embeddings": "X_se"}),
              "tune": {"recipe": "debug", "space": "debug", "num_samples": 2, "max_steps": 4,
                       "checkpoint_every": 2}},
}

#: the baselines the baselines stage writes (and the predict stage scores with the models)
BASELINE_KINDS = ("cell-mean", "context-mean", "ridge")
#: the models the predict stage scores: report name -> run directory (relative to the run dir)
MODELS = {"ST (genes)": "st", "ST on SE": "st_se"}
#: the report name of the best Tune trial's model
TUNE_MODEL = "ST, best Tune trial"


@dataclass
class RunContext:
    """Everything a stage reads: the run directory and the job's options.

    ``quick`` selects the debug recipes (``MODES["quick"]``); ``say`` prints a line (stdout,
    flushed, by default); ``label`` prefixes a stage's first line (:meth:`Pipeline.run` sets it
    to ``[k/n] name``; a stage run alone prints its lines without it)."""

    out: Path
    preset: str = "small"
    seed: int = 0
    sim_overrides: dict[str, Any] = field(default_factory=dict)
    split_files_by: str = "cell_type"
    num_cpus: int | None = None
    n_top_genes: int | None = None
    quick: bool = False
    progress: bool = True
    say: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True), repr=False)
    label: str = ""

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def mode(self) -> dict[str, Any]:
        return MODES["quick" if self.quick else "full"]

    def path(self, rel: str) -> Path:
        """A path in the run directory, absolute (training configs and Ray workers need it)."""
        return (self.out / rel).resolve()

    def step(self, msg: str) -> None:
        """A stage's headline: ``[k/n] name: msg``."""
        self.say(f"{self.label}: {msg}" if self.label else msg)

    def detail(self, msg: str) -> None:
        """A continuation line under the headline."""
        self.say(f"      {msg}")


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline; see the module docstring. ``outputs`` are paths relative to
    the run directory (a ``*`` matches as in :meth:`pathlib.Path.glob`); ``done`` must be
    False when any of them is missing; ``uses_ray`` says whether ``run`` needs Ray;
    ``needs_dashboard`` whether Ray must start with its dashboard (Tune's early stops release
    their placement groups only with it); ``skipped`` is what a skip prints."""

    name: str
    description: str
    outputs: tuple[str, ...]
    done: Callable[[RunContext], bool]
    run: Callable[[RunContext], None]
    uses_ray: bool = True
    needs_dashboard: bool = False
    skipped: str = "up to date, skipped"

    def outputs_exist(self, ctx: RunContext) -> bool:
        """Every output path exists (a pattern: at least one match)."""
        return outputs_exist(ctx, self.outputs)


def outputs_exist(ctx: RunContext, outputs: tuple[str, ...]) -> bool:
    """Every path of ``outputs`` (relative to the run directory) exists; a pattern with ``*``
    must match at least one path."""
    return all(any(ctx.out.glob(p)) if "*" in p else (ctx.out / p).exists() for p in outputs)


class Pipeline:
    """An ordered table of uniquely named stages."""

    def __init__(self, stages: tuple[Stage, ...]):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        self.stages = tuple(stages)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"unknown stage {name!r}; the stages, in order: {', '.join(self.names)}")

    def until(self, name: str | None) -> tuple[Stage, ...]:
        """The stages from the first through ``name`` (all of them for None)."""
        if name is None:
            return self.stages
        last = self[name]
        return self.stages[:self.stages.index(last) + 1]

    def run(self, ctx: RunContext, until: str | None = None, *, report: bool = True
            ) -> list[str]:
        """Run the stages through ``until``, skipping each whose ``done`` holds, then write
        ``report.md`` (unless ``report`` is False). Returns the names of the stages that ran
        (not skipped)."""
        todo = self.until(until)
        ctx.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if any(s.uses_ray for s in todo):
            ensure_ray(num_cpus=ctx.num_cpus,
                       include_dashboard=any(s.needs_dashboard for s in todo))
        ran = []
        for k, stage in enumerate(todo, start=1):  # todo is a prefix: k is the table position
            ctx.label = f"[{k}/{len(self.stages)}] {stage.name}"
            if stage.done(ctx):
                where = sorted({o.split("/")[0] + "/" for o in stage.outputs})
                ctx.step(stage.skipped + (f" ({', '.join(where)} in {ctx.out})" if where else ""))
            else:
                stage.run(ctx)
                ran.append(stage.name)
        ctx.label = ""
        if report:
            path = write_report(ctx, [s.name for s in todo])
            ctx.say(f"done in {time.perf_counter() - t0:.0f}s; report: {path}")
        return ran


# ------------------------------------------------------------------------------------------
# 1. simulate


def _sim_config(ctx: RunContext) -> SimConfig:
    return sim_config(ctx.preset, seed=ctx.seed, split_files_by=ctx.split_files_by,
                      **ctx.sim_overrides)


def sim_h5ads(ctx: RunContext) -> list[Path]:
    """The simulated h5ad files (simulate removes stale ones, so the folder holds exactly its
    current set)."""
    return sorted((ctx.out / "sim").glob("perturbseq*.h5ad"))


SIM_OUTPUTS = ("sim/perturbseq*.h5ad", "sim/proteins.fasta", "sim/pert_features.pt",
               "sim/split.toml", "sim/pert_counts.csv", "sim/sim_config.json")


def _simulate_done(ctx: RunContext) -> bool:
    if not outputs_exist(ctx, SIM_OUTPUTS):
        return False
    try:
        old = json.loads((ctx.out / "sim" / "sim_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return old == json.loads(json.dumps(_sim_config(ctx).to_dict()))


def _simulate_run(ctx: RunContext) -> None:
    sim = ctx.out / "sim"
    ctx.step(f"preset {ctx.preset!r} -> {sim}")
    t0 = time.perf_counter()
    res = simulate(_sim_config(ctx), sim, progress=ctx.progress)
    ctx.detail(f"{res.n_cells:,} cells x {res.n_genes:,} genes, {res.n_contexts} contexts, "
               f"{res.n_perturbations} perturbations, held-out context {res.heldout_context!r} "
               f"({time.perf_counter() - t0:.1f}s)")
    ctx.detail(f"outputs: {', '.join(p.name for p in res.h5ad_paths)}, {res.fasta_path.name}, "
               f"{res.features_path.name}, {res.split_path.name} in {sim}")


SIMULATE = Stage(
    "simulate", "a VCC-shaped Perturb-seq data set: h5ad per cell context, protein FASTA, "
    "perturbation features, STATE split file",
    SIM_OUTPUTS, _simulate_done, _simulate_run, uses_ray=False)


# ------------------------------------------------------------------------------------------
# 2. convert, 3. validate: the conversion layer is passed in (data_conversion is built on top
# of vcc_dist, which never imports it)


@dataclass(frozen=True)
class Conversion:
    """What the convert and validate stages call: ``data_conversion``'s ``ConvertConfig``,
    ``convert_corpus`` and ``validate_corpus`` (the job passes them to :func:`main_pipeline`)."""

    config: Callable[..., Any]
    convert: Callable[[Any], Any]
    validate: Callable[..., Any]


def never_done(ctx: RunContext) -> bool:
    """For stages that always run (checks, and cheap outputs that track their inputs)."""
    return False


CONVERT_OUTPUTS = ("corpus/corpus.json", "corpus/stores")


def conversion_stages(conv: Conversion) -> tuple[Stage, Stage]:
    """The convert and validate stages, calling ``conv``."""

    def config(ctx: RunContext):
        h5ads = sim_h5ads(ctx)
        if not h5ads:
            raise ValueError(f"no perturbseq*.h5ad in {ctx.out / 'sim'}: run the simulate stage "
                             "first (jobs/main.py --until simulate)")
        n_top = ctx.n_top_genes
        if not n_top:
            with h5py.File(h5ads[0], "r") as f:
                n_genes = int(f["X"].attrs["shape"][1])
            # 2,000 HVGs is the convention at ~18k genes; small simulated gene spaces keep a
            # quarter
            n_top = min(2000, max(n_genes // 4, 1))
        return conv.config(inputs=tuple(str(p) for p in h5ads), out=str(ctx.out / "corpus"),
                           progress=ctx.progress, n_top_genes=n_top)

    def done(ctx: RunContext) -> bool:
        if not (outputs_exist(ctx, CONVERT_OUTPUTS) and sim_h5ads(ctx)):
            return False
        cfg = config(ctx)
        try:
            m = load_manifest(ctx.out / "corpus")
        except CorpusError:
            return False
        return (m.status == "complete" and m.options == cfg.stored_options()
                and sorted(s.source for s in m.stores)
                == sorted(str(Path(p).resolve()) for p in cfg.inputs))

    def convert(ctx: RunContext) -> None:
        cfg = config(ctx)
        corpus = ctx.out / "corpus"
        ctx.step(f"{len(cfg.inputs)} h5ad file(s) -> {corpus} (one Ray task per file)")
        ensure_ray(num_cpus=ctx.num_cpus)
        s = conv.convert(cfg).summary
        ctx.detail(f"{s['n_cells']:,} cells, {s['n_genes']:,} genes, {s['n_stores']} stores, "
                   f"{s['n_highly_variable']} highly variable genes; outputs: "
                   f"{corpus}/corpus.json, {corpus}/stores/")

    def validate(ctx: RunContext) -> None:
        rep = conv.validate(ctx.out / "corpus", sample_rows=100)
        ctx.step(f"{'OK' if rep.ok else 'INVALID'} ({rep.checks} checks)")
        if not rep.ok:
            raise ValueError(f"the corpus {ctx.out / 'corpus'} does not match its sources; "
                             f"delete it and rerun to convert it again:\n{rep.text()}")

    return (Stage("convert", "h5ad -> chunked Zarr corpus, one Ray task per input",
                  CONVERT_OUTPUTS, done, convert, skipped="corpus complete, skipped"),
            Stage("validate", "the corpus against its sources (sampled rows; always runs)", (),
                  never_done, validate, uses_ray=False))


# ------------------------------------------------------------------------------------------
# 4. statistics (cheap: always runs)


def _statistics_run(ctx: RunContext) -> None:
    o = write_statistics_report(ctx.out / "corpus", ctx.out / "statistics")
    ctx.step(f"{o.summary['perturbations']} perturbations, {o.summary['controls']:,} controls, "
             f"median {o.summary['cells_per_perturbation']['median']:.0f} cells per "
             f"perturbation; outputs in {ctx.out / 'statistics'}")


STATISTICS = Stage("statistics", "per-gene CSV, plots and a summary of the corpus (always runs)",
                   ("statistics/summary.json", "statistics/summary.md",
                    "statistics/gene_statistics.csv", "statistics/gene_means.png"),
                   never_done, _statistics_run, uses_ray=False)


# ------------------------------------------------------------------------------------------
# 5. baselines


def _baseline_features(ctx: RunContext) -> list[str]:
    """The ridge's perturbation features: the ST (genes) run's, so that every model in the
    report sees the same inputs."""
    return list(_st_config(ctx, "st").features)


def _baselines_done(ctx: RunContext) -> bool:
    # scores.json is written last, atomically: it marks the stage complete; features.json
    # records the ridge's inputs (other features: run again)
    try:
        feats = json.loads((ctx.out / "baselines" / "features.json").read_text())
    except (OSError, ValueError):
        return False
    return BASELINES.outputs_exist(ctx) and feats == _baseline_features(ctx)


def _baselines_run(ctx: RunContext) -> None:
    dst, sim = ctx.out / "baselines", ctx.out / "sim"
    features = _baseline_features(ctx)
    ctx.step(f"fit on training cells, predict the held-out context, score (ridge on ST's "
             f"features: {', '.join(features)})")
    (dst / "scores.json").unlink(missing_ok=True)
    score_baselines(sim_h5ads(ctx), sim / "split.toml", dst, features=tuple(features))
    atomic_json(dst / "features.json", features)
    rep = json.loads((dst / "scores.json").read_text())
    best = max(rep["scores"], key=lambda r: r.get("score", 0))
    ctx.step(f"context {rep['context']}, {rep['n_perturbations']} held-out perturbations; "
             f"best {best['baseline']} (score {best.get('score', 0):.1f}); outputs in {dst}")


BASELINES = Stage(
    "baselines", "cell-mean, context-mean and ridge fitted on the training cells, predicting "
    "the held-out context, scored with the challenge metrics",
    ("baselines/real.h5ad", *(f"baselines/{k}.h5ad" for k in BASELINE_KINDS),
     "baselines/scores.json"),
    _baselines_done, _baselines_run, uses_ray=False)


# ------------------------------------------------------------------------------------------
# 6. esm


def _esm_done(ctx: RunContext) -> bool:
    return ESM.outputs_exist(ctx)


def _esm_run(ctx: RunContext) -> None:
    esm = ctx.out / "esm"
    model_dir = esm / "model"
    model = next(model_dir.glob("esm2_*_tiny.pt"), None) if model_dir.is_dir() else None
    model = model or save_tiny_esm2(model_dir)
    fasta = ctx.out / "sim" / "proteins.fasta"
    ctx.step(f"ESM2 gene embeddings of {fasta} with a tiny random ESM2 ({model.name}; use "
             "jobs/embed_genes.py --model for real weights)")
    r = embed_genes(EmbedConfig(inputs=str(fasta), model_path=str(model), out=str(esm),
                                corpus=str(ctx.path("corpus")), progress=ctx.progress))
    ctx.detail(f"{r.n_genes:,} genes from {r.n_isoforms:,} isoforms, {r.embed_dim}-d, "
               f"{r.tokens_per_s:,.0f} tokens/s; outputs: {esm / 'gene_embeddings.pt'}")


ESM = Stage("esm", "ESM2 gene embeddings of the simulated protein FASTA (a tiny random ESM2 "
            "built here: no weights can be downloaded)",
            ("esm/manifest.json", "esm/gene_embeddings.pt"), _esm_done, _esm_run)


# ------------------------------------------------------------------------------------------
# 7. se, 9. st, 10. st_se: training runs


def run_up_to_date(run_dir: Path, cfg: dict) -> bool:
    """A training run finished with this config (best checkpoint recorded, same config)."""
    try:
        old = json.loads((run_dir / "config.json").read_text())
        return (run_dir / "best_checkpoint.json").is_file() and old == json.loads(
            json.dumps(cfg))
    except (OSError, ValueError):
        return False


def _se_config(ctx: RunContext):
    recipe, over = ctx.mode["se"]
    return se_recipe(recipe, {"wandb": {"group": ctx.out.name}}, corpus=str(ctx.path("corpus")),
                     gene_table=str(ctx.path("esm/gene_embeddings.pt")),
                     run_dir=str(ctx.path("se")), **over)


def _se_done(ctx: RunContext) -> bool:
    return SE.outputs_exist(ctx) and run_up_to_date(ctx.out / "se", _se_config(ctx).to_dict())


def _se_run(ctx: RunContext) -> None:
    cfg = _se_config(ctx)
    ctx.step(f"SE pretraining, recipe {ctx.mode['se'][0]!r} (DeepSpeed ZeRO stage "
             f"{cfg.engine_config().zero_stage}, {cfg.num_workers} worker(s)) -> {cfg.run_dir}")
    r = train_se(cfg, progress=ctx.progress)
    rv = r.return_value or {}
    ctx.detail(f"{rv.get('step')} steps in {r.wall_s:.0f} s, validation loss "
               f"{rv.get('last_val', {}).get('loss', float('nan')):.4f}; outputs: {r.run_dir} "
               "(checkpoints, metrics_*.csv, curves.png)")


SE = Stage("se", "SE pretraining (Ray Train + DeepSpeed ZeRO-3)",
           ("se/config.json", "se/best_checkpoint.json"), _se_done, _se_run)


def _st_config(ctx: RunContext, name: str):
    recipe, over = ctx.mode[name]
    return st_recipe(recipe, {"wandb": {"group": ctx.out.name}, **over},
                     corpus=str(ctx.path("corpus")), split=str(ctx.path("sim/split.toml")),
                     run_dir=str(ctx.path(name)))


def _st_done(name: str) -> Callable[[RunContext], bool]:
    def done(ctx: RunContext) -> bool:
        return (outputs_exist(ctx, (f"{name}/config.json", f"{name}/best_checkpoint.json"))
                and run_up_to_date(ctx.out / name, _st_config(ctx, name).to_dict()))
    return done


def _st_run(name: str) -> Callable[[RunContext], None]:
    def run(ctx: RunContext) -> None:
        cfg = _st_config(ctx, name)
        what = "ST on SE embeddings" if cfg.embeddings else "ST on genes"
        ctx.step(f"{what}, recipe {ctx.mode[name][0]!r} -> {cfg.run_dir}")
        r = train_st(cfg, progress=ctx.progress)
        rv = r.return_value or {}
        ctx.detail(f"{rv.get('step')} steps in {r.wall_s:.0f} s; best validation score "
                   f"{rv.get('best_val_score')} (context-mean on the same cells: "
                   f"{r.prep.baselines.get('context-mean', {}).get('score')}); outputs: "
                   f"{cfg.run_dir}")
    return run


# ------------------------------------------------------------------------------------------
# 8. embed


def _embed_done(ctx: RunContext) -> bool:
    """cells_state.h5ad exists and every store holds complete X_se embeddings of the SE run's
    best checkpoint (what embed_corpus would skip)."""
    if not EMBED.outputs_exist(ctx):
        return False
    try:
        ck, manifest = open_checkpoint(ctx.out / "se", "best", SE_KIND)
        status = embedding_status(ctx.out / "corpus", "X_se")
    except (OSError, ValueError, CorpusError):  # CheckpointError is a ValueError
        return False
    # the identity embed_corpus records, from the checkpoint manifest alone (the weights are
    # not loaded: identity reads only the manifest and the path)
    ident = {**se_identity(ck, manifest), "with_dataset": True}
    return bool(status) and all(
        m is not None and all(m.get(k) == v for k, v in ident.items()) for m in status.values())


def _embed_run(ctx: RunContext) -> None:
    h5 = ctx.out / "se" / "cells_state.h5ad"
    res = embed_corpus(ctx.out / "se", ctx.out / "corpus", key="X_se", progress=ctx.progress)
    export_anndata(ctx.out / "corpus", "X_se", h5)
    if res["embedded"]:
        ctx.step(f"{res['cells']:,} cells embedded ({res['dim']}-d, "
                 f"{res['cells_per_s']:,.0f} cells/s) -> obsm/X_se in {ctx.out / 'corpus'}; "
                 f"AnnData: {h5}")
    else:
        ctx.step(f"embeddings up to date (obsm/X_se in {ctx.out / 'corpus'}); AnnData: {h5}")


EMBED = Stage("embed", "SE cell embeddings into the corpus (obsm/X_se) and an AnnData with "
              "obsm['X_state']", ("se/cells_state.h5ad",), _embed_done, _embed_run)

ST = Stage("st", "ST on genes (the context-mean shift plus a learned correction)",
           ("st/config.json", "st/best_checkpoint.json"), _st_done("st"), _st_run("st"))
ST_SE = Stage("st_se", "ST on SE embeddings with a gene decoder",
              ("st_se/config.json", "st_se/best_checkpoint.json"), _st_done("st_se"),
              _st_run("st_se"))


# ------------------------------------------------------------------------------------------
# 11. tune


def best_trial_line(summary: dict) -> str:
    """The one Tune figure: the best trial by validation score, where a trial's validation
    score is its best over its validations (what ``tune/summary.json`` ranks by), shown x 100
    like the test scores of the predict stage and the report's tables."""
    best = summary.get("best") or {}
    if not best:
        return "no trial reported a validation score"
    score = 100 * float(best.get("best_score", float("nan")))
    return (f"best trial {best.get('trial_id')} by validation score (its best over "
            f"{best.get('validations')} validations, x 100): {score:.1f}")


def _tune_summary(ctx: RunContext) -> dict | None:
    try:
        return json.loads((ctx.out / "tune" / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tune_done(ctx: RunContext) -> bool:
    # summary.json is written last (after trials.csv, best_recipe.json and sweep.png)
    return TUNE.outputs_exist(ctx) and _tune_summary(ctx) is not None


def _tune_run(ctx: RunContext) -> None:
    run = ctx.path("tune")
    cfg = SweepConfig(corpus=str(ctx.path("corpus")), split=str(ctx.path("sim/split.toml")),
                      run_dir=str(run), wandb={"group": f"{ctx.out.name}-tune"},
                      **ctx.mode["tune"])
    ctx.step(f"{cfg.num_samples} trials, space {cfg.space!r}, ASHA + Optuna -> {run}")
    # progress=False: Tune's status output ranks trials by their last result, a second "best"
    # that disagrees with the summary's; the trials are listed below instead
    res = run_sweep(cfg, progress=False)
    for _, t in res.trials.iterrows():
        ctx.detail(f"trial {t['trial_id']}: {t['status']}, {t['validations']} validations, "
                   f"validation score {100 * t['best_score']:.1f} (its best, x 100)")
    summary = json.loads((run / "summary.json").read_text())
    ctx.detail(f"{best_trial_line(summary)} (its test score: the predict stage); outputs: "
               f"{run}/trials.csv, sweep.png, best_recipe.json")


TUNE = Stage("tune", "a small Ray Tune sweep of ST (ASHA + Optuna) against the validation score",
             ("tune/trials.csv", "tune/summary.json"), _tune_done, _tune_run,
             needs_dashboard=True)


# ------------------------------------------------------------------------------------------
# 12. predict


def _predict_run(ctx: RunContext) -> None:
    """Every trained model predicts the held-out context's test perturbations; models and
    baselines are scored on those cells (the validation perturbations chose checkpoints)."""
    out = ctx.out
    dst = out / "predictions"
    dst.mkdir(parents=True, exist_ok=True)
    plan, _ = set_plan(out / "corpus", SetStreamConfig(), out / "sim" / "split.toml")
    held = heldout_groups(plan, "test")
    context, counts = held.context, held.counts()
    test = sorted(counts)
    files = {k: out / "baselines" / f"{k}.h5ad" for k in BASELINE_KINDS}
    models = {name: out / rel for name, rel in MODELS.items()}
    summary = _tune_summary(ctx)
    best = (summary or {}).get("best")
    if best:
        models[TUNE_MODEL] = Path(best["run_dir"])
    for name, run in models.items():
        try:  # a Tune trial stopped early has checkpoints but no best_checkpoint.json
            ck = str(resolve_checkpoint(run, "best"))
        except FileNotFoundError:
            continue
        pred = dst / f"{run.name}.h5ad"
        stamp = dst / f"{run.name}.checkpoint"
        if not (pred.is_file() and stamp.is_file() and stamp.read_text() == ck):
            predict_context(load_st_checkpoint(ck), out / "corpus", context, counts, pred,
                            progress=ctx.progress)
            stamp.write_text(ck)
        files[name] = pred
    rows = score_predictions(out / "baselines" / "real.h5ad", files, set(test))
    (dst / "scores.json").write_text(json.dumps({"context": context, "perturbations": test,
                                                 "rows": rows}, indent=1) + "\n")
    ctx.step(f"{len(test)} test perturbations of {context!r} ({sum(counts.values()):,} cells); "
             "test scores: " + ", ".join(f"{r['model']} {r['score']:.1f}"
                                         for r in sorted(rows, key=lambda r: -r["score"]))
             + f"; outputs in {dst}")
    tuned = next((r for r in rows if r["model"] == TUNE_MODEL), None)
    if summary and tuned:
        ctx.detail(f"Tune: {best_trial_line(summary)}; its test score: {tuned['score']:.1f}")


PREDICT = Stage("predict", "every model predicts the held-out context's test perturbations, "
                "scored with the baselines on the same cells (always runs; predictions are "
                "cached per checkpoint)", ("predictions/scores.json",), never_done, _predict_run)


def main_pipeline(conversion: Conversion) -> Pipeline:
    """The main job's stage table, its convert and validate stages calling ``conversion``."""
    convert, validate = conversion_stages(conversion)
    return Pipeline((SIMULATE, convert, validate, STATISTICS, BASELINES, ESM, SE, EMBED, ST,
                     ST_SE, TUNE, PREDICT))


# ------------------------------------------------------------------------------------------
# the report


def _model_table(sc: dict) -> str:
    lines = [f"## Models and baselines on the held-out context `{sc['context']}`: "
             f"{len(sc['perturbations'])} test perturbations",
             "", "The split's validation perturbations chose the checkpoints, so only the test "
             "perturbations are scored here; score = cell-eval score x 100 against cell-mean.",
             "", "| model | DES | PDS | MAE | score |", "|---|---:|---:|---:|---:|"]
    for r in sorted(sc["rows"], key=lambda r: -r["score"]):
        lines.append(f"| {r['model']} | {r['DES']:.3f} | {r['PDS']:.3f} | {r['MAE']:.4f} | "
                     f"{r['score']:.1f} |")
    return "\n".join(lines + [""])


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


def _training_section(out: Path, tune: dict | None, predictions: dict | None) -> str:
    lines = ["## Training", ""]
    for name, title in (("se", "SE pretraining"), ("st", "ST on genes"), ("st_se", "ST on SE")):
        if (out / name / "curves.png").is_file():
            lines += [f"### {title} (`{name}/`)", "", f"![{title}]({name}/curves.png)", ""]
    if tune:
        test = next((r["score"] for r in (predictions or {}).get("rows", [])
                     if r["model"] == TUNE_MODEL), None)
        test_txt = (f"; its test score: {test:.1f} (`{TUNE_MODEL}` in the table at the top)"
                    if test is not None else "")
        lines += ["### Tune sweep (`tune/`)", "",
                  f"{tune['trials']} trials ({tune['by_status']}); {best_trial_line(tune)}"
                  f"{test_txt}. All trials: `tune/trials.csv`; best config: "
                  "`tune/best_recipe.json` (`jobs/train_st.py --recipe` takes it).",
                  "", "![sweep](tune/sweep.png)", ""]
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_report(ctx: RunContext, stages: list[str]) -> Path:
    """``report.md`` from the outputs of ``stages`` (names): the models' table (predict), the
    baselines (baselines), training curves and the sweep (se onwards; the sweep with tune),
    the corpus statistics (statistics)."""
    out = ctx.out
    stats = _read_json(out / "statistics" / "summary.json") if "statistics" in stages else None
    parts = ["# vcc-dist run report", ""]
    if stats:
        parts += [f"Simulated data: `sim`; corpus: `corpus` ({stats['cells']:,} cells x "
                  f"{stats['genes']:,} genes).", ""]
    predictions = _read_json(out / "predictions" / "scores.json") if "predict" in stages else None
    if predictions:
        parts.append(_model_table(predictions))
    base = _read_json(out / "baselines" / "scores.json") if "baselines" in stages else None
    if base:
        parts.append(_baseline_table(base))
    if "se" in stages:
        tune = _tune_summary(ctx) if "tune" in stages else None
        parts.append(_training_section(out, tune, predictions))
    if stats:
        md = (out / "statistics" / "summary.md").read_text()
        parts.append(md.replace("](", "](statistics/").split("\n", 1)[1])
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return report
