"""Per-gene ESM2 protein embeddings from an isoform FASTA (vcc_dist/esm/embed.py).

    python jobs/embed_genes.py --fasta sim/proteins.fasta --model esm2_t33_650M_UR50D.pt \\
        --out runs/esm --corpus runs/demo/corpus
    ray job submit --working-dir . -- python jobs/embed_genes.py --fasta /shared/proteins.fa \\
        --model /shared/esm2_t48_15B_UR50D.pt --out /shared/esm15b

Options:
  --fasta PATH          protein FASTA (Ensembl pep, UniProt, or ">GENE|isoform" headers; .gz ok)
                        or a TSV/CSV with columns gene, isoform, sequence
  --model PATH          local ESM2 release checkpoint (weights cannot be downloaded at run time;
                        its -contact-regression.pt must sit beside it)
  --tiny-model DIR      build a tiny random ESM2 in the release format in DIR and use it (for
                        tests and demos; the embeddings mean nothing)
  --out DIR             output directory (resumes a run with the same inputs, model and layer)
  --layer L             representation layer (default -1: the last)
  --max-tokens N        tokens per forward pass, length-sorted batches (default 4096)
  --isoforms-per-part N isoforms per Ray task and part file (default 256)
  --num-actors N        model replicas (default: one per GPU, or 2 on CPU)
  --long-sequences R    truncate (to 1,022 residues, default) or error
  --corpus DIR          write coverage.json against this corpus's gene vocabulary
  --on-duplicate M      error (default) or keep-first for an isoform id seen twice with
                        different sequences
  --overwrite           discard a previous run in --out made with other settings
  --num-cpus N          CPUs of the embedded local Ray (default: all)
  --no-progress         no progress bar

Outputs (in --out): gene_embeddings.pt ({gene: tensor}, STATE's ESM2_pert_features.pt format),
gene_embeddings.npz (genes, embeddings, n_isoforms), manifest.json, coverage.json (--corpus).
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fasta", required=True)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--model")
    g.add_argument("--tiny-model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--isoforms-per-part", type=int, default=256)
    ap.add_argument("--num-actors", type=int, default=0)
    ap.add_argument("--long-sequences", choices=["truncate", "error"], default="truncate")
    ap.add_argument("--corpus")
    ap.add_argument("--on-duplicate", choices=["error", "keep-first"], default="error")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--num-cpus", type=int)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    from vcc_dist.esm.embed import EmbedConfig, EmbedError, embed_genes
    from vcc_dist.esm.fasta import FastaError
    from vcc_dist.esm.model import ESMLoadError, save_tiny_esm2
    from vcc_dist.ray_utils import ensure_ray

    model = a.model
    if a.tiny_model:
        model = str(save_tiny_esm2(a.tiny_model))
        print(f"tiny random ESM2 written to {model}")
    try:
        cfg = EmbedConfig(inputs=a.fasta, model_path=model, out=a.out, layer=a.layer,
                          max_tokens=a.max_tokens, isoforms_per_part=a.isoforms_per_part,
                          num_actors=a.num_actors, long_sequences=a.long_sequences,
                          corpus=a.corpus, on_duplicate=a.on_duplicate, overwrite=a.overwrite,
                          progress=not a.no_progress)
        ensure_ray(num_cpus=a.num_cpus)
        r = embed_genes(cfg)
    except (EmbedError, FastaError, ESMLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cov = r.manifest.get("coverage")
    print(f"{r.n_genes:,} genes from {r.n_isoforms:,} isoforms, {r.embed_dim}-d "
          f"(layer {r.manifest['layer']}); parts {r.parts_computed}/{r.parts_total} embedded "
          f"this run ({r.tokens:,} tokens, {r.tokens_per_s:,.0f} tokens/s)")
    if cov:
        print(f"coverage: {cov['covered']:,}/{cov['vocabulary']:,} corpus genes "
              f"({100 * cov['fraction']:.1f}%)")
    print(f"outputs: {r.out}/gene_embeddings.pt, gene_embeddings.npz, manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
