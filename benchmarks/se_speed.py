"""SE pretraining on CPU: training speed of vcc-dist's trainer vs a bare PyTorch loop, and the
model's memory per rank vs the DeepSpeed ZeRO stage.

    python benchmarks/se_speed.py --steps 40 --threads 2     # training speed (default mode)
    python benchmarks/se_speed.py --memory                   # ZeRO 0/2/3 memory at 2 ranks

**Speed** (default): the corpus (default ``runs/demo/corpus``: 15,000 cells x 2,000 genes) and a
random gene table this script writes (``{gene: vector}`` .pt, ESM2-t6 width 320, every corpus
gene, in --workdir), the ``small`` SE recipe (d_model 128, 4 layers, 255-gene sentences, 192
targets per cell, 32 cells per batch), fp32.

- ours: ``train_se(se_recipe("small", ...))``: 1 Ray Train worker (``cpus_per_worker`` 1,
  ``torch_threads`` --threads), DeepSpeed at the trainer's default stage (0 for one worker, 3 for several), the SE cell stream
  read and tokenised in Ray Data on the embedded Ray's other CPU (``--num-cpus`` 2), wandb
  disabled, ``log_every`` 5. Rates: ``cells_per_s_worker`` / ``tokens_per_s_worker`` of
  ``metrics_train.csv`` (cells or sentence tokens between two log points / the time between
  them), the median over the log points after the first --warmup steps. Wall time: the whole
  ``train_se`` call (preparation, Ray start, workers, the final validation and checkpoint).
- bare torch (the peer, same process afterwards, Ray shut down): the same model config, gene
  table and gene map (from ours' ``prep/``), ``torch.optim.AdamW`` with the trainer's two
  parameter groups, LR and gradient clipping, no Ray, no DeepSpeed, the same --threads. Batches
  of 32 random training rows read with ``CorpusReader(corpus, normalize=False).read_many``
  (timed apart), tokenised in-process with ``SETokenizer`` and stepped. Per batch it times the
  tokenisation and the model step (inputs, forward, loss, backward, clip, AdamW) separately:
  "step only" rate = cells / step seconds, "with tokenisation" = cells / (tokenise + step).

**Memory** (--memory): ``se_preset("small")`` widened (--mem-d-model 512, --mem-layers 8,
--mem-d-hid 2048; sentences of 63 genes so activations stay small), 2 processes
(torch.multiprocessing, gloo, MASTER_ADDR/PORT, RANK/WORLD_SIZE) per ZeRO stage 0, 2, 3, each
building ``build_engine`` and running 3 training steps on random token batches. Per rank:
the bytes of the tensors that rank holds, counted once per storage (see ``held_bytes``), taken
after the 3rd step's backward (gradients alive, optimizer state from steps 1-2) and after its
optimizer step; and the process's peak RSS growth (``ru_maxrss``) from just before the model is
built to after the steps.

Results are merged into benchmarks/results/se_speed.json (keys "speed" -> "threads=N", and
"memory"); running one mode keeps the other's results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks/results/se_speed.json"
ESM_T6_DIM = 320


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"node": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version()}


def save(key: str, rec: dict, sub: str | None = None) -> None:
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if sub is None:
        old[key] = rec
    else:
        old.setdefault(key, {})[sub] = rec
    RESULTS.write_text(json.dumps(old, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------


def gene_table(corpus: Path, work: Path, dim: int = ESM_T6_DIM) -> Path:
    """A random {gene: vector} table (ESM2-t6 width) for every gene of the corpus vocabulary."""
    import torch

    from vcc_dist.data.corpus import load_manifest

    path = work / f"gene_table_random_{dim}.pt"
    if not path.exists():
        genes = list(load_manifest(corpus).genes)
        g = torch.Generator().manual_seed(0)
        torch.save({name: torch.randn(dim, generator=g) for name in genes}, path)
    return path


class TreeCPU(threading.Thread):
    """Last CPU reading of every process of this process's tree (Ray's processes exit before
    the end, so one reading at the end would miss them)."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.seen: dict[int, float] = {}
        self.base = sum(self.proc.cpu_times()[:2])
        self._stop_evt = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return
        for c in procs:
            with contextlib.suppress(psutil.Error):
                t = c.cpu_times()
                self.seen[c.pid] = t.user + t.system
    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.sample()
            self._stop_evt.wait(0.5)

    def stop(self) -> float:
        self._stop_evt.set()
        self.join()
        self.sample()
        return sum(self.seen.values()) - self.base


