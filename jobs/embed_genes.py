"""Per-gene ESM2 protein embeddings from an isoform FASTA (vcc_dist/esm/embed.py).

    python jobs/embed_genes.py --fasta sim/proteins.fasta --model esm2_t33_650M_UR50D.pt \\
        --out runs/esm --corpus runs/demo/corpus
    ray job submit --working-dir . -- python jobs/embed_genes.py --fasta /shared/proteins.fa \\
        --model /shared/esm2_t48_15B_UR50D.pt --out /shared/esm15b
    ray job submit --working-dir . -- python jobs/embed_genes.py \\
        --fasta s3://bucket/proteins.fa --model s3://bucket/esm/esm2_t33_650M_UR50D.pt \\
        --out s3://bucket/esm650m --corpus s3://bucket/corpus

--fasta, --model, --out and --corpus each take a local path or s3://bucket/key (endpoint and
credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION):
the hosts need share no file system. Every option is listed by --help with its default and
accepted values.

Outputs (in --out): gene_embeddings.pt ({gene: tensor}, STATE's ESM2_pert_features.pt format),
gene_embeddings.npz (genes, embeddings, n_isoforms), manifest.json (written last: the run is
finished when it exists; it lists the Ray nodes that computed parts), coverage.json (--corpus).
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401  (first: puts the checkout on sys.path)

from jobs._cli import add_progress, add_ray, connect_ray, job_parser, one_of
from vcc_dist.esm.embed import EmbedConfig, EmbedError, embed_genes
from vcc_dist.esm.fasta import ON_DUPLICATE, FastaError
from vcc_dist.esm.model import LONG_SEQUENCE_RULES, MAX_RESIDUES, ESMLoadError, save_tiny_esm2
from vcc_dist.storage import StorageError


def parser():
    ap = job_parser(__doc__)
    ap.add_argument("--fasta", required=True, metavar="PATH",
                    help="protein FASTA (Ensembl pep, UniProt, or '>GENE|isoform' headers; .gz "
                         "ok) or a TSV/CSV with columns gene, isoform, sequence; a local path "
                         "or s3://bucket/key (required)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", metavar="PATH",
                   help="ESM2 release checkpoint, its -contact-regression.pt beside it: a "
                        "local path or s3://bucket/key/esm2_<...>.pt (downloaded once per host "
                        "into $VCC_DIST_SCRATCH); weights are never fetched from the internet "
                        "(this or --tiny-model is required)")
    g.add_argument("--tiny-model", metavar="DIR",
                   help="build a tiny random ESM2 in the release format in DIR and use it, for "
                        "tests and demos: the embeddings mean nothing (this or --model is "
                        "required)")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="output directory or s3://bucket/prefix; a rerun with the same "
                         "inputs, model and layer resumes (required)")
    ap.add_argument("--layer", type=int, default=-1, metavar="L",
                    help="representation layer: 0 = token embeddings, -1 = the last "
                         "(default: -1)")
    ap.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                    help="tokens per forward pass, length-sorted batches (default: 4096)")
    ap.add_argument("--isoforms-per-part", type=int, default=256, metavar="N",
                    help="isoforms per Ray task and part file (default: 256)")
    ap.add_argument("--num-actors", type=int, default=0, metavar="N",
                    help="model replicas; 0 = one per GPU, or 2 on CPU (default: 0)")
    ap.add_argument("--long-sequences", choices=LONG_SEQUENCE_RULES, default="truncate",
                    help=f"isoforms longer than {MAX_RESIDUES:,} residues (ESM2's trained range): "
                         f"one of {one_of(LONG_SEQUENCE_RULES)} (default: truncate)")
    ap.add_argument("--corpus", metavar="DIR",
                    help="write coverage.json: which of this corpus's genes have an embedding; "
                         "a local directory or s3://bucket/prefix (default: none)")
    ap.add_argument("--on-duplicate", choices=ON_DUPLICATE, default="error",
                    help="an isoform id seen twice with different sequences: one of "
                         f"{one_of(ON_DUPLICATE)} (default: error)")
    ap.add_argument("--overwrite", action="store_true",
                    help="discard a previous run in --out made with other settings (default: "
                         "off: such a run is refused)")
    add_ray(ap)
    add_progress(ap)
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)

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
        if not connect_ray("embed_genes", num_cpus=a.num_cpus):
            return 2
        r = embed_genes(cfg)
    except (EmbedError, FastaError, ESMLoadError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cov = r.manifest.get("coverage")
    print(f"{r.n_genes:,} genes from {r.n_isoforms:,} isoforms, {r.embed_dim}-d "
          f"(layer {r.manifest['layer']}); parts {r.parts_computed}/{r.parts_total} embedded "
          f"this run ({r.tokens:,} tokens, {r.tokens_per_s:,.0f} tokens/s)")
    if cov:
        print(f"coverage: {cov['covered']:,}/{cov['vocabulary']:,} corpus genes "
              f"({100 * cov['fraction']:.1f}%)")
    print(f"outputs: {r.out}/gene_embeddings.pt, gene_embeddings.npz, manifest.json "
          f"(parts computed on {len(r.manifest['node_ids'])} Ray node(s) this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
