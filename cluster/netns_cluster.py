#!/usr/bin/env python3
"""A multi-host Ray test cluster on one Linux machine: every host is a network namespace.

``up`` builds, as root with iproute2:

- a bridge ``vcc-<id>-br`` in the root namespace holding ``10.213.<k>.254/24`` (a free /24 is
  chosen so that it overlaps no address or route of the root namespace, nor another cluster);
- one namespace per host, ``vcc-<id>-<host>`` (``head``, ``w1``, ``w2``, ...), each joined to the
  bridge by a veth pair (``vcc-<id>-v<i>`` in the root namespace, ``eth0`` inside), with its own
  address ``10.213.<k>.<i+1>`` and loopback up; no default route, so nothing leaves the subnet;
- a moto S3 server on the bridge address (it outlives any host, like a real object store), with
  one bucket created;
- a Ray head in the first namespace and a Ray worker node in each of the others, each with its own
  ``--num-cpus``, ``--temp-dir``, object store and ``--node-ip-address`` (its namespace address),
  token authentication on with a per-cluster token, the job server at ``http://<head-ip>:8265``;

and waits until every node is registered (``up --timeout``; a node whose ``ray start`` exits
during start-up, as happens on a starved CPU, is started again up to twice). Each host has its
own network namespace, so every Ray port is fixed (GCS 6379, dashboard 8265, raylet 6380/6381,
agents 52365-52368). Everything it makes is recorded in ``<root>/<id>/state.json`` *before* it
is made, so ``down`` removes exactly that, is idempotent, and is safe after a partial ``up``.
``<root>`` is ``$VCC_NETNS_ROOT`` or ``/tmp/vcc-netns``.

``down`` kills the processes it started (SIGTERM to their process groups, SIGKILL after 3 s, then
SIGKILL to every process left in its namespaces), deletes its namespaces, veths and bridge, and
removes ``<root>/<id>``. Processes are only signalled when their PID still has the recorded
start time (and is no zombie), so a reused PID is never hit.
``kill-host`` SIGKILLs every process of one namespace (a lost machine); ``restart-host`` starts
that host's Ray node again and waits for it. ``env`` prints the variables a client needs:

    python cluster/netns_cluster.py up --cpus 2,1,1          # prints the cluster id
    eval "$(python cluster/netns_cluster.py env --id <id>)"  # AWS_*, RAY_ADDRESS, RAY_AUTH_*
    ray job submit --working-dir . -- "$PWD/.venv/bin/python" jobs/...
    python cluster/netns_cluster.py down --id <id>           # or: down --all

``probe`` is a Ray job (submit it to the cluster): one task pinned to every alive node writes
its node id, IP and network namespace to S3, using only the standard AWS variables.

Never ``ray stop``: it would end every Ray process on the machine, not only this cluster's.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

DEFAULT_ROOT = "/tmp/vcc-netns"
SUBNET_PREFIX = "10.213"
RAY_PORT = 6379
DASHBOARD_PORT = 8265
NODE_MANAGER_PORT = 6380
OBJECT_MANAGER_PORT = 6381
# dashboard agent http and grpc, runtime-env agent, metrics export
AGENT_PORTS = (52365, 52366, 52367, 52368)
S3_ACCESS_KEY = "vcc-test"
S3_SECRET_KEY = "vcc-test-secret"
S3_REGION = "us-east-1"
DEFAULT_BUCKET = "vcc"
DEFAULT_OBJECT_STORE_BYTES = 100 * 1024 * 1024
START_RETRIES = 2  # times a Ray node that exits during start-up is started again


class ClusterError(RuntimeError):
    """The cluster could not be built, reached or torn down; the message names the fix."""


@dataclass
class Proc:
    """A process this tool started: its PID and the start time that makes the PID unambiguous."""

    pid: int
    start: int  # /proc/<pid>/stat field 22 (clock ticks since boot)
    log: str


@dataclass
class Host:
    name: str
    netns: str
    ip: str
    num_cpus: int
    veth: str  # root-namespace end; the namespace end is eth0
    temp_dir: str
    ray: Proc | None = None


@dataclass
class ClusterState:
    cluster_id: str
    dir: str
    subnet: str
    bridge: str
    bridge_ip: str
    hosts: list[Host]
    bucket: str
    token_path: str
    object_store_bytes: int
    s3_port: int = 0
    s3: Proc | None = None
    status: str = "creating"
    made: list[str] = field(default_factory=list)  # "netns:<name>", "link:<name>" actually made

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.bridge_ip}:{self.s3_port}"

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ClusterError(f"cluster {self.cluster_id} has no host {name!r}; its hosts are "
                           f"{[h.name for h in self.hosts]}")

    def client_env(self) -> dict[str, str]:
        """What a client (``ray job submit``, boto3, s3fs) needs to use this cluster."""
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": S3_REGION,
                "RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": self.token_path}

    def save(self) -> None:
        path = Path(self.dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, cluster_dir: Path) -> ClusterState:
        path = cluster_dir / "state.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster state at {path}: nothing to do for this id "
                               f"(list clusters with `status`)") from None
        hosts = [Host(**{**h, "ray": Proc(**h["ray"]) if h["ray"] else None})
                 for h in raw.pop("hosts")]
        s3 = raw.pop("s3")
        return cls(hosts=hosts, s3=Proc(**s3) if s3 else None, **raw)


# ---------------------------------------------------------------------------------------------
# small system helpers


def root_dir() -> Path:
    return Path(os.environ.get("VCC_NETNS_ROOT", DEFAULT_ROOT))


def check_prerequisites() -> None:
    """Raise ClusterError unless this process is root and iproute2's ``ip`` is on PATH."""
    if os.geteuid() != 0:
        raise ClusterError("network-namespace hosts need root (ip netns add): run as root, "
                           "e.g. in CI or with sudo")
    if shutil.which("ip") is None:
        raise ClusterError("iproute2's `ip` is not on PATH: install it "
                           "(apt-get install -y iproute2)")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and p.returncode != 0:
        raise ClusterError(f"`{' '.join(args)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when there is no such process
    or it has exited (a zombie: it is reaped here when it is this process's child)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # field 2 (comm) may hold spaces: split after its closing parenthesis
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return None
    return int(fields[19])


def is_ours(proc: Proc | None) -> bool:
    return proc is not None and proc_start(proc.pid) == proc.start


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    p = sh("ip", "netns", "pids", name, check=False)
    return [int(x) for x in p.stdout.split()]


def kill_group(proc: Proc | None, sig: int) -> None:
    """Signal the process group ``proc`` leads (it was started with a new session)."""
    if not is_ours(proc):
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pred():
            return True
        time.sleep(0.1)
    return not pred()


def http_status(url: str, token: str | None = None, method: str = "GET") -> int | None:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def tail(path: str, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "<no log>"


@contextmanager
def root_lock() -> Iterator[None]:
    """Serialises subnet choice between concurrent ``up`` calls sharing one root."""
    root = root_dir()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # the lock is the directory: no lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pick_subnet() -> ipaddress.IPv4Network:
    """The first 10.213.<k>.0/24 that no root-namespace address or route overlaps."""
    used: list[ipaddress.IPv4Network] = []
    for cmd in (("ip", "-4", "-o", "addr", "show"), ("ip", "-4", "route", "show", "table", "all")):
        for line in sh(*cmd).stdout.splitlines():
            for tok in line.split():
                if tok[0].isdigit() and "." in tok:
                    try:
                        used.append(ipaddress.ip_network(tok, strict=False))
                    except ValueError:
                        pass
    for state_file in root_dir().glob("*/state.json"):
        try:
            used.append(ipaddress.ip_network(json.loads(state_file.read_text())["subnet"]))
        except (ValueError, KeyError, OSError):
            pass
    for k in range(7, 255):
        net = ipaddress.ip_network(f"{SUBNET_PREFIX}.{k}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise ClusterError(f"every {SUBNET_PREFIX}.<k>.0/24 is in use: tear down old clusters "
                       f"(`netns_cluster.py down --all`)")


# ---------------------------------------------------------------------------------------------
# Ray and S3 processes


def tool_bin(name: str) -> str:
    """``ray``/``moto_server`` next to the running interpreter (the virtualenv), else PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"`{name}` not found next to {sys.executable} nor on PATH: install the "
                           f"test extra (pip install -e '.[test]') and run this with that python")
    return found


def node_env(state: ClusterState) -> dict[str, str]:
    """Environment of every Ray node: token auth with this cluster's token, the S3 variables,
    no usage reporting, nothing inherited that would attach it to another cluster."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_")) and k != "VIRTUAL_ENV"}
    env.update(state.client_env())
    env.pop("RAY_ADDRESS")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    # torch.distributed's gloo picks its network interface from the hostname, which every
    # namespace shares with the machine and which resolves to 127.0.0.1: ranks on two hosts
    # would then dial each other's loopback. Every namespace's end of its veth is eth0.
    env["GLOO_SOCKET_IFNAME"] = "eth0"
    return env