def ours(corpus: Path, table: Path, work: Path, steps: int, threads: int, warmup: int) -> dict:
    import shutil

    import pandas as pd
    import ray

    from vcc_dist.ray_utils import ensure_ray
    from vcc_dist.train.se import se_recipe, train_se

    rd = work / f"ours_small_t{threads}"
    if rd.exists():
        shutil.rmtree(rd)
    over = {"wandb": {"mode": "disabled"}, "engine": {"precision": "fp32"}}
    cfg = se_recipe("small", over, corpus=str(corpus), gene_table=str(table), run_dir=str(rd),
                    num_workers=1, cpus_per_worker=1.0, torch_threads=threads, max_steps=steps,
                    log_every=5)
    stage = cfg.engine_config().zero_stage  # the trainer's default: 0 for one worker
    ensure_ray(num_cpus=2)
    cpu = TreeCPU()
    cpu.start()
    t0 = time.perf_counter()
    res = train_se(cfg, progress=False)
    wall = time.perf_counter() - t0
    cpu_s = cpu.stop()
    ray.shutdown()
    m = pd.read_csv(rd / "metrics_train.csv")
    st = m[m["step"] > warmup]
    cells = st["cells_per_s_worker"].tolist()
    toks = st["tokens_per_s_worker"].tolist()
    from vcc_dist.models.se import SEConfig, count_parameters

    mcfg = SEConfig.from_dict(res.prep.model_config)
    return {"tool": "vcc-dist train_se", "recipe": "small", "zero_stage": stage, "precision": "fp32",
            "torch_threads": threads, "cpus_per_worker": 1, "ray_num_cpus": 2,
            "batch_size": cfg.stream_config().batch_size, "steps": int(res.return_value["step"]),
            "params": count_parameters(mcfg), "cells_per_s": statistics.median(cells),
            "tokens_per_s": statistics.median(toks), "tokens_per_cell": statistics.median(toks)
            / statistics.median(cells), "rates_cells_per_s": cells,
            "rates_steps": st["step"].tolist(), "wall_s": wall, "train_se_wall_s": res.wall_s,
            "cpu_s_process_tree": cpu_s, "run_dir": str(rd), "prep_dir": str(res.prep.dir),
            "model_config": res.prep.model_config,
            "call": (f"train_se(se_recipe('small', {over}, corpus=..., gene_table=..., "
                     f"run_dir=..., num_workers=1, cpus_per_worker=1.0, torch_threads={threads}, "
                     f"max_steps={steps}, log_every=5)) after ensure_ray(num_cpus=2)")}


