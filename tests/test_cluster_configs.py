"""The shipped cluster configs (cluster/): they cannot be launched here, so check everything that
can be checked without a cloud or a Kubernetes cluster, and without starting Ray:

- every YAML parses;
- the cluster-launcher config validates against Ray's own ray-schema.json and goes through Ray's
  own config preparation (defaults merged, node types checked), and is internally consistent;
- the KubeRay manifests carry the fields KubeRay requires;
- token authentication is never turned off, and is explicitly on where Ray needs it;
- every `python jobs/<job>.py ...` command in a YAML or in cluster/README.md names an existing
  job and passes only options that job's argparse defines (read from its source with ast).
"""

import ast
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"

YAML_FILES = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
TEXT_FILES = YAML_FILES + [CLUSTER / "README.md", CLUSTER / "node_env.sh", CLUSTER / "Dockerfile"]

# ASSUMED: jobs/tune_st.py does not exist yet; the lead writes it with exactly these options.
# The configs may only pass options from this list (test_tune_st_commands_use_assumed_options);
# once the file exists, the options are also read from its source like every other job's.
TUNE_ST_ASSUMED_OPTIONS = frozenset({
    "--space", "--recipe", "--corpus", "--split", "--run-dir", "--num-samples",
    "--max-concurrent", "--trial-workers", "--cpus-per-trial", "--gpus-per-trial", "--scheduler",
    "--searcher", "--max-steps", "--resume", "--wandb", "--wandb-project", "--set", "--num-cpus",
    "--no-progress",
})
# Jobs the configs run that must exist (tune_st.py fails until the lead adds it: intended).
REQUIRED_JOBS = ("pretrain_se", "tune_st")


def _load(path):
    return list(yaml.safe_load_all(path.read_text()))


def _strings(obj):
    """Every string inside a parsed YAML document (keys excluded)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _kuberay_docs():
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _load(p)
            if d and str(d.get("apiVersion", "")).startswith("ray.io/")]


# ---------------------------------------------------------------- all files

def test_cluster_files_exist():
    for p in (LAUNCHER, CLUSTER / "runtime_env.yaml", CLUSTER / "README.md",
              KUBERAY / "raycluster.yaml", KUBERAY / "rayjob-pretrain-se.yaml",
              KUBERAY / "rayjob-tune-st.yaml", KUBERAY / "pvc-shared.yaml"):
        assert p.is_file(), f"missing {p.relative_to(ROOT)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    docs = _load(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: not a mapping"


@pytest.mark.parametrize("path", [p for p in TEXT_FILES if p.exists()],
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_token_auth_is_never_disabled(path):
    """No shipped file turns Ray's token authentication off (env var, YAML value, authOptions)."""
    text = path.read_text()
    assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", text), path.name
    assert not re.search(r"name:\s*RAY_AUTH_MODE\s*,?\s*value:\s*[\"']?disabled", text), path.name
    if path.suffix in (".yaml", ".yml"):
        for doc in _load(path):
            for s in _strings(doc):
                assert "RAY_AUTH_MODE=disabled" not in s.replace(" ", ""), path.name
            spec = (doc or {}).get("spec") or {}
            for sp in (spec, spec.get("rayClusterSpec") or {}):
                assert (sp.get("authOptions") or {}).get("mode", "token") != "disabled", path.name


# ---------------------------------------------------------------- runtime env