def spawn(state: ClusterState, argv: list[str], log: str, netns: str | None) -> Proc:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + argv
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=node_env(state), cwd=state.dir, start_new_session=True)
    start = None
    for _ in range(50):
        start = proc_start(p.pid)
        if start is not None:
            break
        time.sleep(0.01)
    if start is None:
        raise ClusterError(f"`{' '.join(cmd)}` exited at once: {tail(log)}")
    return Proc(pid=p.pid, start=start, log=log)


def start_s3(state: ClusterState, timeout: float) -> None:
    log = str(Path(state.dir) / "moto.log")
    with socket.socket() as s:  # a free port on the bridge address
        s.bind((state.bridge_ip, 0))
        state.s3_port = s.getsockname()[1]
    state.s3 = spawn(state, [tool_bin("moto_server"), "-H", state.bridge_ip, "-p", str(state.s3_port)],
                     log, netns=None)
    state.save()
    deadline = time.monotonic() + timeout
    while http_status(state.s3_endpoint + "/") is None:
        if not is_ours(state.s3) or time.monotonic() > deadline:
            raise ClusterError(f"moto S3 server did not answer at {state.s3_endpoint}: {tail(log)}")
        time.sleep(0.2)
    # moto does not check signatures: a plain PUT creates the bucket
    code = http_status(f"{state.s3_endpoint}/{state.bucket}", method="PUT")
    if code != 200:
        raise ClusterError(f"could not create bucket {state.bucket!r} on {state.s3_endpoint}: "
                           f"HTTP {code}")