def bare(corpus: Path, prep_dir: Path, steps: int, threads: int, warmup: int, seed: int = 0,
         kind: str = "torch") -> dict:
    """Plain PyTorch: read -> SETokenizer -> forward/backward/AdamW, timed per phase.
    ``kind="deepspeed"``: the same loop, the step through our DeepSpeed engine (the trainer's stage) (build_engine) in
    this process (no Ray): what DeepSpeed alone costs."""
    import numpy as np
    import torch

    from vcc_dist.data.reader import CorpusReader
    from vcc_dist.data.se_tokens import SETokenizer
    from vcc_dist.models.se import SEConfig, SEModel, se_loss
    from vcc_dist.train.engine import make_scheduler, param_groups
    from vcc_dist.train.se import SEPrep, SETrainConfig, se_step_inputs

    torch.set_num_threads(threads)
    prep = SEPrep.load(prep_dir)
    mcfg = SEConfig.from_dict(prep.model_config)
    tcfg = SETrainConfig.from_dict(json.loads((prep_dir.parent / "config.json").read_text()))
    ocfg = tcfg.optim_config(warmup + steps)
    B = tcfg.stream_config().batch_size
    torch.manual_seed(seed)
    model = SEModel(mcfg, torch.from_numpy(prep.gene_table()))
    model.train()
    if kind == "deepspeed":
        from vcc_dist.train.engine import build_engine

        # the trainer's own engine config (ZeRO stage 0 for one worker, 3 for several)
        engine, _ = build_engine(model, tcfg.engine_config(), ocfg, B)
        torch.set_num_threads(threads)
    else:
        opt = torch.optim.AdamW(param_groups(model, ocfg.weight_decay), lr=ocfg.lr,
                                betas=ocfg.betas, eps=ocfg.eps)
        sch = make_scheduler(opt, ocfg)
    tok = SETokenizer(mcfg, prep.gene_map(), seed=seed)
    reader = CorpusReader(corpus, normalize=False)
    n = warmup + steps
    rng = np.random.default_rng(seed)
    stores = rng.integers(0, reader.n_cells.size, n * B)
    rows = (rng.random(n * B) * reader.n_cells[stores]).astype(np.int64)
    t = time.perf_counter()
    blocks = [reader.read_many(stores[i * B:(i + 1) * B], rows[i * B:(i + 1) * B]) for i in range(n)]
    t_read = time.perf_counter() - t
    t_tok, t_step, n_tok = [], [], []
    for i, blk in enumerate(blocks):
        t0 = time.perf_counter()
        batch = tok(blk.indptr, blk.indices, blk.data, blk.totals, epoch=0, step=i, train=True)
        batch["dataset"] = stores[i * B:(i + 1) * B].astype(np.int32)
        t1 = time.perf_counter()
        ids, expr, tids, depth, target, weight, dataset = se_step_inputs(batch, "cpu", torch.float32)
        if kind == "deepspeed":
            rec = se_loss(engine(ids, expr, tids, depth), target, weight, dataset, mcfg)
            engine.backward(rec.total)
            engine.step()
        else:
            rec = se_loss(model(ids, expr, tids, depth), target, weight, dataset, mcfg)
            rec.total.backward()
            if ocfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.grad_clip)
            opt.step()
            sch.step()
            opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        t_tok.append(t1 - t0)
        t_step.append(t2 - t1)
        n_tok.append(int((ids >= 0).sum()) + 2 * ids.shape[0])
    tt, ts, nt = t_tok[warmup:], t_step[warmup:], n_tok[warmup:]
    # headline rates from the median step (robust to the other tenant's bursts on the 2
    # shared cores); the means over all timed steps alongside
    tpc = sum(nt) / (B * len(nt))  # tokens per cell
    s_med, st_med = statistics.median(ts), statistics.median([a + b for a, b in zip(ts, tt)])
    cells = B * len(ts)
    return {"tool": ("bare torch (no Ray, no DeepSpeed)" if kind == "torch" else
                     "our DeepSpeed engine in-process (no Ray)"), "kind": kind,
            "torch_threads": threads,
            "batch_size": B, "steps_timed": len(ts), "warmup_steps": warmup,
            "step_only_cells_per_s": B / s_med, "step_only_tokens_per_s": B * tpc / s_med,
            "with_tok_cells_per_s": B / st_med, "with_tok_tokens_per_s": B * tpc / st_med,
            "mean_step_only_cells_per_s": cells / sum(ts),
            "mean_with_tok_cells_per_s": cells / (sum(ts) + sum(tt)),
            "step_s_median": statistics.median(ts), "tokenise_s_median": statistics.median(tt),
            "read_s_per_batch": t_read / n, "final_loss": float(rec.total.detach()),
            "step_s": ts, "tokenise_s": tt,
            "note": "read (CorpusReader.read_many of 32 random rows) timed apart, before the loop"}


