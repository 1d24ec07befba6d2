"""Fixture helpers for the multi-host tests: a cluster of network-namespace hosts
(``cluster/netns_cluster.py``) built once per pytest session and torn down at its end, also when
a test fails.

The cluster's client variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``RAY_ADDRESS``, ``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN_PATH``) are handed to subprocesses through ``MultiHost.env`` rather than set in
``os.environ``: set process-wide they would leak into the test modules that run after this one and
point their jobs and S3 clients at this cluster.

These tests need root and iproute2. Without them the fixture fails (never skips): CI runs as root,
and a skipped multi-host test would hide a broken cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster import netns_cluster as nc

ROOT = Path(__file__).resolve().parents[1]
#: Ray CPUs of the shared test cluster's hosts, head first (tests/conftest.py's ``multihost``)
MULTIHOST_CPUS = (2, 1, 1)


def require_root_and_ip() -> None:
    """Fail the requesting test, naming the fix, unless this is root with iproute2."""
    try:
        nc.check_prerequisites()
    except nc.ClusterError as e:
        pytest.fail(f"multi-host tests cannot run: {e}. They are not skipped on purpose: "
                    f"run the suite as root with iproute2 installed, as .ci/run does.",
                    pytrace=False)


def client_env(state: nc.ClusterState) -> dict[str, str]:
    """``os.environ`` without any RAY_*/AWS_* of the caller, plus this cluster's variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_")) and k != "VIRTUAL_ENV"}
    env.update(state.client_env())
    env["WANDB_MODE"] = "offline"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@dataclass
class MultiHost:
    state: nc.ClusterState
    up_seconds: float

    @property
    def env(self) -> dict[str, str]:
        return client_env(self.state)

    def submit(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir . -- "$PWD/.venv/bin/python" <args>`` from the
        repository root, as the README does; the entrypoint runs in the head's namespace."""
        venv_python = ROOT / ".venv" / "bin" / "python"
        python = str(venv_python) if venv_python.exists() else sys.executable
        ray = str(Path(sys.executable).parent / "ray")
        return subprocess.run([ray, "job", "submit", "--working-dir", ".", "--", python, *args],
                              cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def s3(self):
        """A boto3 S3 client configured from the cluster's AWS variables only."""
        import boto3  # heavy; only the S3 checks need it

        env = self.env
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                            region_name=env["AWS_DEFAULT_REGION"])


def cluster_fixture(cpus: Sequence[int] = (2, 1, 1), timeout: float = 240.0) -> Callable:
    """A session-scoped fixture yielding a ``MultiHost`` of ``len(cpus)`` hosts (head first,
    ``cpus[i]`` Ray CPUs each); the cluster is torn down when the session ends."""

    @pytest.fixture(scope="session")
    def fixture() -> Iterator[MultiHost]:
        require_root_and_ip()
        t0 = time.monotonic()
        state = nc.up(list(cpus), timeout=timeout)
        up_seconds = time.monotonic() - t0
        print(f"\nnetns cluster {state.cluster_id} up in {up_seconds:.1f}s", file=sys.stderr)
        try:
            yield MultiHost(state, up_seconds)
        finally:
            t0 = time.monotonic()
            nc.down(state)
            print(f"\nnetns cluster {state.cluster_id} down in {time.monotonic() - t0:.1f}s",
                  file=sys.stderr)

    return fixture


def leftovers(state: nc.ClusterState) -> list[str]:
    """Whatever of ``state``'s cluster still exists: namespaces, links, addresses of its subnet
    in the root namespace, processes it started or running in its namespaces, its directory."""
    prefix = f"vcc-{state.cluster_id}-"
    out = [f"netns {n}" for n in sorted(os.listdir("/run/netns"))
           if n.startswith(prefix)] if os.path.isdir("/run/netns") else []
    out += [f"link {n}" for n in sorted(os.listdir("/sys/class/net")) if n.startswith(prefix)]
    addrs = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                           check=True).stdout
    net_prefix = state.subnet.rsplit(".", 1)[0] + "."
    out += [f"address {line.split()[3]}" for line in addrs.splitlines()
            if line.split()[3].startswith(net_prefix)]
    procs = [p for p in [state.s3] + [h.ray for h in state.hosts] if nc.is_ours(p)]
    out += [f"process {p.pid}" for p in procs]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if state.dir in cmdline or state.token_path in cmdline:
            out.append(f"process {pid}: {cmdline[:200]}")
    if os.path.exists(state.dir):
        out.append(f"directory {state.dir}")
    return out