def start_ray_node(state: ClusterState, host: Host) -> None:
    Path(host.temp_dir).mkdir(parents=True, exist_ok=True)
    argv = [tool_bin("ray"), "start", "--block", "--node-ip-address", host.ip,
            "--num-cpus", str(host.num_cpus), "--temp-dir", host.temp_dir,
            "--object-store-memory", str(state.object_store_bytes), "--disable-usage-stats"]
    # fixed agent ports (each host has its own network namespace, so they cannot collide):
    # with dynamic ones the raylet waits a bounded time for the agents to report theirs, which
    # a starved CPU can exceed, and the node then fails to start
    argv += ["--node-manager-port", str(NODE_MANAGER_PORT),
             "--object-manager-port", str(OBJECT_MANAGER_PORT),
             "--dashboard-agent-listen-port", str(AGENT_PORTS[0]),
             "--dashboard-agent-grpc-port", str(AGENT_PORTS[1]),
             "--runtime-env-agent-port", str(AGENT_PORTS[2]),
             "--metrics-export-port", str(AGENT_PORTS[3])]
    if host is state.head:
        argv += ["--head", "--port", str(RAY_PORT), "--include-dashboard", "true",
                 "--dashboard-host", host.ip, "--dashboard-port", str(DASHBOARD_PORT)]
    else:
        argv += ["--address", f"{state.head.ip}:{RAY_PORT}"]
    host.ray = spawn(state, argv, str(Path(state.dir) / f"ray-{host.name}.log"), host.netns)
    state.save()


def alive_nodes(state: ClusterState) -> list[dict]:
    """The cluster's alive Ray nodes from the head's state API (node_id, node_ip, ...)."""
    token = Path(state.token_path).read_text().strip()
    req = urllib.request.Request(f"{state.dashboard_url}/api/v0/nodes?limit=1000&detail=false",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.load(r)
    return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]