def speed(a) -> int:
    corpus, work = Path(a.corpus).resolve(), Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    table = gene_table(corpus, work)
    load0 = os.getloadavg()
    o = ours(corpus, table, work, a.steps, a.threads, a.warmup)
    print(json.dumps({k: v for k, v in o.items() if k not in ("model_config", "rates_cells_per_s",
                                                                "rates_steps")}), flush=True)
    b = bare(corpus, Path(o["prep_dir"]), a.peer_steps, a.threads, 3)
    print(json.dumps({k: v for k, v in b.items() if k not in ("step_s", "tokenise_s")}), flush=True)
    d = bare(corpus, Path(o["prep_dir"]), a.peer_steps, a.threads, 3, kind="deepspeed")
    print(json.dumps({k: v for k, v in d.items() if k not in ("step_s", "tokenise_s")}), flush=True)
    ratio = {"cells_per_s_vs_step_only": o["cells_per_s"] / b["step_only_cells_per_s"],
             "cells_per_s_vs_with_tok": o["cells_per_s"] / b["with_tok_cells_per_s"],
             "tokens_per_s_vs_step_only": o["tokens_per_s"] / b["step_only_tokens_per_s"],
             "tokens_per_s_vs_with_tok": o["tokens_per_s"] / b["with_tok_tokens_per_s"],
             "deepspeed_in_process_vs_bare_step_only": d["step_only_cells_per_s"]
             / b["step_only_cells_per_s"]}
    print(f"ours/bare: {json.dumps(ratio)}")
    save("speed", {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                   "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                   "command": "python benchmarks/se_speed.py " + " ".join(a.argv),
                   "corpus": str(corpus), "gene_table": str(table), "ours": o, "bare_torch": b,
                   "deepspeed_in_process": d,
                   "ratio_ours_over_bare": ratio}, sub=f"threads={a.threads}")
    return 0


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def held_bytes(engine) -> dict:
    """Bytes of the tensors this rank holds, each storage counted once, in the first category
    that reaches it: "params" (the module's parameters as materialised on this rank: ZeRO-3's
    ``p.ds_tensor`` partitions, and ``p.data`` where it is not empty, i.e. stages 0-2 and
    ZeRO-3's persistent small parameters; at stage 2 these are views of DeepSpeed's flat
    buffer, counted whole), "grads" (``p.grad``, and the ZeRO optimizer's attributes whose
    name holds "grad", e.g. ZeRO-3's flat gradient partition), "optimizer_state" (the inner
    torch AdamW's state tensors), "fp32_master" (the tensors the inner AdamW steps when they are
    not the module's own, and the ZeRO optimizer's attributes whose name holds "fp32": the ZeRO
    fp32 partitions; their ``.grad`` counted as grads),
    "zero_other" (any other tensor the ZeRO optimizer keeps as an attribute, lists and dicts
    one level deep), "buffers" (module buffers: the frozen gene table). Not included: ZeRO-2's
    gradient reduction buckets (reported as ``ipg_bucket_bytes``, allocated with torch.empty
    so only pages written count in RSS), activations, the allocator's cache, Python objects."""
    import torch

    seen: set[int] = set()
    out = {k: 0 for k in ("params", "grads", "optimizer_state", "fp32_master", "zero_other",
                          "buffers")}

    def add(cat: str, t) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        s = t.untyped_storage()
        if s.data_ptr() == 0 or s.data_ptr() in seen:
            return
        seen.add(s.data_ptr())
        out[cat] += s.nbytes()

    mod = engine.module
    params = list(mod.parameters())
    for p in params:
        if hasattr(p, "ds_tensor"):
            add("params", p.ds_tensor)
        add("params", p.data)
    for p in params:
        add("grads", p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    inner = inner if isinstance(inner, torch.optim.Optimizer) else opt
    zero = opt if opt is not inner else None
    if zero is not None:
        for name, v in vars(zero).items():
            if "grad" in name.lower():
                for t in _tensors(v):
                    add("grads", t)
    for st in inner.state.values():
        for v in st.values():
            add("optimizer_state", v)
    fp32 = [p for g in inner.param_groups for p in g["params"]]
    if zero is not None:  # ZeRO-3 puts its fp32 partitions into the param groups only to step
        fp32 += [t for name, v in vars(zero).items() if "fp32" in name.lower()
                 for t in _tensors(v)]
    for p in fp32:
        add("grads", p.grad)
    for p in fp32:
        add("fp32_master", p)
    ipg = 0
    if zero is not None:
        for name, v in vars(zero).items():
            if name == "ipg_buckets":
                for b in v.values():  # ZeRO-2: a list of buffers; ZeRO-3: one tensor
                    buf = getattr(b, "buffer", None)
                    for t in ([buf] if isinstance(buf, torch.Tensor) else list(buf or [])):
                        ipg += t.untyped_storage().nbytes()
                continue
            for t in _tensors(v):
                add("zero_other", t)
    for b in mod.buffers():
        add("buffers", b)
    out["total_state"] = sum(out[k] for k in ("params", "grads", "optimizer_state",
                                              "fp32_master", "zero_other"))
    out["ipg_bucket_bytes"] = ipg
    return out


def _tensors(v, depth: int = 3):
    """Tensors in v: a tensor, or lists/tuples/dicts of them nested up to ``depth`` levels."""
    import torch

    if isinstance(v, torch.Tensor):
        yield v
    elif depth > 0 and isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x, depth - 1)
    elif depth > 0 and isinstance(v, dict):
        for x in v.values():
            yield from _tensors(x, depth - 1)


