"""Defects found by trying the conversion (issue 15): an absent control label, a corrupt X, and
inputs with different gene sets. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_conversion import (
    ConversionError,
    ConversionWarning,
    ConvertConfig,
    CorruptInputError,
    convert_corpus,
    validate_corpus,
)
from data_conversion.cli import convert_main, validate_main
from data_conversion.source import H5adSource
from tests.h5ad_factory import make_adata, write
from vcc_dist import constants as K
from vcc_dist.data.corpus import load_manifest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def _convert(inputs, out, **kw):
    kw.setdefault("parallel", "serial")
    kw.setdefault("progress", False)
    kw.setdefault("n_top_genes", 5)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*anndata.*")
        return convert_corpus(ConvertConfig(inputs=tuple(str(i) for i in inputs), out=str(out),
                                            **kw))


def _relabel(a, old, new, where=None):
    """Relabel perturbation ``old`` as ``new`` (in the cells selected by ``where``)."""
    t = a.obs["target_gene"].astype(str).to_numpy().copy()
    sel = (t == old) if where is None else (t == old) & where
    t[sel] = new
    a.obs["target_gene"] = t
    a.obs["target_gene"] = a.obs["target_gene"].astype("category")
    return a


def _conversion_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ConversionWarning)]


def _assert_nothing_looks_complete(corpus: Path) -> None:
    if not corpus.exists():
        return
    m = load_manifest(corpus, require_complete=False)
    assert m.status != "complete"
    assert all(s.status != "complete" for s in m.stores)
    assert not list((corpus / K.CORPUS_STORES_DIR).iterdir())  # no store, no temporaries


# ----------------------------------------------------------------- 2: control label absent


def test_absent_control_label_is_an_error_naming_the_option(tmp_path):
    a = _relabel(make_adata(n=200, g=12), "non-targeting", "NTC")
    write(a, tmp_path / "a.h5ad")
    n_ntc = int((a.obs["target_gene"] == "NTC").sum())
    with pytest.raises(ConversionError) as e:
        _convert([tmp_path / "a.h5ad"], tmp_path / "c")
    msg = str(e.value)
    assert "no input has control cells" in msg and "'non-targeting' (--control-label)" in msg
    assert f"labels that look like controls: 'NTC' ({n_ntc:,} cells)" in msg
    assert "most frequent labels:" in msg and "e.g. --control-label NTC" in msg
    assert "a.h5ad" in msg and "--allow-missing-controls" in msg
    assert not (tmp_path / "c").exists()  # planning fails before anything is written
    m = _convert([tmp_path / "a.h5ad"], tmp_path / "c", control_label="NTC")
    assert m.summary["n_controls"] == n_ntc
    assert validate_corpus(tmp_path / "c").ok


def test_absent_control_label_through_the_job(tmp_path, capsys):
    write(_relabel(make_adata(n=120, g=12), "non-targeting", "NTC"), tmp_path / "a.h5ad")
    rc = convert_main([str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "c"), "--serial",
                       "--no-progress", "--n-top-genes", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "--control-label" in err and "'NTC'" in err


def test_one_input_without_controls_is_named(tmp_path):
    write(make_adata(n=150, g=12, seed=0), tmp_path / "a.h5ad")
    b = _relabel(make_adata(n=150, g=12, seed=1, contexts=("C",)), "non-targeting", "G1")
    write(b, tmp_path / "b.h5ad")
    with pytest.raises(ConversionError, match=r"1 of 2 input\(s\) have no control cells") as e:
        _convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c")
    assert "b.h5ad" in str(e.value) and "a.h5ad" not in str(e.value)
    assert "no label looks like a control" in str(e.value)
    # allowed: a warning naming the input, and the corpus has a context without controls,
    # which the conversion warns about and validation reports as a problem
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c",
                 allow_missing_controls=True)
    got = _conversion_warnings(rec)
    assert any("b.h5ad" in w and "--allow-missing-controls" in w for w in got), got
    assert any("context(s) have no control cells: ['C']" in w for w in got), got
    rep = validate_corpus(tmp_path / "c")
    assert not rep.ok
    assert [p for p in rep.problems if "context 'C' has no control cells" in p
            and "--control-label" in p and "['b']" in p]
    assert not [p for p in rep.problems if "context 'A'" in p or "context 'B'" in p]


def test_control_label_in_no_input_is_a_warning_when_allowed(tmp_path):
    write(_relabel(make_adata(n=100, g=12), "non-targeting", "NTC"), tmp_path / "a.h5ad")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _convert([tmp_path / "a.h5ad"], tmp_path / "c", allow_missing_controls=True)
    first, last = _conversion_warnings(rec)
    assert "control label 'non-targeting' (--control-label) is found in no input" in first
    assert "'NTC'" in first and "e.g. --control-label NTC" in first
    assert "2 context(s) have no control cells: ['A', 'B']" in last


def test_validate_reports_a_context_without_controls(tmp_path):
    a = make_adata(n=300, g=12, contexts=("A", "B"))
    a = _relabel(a, "non-targeting", "G1", where=(a.obs["cell_type"] == "B").to_numpy())
    write(a, tmp_path / "a.h5ad")
    with pytest.warns(ConversionWarning, match=r"context\(s\) have no control cells: \['B'\]"):
        _convert([tmp_path / "a.h5ad"], tmp_path / "c")  # the input as a whole has controls
    rep = validate_corpus(tmp_path / "c")
    assert not rep.ok and len(rep.problems) == 1
    assert "context 'B' has no control cells ('non-targeting')" in rep.problems[0]


# ----------------------------------------------------------------- 5: corrupt X/indices


def _corrupt_indices(path: Path, seed: int = 0) -> None:
    """Overwrite part of the middle chunk of X/indices with random bytes, as a damaged disk
    or an interrupted copy would."""
    with h5py.File(path, "r") as f:
        d = f["X/indices"]
        assert d.compression is None
        off = (d.id.get_chunk_info(d.id.get_num_chunks() // 2).byte_offset if d.chunks
               else d.id.get_offset())
    with open(path, "r+b") as fh:
        fh.seek(off + 64)
        fh.write(np.random.default_rng(seed).bytes(4096))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_corrupt_indices_are_a_named_error(tmp_path, fmt):
    p = write(make_adata(n=3000, g=200, density=0.5), tmp_path / "bad.h5ad", fmt=fmt)
    _corrupt_indices(p)
    with pytest.raises(CorruptInputError) as e:
        _convert([p], tmp_path / "c")
    assert isinstance(e.value, ValueError)
    major = "rows" if fmt == "csr" else "columns"
    assert str(e.value).startswith(f"{p}: X/indices of {major} [")
    assert "out of range" in str(e.value) and "re-export it" in str(e.value)
    assert "check its integrity" in str(e.value)
    _assert_nothing_looks_complete(tmp_path / "c")


def test_corrupt_indptr_and_dtype_are_named_at_open(tmp_path):
    p = write(make_adata(n=60, g=12), tmp_path / "a.h5ad")
    with h5py.File(p, "r+") as f:
        ip = f["X/indptr"][:]
        ip[5] = ip[7] + 3
        f["X/indptr"][:] = ip
    with pytest.raises(CorruptInputError, match=r"a.h5ad: X/indptr is non-monotonic: rows "
                       r"\[5, 6\) include 1 with a negative length.*re-export"):
        H5adSource(p)
    p = write(make_adata(n=60, g=12), tmp_path / "b.h5ad")
    with h5py.File(p, "r+") as f:
        ind = f["X/indices"][:]
        del f["X/indices"]
        f["X/indices"] = ind.astype(np.float32)
    with pytest.raises(CorruptInputError, match=r"b.h5ad: X/indices has dtype float32, not an "
                       r"integer type \(wrong dtype\).*check its integrity"):
        H5adSource(p)
    p = write(make_adata(n=60, g=12), tmp_path / "c.h5ad")
    with h5py.File(p, "r+") as f:
        ind = f["X/indices"][:]
        ind[int(f["X/indptr"][7]) + 1] = 12  # one past the last column, in row 7
        f["X/indices"][:] = ind
    with pytest.raises(CorruptInputError, match=r"c.h5ad: X/indices of rows \[7, 8\) hold 1 "
                       r"column index\(es\) out of range \(e.g. 12 in row 7; valid: 0..11\)"):
        _convert([p], tmp_path / "c")


@pytest.mark.integration
def test_corrupt_indices_through_the_job_with_ray(tmp_path):
    """The user's view: jobs/convert.py (Ray tasks) prints the named error, no traceback."""
    p = write(make_adata(n=3000, g=200, density=0.5), tmp_path / "bad.h5ad")
    _corrupt_indices(p)
    out = tmp_path / "c"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "convert.py"), str(p), "--out",
                        str(out), "--num-cpus", "1", "--no-progress"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"error: {p}: X/indices of rows [" in r.stderr and "re-export it" in r.stderr
    assert "Traceback" not in r.stderr and "IndexError" not in r.stderr + r.stdout
    assert "RayTaskError" not in r.stderr
    _assert_nothing_looks_complete(out)