def test_runtime_env_keeps_local_artefacts_out():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert {".venv/", "runs/", "bench_data/", ".git/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars must be strings"


# ---------------------------------------------------------------- cluster launcher

@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_validates_against_rays_schema(launcher):
    """Ray's own JSON schema (the one `ray up` validates with), from the installed ray."""
    jsonschema = pytest.importorskip("jsonschema")  # a dependency of ray itself
    import ray

    schema_path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(launcher, schema)


def test_launcher_passes_rays_config_preparation(launcher):
    """What `ray up` does before touching the cloud: merge the AWS defaults, merge setup
    commands, check node types and worker bounds, validate again (no boto3 call)."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(launcher)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_launcher_fields(launcher):
    c = launcher
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types",
                "head_node_type", "file_mounts", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in c, f"aws-gpu.yaml: missing {key}"
    assert c["provider"]["type"] == "aws"
    assert c["provider"]["region"] and c["provider"]["availability_zone"]
    assert c["auth"]["ssh_user"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) > 0]
    assert gpu, "no GPU worker group"
    for v in workers.values():
        assert 0 <= v.get("min_workers", 0) <= v["max_workers"] <= c["max_workers"]
        assert v["node_config"]["InstanceType"]
    assert sum(v.get("min_workers", 0) for v in workers.values()) <= c["max_workers"]


def test_launcher_token_auth_and_shared_storage(launcher):
    c = launcher
    starts = c["head_start_ray_commands"] + c["worker_start_ray_commands"]
    ray_starts = [s for s in starts if "ray start" in s]
    assert len(ray_starts) == 2
    for s in ray_starts:
        # explicit: `ray start --head` leaves auth off when neither this nor a token file is set
        assert "RAY_AUTH_MODE=token" in s.split("ray start")[0], s
    assert "--head" in c["head_start_ray_commands"][-1]
    # one token for head, workers and client, at the path Ray reads it from
    assert c["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # the node env file the start commands source ships with the tree
    for s in ray_starts:
        for m in re.findall(r"source\s+~/vcc-dist/(\S+)", s):
            assert (ROOT / m).is_file(), m
    setup = "\n".join(c["setup_commands"])
    assert re.search(r"mount\b.*\s/shared\b", setup), "shared storage must be mounted at /shared"


def test_launcher_installs_cuda_torch_then_the_package(launcher):
    setup = launcher["setup_commands"]
    torch_i = [i for i, s in enumerate(setup) if re.search(r"pip install.*torch==", s)]
    pkg_i = [i for i, s in enumerate(setup) if re.search(r"pip install.*-e\s+~/vcc-dist", s)]
    assert torch_i and pkg_i and torch_i[0] < pkg_i[0], "install torch first, then the package"
    torch_cmd = setup[torch_i[0]]
    assert "+cpu" not in torch_cmd and "whl/cpu" not in torch_cmd, "GPU nodes need CUDA torch"
    # same torch version as the local pin (Makefile), so checkpoints move between the two
    local_pin = re.search(r"torch==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"torch=={local_pin}" in torch_cmd
    # the package is uploaded to where it is installed from
    assert launcher["file_mounts"].get("~/vcc-dist") == "."
    assert {".venv", "runs", ".git"} <= set(launcher["rsync_exclude"])


def test_node_env_script_is_valid_bash():
    script = CLUSTER / "node_env.sh"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = script.read_text()
    assert re.search(r"^export RAY_AUTH_MODE=token$", text, re.M)
    assert "NCCL_SOCKET_IFNAME" in text


# ---------------------------------------------------------------- KubeRay

def _check_pod_template(where, template):
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    return containers


def _check_ray_cluster_spec(where, spec):
    assert str(spec.get("rayVersion", "")).startswith("2.60"), f"{where}: rayVersion"
    # token auth on (KubeRay >= 1.5.1 generates the Secret and injects RAY_AUTH_MODE/TOKEN)
    assert (spec.get("authOptions") or {}).get("mode") == "token", f"{where}: authOptions.mode"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    _check_pod_template(f"{where} head", head["template"])
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    gpus = 0
    for g in groups:
        w = f"{where} group {g['groupName']}"
        for k in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[k], int), f"{w}: {k}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], w
        assert isinstance(g["rayStartParams"], dict), f"{w}: rayStartParams"
        for c in _check_pod_template(w, g["template"]):
            limits = c.get("resources", {}).get("limits", {})
            gpus += int(limits.get("nvidia.com/gpu", 0))
            env = {e["name"]: e for e in c.get("env", [])}
            if "nvidia.com/gpu" in limits:
                assert "NCCL_SOCKET_IFNAME" in env, f"{w}: NCCL_SOCKET_IFNAME"
    assert gpus > 0, f"{where}: no GPU worker group"
    # every Ray pod mounts the shared claim at /shared
    for t in [head["template"]] + [g["template"] for g in groups]:
        vols = {v["name"]: v for v in t["spec"].get("volumes", [])}
        for c in t["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/shared" in mounts, f"{where}: {c['name']} does not mount /shared"
            assert "persistentVolumeClaim" in vols[mounts["/shared"]], where
            # wandb key from a Secret, never inline
            for e in c.get("env", []):
                if e["name"] in ("WANDB_API_KEY", "RAY_AUTH_TOKEN"):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']}"


def test_kuberay_manifests():
    docs = _kuberay_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["RayCluster", "RayJob", "RayJob"], kinds
    for path, d in docs:
        assert d["apiVersion"] == "ray.io/v1", path.name
        assert d["metadata"]["name"], path.name
        spec = d["spec"]
        if d["kind"] == "RayCluster":
            _check_ray_cluster_spec(path.name, spec)
        else:
            assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip(), path.name
            assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), \
                f"{path.name}: exactly one of rayClusterSpec / clusterSelector"
            if "rayClusterSpec" in spec:
                _check_ray_cluster_spec(path.name, spec["rayClusterSpec"])
            if spec.get("ttlSecondsAfterFinished") is not None:
                assert spec.get("shutdownAfterJobFinishes") is True, \
                    f"{path.name}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes"
            env = yaml.safe_load(spec["runtimeEnvYAML"])
            assert env["working_dir"], path.name
            assert "WANDB_API_KEY" not in env.get("env_vars", {}), "secrets belong in Secrets"
            sub = spec.get("submitterPodTemplate")
            if sub:
                _check_pod_template(f"{path.name} submitter", sub)
                assert sub["spec"].get("restartPolicy") == "Never", path.name


def test_kuberay_claims_are_defined():
    pvcs = {d["metadata"]["name"]: d for d in _load(KUBERAY / "pvc-shared.yaml")
            if d["kind"] == "PersistentVolumeClaim"}
    assert all("ReadWriteMany" in p["spec"]["accessModes"] for p in pvcs.values())
    for path, d in _kuberay_docs():
        claims = re.findall(r"claimName:\s*([\w.-]+)", path.read_text())
        assert claims, path.name
        assert set(claims) <= set(pvcs), f"{path.name}: claims {set(claims) - set(pvcs)} undefined"


def test_rayjob_entrypoints():
    want = {"pretrain_se": "python jobs/pretrain_se.py --recipe se600m --corpus /shared/corpus "
                           "--gene-table /shared/esm/gene_embeddings.pt --run-dir "
                           "/shared/runs/se600m --num-workers 8 --use-gpu",
            "tune_st": "python jobs/tune_st.py --space default --corpus /shared/corpus --split "
                       "/shared/split.toml --run-dir /shared/runs/tune --num-samples 32 "
                       "--trial-workers 1 --gpus-per-trial 1 --wandb auto"}
    got = {}
    for _, d in _kuberay_docs():
        if d["kind"] == "RayJob":
            m = re.search(r"jobs/(\w+)\.py", d["spec"]["entrypoint"])
            got[m.group(1)] = " ".join(d["spec"]["entrypoint"].split())
    assert got == want


# ---------------------------------------------------------------- job commands

_JOB_CMD = re.compile(r"python\s+jobs/([\w-]+)\.py\b([^\n`|;&)]*)")


def _job_commands():
    """(file, job, [options]) for every `python jobs/<job>.py ...` in the cluster files: raw text
    with backslash continuations joined (README, comments) and every parsed YAML string (folded
    entrypoints, runtimeEnvYAML)."""
    found = []
    for path in [p for p in TEXT_FILES if p.exists()]:
        texts = [re.sub(r"\\\n\s*", " ", path.read_text())]
        if path.suffix in (".yaml", ".yml"):
            texts += [s for d in _load(path) for s in _strings(d)]
        for text in texts:
            for m in _JOB_CMD.finditer(text):
                try:
                    tokens = shlex.split(m.group(2), comments=True)
                except ValueError:
                    tokens = m.group(2).split()
                opts = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
                found.append((path.relative_to(ROOT).as_posix(), m.group(1), opts))
    return found


def _imported_parsers(tree, path):
    """Modules of this repo a job imports its parser from (e.g. convert.py ->
    data_conversion/cli.py), with the names imported."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mod = ROOT / (node.module.replace(".", "/") + ".py")
            if mod.is_file():
                out.append((mod, {a.name for a in node.names}))
    return out


def _add_argument_options(nodes):
    opts = set()
    for node in nodes:
        for call in ast.walk(node):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "add_argument"):
                for a in call.args:
                    if isinstance(a, ast.Constant) and isinstance(a.value, str) \
                            and a.value.startswith("--"):
                        opts.add(a.value)
    return opts