def wait_nodes(state: ClusterState, timeout: float, stale: frozenset[str] = frozenset(),
               hosts: list[Host] | None = None, restarts: int = 0) -> list[dict]:
    """Wait until each of ``hosts`` (default: all) has one alive Ray node whose id is not in
    ``stale`` (the nodes of killed hosts, which the head reports alive until its health check
    notices). A node whose ``ray start`` exits is started again up to ``restarts`` times: on a
    starved CPU a raylet can miss Ray's fixed 30 s registration window. A head is only restarted
    while it is the only host waited for (restarting it would orphan registered workers).
    Raises ClusterError naming the missing hosts, with their logs. Returns the nodes."""
    hosts = state.hosts if hosts is None else hosts
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    want = {h.ip for h in hosts}
    left = {h.name: restarts for h in hosts}
    while True:
        try:
            nodes = [n for n in alive_nodes(state)
                     if n["node_id"] not in stale and n["node_ip"] in want]
        except (OSError, KeyError, ValueError):
            nodes = []
        if {n["node_ip"] for n in nodes} == want and len(nodes) == len(want):
            return nodes
        dead = [h for h in hosts if not is_ours(h.ray)]
        for h in [h for h in dead if left[h.name] > 0 and (h is not state.head or hosts == [h])]:
            print(f"netns_cluster: Ray node on {h.name} exited during start-up; starting it "
                  f"again:\n{tail(h.ray.log, 600) if h.ray else ''}", file=sys.stderr)
            left[h.name] -= 1
            stop_host_processes(state, [h], grace=0.0)
            start_ray_node(state, h)
            dead.remove(h)
        if dead or time.monotonic() > deadline:
            seen = {n["node_ip"] for n in nodes}
            missing = dead or [h for h in hosts if h.ip not in seen]
            logs = "\n".join(f"--- {h.name} ({h.ray.log if h.ray else '-'}):\n"
                             f"{tail(h.ray.log) if h.ray else ''}" for h in missing)
            why = "exited" if dead else f"not registered after {timeout:.0f}s"
            raise ClusterError(f"cluster {state.cluster_id}: Ray node(s) "
                               f"{[h.name for h in missing]} {why}; their logs:\n{logs}")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# up / down / host control


def up(cpus: list[int], timeout: float = 180.0, bucket: str = DEFAULT_BUCKET,
       object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES) -> ClusterState:
    """Build a cluster of ``len(cpus)`` hosts (the first is the head) and wait for every node.
    On any failure everything made so far is torn down and the ClusterError re-raised."""
    check_prerequisites()
    if len(cpus) < 1 or any(c < 1 for c in cpus):
        raise ClusterError(f"--cpus must list at least one positive CPU count per host, "
                           f"got {cpus}; e.g. --cpus 2,1,1")
    if len(cpus) > 250:
        raise ClusterError(f"at most 250 hosts fit a /24, got {len(cpus)}")
    cid = secrets.token_hex(3)
    cdir = root_dir() / cid
    names = ["head"] + [f"w{i}" for i in range(1, len(cpus))]
    with root_lock():
        net = pick_subnet()
        cdir.mkdir(parents=True)
        ips = list(net.hosts())
        state = ClusterState(
            cluster_id=cid, dir=str(cdir), subnet=str(net), bridge=f"vcc-{cid}-br",
            bridge_ip=str(ips[-1]), bucket=bucket, token_path=str(cdir / "auth_token"),
            object_store_bytes=object_store_bytes,
            hosts=[Host(name=n, netns=f"vcc-{cid}-{n}", ip=str(ips[i]), num_cpus=c,
                        veth=f"vcc-{cid}-v{i}", temp_dir=str(cdir / n))
                   for i, (n, c) in enumerate(zip(names, cpus))])
        taken = [n for n in [state.bridge] + [h.veth for h in state.hosts] if link_exists(n)]
        taken += [h.netns for h in state.hosts if netns_exists(h.netns)]
        if taken:  # never adopt (and later delete) what another run made
            shutil.rmtree(cdir)
            raise ClusterError(f"{taken} exist already: another cluster uses id {cid}; "
                               f"run `up` again (it draws a new id)")
        state.save()
        try:
            made = state.made
            sh("ip", "link", "add", state.bridge, "type", "bridge")
            made.append(f"link:{state.bridge}")
            state.save()
            sh("ip", "addr", "add", f"{state.bridge_ip}/{net.prefixlen}", "dev", state.bridge)
            sh("ip", "link", "set", state.bridge, "up")
        except BaseException:
            down(state)
            raise
    try:
        for h in state.hosts:
            made.append(f"netns:{h.netns}")
            state.save()
            sh("ip", "netns", "add", h.netns)
            made.append(f"link:{h.veth}")
            state.save()
            sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0",
               "netns", h.netns)
            sh("ip", "link", "set", h.veth, "master", state.bridge, "up")
            sh("ip", "-n", h.netns, "addr", "add", f"{h.ip}/{net.prefixlen}", "dev", "eth0")
            sh("ip", "-n", h.netns, "link", "set", "eth0", "up")
            sh("ip", "-n", h.netns, "link", "set", "lo", "up")
        token = Path(state.token_path)
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
        start_s3(state, timeout=min(timeout, 60.0))
        deadline = time.monotonic() + timeout
        start_ray_node(state, state.head)
        wait_nodes(state, timeout, hosts=[state.head], restarts=START_RETRIES)
        for h in state.hosts[1:]:
            start_ray_node(state, h)
        wait_nodes(state, max(10.0, deadline - time.monotonic()), restarts=START_RETRIES)
        state.status = "up"
        state.save()
        return state
    except BaseException:
        down(state)
        raise