# ----------------------------------------------------------------- 6: gene coverage


def _two_gene_panels(tmp_path):
    a = make_adata(n=80, g=20, seed=0)  # GENE0..19
    b = make_adata(n=80, g=60, seed=1)
    b.var_names = [f"GENE{i + 10}" for i in range(60)]  # GENE10..69
    b.var["gene_id"] = [f"ENSG{i + 10:05d}" for i in range(60)]
    return write(a, tmp_path / "a.h5ad"), write(b, tmp_path / "b.h5ad")


def test_gene_coverage_reported_warned_and_recorded(tmp_path, capsys):
    pa, pb = _two_gene_panels(tmp_path)
    with pytest.warns(ConversionWarning, match=r"1 input\(s\) cover less than 50% (.|\n)*"
                      r"a.h5ad: 20 of 70 genes \(28.6%\)(.|\n)*--min-gene-coverage") as rec:
        m = _convert([pa, pb], tmp_path / "c")
    assert not any("b.h5ad" in w for w in _conversion_warnings(rec))
    out = capsys.readouterr().out
    assert "gene coverage per input (corpus vocabulary: 70 genes):" in out
    assert "a.h5ad: 20 of 70 vocabulary genes (28.6%); 0 of its 20 genes not in the " \
           "vocabulary" in out
    assert "b.h5ad: 60 of 70 vocabulary genes (85.7%)" in out
    # recorded per store in corpus.json
    stores = {s["name"]: s for s in json.loads((tmp_path / "c" / K.CORPUS_MANIFEST)
                                               .read_text())["stores"]}
    assert stores["a"]["coverage"]["vocabulary_genes_present"] == 20
    assert stores["a"]["coverage"]["vocabulary_coverage"] == pytest.approx(20 / 70, abs=1e-6)
    assert stores["b"]["coverage"]["vocabulary_genes_present"] == 60
    assert m.stores[0].coverage["vocabulary_genes_present"] == 20
    # validation reports it: a warning for the low store, a note for the other; still valid
    rep = validate_corpus(tmp_path / "c")
    assert rep.ok, rep.text()
    (w,) = rep.warnings
    assert w.startswith("store a: its input measures 20 of 70 vocabulary genes (28.6%)")
    assert "below --min-gene-coverage 0.5" in w
    assert any(n.startswith("store b: its input measures 60 of 70") for n in rep.notes)
    assert "WARNING: store a" in rep.text()
    # a lower threshold: no warning
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _convert([pa, pb], tmp_path / "d", min_gene_coverage=0.2)
    assert _conversion_warnings(rec) == []
    assert validate_corpus(tmp_path / "d", min_gene_coverage=0.2).warnings == []


