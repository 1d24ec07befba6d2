"""Command line of the conversion: ``python jobs/convert.py`` / ``python -m data_conversion``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from vcc_dist import constants as K
from vcc_dist.storage import StorageError

from .convert import ConvertConfig, convert_corpus
from .source import ConversionError, ConversionWarning
from .validate import validate_corpus


def _pairs(items: list[str] | None, opt: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"{opt} expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def convert_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    d = ConvertConfig(inputs=("x",), out="x")
    p = p or argparse.ArgumentParser(
        prog="convert", description="Convert h5ad files into a vcc-dist corpus (chunked Zarr v3 "
        "stores + corpus.json). Resumable: run the same command again after an interruption. "
        "Inputs and output may be in S3-compatible object storage (s3://bucket/prefix), "
        "configured by the AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION; see vcc_dist/storage.py); the bucket must "
        "exist. There, each store is uploaded under an attempt-unique prefix "
        "(stores/<name>~<attempt>.zarr) and corpus.json, written last in one PUT, is the "
        "commit point: a rerun keeps the stores it lists, adopts finished unrecorded ones and "
        "deletes abandoned prefixes (docs/design.md, section 3).")
    p.add_argument("inputs", nargs="+", help=".h5ad files, directories of them, globs, or "
                   "s3:// objects or prefixes holding .h5ad objects (a task downloads its input "
                   "to a local temporary file)")
    p.add_argument("--out", required=True, help="corpus to create or resume: a directory, or "
                   "s3://bucket/prefix (every Ray node then needs no shared file system, only "
                   "the AWS variables of the driver, which travel with the tasks)")
    p.add_argument("--obs-map", action="append", metavar="KEY=COLUMN",
                   help=f"take corpus obs column KEY from input column COLUMN; KEY in "
                   f"{list(K.CORPUS_OBS_KEYS)} (repeatable)")
    p.add_argument("--obs-fill", action="append", metavar="KEY=VALUE",
                   help="fill corpus obs column KEY with VALUE where an input lacks it, e.g. "
                   "guide_id=none for data without guides (repeatable)")
    p.add_argument("--control-label", default=d.control_label,
                   help=f"label of control cells in the perturbation column; stored as "
                   f"{K.CONTROL_LABEL!r}. An input without cells of this label is an error "
                   "that lists its labels that look like controls (default: %(default)s)")
    p.add_argument("--allow-missing-controls", action="store_true",
                   help="accept inputs without control cells (a warning instead of an error), "
                   "e.g. perturbed-only files whose controls are in another input")
    p.add_argument("--matrix", default=d.matrix,
                   help="matrix holding raw counts: X, raw/X or layers/<name> (default: X)")
    p.add_argument("--symbol-column", default=None,
                   help="var column with gene symbols (default: the var index)")
    p.add_argument("--gene-id-column", default=d.gene_id_column,
                   help="var column with gene ids; 'auto' looks for gene_id/gene_ids/ensembl_id; "
                   "'none' maps by symbol only (default: auto)")
    p.add_argument("--genes", dest="genes_file", default=None,
                   help="fixed vocabulary (TSV/CSV with a 'gene' and optional 'gene_id' column, "
                   "or one symbol per line); default: the union of the inputs' genes")
    p.add_argument("--gene-conflicts", choices=["error", "prefer-id"], default=d.gene_conflicts,
                   help="what to do when files pair a symbol with different ids (default: error)")
    p.add_argument("--min-gene-coverage", type=float, default=d.min_gene_coverage,
                   help="warn about an input measuring less than this fraction of the corpus "
                   "vocabulary (its missing genes become zeros) (default: %(default)s)")
    p.add_argument("--strict-gene-coverage", action="store_true",
                   help="make a coverage below --min-gene-coverage an error, not a warning")
    p.add_argument("--max-cells-per-store", type=int, default=d.max_cells_per_store,
                   help="split larger inputs into several stores (default: %(default)s)")
    p.add_argument("--read-budget-mb", type=int, default=d.read_budget_mb,
                   help="bytes of X read at once per task; bounds memory (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows,
                   help="rows per inner Zarr chunk, on average (default: %(default)s)")
    p.add_argument("--shard-mb", type=int, default=d.shard_mb,
                   help="uncompressed MiB per shard file (default: %(default)s)")
    p.add_argument("--compressor", default=d.compressor, choices=["lz4", "zstd", "blosclz",
                   "lz4hc", "zlib"], help="Blosc codec (default: %(default)s)")
    p.add_argument("--clevel", type=int, default=d.clevel, help="compression level 0-9")
    p.add_argument("--n-top-genes", type=int, default=d.n_top_genes,
                   help="highly variable genes to flag (seurat flavour; default: %(default)s)")
    p.add_argument("--full-checksum", action="store_true",
                   help="hash whole input files (default: sampled 64 x 64 KiB blocks)")
    p.add_argument("--serial", action="store_true",
                   help="convert in this process instead of Ray tasks")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the embedded local Ray (default: all); ignored on a cluster")
    p.add_argument("--overwrite", action="store_true", help="delete an existing corpus first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--validate", action="store_true", help="validate the corpus afterwards")
    return p


def convert_main(argv: list[str] | None = None) -> int:
    a = convert_parser().parse_args(argv)
    gid = None if (a.gene_id_column or "").lower() == "none" else a.gene_id_column
    try:
        cfg = ConvertConfig(
            inputs=tuple(a.inputs), out=a.out, obs_map=_pairs(a.obs_map, "--obs-map"),
            obs_fill=_pairs(a.obs_fill, "--obs-fill"), control_label=a.control_label,
            matrix=a.matrix, symbol_column=a.symbol_column, gene_id_column=gid,
            genes_file=a.genes_file, gene_conflicts=a.gene_conflicts,
            min_gene_coverage=a.min_gene_coverage, strict_gene_coverage=a.strict_gene_coverage,
            allow_missing_controls=a.allow_missing_controls,
            max_cells_per_store=a.max_cells_per_store, read_budget_mb=a.read_budget_mb,
            chunk_rows=a.chunk_rows, shard_mb=a.shard_mb, compressor=a.compressor,
            clevel=a.clevel, n_top_genes=a.n_top_genes, full_checksum=a.full_checksum,
            parallel="serial" if a.serial else "ray", overwrite=a.overwrite,
            progress=not a.no_progress)
        if not a.serial:
            from vcc_dist.ray_utils import ensure_ray
            ensure_ray(num_cpus=a.num_cpus)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConversionWarning)
            try:
                m = convert_corpus(cfg)
            finally:  # the conversion's warnings as plain lines, also when it then fails
                for w in caught:
                    if issubclass(w.category, ConversionWarning):
                        print(f"warning: {w.message}", file=sys.stderr)
                    else:
                        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except (ConversionError, StorageError) as e:  # CorruptInputError included: a message,
        print(f"error: {e}", file=sys.stderr)  # not a traceback
        return 2
    print(f"corpus written to {a.out} ({K.CORPUS_MANIFEST}, {K.CORPUS_STORES_DIR}/)")
    print(json.dumps(m.summary, indent=1))
    if a.validate:
        rep = validate_corpus(a.out)
        print(rep.text())
        return 0 if rep.ok else 1
    return 0


def validate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="validate", description="Check a corpus against its manifest "
                                "and its source files (cell counts, vocabulary, control cells in "
                                "every context, X on sampled rows, format version) and report "
                                "each store's gene coverage. Exit code 1 when a problem is found "
                                "(warnings do not count).")
    p.add_argument("corpus", help="corpus directory")
    p.add_argument("--sample-rows", type=int, default=200, help="rows per store compared with the "
                   "source (default: %(default)s)")
    p.add_argument("--no-sources", action="store_true", help="skip the comparison with sources")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-gene-coverage", type=float, default=0.5,
                   help="warn about stores whose input measured less than this fraction of the "
                   "vocabulary (default: %(default)s)")
    a = p.parse_args(argv)
    rep = validate_corpus(a.corpus, sample_rows=a.sample_rows, check_sources=not a.no_sources,
                          seed=a.seed, min_gene_coverage=a.min_gene_coverage)
    print(rep.text())
    return 0 if rep.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("convert", "validate"):
        print("usage: python -m data_conversion {convert,validate} ...", file=sys.stderr)
        return 2
    return convert_main(argv[1:]) if argv[0] == "convert" else validate_main(argv[1:])