def stop_host_processes(state: ClusterState, hosts: list[Host], grace: float) -> None:
    """SIGTERM the Ray process groups of ``hosts``, then SIGKILL all left in their namespaces."""
    for h in hosts:
        kill_group(h.ray, signal.SIGTERM)
    wait_gone(lambda: any(is_ours(h.ray) for h in hosts), grace)
    for h in hosts:
        kill_group(h.ray, signal.SIGKILL)
    for _ in range(50):
        pids = [p for h in hosts for p in netns_pids(h.netns)]
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def down(state: ClusterState, grace: float = 3.0) -> None:
    """Remove everything ``state`` records: processes, namespaces, links, the cluster dir.
    Idempotent; each step skips what is already gone."""
    stop_host_processes(state, state.hosts, grace)
    kill_group(state.s3, signal.SIGTERM)
    wait_gone(lambda: is_ours(state.s3), 5.0)
    kill_group(state.s3, signal.SIGKILL)
    for h in state.hosts:
        if f"netns:{h.netns}" in state.made and netns_exists(h.netns):
            sh("ip", "netns", "del", h.netns, check=False)
    for h in state.hosts:
        # deleting the namespace deletes its veth end and so the pair; only a pair whose
        # namespace end never got moved in is left
        if f"link:{h.veth}" in state.made and link_exists(h.veth):
            sh("ip", "link", "del", h.veth, check=False)
    if f"link:{state.bridge}" in state.made and link_exists(state.bridge):
        sh("ip", "link", "del", state.bridge, check=False)
    leftovers = [n for n in ([h.netns for h in state.hosts]) if netns_exists(n)]
    leftovers += [n for n in [state.bridge] + [h.veth for h in state.hosts]
                  if link_exists(n) and not wait_gone(lambda n=n: link_exists(n), 5.0)]
    if leftovers:
        raise ClusterError(f"cluster {state.cluster_id}: could not remove {leftovers}; "
                           f"remove them with `ip netns del` / `ip link del`")
    shutil.rmtree(state.dir, ignore_errors=True)
    try:
        os.rmdir(Path(state.dir).parent)  # the root too, once no cluster is left in it
    except OSError:
        pass


def kill_host(state: ClusterState, name: str) -> None:
    """SIGKILL every process of one host's namespace at once, as if the machine were lost."""
    h = state.host(name)
    stop_host_processes(state, [h], grace=0.0)


def restart_host(state: ClusterState, name: str, timeout: float = 120.0) -> list[dict]:
    """Start one host's Ray node again (killing what runs there first) and wait until every host
    has an alive node. Without GCS fault tolerance a restarted head forms a new cluster whose
    old workers exit, so restarting ``head`` restarts every worker too."""
    h = state.host(name)
    hosts = state.hosts if h is state.head else [h]
    ips = {x.ip for x in hosts}
    try:
        stale = frozenset(n["node_id"] for n in alive_nodes(state) if n["node_ip"] in ips)
    except (OSError, KeyError, ValueError):  # the head is down: it forgets every old node
        stale = frozenset()
    stop_host_processes(state, hosts, grace=5.0)
    for x in hosts:
        start_ray_node(state, x)
    return wait_nodes(state, timeout, stale, hosts=state.hosts, restarts=START_RETRIES)


