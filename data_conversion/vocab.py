"""One corpus gene vocabulary for many inputs with differing gene spaces.

Matching rule: by gene id when both the vocabulary entry and the input gene have one, else by
symbol. The default vocabulary is the union of the inputs' genes in first-seen order; with a
genes file it is that list, and input genes outside it are dropped (and reported).

Many inputs share a gene space (scBaseCount: ~60,000 files, a handful of STARsolo gene sets):
planning keys each space by ``gene_space_key`` and holds its arrays once, and
``build_vocabulary`` maps a space again only when the vocabulary changed since it last mapped
it, so the driver's memory and time grow with the distinct spaces, not the files.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .source import ConversionError


@dataclass
class GeneSpace:
    """One input's genes. Inputs with the same ``key`` (``gene_space_key``) hold the same
    arrays: ``build_vocabulary`` then maps them once and gives them one map object."""

    path: str
    symbols: np.ndarray
    gene_ids: np.ndarray | None
    key: str | None = None


def gene_space_key(symbols: np.ndarray, gene_ids: np.ndarray | None) -> str:
    """sha1 of a gene space's symbols and ids (None ids included), for interning identical
    spaces. Symbols are hashed as their fixed-width array bytes with dtype and shape; ids as
    marked strings joined by NUL, which HDF5 strings cannot hold: equal keys mean equal arrays
    up to a sha1 collision. (6.6 ms for 36,601 genes; hashing lengths too took 13 ms.)"""
    h = hashlib.sha1()
    sym = np.ascontiguousarray(symbols)
    h.update(f"{sym.dtype.str}{sym.shape}".encode())
    h.update(sym.tobytes())
    if gene_ids is None:
        h.update(b"|no-ids")
    else:
        h.update(b"|ids")
        h.update("\x00".join(["\x01" if g is None else "\x02" + g for g in gene_ids.tolist()])
                 .encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass
class Vocabulary:
    symbols: list[str] = field(default_factory=list)
    gene_ids: list[str | None] = field(default_factory=list)
    fixed: bool = False  # from a genes file: inputs cannot add genes
    _by_sym: dict[str, int] = field(default_factory=dict)
    _by_id: dict[str, int] = field(default_factory=dict)
    _origin: dict[int, str] = field(default_factory=dict)  # entry -> file that introduced it
    #: bumped by every change: a space mapped at an unchanged version maps the same way again
    version: int = 0

    def add(self, symbol: str, gene_id: str | None, origin: str) -> int:
        if symbol in self._by_sym:
            raise ConversionError(f"gene symbol {symbol!r} appears twice in {origin}")
        self.version += 1
        j = len(self.symbols)
        self.symbols.append(symbol)
        self.gene_ids.append(gene_id)
        self._by_sym[symbol] = j
        if gene_id is not None:
            self._by_id[gene_id] = j
        self._origin[j] = origin
        return j

    def set_gene_id(self, j: int, gene_id: str) -> None:
        """Give entry ``j`` (known by symbol only so far) the id an input has for it."""
        self.version += 1
        self.gene_ids[j] = gene_id
        self._by_id[gene_id] = j

    def __len__(self) -> int:
        return len(self.symbols)


def check_unique(space: GeneSpace) -> None:
    dup = [s for s, c in Counter(space.symbols.tolist()).items() if c > 1]
    if dup:
        raise ConversionError(
            f"{space.path}: {len(dup)} duplicate gene names in var, e.g. {dup[:5]}. Fix: make them "
            "unique (adata.var_names_make_unique() and re-save), or use a unique var column as the "
            "symbol with --symbol-column.")
    if space.gene_ids is not None:
        ids = [g for g in space.gene_ids.tolist() if g is not None]
        dup = [s for s, c in Counter(ids).items() if c > 1]
        if dup:
            raise ConversionError(
                f"{space.path}: {len(dup)} duplicate gene ids in var, e.g. {dup[:5]}. Fix: "
                "deduplicate the ids, or map by symbol only with --gene-id-column none.")


def read_genes_file(path: str) -> Vocabulary:
    """A genes file: TSV/CSV with a `gene` (symbol) column and optional `gene_id`, or one symbol
    per line."""
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"genes file {path} does not exist")
    text = p.read_text().splitlines()
    if not text:
        raise ConversionError(f"genes file {path} is empty")
    sep = "\t" if "\t" in text[0] else ("," if "," in text[0] else None)
    if sep is not None and "gene" in text[0].split(sep):
        df = pd.read_csv(p, sep=sep, dtype=str)
        syms = df["gene"].tolist()
        ids = df["gene_id"].tolist() if "gene_id" in df else [None] * len(syms)
    else:
        syms = [t.strip() for t in text if t.strip()]
        ids = [None] * len(syms)
    v = Vocabulary(fixed=True)
    for s, g in zip(syms, ids):
        g = None if g is None or (isinstance(g, float) and np.isnan(g)) else str(g)
        v.add(str(s), g, origin=str(path))
    return v


def _map_space(vocab: Vocabulary, space: GeneSpace, conflicts: str) -> tuple[np.ndarray, dict]:
    """One input's source->vocabulary column map (-1 = dropped), adding its new genes to the
    vocabulary, and its coverage report (without the vocabulary-size fields)."""
    ids = space.gene_ids if space.gene_ids is not None else [None] * len(space.symbols)
    m = np.full(len(space.symbols), -1, np.int64)
    by_id = by_sym = 0
    renamed: list[str] = []
    for k, (s, g) in enumerate(zip(space.symbols.tolist(), ids)):
        j = vocab._by_id.get(g) if g is not None else None
        if j is not None:
            if vocab.symbols[j] != s:
                if conflicts == "error":
                    raise ConversionError(
                        f"conflicting gene ids across files: id {g} is {vocab.symbols[j]!r} in "
                        f"{vocab._origin[j]} but {s!r} in {space.path}. Fix: correct one file, "
                        "or pass --gene-conflicts prefer-id to match by id and keep the first "
                        "symbol.")
                renamed.append(f"{s}->{vocab.symbols[j]}")
            m[k] = j
            by_id += 1
            continue
        j = vocab._by_sym.get(s)
        if j is not None:
            vid = vocab.gene_ids[j]
            if vid is not None and g is not None and vid != g:
                if conflicts == "error":
                    raise ConversionError(
                        f"conflicting gene ids across files: {s!r} has id {vid} in "
                        f"{vocab._origin[j]} but {g} in {space.path}. Fix: correct one file, "
                        "or pass --gene-conflicts prefer-id to treat ids as the identity.")
                # prefer-id: a different gene that happens to share the symbol
                if vocab.fixed:
                    continue
                m[k] = vocab.add(f"{s}_{g}", g, origin=space.path)
                renamed.append(f"{s}->{s}_{g}")
                continue
            if vid is None and g is not None:
                vocab.set_gene_id(j, g)
            m[k] = j
            by_sym += 1
            continue
        if not vocab.fixed:
            m[k] = vocab.add(s, g, origin=space.path)
            by_sym += g is None
            by_id += g is not None
    dropped = space.symbols[m < 0]
    report = {
        "source_genes": int(len(m)),
        "mapped": int((m >= 0).sum()),
        "mapped_by_id": int(by_id),
        "mapped_by_symbol": int(by_sym),
        "dropped": int(len(dropped)),
        "dropped_examples": dropped[:20].tolist(),
        "renamed_examples": renamed[:20],
    }
    return m, report


@dataclass
class _Mapped:
    """A space's map and report, valid while the vocabulary is at ``version``."""

    version: int
    gene_map: np.ndarray
    report: dict


