"""Every benchmark script imports without running (its work sits behind an
``if __name__ == "__main__":`` guard) and answers ``--help``.

The peer scripts run side by side with other tools (cell-load, annbatch, arc-state) that live in
their own environments or the ``[bench]`` extra; a script whose optional peer is not installed
here is skipped, and the skip names the peer (``pytest -rs`` lists them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))
#: modules of the benchmarks' shared helpers: imported by the scripts, no command line
HELPERS = {"_common.py"}
#: importable names of the optional peers -> how to install them
OPTIONAL_PEERS = {
    "cell_load": "the [bench] extra (pip install -e '.[bench]')",
    "annbatch": ".venv-annbatch (benchmarks/_annbatch_peer.py)",
    "state": ".venv-state (benchmarks/_state_peer.py)",
}


#: module-level calls a script may make on import (path and warning set-up, no work)
IMPORT_TIME_SETUP = {"sys.path.insert", "sys.path.append", "warnings.filterwarnings",
                     "warnings.simplefilter"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True,
                          timeout=300, check=False)


def _skip_if_peer_missing(p: subprocess.CompletedProcess, script: str) -> None:
    for name, how in OPTIONAL_PEERS.items():
        if f"No module named '{name}'" in p.stderr:
            pytest.skip(f"benchmarks/{script}: optional peer {name!r} is not installed here "
                        f"(it comes from {how})")


def test_the_scripts_are_found():
    assert {"loader.py", "evaluate.py", "st_speed.py", "_common.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in HELPERS])
def test_script_work_is_behind_a_main_guard(script):
    tree = ast.parse((BENCH / script).read_text())
    guards = [n for n in tree.body if isinstance(n, ast.If)
              and ast.unparse(n.test).replace("'", '"') == '__name__ == "__main__"']
    assert guards, f"benchmarks/{script} has no `if __name__ == \"__main__\":` guard"
    calls = [ast.unparse(n) for n in tree.body
             if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and ast.unparse(n.value.func) not in IMPORT_TIME_SETUP]
    assert not calls, f"benchmarks/{script} runs code on import: {calls}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_without_running(script):
    mod = script[:-3]
    p = _run(["-c", f"import sys; sys.path.insert(0, '.'); import {mod}; print('imported')"])
    _skip_if_peer_missing(p, script)
    assert p.returncode == 0, f"benchmarks/{script} failed to import:\n{p.stderr[-3000:]}"
    assert p.stdout.strip().splitlines()[-1] == "imported"


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in HELPERS])
def test_script_help(script):
    p = _run([script, "--help"])
    _skip_if_peer_missing(p, script)
    assert p.returncode == 0, f"benchmarks/{script} --help failed:\n{p.stderr[-3000:]}"
    assert "usage:" in p.stdout
