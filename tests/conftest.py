import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.multihost import MULTIHOST_CPUS, cluster_fixture  # noqa: E402 - needs ROOT on sys.path

#: the one multi-host cluster (network-namespace hosts: a head with 2 CPUs, two workers with 1)
#: every multi-host test module shares; built when first requested, torn down at session end
multihost = cluster_fixture(MULTIHOST_CPUS)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: opt in with --run-slow"))
        if "gpu" in item.keywords and not config.getoption("--run-gpu"):
            item.add_marker(pytest.mark.skip(reason="gpu: opt in with --run-gpu"))


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray cluster per test module (2 CPUs, no dashboard, no progress bars):
    ``address="local"`` so a stale ``ray_current_cluster`` file cannot attach it elsewhere."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A simulated tiny data set (one h5ad per context, split.toml) converted into a corpus,
    with small stores so that contexts span several stores. Returns (SimResult, corpus dir)."""
    import warnings

    from data_conversion import ConvertConfig, convert_corpus
    from vcc_dist.data.simulate import sim_config, simulate

    root = tmp_path_factory.mktemp("tiny_corpus")
    sim = simulate(sim_config("tiny", seed=3, split_files_by="cell_type"), root / "sim",
                   progress=False)
    corpus = root / "corpus"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_corpus(ConvertConfig(inputs=tuple(str(p) for p in sim.h5ad_paths),
                                     out=str(corpus), parallel="serial", progress=False,
                                     n_top_genes=50, max_cells_per_store=300, chunk_rows=8))
    return sim, corpus
