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


def _job(name):
    import importlib.util

    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if str(ROOT / "jobs") in sys.path:
            sys.path.remove(str(ROOT / "jobs"))
    return mod


def test_pretrain_se_options(capsys, tmp_path):
    import json

    main = _job("pretrain_se").main
    assert main(["--recipe", "se600m", "--corpus", "c", "--gene-table", "g.pt", "--run-dir",
                 str(tmp_path), "--set", "optim.grad_accum_steps=4", "targets=state_paper",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "se600m" and cfg["targets"] == "state_paper"
    assert cfg["engine"]["zero_stage"] == 3 and cfg["engine"]["activation_checkpointing"]
    assert cfg["optim"]["grad_accum_steps"] == 4 and cfg["use_gpu"] is True
    assert main(["--recipe", "debug", "--corpus", "c", "--run-dir", str(tmp_path),
                 "--print-config"]) == 2
    assert "gene_table" in capsys.readouterr().err
    assert main(["--recipe", "debug", "--corpus", "c", "--gene-table", "g", "--run-dir",
                 str(tmp_path), "--set", "engine.zero=3"]) == 2
    assert "unknown engine option" in capsys.readouterr().err


def test_embed_cells_refuses_a_non_se_checkpoint(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text('{"kind": "vcc-dist/st-checkpoint"}')
    assert _job("embed_cells").main(["--checkpoint", str(tmp_path), "--corpus", "c",
                                     "--serial"]) == 2
    assert "not an SE checkpoint" in capsys.readouterr().err
