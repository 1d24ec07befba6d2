"""Kill a real conversion job (driver + its embedded Ray) mid-write, rerun it, get identical data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from data_conversion import ConvertConfig, convert_corpus, validate_corpus
from data_conversion.convert import _store_is_complete
from tests.h5ad_factory import make_adata, write
from vcc_dist import constants as K
from vcc_dist.data.corpus import load_manifest, store_path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]


def _job(inputs, out):
    cmd = [sys.executable, str(ROOT / "jobs" / "convert.py"), *map(str, inputs), "--out", str(out),
           "--num-cpus", "1", "--read-budget-mb", "1", "--n-top-genes", "20", "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _kill_when(proc, corpus: Path, n_complete: int, timeout=120):
    """SIGKILL the job's whole process group once `n_complete` stores are recorded and another
    store is being written (a hidden temporary exists)."""
    t0 = time.time()
    stores = corpus / K.CORPUS_STORES_DIR
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"conversion ended before it could be killed:\n{proc.stdout.read().decode()}")
        try:
            m = json.loads((corpus / K.CORPUS_MANIFEST).read_text())
            done = sum(s["status"] == "complete" for s in m["stores"])
        except (FileNotFoundError, json.JSONDecodeError):
            done = 0
        writing = stores.exists() and any(p.name.endswith(".zarr") is False and ".zarr.tmp-" in p.name
                                          for p in stores.iterdir())
        if done >= n_complete and writing:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return done
        time.sleep(0.02)
    pytest.fail("timed out waiting for the kill point")


def _assert_nothing_half_written_looks_complete(corpus: Path):
    m = load_manifest(corpus, require_complete=False)
    assert m.status != "complete"
    for s in m.stores:
        p = store_path(corpus, s.name)
        if s.status == "complete" or p.exists():
            assert _store_is_complete(p, s, m.vocab_hash)


@pytest.mark.integration
def test_kill_and_resume_gives_identical_corpus(tmp_path):
    inputs = []
    for i in range(4):
        a = make_adata(n=6000, g=400, seed=i, density=0.3)
        inputs.append(write(a, tmp_path / f"in{i}.h5ad"))
    ref = tmp_path / "ref"
    convert_corpus(ConvertConfig(inputs=tuple(map(str, inputs)), out=str(ref), parallel="serial",
                                 progress=False, n_top_genes=20, read_budget_mb=1))
    out = tmp_path / "corpus"
    # kill 1: while the second store is being written
    done1 = _kill_when(_job(inputs, out), out, n_complete=1)
    _assert_nothing_half_written_looks_complete(out)
    # kill 2: later, in the resumed run
    done2 = _kill_when(_job(inputs, out), out, n_complete=done1 + 1)
    _assert_nothing_half_written_looks_complete(out)
    assert done2 > done1
    # final run completes the corpus
    p = _job(inputs, out)
    assert p.wait(timeout=300) == 0, p.stdout.read().decode()
    m = load_manifest(out)
    assert not [q for q in (out / K.CORPUS_STORES_DIR).iterdir() if q.name.startswith(".")]
    # identical data to an uninterrupted conversion
    mref = load_manifest(ref)
    assert m.genes == mref.genes and m.gene_stats == mref.gene_stats
    for s in m.stores:
        a = zarr.open_group(str(store_path(out, s.name)), mode="r")
        b = zarr.open_group(str(store_path(ref, s.name)), mode="r")
        for key in ("X/data", "X/indices", "X/indptr", f"obs/{K.SOURCE_ROW_KEY}",
                    f"obs/{K.TOTAL_COUNTS_KEY}", "uns/vcc_dist_pseudobulk"):
            np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=f"{s.name} {key}")
    assert validate_corpus(out).ok