def all_states() -> list[ClusterState]:
    out = []
    for d in sorted(root_dir().iterdir()) if root_dir().is_dir() else []:
        if d.is_dir():
            out.append(ClusterState.load(d))
    return out


def load(cluster_id: str) -> ClusterState:
    return ClusterState.load(root_dir() / cluster_id)


# ---------------------------------------------------------------------------------------------
# the probe job


def probe(bucket: str, prefix: str) -> dict:
    """Run inside a Ray job: one task pinned to each alive node writes ``<prefix>/<node_id>.json``
    (node id, IP, network namespace) to S3; the driver writes ``<prefix>/summary.json``."""
    import boto3  # heavy optional dependencies: only the probe job needs them
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def report(bucket: str, prefix: str) -> dict:
        ctx = ray.get_runtime_context()
        rec = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
               "netns": os.readlink("/proc/self/ns/net"), "pid": os.getpid()}
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{rec['node_id']}.json",
                                      Body=json.dumps(rec).encode())
        return rec

    ray.init()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    recs = ray.get([report.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(bucket, prefix) for n in nodes])
    summary = {"nodes": [{"node_id": n["NodeID"], "node_ip": n["NodeManagerAddress"]}
                         for n in nodes], "reports": recs}
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/summary.json",
                                  Body=json.dumps(summary).encode())
    print(json.dumps(summary))
    return summary


# ---------------------------------------------------------------------------------------------
# CLI


def describe(state: ClusterState) -> dict:
    d = {"id": state.cluster_id, "status": state.status, "subnet": state.subnet,
         "dashboard": state.dashboard_url, "s3": state.s3_endpoint, "bucket": state.bucket,
         "s3_alive": is_ours(state.s3), "hosts": []}
    for h in state.hosts:
        d["hosts"].append({"name": h.name, "netns": h.netns, "ip": h.ip, "cpus": h.num_cpus,
                           "ray_alive": is_ours(h.ray), "netns_exists": netns_exists(h.netns)})
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="build a cluster; prints its id")
    p.add_argument("--cpus", default="2,1,1",
                   help="Ray --num-cpus per host, head first (default 2,1,1: head + 2 workers)")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--bucket", default=DEFAULT_BUCKET)
    p.add_argument("--object-store-bytes", type=int, default=DEFAULT_OBJECT_STORE_BYTES)
    p = sub.add_parser("down", help="tear a cluster down (idempotent)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--id")
    g.add_argument("--all", action="store_true", help="every cluster under $VCC_NETNS_ROOT")
    p = sub.add_parser("status")
    p.add_argument("--id")
    p = sub.add_parser("env", help="print `export` lines for a client of the cluster")
    p.add_argument("--id", required=True)
    for name in ("kill-host", "restart-host"):
        p = sub.add_parser(name)
        p.add_argument("--id", required=True)
        p.add_argument("host")
    p = sub.add_parser("probe", help="(a Ray job) one S3-writing task per alive node")
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", required=True)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "up":
            try:
                cpus = [int(x) for x in a.cpus.split(",")]
            except ValueError:
                raise ClusterError(f"--cpus {a.cpus!r} is not a comma-separated list of "
                                   f"integers; e.g. --cpus 2,1,1") from None
            t0 = time.monotonic()
            state = up(cpus, a.timeout, a.bucket, a.object_store_bytes)
            print(f"cluster {state.cluster_id} up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            print(state.cluster_id)
        elif a.cmd == "down":
            check_prerequisites()
            for s in (all_states() if a.all else [load(a.id)]):
                t0 = time.monotonic()
                down(s)
                print(f"cluster {s.cluster_id} down in {time.monotonic() - t0:.1f}s",
                      file=sys.stderr)
        elif a.cmd == "status":
            states = [load(a.id)] if a.id else all_states()
            print(json.dumps([describe(s) for s in states], indent=1))
        elif a.cmd == "env":
            for k, v in load(a.id).client_env().items():
                print(f"export {k}={v}")
        elif a.cmd == "kill-host":
            kill_host(load(a.id), a.host)
        elif a.cmd == "restart-host":
            restart_host(load(a.id), a.host)
        elif a.cmd == "probe":
            probe(a.bucket, a.prefix)
    except ClusterError as e:
        print(f"netns_cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