def _mem_rank(rank: int, world: int, port: int, stage: int, mcfg_d: dict, batch: int,
              threads: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world)})
    import psutil
    import torch

    torch.set_num_threads(threads)
    from vcc_dist.models.se import SEConfig, SEModel, count_parameters, se_loss
    from vcc_dist.train import engine as eng

    eng._ensure_cpu_accelerator()
    import deepspeed  # noqa: F401  (imported before the baseline)

    eng._ensure_process_group()  # build_engine reuses this group (RANK/WORLD_SIZE above)
    mcfg = SEConfig.from_dict(mcfg_d)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ecfg = eng.EngineConfig(zero_stage=stage, precision="fp32")
    ocfg = eng.OptimConfig(lr=1e-4, warmup_steps=1, total_steps=10)
    # as the trainer builds it: under ZeRO-3, parameters are partitioned as they are created
    with eng.model_init_context(ecfg, ocfg, batch):
        model = SEModel(mcfg, torch.randn(mcfg.n_genes, mcfg.gene_dim))
    n_params = count_parameters(mcfg)
    engine, _ = eng.build_engine(model, ecfg, ocfg, batch)
    max_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(rank)
    k, T = mcfg.sentence_len, mcfg.n_targets
    snaps, times = {}, []
    for s in range(3):
        ids = torch.stack([torch.randperm(mcfg.n_genes, generator=g)[:k + T] for _ in range(batch)])
        gene_ids, tids = ids[:, :k], ids[:, k:]
        expr = torch.rand(batch, k, generator=g) * 3
        depth = torch.full((batch,), 5000.0)
        target = torch.rand(batch, T, generator=g)
        weight = torch.ones(batch, T)
        dataset = torch.zeros(batch, dtype=torch.long)
        t0 = time.perf_counter()
        rec = se_loss(engine(gene_ids, expr, tids, depth), target, weight, dataset, mcfg)
        engine.backward(rec.total)
        if s == 2:
            snaps["after_backward"] = held_bytes(engine)
        engine.step()
        times.append(time.perf_counter() - t0)
    snaps["after_step"] = held_bytes(engine)
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    persist = [p for p in engine.module.parameters() if getattr(p, "ds_persist", False)]
    rec = {"rank": rank, "stage": stage, "params": n_params, "step_s": times,
           "held_bytes": snaps, "peak_rss_growth": max1 - max0,
           "peak_rss_growth_after_build": max_built - max0,
           "rss_growth_end": proc.memory_info().rss - rss0, "rss_end": proc.memory_info().rss,
           "loss": float(rec.total.detach()),
           "zero3_persistent_params": sum(p.numel() for p in persist),
           "zero3_persistent_tensors": len(persist)}
    Path(out_dir, f"stage{stage}_rank{rank}.json").write_text(json.dumps(rec))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def memory(a) -> int:
    import torch.multiprocessing as mp

    from vcc_dist.models.se import count_parameters, se_preset
    from vcc_dist.train.engine import _free_port

    work = Path(a.workdir).resolve() / "memory"
    work.mkdir(parents=True, exist_ok=True)
    mcfg = se_preset("small", 2000, ESM_T6_DIM, d_model=a.mem_d_model, n_layers=a.mem_layers,
                     n_heads=8, d_hid=a.mem_d_hid, sentence_len=a.mem_sentence_len)
    n = count_parameters(mcfg)
    print(f"model: se_preset('small', 2000, {ESM_T6_DIM}, d_model={a.mem_d_model}, "
          f"n_layers={a.mem_layers}, n_heads=8, d_hid={a.mem_d_hid}, "
          f"sentence_len={a.mem_sentence_len}): {n:,} trainable parameters", flush=True)
    rows = []
    for stage in a.stages:
        for f in work.glob(f"stage{stage}_rank*.json"):
            f.unlink()
        t = time.perf_counter()
        mp.spawn(_mem_rank, args=(2, _free_port(), stage, mcfg.to_dict(), a.mem_batch,
                                  a.mem_threads, str(work)), nprocs=2, join=True)
        for r in range(2):
            rec = json.loads((work / f"stage{stage}_rank{r}.json").read_text())
            rec["wall_s_stage"] = time.perf_counter() - t
            rows.append(rec)
            hb = rec["held_bytes"]["after_backward"]
            print(f"stage {stage} rank {r}: held {hb['total_state'] / n:.2f} B/param after "
                  f"backward ({ {k: round(v / n, 2) for k, v in hb.items()} }), after step "
                  f"{rec['held_bytes']['after_step']['total_state'] / n:.2f} B/param; peak RSS "
                  f"growth {rec['peak_rss_growth'] / 2**20:.0f} MiB "
                  f"(after build {rec['peak_rss_growth_after_build'] / 2**20:.0f} MiB)", flush=True)
    save("memory", {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                    "command": "python benchmarks/se_speed.py " + " ".join(a.argv),
                    "model_config": mcfg.to_dict(), "params": n, "world_size": 2,
                    "batch_size": a.mem_batch, "torch_threads": a.mem_threads,
                    "precision": "fp32", "rows": rows, "held_bytes_doc": held_bytes.__doc__})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="runs/demo/corpus")
    ap.add_argument("--workdir", default="bench_data/se_speed")
    ap.add_argument("--steps", type=int, default=40, help="our optimizer steps")
    ap.add_argument("--warmup", type=int, default=10,
                    help="our log points at steps <= this are dropped")
    ap.add_argument("--peer-steps", type=int, default=20, help="bare torch timed steps (+3 warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (ours and the peer)")
    ap.add_argument("--memory", action="store_true", help="ZeRO 0/2/3 memory at 2 ranks")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--mem-d-model", type=int, default=512)
    ap.add_argument("--mem-layers", type=int, default=8)
    ap.add_argument("--mem-d-hid", type=int, default=2048)
    ap.add_argument("--mem-sentence-len", type=int, default=63)
    ap.add_argument("--mem-batch", type=int, default=4)
    ap.add_argument("--mem-threads", type=int, default=1, help="torch threads per rank")
    a = ap.parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])
    return memory(a) if a.memory else speed(a)


if __name__ == "__main__":
    sys.exit(main())
