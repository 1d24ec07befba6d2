"""Job entry points: none shadows a standard-library module (Ray hands the driver's sys.path,
which starts with jobs/, to its workers) and _bootstrap takes jobs/ off sys.path anyway."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_job_file_shadows_the_standard_library():
    names = {p.stem for p in (ROOT / "jobs").glob("*.py")}
    clash = sorted(names & set(sys.stdlib_module_names))
    assert not clash, f"rename jobs/{clash[0]}.py: it shadows the standard library in Ray workers"


def test_bootstrap_removes_the_jobs_folder_from_sys_path(tmp_path):
    code = ("import sys, os; sys.path.insert(0, os.path.join(%r, 'jobs')); import _bootstrap; "
            "print(any(os.path.abspath(p) == os.path.join(%r, 'jobs') for p in sys.path))"
            % (str(ROOT), str(ROOT)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"
