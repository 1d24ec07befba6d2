"""Challenge-format prediction files: write_submission, validate_submission and its CLI.

Every problem code is triggered by a crafted file (written with anndata directly, so nothing
is fixed on the way) and absent from the clean file; one test runs cell-eval 0.8.2 itself to
show that the explicit-zeros check guards a real crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from vcc_dist.constants import CONTROL_LABEL, PERT_KEY
from vcc_dist.infer import submission as S
from vcc_dist.infer.submission import (
    PROBLEM_CODES,
    SubmissionError,
    read_gene_list,
    validate_submission,
    write_submission,
)

ROOT = Path(__file__).resolve().parents[1]
PERTS = ["A", "B", "C"]
N_CTRL, N_PER, N_GENES = 10, 10, 30
GENES = [f"G{i:02d}" for i in range(N_GENES)]
LABELS = np.array([CONTROL_LABEL] * N_CTRL + [p for p in PERTS for _ in range(N_PER)])
COUNTS = pd.DataFrame({PERT_KEY: PERTS, "n_cells": [N_PER] * len(PERTS)})

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                      "ignore::DeprecationWarning")


def _log1p_x(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.log1p(rng.poisson(1.0, size=(len(LABELS), N_GENES)) * 1.37).astype(np.float32)


def _adata(x=None, labels=LABELS, genes=GENES) -> ad.AnnData:
    x = sp.csr_matrix(_log1p_x()) if x is None else x
    obs = pd.DataFrame({PERT_KEY: pd.Categorical(labels)},
                       index=np.arange(len(labels)).astype(str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))


def _write(a: ad.AnnData, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(path)
    return path


def _validate(pred, **kw):
    kw.setdefault("expected_genes", N_GENES)
    return validate_submission(pred, **kw)


@pytest.fixture()
def clean(tmp_path) -> Path:
    return write_submission(_log1p_x(), LABELS, GENES, tmp_path / "clean.h5ad")


# ----------------------------------------------------------------------------- round trip

def test_round_trip_is_clean(clean, tmp_path):
    real = _write(_adata(sp.csr_matrix(np.ones((len(LABELS), N_GENES), np.float32))),
                  tmp_path / "real.h5ad")
    rep = _validate(clean, gene_list=GENES, expected_counts=COUNTS, real=real)
    assert rep.ok and rep.problems == [], str(rep)
    rep.raise_if_errors()  # nothing to raise
    assert rep.stats["n_perts"] == 3 and rep.stats["n_control"] == N_CTRL
    assert rep.stats["is_counts"] is False and rep.stats["format"] == "csr"

    a = ad.read_h5ad(clean)
    assert list(a.obs.columns) == [PERT_KEY]
    assert isinstance(a.obs[PERT_KEY].dtype, pd.CategoricalDtype)
    assert list(a.obs_names) == [str(i) for i in range(len(LABELS))]
    assert list(a.var_names) == GENES
    assert sp.isspmatrix_csr(a.X) or a.X.format == "csr"
    assert a.X.dtype == np.float32 and not (a.X.data == 0).any()
    np.testing.assert_array_equal(a.X.toarray(), _log1p_x())
    np.testing.assert_array_equal(a.obs[PERT_KEY].astype(str).to_numpy(), LABELS)


def test_write_accepts_sparse_float64_and_counts_without_mutating_input(tmp_path):
    x = sp.csr_matrix(np.random.default_rng(1).poisson(2.0, (len(LABELS), N_GENES))
                      .astype(np.float64))
    x.data[:5] = 0.0  # explicit zeros
    before = x.data.copy()
    p = write_submission(x, list(LABELS), GENES, tmp_path / "c.h5ad")
    np.testing.assert_array_equal(x.data, before)
    a = ad.read_h5ad(p)
    assert a.X.dtype == np.float32 and a.X.nnz == np.count_nonzero(before)
    rep = _validate(p)
    assert rep.ok and rep.codes == {"integer_counts"}, str(rep)


def test_gene_list_reorders_columns(tmp_path):
    x = _log1p_x()
    order = GENES[::-1]
    glist = tmp_path / "genes.txt"
    glist.write_text("\n".join(order) + "\n")  # headerless, as cell-eval prep reads it
    assert read_gene_list(glist) == order
    p = write_submission(x, LABELS, GENES, tmp_path / "r.h5ad", gene_list=glist)
    a = ad.read_h5ad(p)
    assert list(a.var_names) == order
    np.testing.assert_array_equal(a.X.toarray(), x[:, ::-1])
    assert _validate(p, gene_list=glist).problems == []


@pytest.mark.parametrize("kw, match", [
    (dict(gene_list=GENES + ["EXTRA"]), "1 missing .*'EXTRA'"),
    (dict(gene_list=GENES[1:]), "1 extra .*'G00'"),
    (dict(labels=["A"] * len(LABELS)), "no control cells"),
    (dict(labels=[*LABELS[:-1], ""]), "empty or NaN label"),
    (dict(labels=LABELS[:-1]), "labels for"),
    (dict(max_cells=len(LABELS) - 1), "exceed the limit"),
    (dict(genes=["G00"] * N_GENES), "duplicate gene names"),
    (dict(value=np.nan), "NaN"),
    (dict(value=-0.5), "negative"),
    (dict(value=17.5), "neither integer counts nor log1p"),
])
def test_write_rejects(tmp_path, kw, match):
    x = _log1p_x()
    if "value" in kw:
        x[3, 4] = kw.pop("value")
    labels = kw.pop("labels", LABELS)
    genes = kw.pop("genes", GENES)
    out = tmp_path / "bad.h5ad"
    with pytest.raises(SubmissionError, match=match):
        write_submission(x, labels, genes, out, **kw)
    assert not out.exists()


def test_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "pred.h5ad"
    out.write_bytes(b"previous complete file")

    def broken(self, filename, *a, **k):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    with pytest.raises(OSError, match="disk full"):
        write_submission(_log1p_x(), LABELS, GENES, out)
    assert out.read_bytes() == b"previous complete file"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.h5ad"]  # no temp left

    out2 = tmp_path / "new.h5ad"
    with pytest.raises(OSError):
        write_submission(_log1p_x(), LABELS, GENES, out2)
    assert not out2.exists()


# ----------------------------------------------------------------------------- each code

def _x_with(**cells) -> sp.csr_matrix:
    x = _log1p_x()
    for v in cells.values():
        (r, c), val = v
        x[r, c] = val
    return sp.csr_matrix(x)


def _explicit_zeros(n=4):
    x = sp.csr_matrix(_log1p_x())
    x.data[:n] = 0.0
    return x


def _duplicate_entries():
    x = sp.csr_matrix(_log1p_x())
    r0 = slice(x.indptr[0], x.indptr[1])
    x.indices[r0][1] = x.indices[r0][0]  # row 0 names one column twice (sorted, duplicated)
    x.has_canonical_format = False
    return x


def _unsorted():
    x = sp.csr_matrix(_log1p_x())
    s, e = x.indptr[12], x.indptr[13]
    x.indices[s:e] = x.indices[s:e][::-1].copy()
    x.data[s:e] = x.data[s:e][::-1].copy()
    x.has_sorted_indices = False
    return x


def _underflow():
    x = _log1p_x().astype(np.float64)
    x[5, 6] = 1e-50
    return sp.csr_matrix(x)


def _cat_labels(extra_cat=False, nan_rows=0, empty_rows=0):
    lab = LABELS.astype(object).copy()
    lab[len(lab) - nan_rows:] = np.nan
    if empty_rows:
        lab[N_CTRL:N_CTRL + empty_rows] = ""
    cats = sorted({v for v in lab if isinstance(v, str)}) + (["UNUSED"] if extra_cat else [])
    return pd.Categorical(lab, categories=cats)


def _real(tmp_path, labels=LABELS, genes=GENES):
    return _write(_adata(labels=labels, genes=genes), tmp_path / "real.h5ad")


CASES = {
    # code: (build(tmp_path) -> (pred AnnData, validate kwargs), severity)
    "pert_col_missing": (lambda t: (_rename_col(_adata()), {}), "error"),
    "missing_control": (lambda t: (_adata(labels=np.where(LABELS == CONTROL_LABEL, "A",
                                                              LABELS)), {}), "error"),
    "empty_labels": (lambda t: (_adata(labels=_cat_labels(nan_rows=2, empty_rows=1)), {}),
                     "error"),
    "unused_categories": (lambda t: (_adata(labels=_cat_labels(extra_cat=True)), {}), "error"),
    "too_many_cells": (lambda t: (_adata(), {"max_cells": len(LABELS) - 1}), "error"),
    "duplicate_genes": (lambda t: (_adata(genes=["G00"] + GENES[1:-1] + ["G00"]), {}),
                        "error"),
    "gene_mismatch": (lambda t: (_adata(), {"gene_list": GENES[:-1] + ["OTHER"]}), "error"),
    "gene_order": (lambda t: (_adata(genes=GENES[::-1]), {"gene_list": GENES}), "warning"),
    "gene_count": (lambda t: (_adata(), {"expected_genes": 18080}), "warning"),
    "nan_values": (lambda t: (_adata(_x_with(a=((3, 4), np.nan))), {}), "error"),
    "inf_values": (lambda t: (_adata(_x_with(a=((3, 4), np.inf))), {}), "error"),
    "negative_values": (lambda t: (_adata(_x_with(a=((3, 4), -0.25))), {}), "error"),
    "not_log1p_range": (lambda t: (_adata(_x_with(a=((3, 4), 15.5), b=((20, 1), 99.0))), {}),
                        "error"),
    "explicit_zeros": (lambda t: (_adata(_explicit_zeros()), {}), "error"),
    "underflow_zeros": (lambda t: (_adata(_underflow()), {}), "error"),
    "duplicate_entries": (lambda t: (_adata(_duplicate_entries()), {}), "error"),
    "unsorted_indices": (lambda t: (_adata(_unsorted()), {}), "warning"),
    "wrong_dtype": (lambda t: (_adata(sp.csr_matrix(_log1p_x().astype(np.float64))), {}),
                    "warning"),
    "integer_counts": (lambda t: (_adata(sp.csr_matrix(
        np.random.default_rng(2).poisson(1.0, (len(LABELS), N_GENES)).astype(np.float32))),
        {}), "warning"),
    "matrix_format": (lambda t: (_adata(_log1p_x()), {}), "warning"),
    "pert_set_mismatch": (lambda t: (_adata(), {"expected_counts": pd.DataFrame(
        {PERT_KEY: ["A", "B", "D"], "n_cells": [10, 10, 10]})}), "error"),
    "cell_count_mismatch": (lambda t: (_adata(), {"expected_counts": pd.DataFrame(
        {PERT_KEY: [CONTROL_LABEL, "A", "B", "C"], "n_cells": [99, 12, 10, 8]})}), "error"),
}


# cases whose code comes from a validation option rather than from the file
OPTION_DRIVEN = {"too_many_cells", "gene_mismatch", "gene_count", "pert_set_mismatch",
                 "cell_count_mismatch"}


def _rename_col(a):
    a.obs = a.obs.rename(columns={PERT_KEY: "perturbation"})
    return a


def test_every_code_has_a_case():
    assert set(CASES) == set(PROBLEM_CODES)


@pytest.mark.parametrize("code", sorted(CASES))
def test_problem_code_is_reported(tmp_path, clean, code):
    build, severity = CASES[code]
    a, kw = build(tmp_path)
    path = _write(a, tmp_path / f"{code}.h5ad")
    for pred in (path, a):  # from the file (read in tiny blocks) and in memory
        rep = _validate(pred, chunk_values=17, **kw)
        hits = [p for p in rep.problems if p.code == code]
        assert hits, f"{code} not reported:\n{rep}"
        assert {p.severity for p in hits} == {severity}
        assert rep.ok == (severity == "warning" and not rep.errors)
        assert code in str(rep)
    # the clean file does not have it, even with every reference given (the option-driven
    # cases above trigger their code through the option: the clean file passes matching ones)
    same_kw = kw if code not in OPTION_DRIVEN else {}
    assert code not in _validate(clean, **same_kw).codes
    full = _validate(clean, gene_list=GENES, expected_counts=COUNTS, real=_real(tmp_path))
    assert full.problems == []


def test_messages_name_counts_examples_and_fix(tmp_path):
    rep = _validate(_adata(_explicit_zeros(4)))
    (p,) = rep.problems
    assert p.count == 4 and "4 values in 1 cells" in p.message
    assert "non-targeting" in p.message and "eliminate_zeros" in p.message

    rep = _validate(_adata(), expected_counts=CASES["cell_count_mismatch"][0](tmp_path)[1][
        "expected_counts"])
    (p,) = rep.problems  # the control row is ignored
    assert "A: 10 predicted vs 12 expected" in p.message
    assert "C: 10 predicted vs 8 expected" in p.message and "1 more, 1 fewer" in p.message

    rep = _validate(_adata(), gene_list=GENES[:-1] + ["OTHER"])
    assert "'OTHER'" in rep.problems[0].message and "'G29'" in rep.problems[0].message

    glist = tmp_path / "with_header.txt"
    glist.write_text("\n".join(["gene"] + GENES) + "\n")
    rep = _validate(_adata(), gene_list=glist, expected_genes=None)
    assert rep.codes == {"gene_mismatch"} and "looks like a header" in str(rep)


@pytest.mark.parametrize("dtype, text", [(np.float16, "float16"), (np.float64, "float64"),
                                         (np.int32, "integer dtype int32")])
def test_dtype_notes(tmp_path, dtype, text):
    x = np.random.default_rng(3).poisson(1.0, (len(LABELS), N_GENES)).astype(dtype)
    path = _write(_adata(x), tmp_path / "d.h5ad")
    rep = _validate(path)
    assert rep.ok, str(rep)
    (p,) = [p for p in rep.problems if p.code == "wrong_dtype"]
    assert p.severity == "warning" and text in p.message
    assert rep.codes == {"wrong_dtype", "integer_counts", "matrix_format"}


def test_real_file_checks(tmp_path):
    real = _real(tmp_path, labels=np.where(LABELS == "C", "D", LABELS))
    rep = _validate(_adata(), real=real)
    (p,) = rep.problems
    assert p.code == "pert_set_mismatch" and "'D'" in p.message and "'C'" in p.message

    real = _real(tmp_path, genes=GENES[::-1])
    rep = _validate(_adata(), real=real)
    assert [(p.code, p.severity) for p in rep.problems] == [("gene_order", "error")]
    # prep fixes the order when the gene list has the real file's order: a warning only
    rep = _validate(_adata(), real=real, gene_list=GENES[::-1])
    assert [(p.code, p.severity) for p in rep.problems] == [("gene_order", "warning")]


def test_real_file_cell_counts(tmp_path):
    """--real checks cells per perturbation, as the README promises (controls excluded: a
    prediction's controls are usually the training controls, in any number)."""
    labels = np.array([CONTROL_LABEL] * 25 + ["A"] * 12 + ["B"] * 10 + ["C"] * 8)
    x = sp.csr_matrix(np.ones((len(labels), N_GENES), np.float32))
    real = _write(_adata(x, labels=labels), tmp_path / "real.h5ad")
    pred = _write(_adata(), tmp_path / "pred.h5ad")  # 10 cells each, 10 controls
    rep = _validate(pred, real=real)
    (p,) = rep.problems
    assert (p.code, p.severity, p.count) == ("cell_count_mismatch", "error", 2)
    assert "A: 10 predicted vs 12 in the real file" in p.message
    assert "C: 10 predicted vs 8 in the real file" in p.message
    assert "1 more, 1 fewer" in p.message and "value_counts" in p.message  # names the fix
    assert "'B'" not in p.message and not any(e.startswith("B:") for e in p.examples)
    # through the job: exit 1 with the code
    r = _cli(pred, "--real", real, "--expected-genes", N_GENES)
    assert r.returncode == 1 and "[cell_count_mismatch]" in r.stdout, r.stdout + r.stderr
    # the same cells per perturbation with another number of controls: OK
    same = np.array([CONTROL_LABEL] * 3 + [p for p in PERTS for _ in range(N_PER)])
    real2 = _write(_adata(sp.csr_matrix(np.ones((len(same), N_GENES), np.float32)),
                          labels=same), tmp_path / "real2.h5ad")
    assert _validate(pred, real=real2).problems == []


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_block_reading_matches_whole_matrix(tmp_path, fmt):
    x = _log1p_x()
    x[0, 0], x[7, 3], x[39, 29] = np.nan, -1.0, np.inf
    x[10, 5] = 20.5
    m = sp.csr_matrix(x)
    if fmt != "dense":
        m.data[m.data == x[12, 2]] = 0.0  # explicit zeros scattered over rows
    m = {"csr": m, "csc": m.tocsc(), "dense": x}[fmt]
    path = _write(_adata(m), tmp_path / f"{fmt}.h5ad")
    summaries = []
    for chunk in (1, 7, 64, S.CHUNK_VALUES):
        rep = _validate(path, chunk_values=chunk)
        summaries.append(sorted((p.code, p.count, p.message) for p in rep.problems))
    assert all(s == summaries[0] for s in summaries)
    codes = {c for c, _, _ in summaries[0]}
    assert {"nan_values", "inf_values", "negative_values", "not_log1p_range"} <= codes
    assert ("explicit_zeros" in codes) == (fmt != "dense")


def test_backed_anndata_and_report_api(tmp_path):
    path = _write(_adata(_explicit_zeros()), tmp_path / "z.h5ad")
    a = ad.read_h5ad(path, backed="r")
    try:
        rep = _validate(a)
    finally:
        a.file.close()
    assert rep.codes == {"explicit_zeros"} and not rep.ok
    with pytest.raises(SubmissionError, match="explicit_zeros") as e:
        rep.raise_if_errors()
    assert isinstance(e.value, ValueError)
    d = json.loads(rep.to_json())
    assert d["ok"] is False and d["problems"][0]["code"] == "explicit_zeros"
    assert "NOT OK: 1 error(s)" in str(rep)


def test_unreadable_inputs_raise(tmp_path):
    with pytest.raises(SubmissionError, match="not found"):
        validate_submission(tmp_path / "missing.h5ad")
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(SubmissionError, match="cannot read"):
        validate_submission(bad)
    with pytest.raises(SubmissionError, match="n_cells"):
        validate_submission(_adata(), expected_counts=pd.DataFrame({PERT_KEY: ["A"]}))
    csv = tmp_path / "counts.csv"
    csv.write_text("target_gene,n_cells\nA,ten\n")
    with pytest.raises(SubmissionError, match="not numeric"):
        validate_submission(_adata(), expected_counts=csv)


def test_counts_csv_keeps_na_like_gene_names(tmp_path):
    csv = tmp_path / "counts.csv"
    csv.write_text(f"target_gene,n_cells\n{CONTROL_LABEL},500\nA,10\nB,10\nC,10\nNA,10\n")
    assert list(S.read_expected_counts(csv).index) == ["A", "B", "C", "NA"]
    rep = _validate(_adata(), expected_counts=csv)
    (p,) = rep.problems
    assert p.code == "pert_set_mismatch" and "'NA'" in p.message and "1 expected" in p.message


# ----------------------------------------------------------------------------- CLI

def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "validate_submission.py"),
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_exit_codes(tmp_path, clean):
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(GENES) + "\n")
    counts = tmp_path / "counts.csv"
    COUNTS.to_csv(counts, index=False)
    out = tmp_path / "report.json"
    r = _cli(clean, "--genes", genes, "--counts", counts, "--expected-genes", N_GENES,
             "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: 0 error(s)" in r.stdout and json.loads(out.read_text())["ok"] is True

    bad = _write(_adata(_explicit_zeros()), tmp_path / "bad.h5ad")
    r = _cli(bad, "--genes", genes, "--max-cells", -1, "--json", out)
    assert r.returncode == 1 and "[explicit_zeros]" in r.stdout
    assert "[gene_count]" in r.stdout  # 30 genes, not 18,080: a warning
    assert {p["code"] for p in json.loads(out.read_text())["problems"]} == {
        "explicit_zeros", "gene_count"}

    r = _cli(tmp_path / "missing.h5ad")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- cell-eval

def test_explicit_zeros_crash_cell_eval_and_write_submission_fixes_them(tmp_path):
    """The point of the explicit-zeros check: cell-eval 0.8.2's DE step refuses them."""
    from cell_eval import MetricsEvaluator

    rng = np.random.default_rng(5)
    real = _adata(sp.csr_matrix(rng.poisson(2.0, (len(LABELS), N_GENES)).astype(np.float32)))
    pred = _adata(_explicit_zeros(6))

    def run(p, name):
        ev = MetricsEvaluator(adata_pred=p, adata_real=real.copy(), control_pert=CONTROL_LABEL,
                              pert_col=PERT_KEY, num_threads=1, outdir=str(tmp_path / name))
        return ev.compute(profile="vcc", break_on_error=True, write_csv=False)

    with pytest.raises(ValueError, match="explicit zero"):
        run(pred.copy(), "raw")
    assert "explicit_zeros" in _validate(pred).codes

    fixed = write_submission(pred.X, pred.obs[PERT_KEY], pred.var_names,
                             tmp_path / "fixed.h5ad")
    assert _validate(fixed, real=real).problems == []
    _, agg = run(ad.read_h5ad(fixed), "fixed")
    assert agg.height > 0
