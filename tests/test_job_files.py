"""Job entry points: every option has a help text with its default, the trainers' help lists the
library's recipes, a refused Ray connection names the fix, and no job file shadows a
standard-library module (Ray hands the driver's sys.path, which starts with jobs/, to its
workers); _bootstrap takes jobs/ off sys.path anyway."""

import subprocess
import sys
from pathlib import Path

import pytest

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
    err = capsys.readouterr().err
    assert "engine.zero" in err and "zero_stage" in err  # names the bad key and the valid one


def test_embed_cells_refuses_a_non_se_checkpoint(capsys, tmp_path):
    import json

    from vcc_dist.checkpoint import ST_KIND, STManifest

    st = STManifest(kind=ST_KIND, model_config={}, zero_stage=2, corpus_fingerprint="x",
                    train_config={})
    (tmp_path / "manifest.json").write_text(json.dumps(st.to_dict()))
    assert _job("embed_cells").main(["--checkpoint", str(tmp_path), "--corpus", "c",
                                     "--serial"]) == 2
    err = capsys.readouterr().err
    assert ST_KIND in err and "not an SE" in err


# --- --help of every job: each option described, with its default or accepted values ------

HELP_JOBS = ("train_st", "predict", "pretrain_se", "tune_st", "embed_genes", "embed_cells")


def _parser(name):
    return _job(name).parser()


@pytest.mark.parametrize("name", HELP_JOBS)
def test_every_job_option_has_a_help_text_with_its_default(name):
    import argparse

    ap = _parser(name)
    bad = []
    for act in ap._actions:  # argparse has no public accessor for its actions
        if isinstance(act, argparse._HelpAction):
            continue
        h = (act.help or "").strip()
        opt = "/".join(act.option_strings) or act.dest
        if not h:
            bad.append(f"{opt}: no help")
        elif "default" not in h and "required" not in h:
            bad.append(f"{opt}: help names no default ({h!r})")
    assert not bad, f"jobs/{name}.py: " + "; ".join(bad)


@pytest.mark.parametrize("name", HELP_JOBS)
def test_every_job_help_lists_its_options(name, capsys):
    ap = _parser(name)
    with pytest.raises(SystemExit) as e:
        _job(name).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for act in ap._actions:
        for opt in act.option_strings:
            assert opt in out, f"jobs/{name}.py --help does not show {opt}"


def test_trainer_helps_list_the_library_recipes_features_and_spaces(capsys):
    from vcc_dist.train import se as se_train
    from vcc_dist.train import st as st_train
    from vcc_dist.train.st_data import ONEHOT, TRANSFER
    from vcc_dist.tune.sweep import SCHEDULERS, SEARCHERS, SPACES

    def help_of(name):
        with pytest.raises(SystemExit):
            _job(name).main(["--help"])
        return " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks

    st, se, tune = help_of("train_st"), help_of("pretrain_se"), help_of("tune_st")
    assert st_train.RECIPES and se_train.RECIPES
    for r in st_train.RECIPES:
        assert r in st and r in tune
    for r in se_train.RECIPES:
        assert r in se
    assert ONEHOT in st and TRANSFER in st
    for name, knobs in SPACES.items():
        assert f"{name} (" in tune and all(k in tune for k in knobs)
    assert all(s in tune for s in SCHEDULERS + SEARCHERS)


# --- joining Ray: an authentication refusal names the fix ----------------------------------


def test_ensure_ray_names_the_auth_fix(monkeypatch):
    import ray
    from ray.exceptions import AuthenticationError

    from vcc_dist import ray_utils

    def refuse(*a, **k):
        raise AuthenticationError("Authentication required: token missing")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ray_utils.RayConnectError) as e:
        ray_utils.ensure_ray()
    msg = str(e.value)
    assert "10.0.0.1:6379" in msg and "RAY_AUTH_MODE=token" in msg
    assert "RAY_AUTH_TOKEN" in msg and "~/.ray/auth_token" in msg


def test_ensure_ray_leaves_other_errors_alone(monkeypatch):
    import ray

    from vcc_dist import ray_utils

    def down(*a, **k):
        raise ConnectionError("could not reach the GCS at 10.0.0.1:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", down)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ConnectionError, match="could not reach"):
        ray_utils.ensure_ray()


def test_a_job_refused_by_the_cluster_prints_the_fix_without_a_traceback(monkeypatch, capsys,
                                                                           tmp_path):
    import ray
    from ray.exceptions import AuthenticationError

    def refuse(*a, **k):
        raise AuthenticationError("Authentication required")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    rc = _job("train_st").main(["--recipe", "debug", "--corpus", str(tmp_path), "--run-dir",
                                str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "RAY_AUTH_MODE=token" in err and "Traceback" not in err
