"""A killed job driver leaves no Ray process running (integration tier).

A job started without a cluster starts an embedded Ray (vcc_dist.ray_utils.ensure_ray): GCS,
raylet, dashboard, their agents and workers. When the driver is SIGKILLed (nothing of it can
run then), Ray's fate sharing ends the head processes, and the raylet's agents and workers
exit when they lose the raylet. This test kills a driver with a task in flight and waits for
every process it had started to end. (A process that has exited but not yet been reaped by
PID 1 is a zombie: it holds no resources and counts as ended.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DRIVER = """
import time
import ray
from vcc_dist.ray_utils import ensure_ray
ensure_ray(num_cpus=1)
@ray.remote
def work():
    time.sleep(600)
ref = work.remote()
print("ready", flush=True)
time.sleep(600)
"""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_driver_leaves_no_ray_process_running():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"})
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(2)  # the task's worker is up
        kids = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(k.name() for k in kids)
        assert "raylet" in names and "gcs_server" in names, names
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 150
    left = kids
    while time.time() < deadline:
        left = [k for k in kids if _alive(k)]
        if not left:
            break
        time.sleep(1)
    assert not left, [f"{k.pid} {k.name()}" for k in left]