def build_vocabulary(spaces: list[GeneSpace], genes_file: str | None = None,
                     conflicts: str = "error") -> tuple[Vocabulary, list[np.ndarray], list[dict]]:
    """Returns the vocabulary, one source->vocabulary column map per input (-1 = dropped) and a
    coverage report per input: its genes (``source_genes``), how many map (``mapped``, by id /
    symbol) or are dropped as not in the vocabulary (``dropped``, with examples), and the
    vocabulary genes it measures (``vocabulary_genes_present``, as a fraction
    ``vocabulary_coverage``). The reports are recorded per store in corpus.json.

    Inputs are mapped in order, as if one by one; an input whose space (``GeneSpace.key``) was
    mapped at the vocabulary's current version reuses that map and report objects (mapping
    it again would give the same), and an input whose map equals its space's previous map gets
    that array object, so inputs of one space share one map."""
    if conflicts not in ("error", "prefer-id"):
        raise ConversionError(f"gene_conflicts must be 'error' or 'prefer-id', got {conflicts!r}")
    vocab = read_genes_file(genes_file) if genes_file else Vocabulary()
    maps, reports = [], []
    done: dict[str, _Mapped] = {}  # space key -> its last mapping
    for space in spaces:
        last = done.get(space.key) if space.key is not None else None
        if last is not None and last.version == vocab.version:
            maps.append(last.gene_map)
            reports.append(last.report)
            continue
        if last is None:  # the same arrays passed before
            check_unique(space)
        start = vocab.version
        m, report = _map_space(vocab, space, conflicts)
        if last is not None and np.array_equal(m, last.gene_map):
            m = last.gene_map
        if space.key is not None:
            # reusable only at the version it was computed from: a mapping that changed the
            # vocabulary is recorded for its map object, not for reuse
            done[space.key] = _Mapped(start if vocab.version == start else -1, m, report)
        maps.append(m)
        reports.append(report)
    if len(vocab) == 0:
        raise ConversionError("the gene vocabulary is empty: no input gene matched the genes file")
    present_of: dict[int, int] = {}  # id(map) -> vocabulary genes it covers
    for r, m in zip(reports, maps):
        present = present_of.get(id(m))
        if present is None:
            present = present_of[id(m)] = int(len(np.unique(m[m >= 0])))
        r["vocabulary_genes_present"] = present  # vocabulary genes this input measures
        r["vocabulary_coverage"] = round(present / len(vocab), 6)
    return vocab, maps, reports
