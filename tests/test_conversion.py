"""h5ad -> corpus conversion: layouts, ordering, gene mapping, statistics, bad inputs, resume."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from data_conversion import (
    ConversionError,
    ConvertConfig,
    convert_corpus,
    validate_corpus,
)
from data_conversion.convert import plan_corpus
from tests.h5ad_factory import make_adata, write
from vcc_dist import constants as K
from vcc_dist.data.corpus import load_manifest, store_path

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def _convert(inputs, out, **kw):
    kw.setdefault("parallel", "serial")
    kw.setdefault("progress", False)
    kw.setdefault("n_top_genes", 10)
    return convert_corpus(ConvertConfig(inputs=tuple(str(i) for i in inputs), out=str(out), **kw))


def _store(corpus, name):
    return ad.read_zarr(store_path(corpus, name))


def _assert_store_equals_source(corpus, name, src: ad.AnnData, control="non-targeting"):
    s = _store(corpus, name)
    m = load_manifest(corpus)
    rows = s.obs[K.SOURCE_ROW_KEY].to_numpy()
    assert sorted(rows) == list(range(src.n_obs))
    col = {g: j for j, g in enumerate(m.genes)}
    x = np.zeros((src.n_obs, len(m.genes)))
    x[:, [col[g] for g in src.var_names]] = np.asarray(sp.csr_matrix(src.X).todense())
    np.testing.assert_array_equal(s.X.toarray(), x[rows])
    assert s.X.dtype.kind == "u"  # smallest exact integer dtype
    pert = src.obs["target_gene"].astype(str).replace(control, K.CONTROL_LABEL).to_numpy()
    np.testing.assert_array_equal(s.obs[K.PERT_KEY].astype(str), pert[rows])
    np.testing.assert_array_equal(s.obs[K.CONTEXT_KEY].astype(str),
                                  src.obs["cell_type"].astype(str).to_numpy()[rows])
    np.testing.assert_array_equal(s.obs[K.TOTAL_COUNTS_KEY], np.asarray(src.X.sum(1)).ravel()[rows])
    return s


@pytest.mark.parametrize("fmt,compression,dtype", [
    ("csr", None, np.float32), ("csr", "gzip", np.int32), ("csc", None, np.float64),
    ("dense", "gzip", np.uint16), ("dense", None, np.float32)])
def test_layouts_convert_exactly(tmp_path, fmt, compression, dtype):
    src = make_adata(n=400, g=40, dtype=dtype)
    write(src, tmp_path / "in.h5ad", fmt=fmt, compression=compression)
    _convert([tmp_path / "in.h5ad"], tmp_path / "c", read_budget_mb=1)
    s = _assert_store_equals_source(tmp_path / "c", "in", src)
    # rows grouped by (context, perturbation with controls first, batch), group index tiles them
    key = list(zip(s.obs[K.CONTEXT_KEY].astype(str), s.obs[K.PERT_KEY].astype(str) != K.CONTROL_LABEL,
                   s.obs[K.PERT_KEY].astype(str), s.obs[K.BATCH_KEY].astype(str)))
    assert key == sorted(key)
    groups = s.uns[K.STORE_GROUPS_KEY]
    assert groups["start"].iloc[0] == 0 and groups["stop"].iloc[-1] == s.n_obs
    assert (groups["start"].to_numpy()[1:] == groups["stop"].to_numpy()[:-1]).all()
    # within a group, source order is kept (stable sort)
    for _, g in groups.iterrows():
        r = s.obs[K.SOURCE_ROW_KEY].to_numpy()[g.start:g.stop]
        assert (np.diff(r) > 0).all()
    assert validate_corpus(tmp_path / "c").ok


def test_small_read_budget_gives_identical_store(tmp_path):
    src = make_adata(n=500, g=30, seed=4)
    write(src, tmp_path / "in.h5ad")
    _convert([tmp_path / "in.h5ad"], tmp_path / "a", read_budget_mb=1)
    _convert([tmp_path / "in.h5ad"], tmp_path / "b", read_budget_mb=64)
    a, b = _store(tmp_path / "a", "in"), _store(tmp_path / "b", "in")
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)


def test_layout_dtypes_and_sharding(tmp_path):
    src = make_adata(n=2000, g=300, density=0.5)
    src.X.data[:5] = 70000  # needs uint32 counts
    write(src, tmp_path / "in.h5ad")
    _convert([tmp_path / "in.h5ad"], tmp_path / "c", chunk_rows=8, shard_mb=1)
    import zarr

    x = zarr.open_group(str(store_path(tmp_path / "c", "in")), mode="r")["X"]
    assert x["data"].dtype == np.uint32 and x["indices"].dtype == np.uint16
    assert x["indptr"].dtype == np.int64
    assert x["data"].shards is not None and x["data"].shards[0] % x["data"].chunks[0] == 0
    # ~8 rows of ~150 non-zeros per chunk, rounded to a power of two
    assert x["data"].chunks[0] == 4096
    assert _assert_store_equals_source(tmp_path / "c", "in", src) is not None


def test_gene_spaces_mapped_onto_one_vocabulary(tmp_path):
    a = make_adata(n=100, g=30, seed=0)
    b = make_adata(n=120, g=30, seed=1)
    # b: a shifted gene space (genes 10..39), one gene with no id, columns in another order
    b.var_names = [f"GENE{i + 10}" for i in range(30)]
    b.var["gene_id"] = [f"ENSG{i + 10:05d}" for i in range(30)]
    b.var.loc["GENE15", "gene_id"] = None
    b = b[:, b.var_names[::-1]].copy()
    write(a, tmp_path / "a.h5ad")
    write(b, tmp_path / "b.h5ad")
    m = _convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c")
    assert m.genes[:30] == [f"GENE{i}" for i in range(30)] and len(m.genes) == 40
    assert m.gene_ids[15] == "ENSG00015"
    cov = {s.name: s.coverage for s in m.stores}
    assert cov["b"]["mapped"] == 30 and cov["b"]["dropped"] == 0
    assert cov["b"]["vocabulary_coverage"] == 0.75
    _assert_store_equals_source(tmp_path / "c", "a", a)
    _assert_store_equals_source(tmp_path / "c", "b", b)
    # a fixed vocabulary drops genes outside it and reports them
    (tmp_path / "genes.tsv").write_text("gene\tgene_id\n" + "".join(
        f"GENE{i}\tENSG{i:05d}\n" for i in range(5, 25)))
    m2 = _convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "d",
                  genes_file=str(tmp_path / "genes.tsv"))
    assert len(m2.genes) == 20
    cov = {s.name: s.coverage for s in m2.stores}
    assert cov["a"]["dropped"] == 10 and cov["b"]["dropped"] == 15
    sa = _store(tmp_path / "d", "a")
    rows = sa.obs[K.SOURCE_ROW_KEY].to_numpy()
    np.testing.assert_array_equal(sa.X.toarray(), a.X.toarray()[rows][:, 5:25])
    assert validate_corpus(tmp_path / "d").ok


def test_conflicting_gene_ids_across_files(tmp_path):
    a = make_adata(n=50, g=10, seed=0)
    b = make_adata(n=50, g=10, seed=1)
    b.var.loc["GENE3", "gene_id"] = "ENSG99999"
    write(a, tmp_path / "a.h5ad")
    write(b, tmp_path / "b.h5ad")
    with pytest.raises(ConversionError, match=r"conflicting gene ids.*GENE3.*--gene-conflicts"):
        _convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c")
    assert not (tmp_path / "c").exists()  # planning fails before anything is written
    m = _convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c",
                 gene_conflicts="prefer-id")
    assert "GENE3_ENSG99999" in m.genes and len(m.genes) == 11
    c = make_adata(n=50, g=10, seed=2)
    c.var_names = [f"GENE{i}" if i != 4 else "OTHER" for i in range(10)]  # same id, other symbol
    write(c, tmp_path / "c.h5ad")
    with pytest.raises(ConversionError, match=r"id ENSG00004 is 'GENE4'.*but 'OTHER'"):
        _convert([tmp_path / "a.h5ad", tmp_path / "c.h5ad"], tmp_path / "e")


def _bad(tmp_path, kind):
    a = make_adata(n=60, g=12)
    p = tmp_path / "bad.h5ad"
    if kind == "negative":
        a.X.data[7] = -3
    elif kind == "nan":
        a.X.data[7] = np.nan
    elif kind == "inf":
        a.X.data[7] = np.inf
    elif kind == "fractional":
        a.X.data[7] = 0.5
    elif kind == "duplicate_genes":
        a.var_names = ["GENE0"] + list(a.var_names[1:-1]) + ["GENE0"]
        del a.var["gene_id"]
    elif kind == "missing_obs":
        a.obs = a.obs.drop(columns=["cell_type"])
    elif kind == "zero_cells":
        a = a[:0].copy()
    elif kind == "empty_file":
        p.write_bytes(b"")
        return p
    elif kind == "corrupt_file":
        write(a, p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])
        return p
    elif kind == "not_hdf5":
        p.write_text("cell,gene\n1,2\n")
        return p
    write(a, p)
    return p


@pytest.mark.parametrize("kind,pattern", [
    ("negative", r"negative values \(-3.0 in source row \d+\).*--matrix"),
    ("nan", r"non-finite values"),
    ("inf", r"non-finite values"),
    ("fractional", r"non-integer values \(0.5 .*raw counts"),
    ("duplicate_genes", r"duplicate gene names.*GENE0.*var_names_make_unique"),
    ("missing_obs", r"no column 'cell_type'.*--obs-map cell_type=<column>.*--obs-fill"),
    ("zero_cells", r"is empty \(0 cells"),
    ("empty_file", r"is empty \(0 bytes\)"),
    ("corrupt_file", r"cannot read .*bad.h5ad"),
    ("not_hdf5", r"cannot read .*bad.h5ad as an h5ad"),
])
def test_bad_input_clear_error_nothing_half_written(tmp_path, kind, pattern):
    good = make_adata(n=80, g=12, seed=9)
    write(good, tmp_path / "good.h5ad")
    bad = _bad(tmp_path, kind)
    with pytest.raises(ConversionError, match=pattern):
        _convert([tmp_path / "good.h5ad", bad], tmp_path / "c")
    corpus = tmp_path / "c"
    if corpus.exists():
        # nothing presents itself as complete; no temporaries survive
        m = load_manifest(corpus, require_complete=False)
        assert m.status != "complete"
        stores = corpus / K.CORPUS_STORES_DIR
        assert not [p for p in stores.iterdir() if p.name.startswith(".")]
        for p in stores.glob("*.zarr"):
            assert p.name == "good.zarr"  # the good input converted before the bad one failed
        with pytest.raises(Exception, match="incomplete"):
            load_manifest(corpus)


def test_corrupt_compressed_chunk_is_a_clear_error(tmp_path):
    """The file opens fine; one compressed chunk of X is damaged and fails mid-conversion."""
    p = write(make_adata(n=3000, g=200, density=0.5), tmp_path / "bad.h5ad", compression="gzip")
    with h5py.File(p, "r") as f:
        d = f["X/data"]
        off = d.id.get_chunk_info(d.id.get_num_chunks() // 2).byte_offset
    with open(p, "r+b") as fh:
        fh.seek(off + 10)
        fh.write(b"\xff" * 64)
    with pytest.raises(ConversionError, match=r"bad.h5ad: reading failed.*truncated or corrupt"):
        _convert([p], tmp_path / "c")
    stores = tmp_path / "c" / K.CORPUS_STORES_DIR
    assert not list(stores.iterdir())  # no store, no temporaries
    assert load_manifest(tmp_path / "c", require_complete=False).status != "complete"


def test_obs_map_and_fill_fix_missing_columns(tmp_path):
    a = make_adata(n=80, g=12)
    a.obs = a.obs.rename(columns={"target_gene": "gene", "cell_type": "cell_line"}).drop(
        columns=["guide_id"])
    a.obs["gene"] = a.obs["gene"].cat.rename_categories({"non-targeting": "CTRL"})
    write(a, tmp_path / "a.h5ad")
    _convert([tmp_path / "a.h5ad"], tmp_path / "c",
             obs_map={"target_gene": "gene", "cell_type": "cell_line"},
             obs_fill={"guide_id": "none"}, control_label="CTRL")
    s = _store(tmp_path / "c", "a")
    assert set(s.obs[K.GUIDE_KEY]) == {"none"}
    assert (s.obs[K.PERT_KEY] == K.CONTROL_LABEL).sum() == (a.obs["gene"] == "CTRL").sum()
    assert s.obs[K.PERT_KEY].iloc[0] == K.CONTROL_LABEL  # controls first
    assert validate_corpus(tmp_path / "c").ok


def test_matrix_option_reads_raw_counts_layer(tmp_path):
    a = make_adata(n=80, g=12)
    counts = a.X.copy()
    a.layers["counts"] = counts
    a.X = a.X.multiply(1 / (1 + a.X.sum(1))).tocsr().astype(np.float32)  # normalised: not counts
    write(a, tmp_path / "a.h5ad")
    with pytest.raises(ConversionError, match="non-integer values"):
        _convert([tmp_path / "a.h5ad"], tmp_path / "c")
    _convert([tmp_path / "a.h5ad"], tmp_path / "d", matrix="layers/counts")
    s = _store(tmp_path / "d", "a")
    rows = s.obs[K.SOURCE_ROW_KEY].to_numpy()
    np.testing.assert_array_equal(s.X.toarray(), counts.toarray()[rows])


def test_large_input_split_into_stores(tmp_path):
    a = make_adata(n=250, g=20)
    write(a, tmp_path / "a.h5ad")
    m = _convert([tmp_path / "a.h5ad"], tmp_path / "c", max_cells_per_store=100)
    assert [s.name for s in m.stores] == ["a.part000", "a.part001", "a.part002"]
    assert [s.source_rows for s in m.stores] == [[0, 83], [83, 167], [167, 250]]
    got = np.concatenate([_store(tmp_path / "c", s.name).obs[K.SOURCE_ROW_KEY] for s in m.stores])
    assert sorted(got) == list(range(250))
    assert m.summary["n_cells"] == 250


def test_corpus_statistics_match_scanpy_and_pseudobulk(tmp_path):
    import scanpy as sc
    a, b = make_adata(n=300, g=60, seed=0), make_adata(n=200, g=60, seed=1)
    write(a, tmp_path / "a.h5ad")
    write(b, tmp_path / "b.h5ad")
    m = _convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c", n_top_genes=15)
    both = ad.concat([a, b])
    sc.pp.normalize_total(both, target_sum=1e4)
    sc.pp.log1p(both)
    ref = sc.pp.highly_variable_genes(both, flavor="seurat", n_top_genes=15, inplace=False)
    t = m.gene_table()
    np.testing.assert_array_equal(t["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())
    X = both.X.toarray()
    np.testing.assert_allclose(t["mean"], X.mean(0), rtol=1e-5)
    np.testing.assert_allclose(t["nonzero_fraction"], (X > 0).mean(0))
    assert m.summary["n_cells"] == 500 and m.summary["n_perturbations"] == 3
    # pseudobulk of one condition = mean log1p-CP10k of its cells
    s = _store(tmp_path / "c", "a")
    conds, pb = s.uns["vcc_dist_conditions"], s.uns["vcc_dist_pseudobulk"]
    x = s.X.toarray().astype(np.float64)
    lg = np.log1p(x / s.obs[K.TOTAL_COUNTS_KEY].to_numpy()[:, None] * 1e4)
    for i, c in conds.iterrows():
        np.testing.assert_allclose(pb[i], lg[c.start:c.stop].mean(0), rtol=1e-5, atol=1e-6)


def test_resume_refuses_changed_options_and_sources(tmp_path):
    a = make_adata(n=80, g=12)
    write(a, tmp_path / "a.h5ad")
    _convert([tmp_path / "a.h5ad"], tmp_path / "c")
    with pytest.raises(ConversionError, match=r"other options.*compressor"):
        _convert([tmp_path / "a.h5ad"], tmp_path / "c", compressor="zstd")
    # n_top_genes only shapes the final statistics: re-applied without reconverting
    before = store_path(tmp_path / "c", "a").stat().st_mtime_ns
    m = _convert([tmp_path / "a.h5ad"], tmp_path / "c", n_top_genes=3)
    assert m.summary["n_highly_variable"] >= 3 and m.gene_table()["highly_variable"].sum() < 12
    assert store_path(tmp_path / "c", "a").stat().st_mtime_ns == before
    write(make_adata(n=80, g=12, seed=5), tmp_path / "a.h5ad")
    with pytest.raises(ConversionError, match="changed since store a was written.*--overwrite"):
        _convert([tmp_path / "a.h5ad"], tmp_path / "c")
    m = _convert([tmp_path / "a.h5ad"], tmp_path / "c", overwrite=True)
    assert m.status == "complete"


def test_validate_detects_tampering(tmp_path):
    a = make_adata(n=120, g=12)
    write(a, tmp_path / "a.h5ad")
    _convert([tmp_path / "a.h5ad"], tmp_path / "c")
    import zarr

    root = zarr.open_group(str(store_path(tmp_path / "c", "a")), mode="a", use_consolidated=False)
    d = root["X/data"][:]
    d[5] += 1
    root["X/data"][:] = d
    rep = validate_corpus(tmp_path / "c", sample_rows=120)
    assert not rep.ok and any("X differs" in p for p in rep.problems)
    m = json.loads((tmp_path / "c" / K.CORPUS_MANIFEST).read_text())
    m["format_version"] = 99
    (tmp_path / "c" / K.CORPUS_MANIFEST).write_text(json.dumps(m))
    rep = validate_corpus(tmp_path / "c")
    assert not rep.ok and "format version 99" in rep.problems[0]


def test_plan_is_cheap_and_reports_coverage(tmp_path):
    a = make_adata(n=50, g=12)
    write(a, tmp_path / "a.h5ad")
    manifest, tasks = plan_corpus(ConvertConfig(inputs=(str(tmp_path),), out=str(tmp_path / "c")))
    assert len(tasks) == 1 and manifest.stores[0].source_size == (tmp_path / "a.h5ad").stat().st_size
    assert manifest.stores[0].source_checksum.startswith("blake2b")
