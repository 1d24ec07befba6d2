"""ST training speed on CPU: vcc-dist's trainer (Ray Train + DeepSpeed, set stream) vs Arc's
``state tx train`` (arc-state 0.11.1, cell-load loader, lightning), both with ``state_sm``, the
same data, set size and batch size, measured in the same run one after the other.

    python benchmarks/st_speed.py --run runs/demo --steps 40 --peer-steps 60

Ours: ``jobs/train_st.py --recipe state_sm`` with ``engine.matmul_precision`` "medium" (what
STATE's trainer sets: fp32 matmuls in bf16 on AMX CPUs) and "highest" (exact fp32), (set 128 x 16 sets, the simulator's 64-d
perturbation features file, ZeRO-2 fp32 on DeepSpeed's CPU accelerator), 1 Ray Train worker
holding 1 CPU and running --threads torch threads (default 2: STATE's process also uses every core), the set
stream on the other core. Its rate is taken from metrics_train.csv
(``cells_per_s_worker``: perturbed cells per second between log points, logged every 5 optimizer
steps), the median over the log points after the first 10 steps; its CPU seconds per cell from
the whole process tree (driver, Ray workers) over the run (start-up included, so a lower
bound of the steady rate per CPU second).
Peer: ``benchmarks/_state_peer.py`` (see its docstring: steady window, loader-built cells, CPU
of the process tree), arc-state in ``.venv-state``.

Results are appended to benchmarks/results/st_speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ours(run: Path, work: Path, steps: int, threads: int, precision: str) -> dict:
    import pandas as pd
    import psutil

    rd = work / f"vcc_dist_state_sm_{precision}"
    if rd.exists():
        import shutil

        shutil.rmtree(rd)
    cmd = [sys.executable, "jobs/train_st.py", "--recipe", "state_sm", "--corpus",
           str(run / "corpus"), "--split", str(run / "sim" / "split.toml"), "--run-dir", str(rd),
           "--features", str(run / "sim" / "pert_features.pt"), "--max-steps", str(steps),
           "--wandb", "disabled", "--no-progress", "--num-cpus", "2",
           "--set", "log_every=5", "val_role=\"\"", f"torch_threads={threads}",
           f"engine.matmul_precision=\"{precision}\""]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(p.pid)
    # last CPU reading of every process of the tree (Ray's processes exit before the driver,
    # so a single reading at the end, as _common.tree_cpu takes, would miss them)
    seen: dict[int, float] = {}
    while p.poll() is None:
        try:
            for c in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = c.cpu_times()
                    seen[c.pid] = t.user + t.system
        except psutil.Error:
            pass
        time.sleep(0.5)
    out = p.stdout.read()
    if p.returncode:
        raise SystemExit(f"train_st failed:\n{out[-4000:]}")
    wall = time.perf_counter() - t0
    cpu = sum(seen.values())
    m = pd.read_csv(rd / "metrics_train.csv")
    steady = m[m["step"] > 10]["cells_per_s_worker"].tolist()
    S, B = 128, 16
    return {"tool": "vcc-dist", "torch_threads": threads, "matmul_precision": precision, "cells_per_s": statistics.median(steady),
            "cells_per_cpu_s_lower_bound": steps * S * B / cpu, "wall_s": wall, "cpu_s": cpu,
            "steps": steps, "set_size": S, "batch_size": B, "rates": steady,
            "command": " ".join(cmd)}


def step_only(threads: int, precision: str, steps: int = 5) -> dict:
    """The model step alone, in this process (no Ray, no data): plain PyTorch + AdamW vs our
    DeepSpeed ZeRO-2 engine, state_sm at 2,000 genes, 16 x 128 random sets."""
    import torch

    from vcc_dist.models.losses import st_loss
    from vcc_dist.models.st import STModel, st_preset
    from vcc_dist.train.engine import EngineConfig, OptimConfig, build_engine

    torch.manual_seed(0)
    x, y, f = torch.rand(16, 128, 2000), torch.rand(16, 128, 2000), torch.rand(16, 64)
    out = {}
    for kind in ("torch", "deepspeed"):
        torch.set_float32_matmul_precision(precision)
        m = STModel(st_preset("state_sm", 2000, 64))
        if kind == "torch":
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

            def step(m=m, opt=opt):
                loss = st_loss(m(x, f)["pred"], y, kind="energy", weights={"main": 1.0}).total
                loss.backward()
                opt.step()
                opt.zero_grad()
        else:
            e, _ = build_engine(m, EngineConfig(zero_stage=2, matmul_precision=precision),
                                OptimConfig(total_steps=100, warmup_steps=1), 16)

            def step(e=e):
                e.backward(st_loss(e(x, f)["pred"], y, kind="energy", weights={"main": 1.0}).total)
                e.step()
        torch.set_num_threads(threads)
        for _ in range(2):
            step()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        out[f"{kind}_s_per_step"] = (time.perf_counter() - t) / steps
    return {"tool": "step-only", "matmul_precision": precision, "torch_threads": threads, **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--workdir", default="bench_data/st_speed")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--peer-steps", type=int, default=60)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--step-only", action="store_true",
                    help="only time the model step in this process (torch vs DeepSpeed)")
    ap.add_argument("--precision", nargs="+", default=["medium", "highest"],
                    help="our engine.matmul_precision runs (STATE's trainer sets 'medium')")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of our worker (STATE's process uses all cores)")
    a = ap.parse_args(argv)
    run, work = Path(a.run).resolve(), Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.step_only:
        rows = [step_only(a.threads, p) for p in a.precision]
        for r in rows:
            print(json.dumps(r))
        res = ROOT / "benchmarks/results/st_speed.json"
        old = json.loads(res.read_text()) if res.exists() else []
        res.write_text(json.dumps(old + [{"when": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "command": "python benchmarks/st_speed.py "
                                          + " ".join(argv or sys.argv[1:]), "rows": rows}],
                                         indent=1) + "\n")
        return 0
    rows = [ours(run, work, a.steps, a.threads, p) for p in a.precision]
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "rates"}))
    if not a.skip_peer:
        p = subprocess.run([sys.executable, "benchmarks/_state_peer.py", "--data-dir",
                            str(run / "sim"), "--toml", str(run / "sim" / "split.toml"),
                            "--workdir", str(work / "state_peer"), "--steps", str(a.peer_steps)],
                           cwd=ROOT, capture_output=True, text=True, check=False)
        if p.returncode:
            raise SystemExit(f"peer failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(p.stdout.strip().splitlines()[-1])
    rec = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(),
           "command": "python benchmarks/st_speed.py " + " ".join(argv or sys.argv[1:]),
           "rows": rows}
    if not a.skip_peer:
        peer = rows[-1]["cells_per_s"]
        rec["ratio_cells_per_s"] = {r["matmul_precision"]: r["cells_per_s"] / peer
                                    for r in rows[:-1]}
        print(f"ratio to arc-state (cells/s): {rec['ratio_cells_per_s']}")
    res = ROOT / "benchmarks/results/st_speed.json"
    old = json.loads(res.read_text()) if res.exists() else []
    res.write_text(json.dumps(old + [rec], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
