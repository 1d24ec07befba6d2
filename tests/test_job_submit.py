"""The cluster path: `ray start --head` in the background, then exactly the README's command,
`ray job submit --working-dir . -- "$PWD/.venv/bin/python" jobs/<job>.py ...`, for
jobs/train_st.py and jobs/pretrain_se.py, success checked, the head stopped by its own PID
(never `ray stop`, which would end every Ray process on the host).

The head runs with a PATH that does not hold the virtualenv (as after `.venv/bin/ray start`
from a shell where it is not activated): the entrypoint names the venv's interpreter, so the
job does not depend on which `python` the head's PATH finds first. Token authentication stays
on (Ray 2.60's default): the client sets RAY_AUTH_MODE=token and finds the token the head
wrote."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_train_st_and_pretrain_se(tiny_corpus, tmp_path):
    sim, corpus = tiny_corpus
    bindir = str(Path(sys.executable).parent)
    # the README's interpreter: "$PWD/.venv/bin/python" from the checkout (the running one
    # when the tests run from another environment)
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != Path(bindir).resolve())
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "WANDB_MODE": "offline",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    head = subprocess.Popen(
        [os.path.join(bindir, "ray"), "start", "--head", "--block", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--disable-usage-stats"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(address, timeout=2)
                break
            except OSError as e:
                # 401/403 means the dashboard is up and asks for the token
                if getattr(e, "code", None) in (401, 403):
                    break
                if head.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"ray head did not start: {head.stdout.read()[-3000:]}")
                time.sleep(1)
        run = tmp_path / "run"
        p = subprocess.run(
            [os.path.join(bindir, "ray"), "job", "submit", "--address", address,
             "--working-dir", ".", "--", python, "jobs/train_st.py", "--recipe", "debug",
             "--corpus", str(corpus), "--split", str(sim.split_path), "--run-dir", str(run),
             "--epochs", "1", "--no-progress", "--wandb", "offline"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-4000:]
        assert "succeeded" in out and "best checkpoint" in out
        assert (run / "best_checkpoint.json").is_file() and (run / "metrics_val.csv").is_file()
        # the headline job, on the same cluster
        import torch

        from vcc_dist.data.corpus import load_manifest

        table = tmp_path / "genes.pt"
        torch.save({g: torch.randn(16) for g in load_manifest(corpus).genes}, table)
        se_run = tmp_path / "se_run"
        p = subprocess.run(
            [os.path.join(bindir, "ray"), "job", "submit", "--address", address,
             "--working-dir", ".", "--", python, "jobs/pretrain_se.py", "--recipe",
             "debug", "--corpus", str(corpus), "--gene-table", str(table), "--run-dir",
             str(se_run), "--max-steps", "4", "--no-progress", "--wandb", "offline"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-4000:]
        assert "succeeded" in out and "best checkpoint" in out
        assert (se_run / "best_checkpoint.json").is_file()
        assert (se_run / "metrics_val.csv").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
