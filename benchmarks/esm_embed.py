"""Gene-embedding throughput: ``jobs/embed_genes.py``'s pipeline vs a plain fair-esm loop.

    python benchmarks/esm_embed.py --workdir bench_data/esm --isoforms 1500

Same model (a randomly initialised ESM2 of the t6_8M shape: 6 layers x 320 dims, 20 heads,
saved in the release format and loaded through fair-esm's loader), same isoforms (the
simulator's Ensembl-style FASTA, ``small`` preset, first N isoforms), same run, on this
machine's CPUs (and on a GPU when one is present). Reported: tokens/s (residues + BOS/EOS) of

- the plain loop: fair-esm's batch converter over the isoforms in file order, ``batch_size``
  sequences at a time (the usual script: ``esm/scripts/extract.py`` style with a fixed batch);
- vcc-dist's job: length-sorted token-budget batches in a Ray Data actor pool (2 actors on CPU),
  with part files and the gene reduction (the whole ``embed_genes`` call, Ray start excluded).

Results are appended to ``benchmarks/results/esm_embed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop(model_path: str, seqs: list[str], batch_size: int) -> dict:
    import torch

    from vcc_dist.esm.model import load_esm

    model, alphabet = load_esm(model_path)
    conv = alphabet.get_batch_converter()
    layer = model.num_layers
    t = time.perf_counter()
    c = time.process_time()
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            _, _, toks = conv([(str(j), s) for j, s in enumerate(chunk)])
            rep = model(toks, repr_layers=[layer])["representations"][layer]
            for j, s in enumerate(chunk):
                rep[j, 1:len(s) + 1].mean(0)
            tokens += sum(len(s) + 2 for s in chunk)
    el = time.perf_counter() - t
    return {"tool": f"plain fair-esm loop (batch {batch_size}, file order)", "tokens": tokens,
            "seconds": round(el, 2), "tokens_per_s": round(tokens / el, 1),
            "cpu_seconds": round(time.process_time() - c, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="bench_data/esm")
    ap.add_argument("--isoforms", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-actors", type=int, default=2)
    a = ap.parse_args(argv)
    import ray
    import torch

    from vcc_dist.data.simulate import sim_config, simulate
    from vcc_dist.esm.embed import EmbedConfig, embed_genes
    from vcc_dist.esm.fasta import read_isoforms, write_fasta_simple
    from vcc_dist.esm.model import MAX_RESIDUES, save_tiny_esm2

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    sim_dir = wd / "sim_small"
    if not (sim_dir / "proteins.fasta").exists():
        simulate(sim_config("small", seed=0), sim_dir, progress=False)
    isos, _ = read_isoforms(sim_dir / "proteins.fasta")
    isos = isos[: a.isoforms]
    fasta = wd / f"isoforms_{len(isos)}.fasta"
    write_fasta_simple(isos, fasta)
    model = save_tiny_esm2(wd / "model", num_layers=6, embed_dim=320, attention_heads=20, seed=0,
                           name="esm2_t6_320_random")
    seqs = [i.sequence[:MAX_RESIDUES] for i in isos]
    threads = torch.get_num_threads()
    rec = {"date": time.strftime("%Y-%m-%d %H:%M"), "isoforms": len(isos),
           "residues": sum(len(s) for s in seqs), "cpus": os.cpu_count(),
           "gpu": torch.cuda.is_available(), "torch_threads": threads, "results": {}}
    rec["results"]["plain"] = plain_loop(str(model), seqs, a.batch_size)
    print(rec["results"]["plain"], flush=True)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = wd / "job_out"
    r = embed_genes(EmbedConfig(inputs=str(fasta), model_path=str(model), out=str(out),
                                num_actors=a.num_actors, overwrite=True, progress=False))
    if r.parts_computed == 0:  # a previous run's parts: embed again for the timing
        import shutil

        shutil.rmtree(out)
        r = embed_genes(EmbedConfig(inputs=str(fasta), model_path=str(model), out=str(out),
                                    num_actors=a.num_actors, progress=False))
    rec["results"]["job"] = {"tool": f"vcc-dist embed_genes ({a.num_actors} actors, "
                                     "token-budget batches)",
                             "tokens": r.tokens, "seconds": round(r.seconds, 2),
                             "tokens_per_s": round(r.tokens_per_s, 1)}
    rec["speedup"] = round(r.tokens_per_s / rec["results"]["plain"]["tokens_per_s"], 2)
    print(rec["results"]["job"], "speed-up", rec["speedup"], flush=True)
    res = ROOT / "benchmarks" / "results" / "esm_embed.json"
    hist = json.loads(res.read_text()) if res.exists() else []
    hist.append(rec)
    res.write_text(json.dumps(hist, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