def test_strict_gene_coverage_is_an_error(tmp_path):
    pa, pb = _two_gene_panels(tmp_path)
    with pytest.raises(ConversionError, match=r"a.h5ad: 20 of 70 genes(.|\n)*"
                       r"--strict-gene-coverage makes this an error"):
        _convert([pa, pb], tmp_path / "c", strict_gene_coverage=True)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConversionError, match="min_gene_coverage=1.5"):
        ConvertConfig(inputs=(str(pa),), out=str(tmp_path / "x"), min_gene_coverage=1.5)


def test_gene_coverage_options_through_the_jobs(tmp_path, capsys):
    pa, pb = _two_gene_panels(tmp_path)
    base = [str(pa), str(pb), "--serial", "--no-progress", "--n-top-genes", "5"]
    rc = convert_main(base + ["--out", str(tmp_path / "c")])
    cap = capsys.readouterr()
    assert rc == 0
    assert "warning: 1 input(s) cover less than 50% of the corpus gene vocabulary" in cap.err
    assert "gene coverage per input" in cap.out
    rc = convert_main(base + ["--out", str(tmp_path / "d"), "--strict-gene-coverage"])
    cap = capsys.readouterr()
    assert rc == 2 and "--strict-gene-coverage" in cap.err and "Traceback" not in cap.err
    rc = convert_main(base + ["--out", str(tmp_path / "e"), "--min-gene-coverage", "0.25"])
    assert rc == 0 and "warning:" not in capsys.readouterr().err
    assert validate_main([str(tmp_path / "c")]) == 0
    assert "WARNING: store a: its input measures 20 of 70" in capsys.readouterr().out
    assert validate_main([str(tmp_path / "c"), "--min-gene-coverage", "0.1"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_old_corpus_without_coverage_still_loads_and_validates(tmp_path, capsys):
    write(make_adata(n=80, g=12), tmp_path / "a.h5ad")
    _convert([tmp_path / "a.h5ad"], tmp_path / "c")
    path = tmp_path / "c" / K.CORPUS_MANIFEST
    d = json.loads(path.read_text())
    for s in d["stores"]:
        del s["coverage"]  # as written before the field existed
    path.write_text(json.dumps(d))
    assert load_manifest(tmp_path / "c").stores[0].coverage is None
    rep = validate_corpus(tmp_path / "c")
    assert rep.ok, rep.text()
    assert any("no gene coverage recorded" in n for n in rep.notes)
    # coverage without the newer vocabulary_genes_present key
    d["stores"][0]["coverage"] = {"vocabulary_coverage": 0.25, "dropped": 0}
    path.write_text(json.dumps(d))
    rep = validate_corpus(tmp_path / "c")
    assert rep.ok and any("3 of 12 vocabulary genes (25.0%)" in w for w in rep.warnings)
    # resuming the old corpus (same inputs, same options) records the coverage again
    m = _convert([tmp_path / "a.h5ad"], tmp_path / "c")
    assert m.stores[0].coverage["vocabulary_genes_present"] == 12
