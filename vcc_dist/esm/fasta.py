"""Read protein isoform sequences, each with its gene, for ESM2 gene embeddings.

A gene's ESM2 embedding is the mean over the embeddings of its protein isoforms, so every record
must name both its gene and its isoform. ``read_isoforms(path)`` returns the isoforms in file order
and a ``ParseReport`` of what was cleaned or dropped.

Input formats
-------------

FASTA files may be plain or gzip-compressed (detected from the file's first bytes, so ``.gz`` or
not). With ``fmt="auto"`` (the default) the header convention is detected per record, so one file
may mix them; ``fmt="ensembl" | "uniprot" | "pipe"`` requires every header to follow that one.

- **Ensembl pep** (``fmt="ensembl"``; any header with a ``gene:`` field), as in Ensembl's
  ``*.pep.all.fa`` and vcc-dist's simulator::

      >ENSP00000269305.9 pep chromosome:GRCh38:17:7661779:7687538:-1 gene:ENSG00000141510.18 transcript:ENST00000269305.9 gene_biotype:protein_coding transcript_biotype:protein_coding gene_symbol:TP53 description:tumor protein p53 [...]

  gene = the ``gene_symbol:`` value; a record without one uses the ``gene:`` id without its
  version (``ENSG00000141510``) and is counted in ``genes_without_symbol``. isoform = the first
  token (the protein id, version kept).
- **UniProt** (``fmt="uniprot"``; first token ``sp|ACCESSION|ENTRY`` or ``tr|...``)::

      >sp|P04637|P53_HUMAN Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53 PE=1 SV=4
      >sp|P04637-2|P53_HUMAN Isoform 2 of Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53

  gene = the ``GN=`` value, isoform = the accession (``P04637-2``). A UniProt record without
  ``GN=`` is an error: rewrite its header in the ``>GENE|isoform`` form.
- **Simple pipe** (``fmt="pipe"``; first token ``GENE|isoform``, free text may follow)::

      >TP53|TP53-201 optional free text

- **Table** (``fmt="tsv"``, or ``fmt="auto"`` with a ``.tsv``/``.csv`` name, ``.gz`` allowed): a
  tab- (``.tsv``) or comma- (``.csv``) separated file whose header row has the columns ``gene``,
  ``isoform`` and ``sequence`` (other columns are ignored). With ``fmt="tsv"`` and another
  extension the separator is a tab if the header row contains one, else a comma.

Sequence cleaning
-----------------

Sequences may span several lines; all whitespace is removed and letters are uppercased. Then:

- trailing ``*`` (a translated stop codon) is stripped, counted in ``stop_codons_stripped``;
- every character outside ESM2's alphabet of standard and extra residues
  ``LAGVSERTIDPKQNFYMHWCXBUZO`` becomes ``X`` and is counted in ``nonstandard`` (with up to 10
  example isoform ids). This includes an internal ``*`` (a read-through or pseudogene translation):
  replacing it, rather than failing, keeps the sequence length and positions;
- a record whose sequence is then empty is dropped and its isoform id listed in ``empty``; it is an
  error only when every record is empty.

Duplicates: the same (gene, isoform) again with the identical (cleaned) sequence is dropped and
counted in ``duplicates_dropped``; with a different sequence it is an error unless
``on_duplicate="keep-first"`` (then counted in ``conflicts_dropped``). The same isoform id under two
genes is always an error.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ESM_ALPHABET",
    "FASTA_FORMATS",
    "FORMATS",
    "FastaError",
    "Isoform",
    "ParseReport",
    "genes_of",
    "read_isoforms",
    "write_fasta_simple",
]

# ESM2's standard + extra residue tokens (esm.data.Alphabet "ESM-1b" proteinseq_toks).
ESM_ALPHABET = "LAGVSERTIDPKQNFYMHWCXBUZO"
FASTA_FORMATS = ("ensembl", "uniprot", "pipe")
FORMATS = ("auto", *FASTA_FORMATS, "tsv")
ON_DUPLICATE = ("error", "keep-first")
TABLE_COLUMNS = ("gene", "isoform", "sequence")
MAX_EXAMPLES = 10

_NONSTANDARD = re.compile(f"[^{ESM_ALPHABET}]")
_UNIPROT = re.compile(r"^(sp|tr)\|([^|\s]+)\|(\S*)$")
_GN = re.compile(r"(?:^|\s)GN=(\S+)")
_PIPE_FIX = "rewrite the header as '>GENE|isoform' (the simple pipe form)"


class FastaError(ValueError):
    """Bad isoform input; the message names the file, the record (line number) and the fix."""


@dataclass(frozen=True)
class Isoform:
    """One protein isoform: its gene (symbol), its id and its cleaned sequence."""

    gene: str
    isoform: str
    sequence: str

    @property
    def length(self) -> int:
        return len(self.sequence)


@dataclass
class ParseReport:
    """What ``read_isoforms`` read, cleaned and dropped (see the module docstring)."""

    path: str
    header_format: str = ""  # "ensembl" | "uniprot" | "pipe" | "tsv" | "mixed"
    format_counts: dict[str, int] = field(default_factory=dict)  # records per header format
    n_records: int = 0  # records read, dropped ones included
    n_isoforms: int = 0  # isoforms kept
    n_genes: int = 0
    duplicates_dropped: int = 0  # identical (gene, isoform, sequence) repeats
    conflicts_dropped: int = 0  # differing repeats dropped under on_duplicate="keep-first"
    empty: list[str] = field(default_factory=list)  # isoform ids dropped for an empty sequence
    nonstandard: int = 0  # residues replaced by X
    nonstandard_examples: list[str] = field(default_factory=list)  # up to 10 isoform ids
    stop_codons_stripped: int = 0  # records whose trailing '*' was stripped
    genes_without_symbol: int = 0  # Ensembl genes without gene_symbol (gene id used)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# reading


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


def _table_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _error(path: Path, line: int, record: str | None, problem: str, fix: str) -> FastaError:
    where = f"{path}, line {line}" + (f" (record {record!r})" if record else "")
    return FastaError(f"{where}: {problem}. Fix: {fix}.")


def _parse_header(header: str, fmt: str, path: Path, line: int) -> tuple[str, str, str, str | None]:
    """(format, gene, isoform, gene id used for lack of a symbol or None) of one '>' header."""
    text = header[1:].strip()
    if not text:
        raise _error(path, line, None, "empty FASTA header '>'", _PIPE_FIX)
    tokens = text.split()
    first = tokens[0]
    m = _UNIPROT.match(first)
    if m and fmt in ("auto", "uniprot"):
        gn = _GN.search(text)
        if gn is None:
            raise _error(path, line, first, "UniProt header without a GN= gene name",
                         f"{_PIPE_FIX}, e.g. '>GENESYMBOL|{m.group(2)}'")
        return "uniprot", gn.group(1), m.group(2), None
    if fmt in ("auto", "ensembl"):
        fields: dict[str, str] = {}
        for tok in tokens[1:]:
            if tok.startswith("description:"):
                break  # free text follows
            key, sep, value = tok.partition(":")
            if sep and key not in fields:
                fields[key] = value
        if "gene" in fields:
            gene_id = fields["gene"].split(".", 1)[0]
            if not gene_id:
                raise _error(path, line, first, "Ensembl header with an empty gene: field",
                             "give the gene id (gene:ENSG...) or " + _PIPE_FIX)
            symbol = fields.get("gene_symbol", "")
            if symbol:
                return "ensembl", symbol, first, None
            return "ensembl", gene_id, first, gene_id
    if fmt in ("auto", "pipe") and not m:
        parts = first.split("|")
        if len(parts) == 2 and parts[0] and parts[1]:
            return "pipe", parts[0], parts[1], None
    expected = {
        "auto": "one of: Ensembl pep ('gene:' and 'gene_symbol:' fields), UniProt "
                "('sp|ACC|ENTRY ... GN=GENE'), or '>GENE|isoform'",
        "ensembl": "an Ensembl pep header with a 'gene:' field",
        "uniprot": "a UniProt header 'sp|ACC|ENTRY ... GN=GENE' (or tr|)",
        "pipe": "'>GENE|isoform' (two non-empty fields)",
    }[fmt]
    fix = _PIPE_FIX if fmt == "auto" else f"{_PIPE_FIX} or pass fmt='auto'"
    raise _error(path, line, first, f"cannot tell the gene and isoform: header is not {expected}",
                 fix)


def _fasta_records(fh: io.TextIOBase, path: Path, fmt: str) -> Iterator[tuple]:
    """Yield (line, format, gene, isoform, raw sequence, gene id lacking a symbol) per record."""
    head: tuple | None = None
    chunks: list[str] = []
    line_no = 0
    for line_no, line in enumerate(fh, 1):
        if line.startswith(">"):
            if head is not None:
                yield (*head[:4], "".join(chunks), head[4])
            head = (line_no, *_parse_header(line, fmt, path, line_no))
            chunks = []
        elif head is not None:
            chunks.append(line)
        elif line.strip():
            hint = ""
            if "\t" in line or "," in line:
                hint = ", or for a table with columns gene, isoform, sequence pass fmt='tsv'"
            raise _error(path, line_no, None,
                         f"not a FASTA file: expected a '>' header line, got {line[:60].rstrip()!r}",
                         f"pass a protein FASTA (headers described in vcc_dist.esm.fasta){hint}")
    if head is not None:
        yield (*head[:4], "".join(chunks), head[4])


def _table_records(fh: io.TextIOBase, path: Path) -> Iterator[tuple]:
    first = fh.readline()
    while first and not first.strip():
        first = fh.readline()
    if not first:
        return
    suffix = _table_suffix(path)
    delim = {".tsv": "\t", ".csv": ","}.get(suffix, "\t" if "\t" in first else ",")
    cols = [c.strip().lower() for c in next(csv.reader([first], delimiter=delim))]
    missing = [c for c in TABLE_COLUMNS if c not in cols]
    if missing:
        raise _error(path, 1, None, f"table header {cols[:8]} lacks column(s) {missing}",
                     "make the first row name the columns gene, isoform, sequence "
                     f"(separated by {'tabs' if delim == chr(9) else 'commas'})")
    ig, ii, iseq = (cols.index(c) for c in TABLE_COLUMNS)
    need = max(ig, ii, iseq) + 1
    reader = csv.reader(fh, delimiter=delim)
    try:
        for row in reader:
            line = reader.line_num + 1  # + the header row read above
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < need:
                raise _error(path, line, None, f"row has {len(row)} fields, need at least {need}",
                             "give every row a gene, isoform and sequence value")
            gene, iso = row[ig].strip(), row[ii].strip()
            if not gene or not iso:
                raise _error(path, line, iso or None, "empty gene or isoform value",
                             "fill in both the gene and the isoform column")
            yield line, "tsv", gene, iso, row[iseq], None
    except csv.Error as e:
        raise _error(path, reader.line_num + 1, None, f"malformed table row ({e})",
                     "check the quoting and the separator of that row") from e


def read_isoforms(path: str | os.PathLike, fmt: str = "auto",
                  on_duplicate: str = "error") -> tuple[list[Isoform], ParseReport]:
    """Read protein isoforms with their genes from a FASTA or table file (see module docstring).

    Returns the kept isoforms in file order and a ``ParseReport``. Raises ``FastaError`` for bad
    input (the message names the file, the line and the fix) and ``ValueError`` for a bad argument.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not one of {FORMATS}")
    if on_duplicate not in ON_DUPLICATE:
        raise ValueError(f"on_duplicate={on_duplicate!r} is not one of {ON_DUPLICATE}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"isoform file {path} does not exist (or is not a file)")
    table = fmt == "tsv" or (fmt == "auto" and _table_suffix(path) in (".tsv", ".csv"))
    report = ParseReport(path=str(path))
    kept: list[Isoform] = []
    seen: dict[str, tuple[int, int]] = {}  # isoform id -> (index in kept, line)
    no_symbol: set[str] = set()
    counts: dict[str, int] = {}
    try:
        with _open_text(path) as fh:
            records = _table_records(fh, path) if table else _fasta_records(fh, path, fmt)
            for line, rec_fmt, gene, iso, raw, gene_id_used in records:
                report.n_records += 1
                counts[rec_fmt] = counts.get(rec_fmt, 0) + 1
                seq = "".join(raw.split()).upper()
                if seq.endswith("*"):
                    seq = seq.rstrip("*")
                    report.stop_codons_stripped += 1
                if not seq:
                    report.empty.append(iso)
                    continue
                seq, n_bad = _NONSTANDARD.subn("X", seq)
                if n_bad:
                    report.nonstandard += n_bad
                    if len(report.nonstandard_examples) < MAX_EXAMPLES:
                        report.nonstandard_examples.append(iso)
                prev = seen.get(iso)
                if prev is not None:
                    first = kept[prev[0]]
                    if first.gene != gene:
                        raise _error(path, line, iso,
                                     f"isoform id under gene {gene!r} was already read under "
                                     f"gene {first.gene!r} (line {prev[1]})",
                                     "give each isoform a unique id, or remove the wrong record")
                    if first.sequence == seq:
                        report.duplicates_dropped += 1
                    elif on_duplicate == "keep-first":
                        report.conflicts_dropped += 1
                    else:
                        raise _error(path, line, iso,
                                     f"a different sequence for ({gene!r}, {iso!r}), first read "
                                     f"at line {prev[1]}",
                                     "remove one of the two records, or pass "
                                     "on_duplicate='keep-first' to keep the first")
                    continue
                if gene_id_used is not None:
                    no_symbol.add(gene_id_used)
                seen[iso] = (len(kept), line)
                kept.append(Isoform(gene, iso, seq))
    except UnicodeDecodeError as e:
        raise FastaError(f"{path}: not a text file ({e}). Fix: pass a protein FASTA or a "
                         "gene/isoform/sequence table, plain or gzip-compressed.") from e
    except (gzip.BadGzipFile, EOFError) as e:
        raise FastaError(f"{path}: corrupt gzip data ({e}). Fix: re-download or re-compress "
                         "the file.") from e

    if report.n_records == 0:
        raise FastaError(f"{path}: no records found. Fix: pass a non-empty protein FASTA or "
                         "gene/isoform/sequence table.")
    if not kept:
        raise FastaError(f"{path}: all {report.n_records} records have an empty sequence "
                         f"(e.g. {report.empty[:3]}). Fix: pass a FASTA with the sequences "
                         "under each header.")
    report.format_counts = counts
    report.header_format = next(iter(counts)) if len(counts) == 1 else "mixed"
    report.n_isoforms = len(kept)
    report.n_genes = len({i.gene for i in kept})
    report.genes_without_symbol = len(no_symbol)
    return kept, report


# ------------------------------------------------------------------------------------------------
# helpers


def genes_of(isoforms: Iterable[Isoform]) -> dict[str, list[Isoform]]:
    """Group isoforms by gene; genes and isoforms in first-seen order."""
    out: dict[str, list[Isoform]] = {}
    for iso in isoforms:
        out.setdefault(iso.gene, []).append(iso)
    return out


def write_fasta_simple(isoforms: Iterable[Isoform], path: str | os.PathLike,
                       width: int = 60) -> int:
    """Write ``>gene|isoform`` FASTA, ``width`` residues a line (gzip if the name ends in .gz).

    Returns the number of records written; ``read_isoforms`` reads the file back unchanged.
    """
    path = Path(path)
    lines: list[str] = []
    n = 0
    for iso in isoforms:
        for name, value in (("gene", iso.gene), ("isoform", iso.isoform)):
            if not value or "|" in value or any(c.isspace() for c in value):
                raise ValueError(f"{name} {value!r} of {iso.isoform!r} cannot be written in the "
                                 "'>gene|isoform' form: it must be non-empty, without '|' or spaces")
        lines.append(f">{iso.gene}|{iso.isoform}")
        seq = iso.sequence
        lines.extend(seq[i: i + width] for i in range(0, len(seq), width))
        n += 1
    text = "\n".join(lines) + "\n" if lines else ""
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return n