def _functions_reached(tree, names):
    """The module-level functions named, plus the module functions they call (transitively)."""
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    todo, seen = [n for n in names if n in funcs], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for call in ast.walk(funcs[name]):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) \
                    and call.func.id in funcs:
                todo.append(call.func.id)
    return [funcs[n] for n in seen]


def job_options(job: str) -> set[str]:
    """The `--options` of jobs/<job>.py, read from its source without importing it: its own
    add_argument calls and those of the repo functions it imports."""
    path = ROOT / "jobs" / f"{job}.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    opts = _add_argument_options([tree])
    # plus the options of the repo functions it imports (jobs/_cli.py's shared options, or a
    # thin wrapper's parser in data_conversion/cli.py)
    for mod, names in _imported_parsers(tree, path):
        mtree = ast.parse(mod.read_text(), filename=str(mod))
        opts |= _add_argument_options(_functions_reached(mtree, names))
    return opts


def test_job_option_reader_sees_real_options():
    assert {"--recipe", "--gene-table", "--use-gpu", "--num-workers"} <= job_options("pretrain_se")
    assert {"--out", "--validate", "--obs-map"} <= job_options("convert")  # via data_conversion
    assert "--validate" not in job_options("validate_corpus")  # only validate_main's options


def test_commands_found():
    jobs = {job for _, job, _ in _job_commands()}
    assert set(REQUIRED_JOBS) <= jobs, jobs


@pytest.mark.parametrize("job", REQUIRED_JOBS)
def test_required_jobs_exist(job):
    assert (ROOT / "jobs" / f"{job}.py").is_file(), f"jobs/{job}.py is run by the cluster configs"


def test_job_commands_use_existing_jobs_and_options():
    problems = []
    for where, job, opts in _job_commands():
        if not (ROOT / "jobs" / f"{job}.py").is_file():
            problems.append(f"{where}: jobs/{job}.py does not exist")
            continue
        unknown = sorted(set(opts) - job_options(job))
        if unknown:
            problems.append(f"{where}: jobs/{job}.py has no option {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


def test_tune_st_commands_use_assumed_options():
    """Holds before jobs/tune_st.py exists: the configs pass only the options it will have."""
    used = {o for _, job, opts in _job_commands() if job == "tune_st" for o in opts}
    assert used and used <= TUNE_ST_ASSUMED_OPTIONS, sorted(used - TUNE_ST_ASSUMED_OPTIONS)
