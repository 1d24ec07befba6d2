"""Check a corpus against its manifest and its source files.

Problems (the corpus is invalid): format version, completeness, vocabulary, cell counts,
indptr, group index, obs labels, contexts without control cells, and X / total counts / labels
differing from the source on sampled rows. Warnings (valid, but worth knowing): stores whose
input covers less than ``min_gene_coverage`` of the vocabulary. Notes: per-store gene coverage
and what was compared."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from vcc_dist import constants as K
from vcc_dist import storage
from vcc_dist.data.corpus import CorpusError, load_manifest, store_path

from .source import ConversionError, H5adSource, file_fingerprint


@dataclass
class ValidationReport:
    corpus: str
    checks: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, cond: bool, problem: str) -> bool:
        self.checks += 1
        if not cond:
            self.problems.append(problem)
        return cond

    def text(self) -> str:
        head = (f"corpus {self.corpus}: {'OK' if self.ok else 'INVALID'} "
                f"({self.checks} checks, {len(self.problems)} problems, "
                f"{len(self.warnings)} warnings)")
        return "\n".join([head] + [f"  PROBLEM: {p}" for p in self.problems]
                         + [f"  WARNING: {w}" for w in self.warnings]
                         + [f"  note: {n}" for n in self.notes])


def map_to_vocabulary(symbols, gene_ids, vocab_symbols, vocab_ids) -> np.ndarray:
    """Source column -> corpus column (-1: not in the corpus), by id first, then symbol."""
    by_id = {g: j for j, g in enumerate(vocab_ids) if g}
    by_sym = {s: j for j, s in enumerate(vocab_symbols)}
    ids = gene_ids if gene_ids is not None else [None] * len(symbols)
    return np.array([by_id[g] if g is not None and g in by_id else by_sym.get(s, -1)
                     for s, g in zip(symbols, ids)], np.int64)


def _check_coverage(rep: ValidationReport, m, min_gene_coverage: float) -> None:
    """Per-store gene coverage from corpus.json (older corpora may lack part or all of it)."""
    G = len(m.genes)
    for s in m.stores:
        r = s.coverage
        if not r or "vocabulary_coverage" not in r:
            rep.notes.append(f"store {s.name}: no gene coverage recorded (converted by an older "
                             "vcc-dist); re-convert to record it")
            continue
        present = r.get("vocabulary_genes_present", int(round(r["vocabulary_coverage"] * G)))
        frac = float(r["vocabulary_coverage"])
        text = (f"store {s.name}: its input measures {present:,} of {G:,} vocabulary genes "
                f"({100 * frac:.1f}%); {r.get('dropped', 0):,} input genes not in the vocabulary")
        if frac < min_gene_coverage:
            rep.warnings.append(
                f"{text}: below --min-gene-coverage {min_gene_coverage:g}. Its cells hold zeros "
                "for the other genes, indistinguishable from no expression; convert inputs with "
                "different gene panels into separate corpora, or use a common --genes list.")
        else:
            rep.notes.append(text)


def _check_controls(rep: ValidationReport, contexts: dict[str, list[str]],
                    with_controls: set[str], control_label: str) -> None:
    """Every context needs control cells (ST training pairs perturbed cells with them)."""
    missing = sorted(set(contexts) - with_controls)
    for c in missing:
        stores = contexts[c]
        rep.problems.append(
            f"context {c!r} has no control cells ({K.CONTROL_LABEL!r}) in its stores "
            f"{stores[:5]}{' ...' if len(stores) > 5 else ''}: ST training needs controls in "
            f"every context. Fix: re-convert with the inputs' control label (--control-label; "
            f"this corpus used {control_label!r}), or add that context's control cells.")
    rep.checks += 1


def validate_corpus(corpus_dir: str | os.PathLike, sample_rows: int = 200,
                    check_sources: bool = True, seed: int = 0,
                    min_gene_coverage: float = 0.5) -> ValidationReport:
    import anndata as ad
    import zarr
    from anndata.io import read_elem, sparse_dataset

    rep = ValidationReport(str(corpus_dir))
    try:
        m = load_manifest(corpus_dir, require_complete=False)
    except CorpusError as e:
        rep.check(False, str(e))
        return rep
    rep.check(m.status == "complete", f"corpus status is {m.status!r}, not 'complete' (resume "
              "the conversion by running the same command again)")
    rng = np.random.default_rng(seed)
    G = len(m.genes)
    _check_coverage(rep, m, min_gene_coverage)
    contexts: dict[str, list[str]] = {}  # context -> stores holding it
    with_controls: set[str] = set()
    for s in m.stores:
        p = store_path(corpus_dir, s)
        present = storage.exists(p)
        if not rep.check(s.status == "complete" and present,
                         f"store {s.name}: status {s.status!r}, present={present}"):
            continue
        root = zarr.open_group(storage.open_zarr_store(p), mode="r")
        meta = read_elem(root["uns"][K.STORE_UNS_KEY])
        rep.check(bool(meta.get("complete")), f"store {s.name}: not marked complete")
        rep.check(int(meta.get("format_version", -1)) == K.CORPUS_FORMAT_VERSION,
                  f"store {s.name}: format version {meta.get('format_version')}")
        rep.check(meta.get("vocab_hash") == m.vocab_hash,
                  f"store {s.name}: vocabulary hash {meta.get('vocab_hash')} != corpus "
                  f"{m.vocab_hash}")
        var = read_elem(root["var"])
        rep.check(list(var.index) == m.genes, f"store {s.name}: var genes differ from the corpus")
        obs = read_elem(root["obs"])
        n = len(obs)
        rep.check(n == s.n_cells == meta["n_cells"] == s.source_rows[1] - s.source_rows[0],
                  f"store {s.name}: {n} cells in obs, manifest {s.n_cells}, source rows "
                  f"{s.source_rows}")
        X = sparse_dataset(root["X"])
        rep.check(tuple(X.shape) == (n, G), f"store {s.name}: X shape {X.shape} != {(n, G)}")
        indptr = root["X/indptr"][:]
        rep.check(bool(np.all(np.diff(indptr) >= 0)) and indptr[0] == 0
                  and indptr[-1] == s.nnz == root["X/data"].shape[0],
                  f"store {s.name}: indptr inconsistent with nnz {s.nnz}")
        conds = read_elem(root["uns"]["vcc_dist_conditions"])
        for c, pert in zip(conds[K.CONTEXT_KEY].astype(str), conds[K.PERT_KEY].astype(str)):
            contexts.setdefault(c, [])
            if s.name not in contexts[c]:
                contexts[c].append(s.name)
            if pert == K.CONTROL_LABEL:
                with_controls.add(c)
        groups = read_elem(root["uns"][K.STORE_GROUPS_KEY])
        st, sp_ = groups["start"].to_numpy(), groups["stop"].to_numpy()
        rep.check(len(st) > 0 and st[0] == 0 and sp_[-1] == n and np.all(st[1:] == sp_[:-1])
                  and np.all(sp_ > st), f"store {s.name}: group index does not tile the rows")
        for key in (K.CONTEXT_KEY, K.PERT_KEY, K.BATCH_KEY):
            lab = np.asarray(obs[key].astype(str))
            exp = np.repeat(groups[key].astype(str).to_numpy(), sp_ - st)
            rep.check(bool(np.array_equal(lab, exp)),
                      f"store {s.name}: obs {key} disagrees with the group index")
        src_rows = obs[K.SOURCE_ROW_KEY].to_numpy()
        rep.check(bool(np.array_equal(np.sort(src_rows), np.arange(*s.source_rows))),
                  f"store {s.name}: source_row is not a permutation of {s.source_rows}")
        if not check_sources:
            continue
        if not storage.exists(s.source):
            rep.notes.append(f"store {s.name}: source {s.source} not found; compared with the "
                             "manifest only")
            continue
        size, checksum = file_fingerprint(s.source, full=s.source_checksum.startswith(
            "blake2b-full") and storage.file_size(s.source) > 64 * 65536)
        if not rep.check((size, checksum) == (s.source_size, s.source_checksum),
                         f"store {s.name}: source {s.source} changed since conversion "
                         f"(size/checksum differ)"):
            continue
        opts = m.options
        try:
            src = H5adSource(s.source, opts["matrix"], opts["symbol_column"],
                             opts["gene_id_column"])
        except ConversionError as e:
            rep.check(False, f"store {s.name}: {e}")
            continue
        try:
            _compare_with_source(rep, s, src, m, X, obs, src_rows, n, G, rng, sample_rows)
        except ConversionError as e:  # e.g. a source damaged since conversion
            rep.check(False, f"store {s.name}: {e}")
        finally:
            src.close()
    if contexts:
        _check_controls(rep, contexts, with_controls, m.options.get("control_label",
                                                                     K.CONTROL_LABEL))
    # the anndata contract: a store opens with plain anndata
    if m.stores and storage.exists(store_path(corpus_dir, m.stores[0])):
        try:
            a = ad.read_zarr(storage.open_zarr_store(store_path(corpus_dir, m.stores[0])))
            rep.check(a.shape[1] == G, "anndata.read_zarr gives the wrong number of genes")
        except Exception as e:  # noqa: BLE001 - any failure here is a finding to report
            rep.check(False, f"anndata.read_zarr cannot open {m.stores[0].name}: {e}")
    return rep


def _compare_with_source(rep, s, src, m, X, obs, src_rows, n, G, rng, sample_rows) -> None:
    """X, total counts and labels of sampled rows of store ``s`` against its source."""
    opts = m.options
    n_problems = len(rep.problems)
    gmap = map_to_vocabulary(src.symbols, src.gene_ids, m.genes, m.gene_ids)
    k = min(sample_rows, n)
    rows = np.sort(rng.choice(n, size=k, replace=False))
    srows = src_rows[rows]
    mine = X[rows].toarray() if k else np.zeros((0, G))
    # source rows, mapped onto the vocabulary
    ref = np.zeros((k, G), np.float64)
    srt = np.argsort(srows)
    if src.info.fmt == "csr":
        got = src.read_rows(srows[srt])
    else:
        node = src.f[src.matrix]
        if src.info.fmt == "dense":
            got = sp.csr_matrix(node[np.sort(srows), :])
        else:  # CSC: one streaming pass over the columns, bounded memory
            want = np.sort(srows)
            dense = np.zeros((k, src.n_vars), np.float64)
            for c0, _, data, rws, ip in src.iter_csc_columns(64 << 20):
                cols = np.repeat(np.arange(c0, c0 + len(ip) - 1), np.diff(ip))
                hit = np.isin(rws, want)
                dense[np.searchsorted(want, rws[hit]), cols[hit]] = data[hit]
            got = sp.csr_matrix(dense)
    got = got.toarray()
    keep = gmap >= 0
    ref[srt[:, None], gmap[keep][None, :]] = got[:, keep] if k else 0
    rep.check(bool(np.array_equal(mine, ref)),
              f"store {s.name}: X differs from the source on sampled rows")
    tot = got.sum(1)
    rep.check(bool(np.allclose(obs[K.TOTAL_COUNTS_KEY].to_numpy()[rows][srt], tot)),
              f"store {s.name}: total_counts differ from the source")
    for key in K.CORPUS_OBS_KEYS:
        col = opts["obs_map"].get(key, key)
        if col not in src.obs_columns:
            continue
        v = src.obs_column(col)[srows].astype(str)
        if key == K.PERT_KEY:
            v = np.where(v == opts["control_label"], K.CONTROL_LABEL, v)
        rep.check(bool(np.array_equal(v, obs[key].astype(str).to_numpy()[rows])),
                  f"store {s.name}: obs {key} differs from source column {col!r}")
    if len(rep.problems) == n_problems:
        rep.notes.append(f"store {s.name}: {k} sampled rows equal to the source")
