"""Multi-host Ray on one machine: every host a network namespace (cluster/netns_cluster.py).

One cluster (head with 2 CPUs, two workers with 1) serves the module; jobs reach it only through
``ray job submit --working-dir .`` and S3 (moto) only through the standard AWS variables. The
build-and-teardown tests check that a cluster, also a half-built one, leaves nothing behind.
These tests need root and iproute2 and fail, never skip, without them (tests/multihost.py)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cluster import netns_cluster as nc
from tests.multihost import MULTIHOST_CPUS, MultiHost, leftovers, require_root_and_ip

pytestmark = [pytest.mark.integration]

CPUS = MULTIHOST_CPUS  # the shared cluster: tests/conftest.py's ``multihost`` fixture


def test_three_hosts_with_own_addresses_cpus_and_temp_dirs(multihost: MultiHost):
    state = multihost.state
    nodes = nc.alive_nodes(state)
    ips = [n["node_ip"] for n in nodes]
    assert len(nodes) == 3 and len(set(ips)) == 3, nodes
    subnet = ipaddress.ip_network(state.subnet)
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        assert addr in subnet and not addr.is_loopback, ip
    assert sorted(ips) == sorted(h.ip for h in state.hosts)
    by_ip = {n["node_ip"]: n for n in nodes}
    assert by_ip[state.head.ip]["is_head_node"]
    for h in state.hosts:
        assert by_ip[h.ip]["resources_total"]["CPU"] == h.num_cpus
        # each host keeps its own Ray session under its own --temp-dir
        assert (Path(h.temp_dir) / "session_latest").exists(), h.temp_dir
    assert [h.num_cpus for h in state.hosts] == list(CPUS)
    # token authentication is on: the job server refuses a client without the token
    assert nc.http_status(state.dashboard_url + "/api/version") in (401, 403)
    token = Path(state.token_path).read_text().strip()
    assert nc.http_status(state.dashboard_url + "/api/version", token=token) == 200


def test_job_tasks_on_every_host_write_to_s3(multihost: MultiHost):
    state = multihost.state
    prefix = "probe-" + os.urandom(4).hex()
    p = multihost.submit("cluster/netns_cluster.py", "probe", "--bucket", state.bucket,
                         "--prefix", prefix)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "succeeded" in out, out[-4000:]
    s3 = multihost.s3()
    summary = json.loads(s3.get_object(Bucket=state.bucket,
                                       Key=f"{prefix}/summary.json")["Body"].read())
    reports = summary["reports"]
    alive = {n["node_id"]: n["node_ip"] for n in nc.alive_nodes(state)}
    assert len(alive) == 3
    # one report from each node, made on that node, from three different network namespaces
    assert {r["node_id"] for r in reports} == set(alive)
    assert all(alive[r["node_id"]] == r["node_ip"] for r in reports), reports
    assert len({r["netns"] for r in reports}) == 3, reports
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=state.bucket,
                                                 Prefix=prefix + "/")["Contents"]}
    # every task wrote its own object from its own host
    assert keys == {f"{prefix}/{nid}.json" for nid in alive} | {f"{prefix}/summary.json"}


def test_kill_host_then_restart_host(multihost: MultiHost):
    state = multihost.state
    w2 = state.host("w2")
    before = {n["node_ip"]: n["node_id"] for n in nc.alive_nodes(state)}
    nc.kill_host(state, "w2")
    assert nc.netns_pids(w2.netns) == [] and not nc.is_ours(w2.ray)
    nodes = nc.restart_host(state, "w2", timeout=180)
    after = {n["node_ip"]: n["node_id"] for n in nodes}
    assert sorted(after) == sorted(before)
    assert after[w2.ip] != before[w2.ip]  # a new Ray node on the same host
    assert after[state.head.ip] == before[state.head.ip]
    assert nc.is_ours(w2.ray)


def test_up_down_cycle_leaves_nothing(multihost: MultiHost):
    """A second, smaller cluster next to the session's: its own subnet and names; after
    ``down`` none of its namespaces, links, addresses, processes or files remain."""
    state = nc.up([1, 1], timeout=240)
    try:
        assert state.subnet != multihost.state.subnet
        assert state.cluster_id != multihost.state.cluster_id
        made = leftovers(state)
        assert sum(x.startswith("netns ") for x in made) == 2, made
        assert sum(x.startswith("link ") for x in made) == 3, made  # bridge + 2 veths
        assert len(nc.alive_nodes(state)) == 2
    finally:
        nc.down(state)
    assert leftovers(state) == []
    nc.down(state)  # idempotent
    # the session's cluster was not touched
    assert len(nc.alive_nodes(multihost.state)) == 3


def test_failed_up_removes_what_it_made(monkeypatch):
    require_root_and_ip()
    seen: list[nc.ClusterState] = []

    def fail(state: nc.ClusterState, host: nc.Host) -> None:
        seen.append(state)
        raise nc.ClusterError("injected failure before the Ray head starts")

    monkeypatch.setattr(nc, "start_ray_node", fail)
    with pytest.raises(nc.ClusterError, match="injected"):
        nc.up([1, 1, 1], timeout=60)
    (state,) = seen
    assert state.s3 is not None and state.made  # S3, namespaces and links had been made
    assert leftovers(state) == []


def test_bad_cpus_is_refused_naming_the_option():
    require_root_and_ip()
    with pytest.raises(nc.ClusterError, match="--cpus"):
        nc.up([2, 0])
    assert nc.main(["up", "--cpus", "2,x"]) == 1


def test_exited_child_is_not_taken_for_alive():
    """A node whose ``ray start`` exited stays a zombie child of the process that started it;
    it must count as gone (and be reaped), or a failed start is waited on until the timeout."""
    p = subprocess.Popen(["sleep", "0.5"])
    start = nc.proc_start(p.pid)
    assert start is not None and nc.is_ours(nc.Proc(pid=p.pid, start=start, log=""))
    deadline = time.monotonic() + 10
    while Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not nc.is_ours(nc.Proc(pid=p.pid, start=start, log=""))
    assert not Path(f"/proc/{p.pid}").exists()  # reaped
