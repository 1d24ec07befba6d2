"""Conversion planning: the parallel scans (Ray tasks, threads) plan exactly as the serial one,
for local and s3:// inputs; identical gene spaces are interned (one map object per space); bad
inputs are reported as the serial scan reports them."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import ray

from data_conversion import ConversionError, ConvertConfig
from data_conversion.convert import plan_corpus
from data_conversion.vocab import GeneSpace, build_vocabulary, gene_space_key
from tests.h5ad_factory import make_adata, write
from tests.s3server import moto_s3

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

#: input order of the gene spaces: interleaved, so a space recurs after the vocabulary changed
ORDER = "BABCACBACABCA"
BUCKET = "plan-inputs"


@pytest.fixture(scope="module")
def ray_s3():
    """A moto S3 server (the AWS variables point at it), then a local Ray whose workers
    inherit those variables (they read s3:// inputs)."""
    import boto3

    with moto_s3(BUCKET):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield boto3.client("s3")
        finally:
            ray.shutdown()


def _space_adata(space: str, seed: int):
    """Space A: GENE0..29; B: GENE10..39 reversed, GENE15 without an id (A gives it one
    later); C: GENE20..49 with GENE22 lacking its id."""
    if space == "A":
        return make_adata(n=40, g=30, seed=seed)
    a = make_adata(n=40, g=30, seed=seed)
    off = 10 if space == "B" else 20
    a.var_names = [f"GENE{i + off}" for i in range(30)]
    a.var["gene_id"] = [f"ENSG{i + off:05d}" for i in range(30)]
    if space == "B":
        a.var.loc["GENE15", "gene_id"] = None
        return a[:, a.var_names[::-1]].copy()
    a.var.loc["GENE22", "gene_id"] = None
    return a


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("plan_inputs")
    paths = []
    for i, space in enumerate(ORDER):
        paths.append(str(write(_space_adata(space, seed=i), d / f"in{i:02d}_{space}.h5ad")))
    return d, paths


def _cfg(paths: list[str], out: Path, **kw) -> ConvertConfig:
    return ConvertConfig(inputs=tuple(paths), out=str(out), progress=False, **kw)


def _plan_record(plan) -> dict:
    manifest, tasks = plan
    return {
        "genes": manifest.genes, "gene_ids": manifest.gene_ids, "options": manifest.options,
        "stores": [asdict(s) for s in manifest.stores],
        "maps": [t.gene_map.tolist() for t in tasks],
        "obs_columns": [t.obs_columns for t in tasks],
    }


def test_parallel_plans_equal_the_serial_plan(ray_s3, inputs, tmp_path):
    _, paths = inputs
    cfg = _cfg(paths, tmp_path / "c", max_cells_per_store=25)  # two stores per input
    serial = plan_corpus(cfg, scan="serial")
    ref = _plan_record(serial)
    assert len(ref["stores"]) == 2 * len(paths) and len(ref["genes"]) == 50
    for mode in ("ray", "threads", "auto"):  # auto: Ray, as it is initialised
        assert _plan_record(plan_corpus(cfg, scan=mode)) == ref, mode
    # the planned maps and reports are those of mapping every input on its own (no interning)
    spaces = []
    for p in paths:
        a = _space_adata(Path(p).stem[-1], 0)
        spaces.append(GeneSpace(p, np.asarray(a.var_names).astype(str),
                                np.asarray(a.var["gene_id"], dtype=object)))
    vocab, maps, reports = build_vocabulary(spaces)
    assert vocab.symbols == ref["genes"] and vocab.gene_ids == ref["gene_ids"]
    manifest, tasks = serial
    for k, (m, r) in enumerate(zip(maps, reports)):
        assert tasks[2 * k].gene_map.tolist() == m.tolist()
        assert manifest.stores[2 * k].coverage == r == manifest.stores[2 * k + 1].coverage


def test_same_gene_space_shares_one_map_object(ray_s3, inputs, tmp_path):
    _, paths = inputs
    for mode in ("serial", "ray"):
        _, tasks = plan_corpus(_cfg(paths, tmp_path / "c"), scan=mode)
        by_space: dict[str, list[np.ndarray]] = {}
        for t in tasks:
            by_space.setdefault(Path(t.entry.source).stem[-1], []).append(t.gene_map)
        assert sorted(by_space) == ["A", "B", "C"]
        for space, ms in by_space.items():
            assert all(m is ms[0] for m in ms), (mode, space)
        assert len({id(m) for ms in by_space.values() for m in ms}) == 3
        assert len({id(t.obs_columns) for t in tasks}) == 1


def test_gene_space_key_tells_spaces_apart():
    sym = np.array(["A", "B", "C"])
    ids = np.array(["1", None, "3"], dtype=object)
    k = gene_space_key(sym, ids)
    assert k == gene_space_key(sym.copy(), ids.copy())
    assert k != gene_space_key(sym, None)
    assert k != gene_space_key(sym, np.array(["1", "", "3"], dtype=object))
    assert k != gene_space_key(np.array(["A", "BC"]), np.array(["1", "3"], dtype=object))
    assert gene_space_key(np.array(["AB", "C"]), None) != gene_space_key(np.array(["A", "BC"]),
                                                                         None)


def _messages(cfg: ConvertConfig) -> dict[str, str]:
    out = {}
    for mode in ("serial", "threads", "ray"):
        with pytest.raises(ConversionError) as e:
            plan_corpus(cfg, scan=mode)
        out[mode] = str(e.value)
    return out


def test_first_bad_input_is_reported_as_serially(ray_s3, inputs, tmp_path):
    _, paths = inputs
    paths = list(paths)
    bad = tmp_path / "in05_bad.h5ad"
    bad.write_bytes(b"not an HDF5 file" * 64)
    paths[5] = str(bad)
    a = make_adata(n=40, g=30, seed=99)
    write(a.copy(), tmp_path / "in11_noctx.h5ad")
    paths[11] = str(tmp_path / "in11_noctx.h5ad")
    b = a.copy()
    del b.obs["cell_type"]
    write(b, tmp_path / "in09_noctx.h5ad")
    paths[9] = str(tmp_path / "in09_noctx.h5ad")
    msgs = _messages(_cfg(paths, tmp_path / "c"))
    assert msgs["serial"].startswith(f"cannot read {bad} as an h5ad")
    assert msgs["threads"] == msgs["serial"] and msgs["ray"] == msgs["serial"]
    # without the unreadable file, the input lacking an obs column is the first bad one
    paths[5] = inputs[1][5]
    msgs = _messages(_cfg(paths, tmp_path / "c"))
    assert "in09_noctx.h5ad: obs has no column 'cell_type'" in msgs["serial"]
    assert msgs["threads"] == msgs["serial"] and msgs["ray"] == msgs["serial"]


def test_inputs_without_controls_are_named_as_serially(ray_s3, inputs, tmp_path):
    _, paths = inputs
    msgs = _messages(_cfg(paths, tmp_path / "c", control_label="ctrl"))
    assert msgs["serial"].startswith("no input has control cells")
    assert msgs["serial"].count("\n  ") == len(paths)
    assert msgs["threads"] == msgs["serial"] and msgs["ray"] == msgs["serial"]


def test_s3_inputs_plan_as_local_ones(ray_s3, inputs, tmp_path):
    _, paths = inputs
    for p in paths:
        ray_s3.upload_file(p, BUCKET, f"in/{Path(p).name}")
    cfg = _cfg([f"s3://{BUCKET}/in"], tmp_path / "c")
    ref = _plan_record(plan_corpus(cfg, scan="serial"))
    assert len(ref["stores"]) == len(paths) and ref["stores"][0]["source"].startswith("s3://")
    local = _plan_record(plan_corpus(_cfg(paths, tmp_path / "c"), scan="serial"))
    for key in ("genes", "gene_ids", "maps"):
        assert ref[key] == local[key]
    for mode in ("threads", "ray"):
        assert _plan_record(plan_corpus(cfg, scan=mode)) == ref, mode
