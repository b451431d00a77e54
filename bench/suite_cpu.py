"""Where a command's CPU time goes, by kind of process: every process that starts on this machine while it runs
(its children, and Ray's daemons and workers, servers and browsers, which a daemon may have re-parented: so run
nothing else beside it) is sampled from ``/proc`` until the command exits, and its CPU seconds (user + system) are
summed per kind. Made for the test suite, which is CPU-bound on 2 cores (bench/RESULTS.md).

    python bench/suite_cpu.py [--every 0.3] [--json OUT.json] -- COMMAND...

e.g. ``python bench/suite_cpu.py -- .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup``.
A process that lives less than one sampling interval is missed; Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")

#: (kind, what its command line contains), first match wins
KINDS = (
    ("pytest-xdist workers (and the processes they fork)", "exec(eval(sys.stdin.readline()))"),
    ("a trial's start, timed by the estimate (planning/overhead.py)", "import ray, ray.tune, ray.train, torch"),
    ("Tune function trials", "ray::ImplicitFunc"),
    ("Ray Train workers", "ray::RayTrainWorker"),
    ("Ray Train's own actors (controller, datasets, sync, placement-group cleaner, autoscaling coordinator)",
     ("ray::TrainController", "ray::DatasetManager", "ray::SynchronizationActor", "ray::PlacementGroupCleaner",
      "ray::_AutoscalingCoordinatorActor")),
    ("Ray's node processes (GCS, raylet, agents, log and autoscaler monitors)",
     ("gcs_server", "raylet", "log_monitor", "dashboard", "DashboardAgent", "RuntimeEnvAgent", "monitor.py",
      "ray start")),
    ("gloo ranks spawned by the DDP tests", "multiprocessing.spawn"),
    ("MLflow servers", ("mlflow server", "uvicorn", "mlflow.server")),
    ("Chromium (UI checks)", "chrom"),
    ("other Ray actors and workers", "ray::"),
)


def kind_of(cmd: str) -> str:
    for kind, needles in KINDS:
        if any(n in cmd for n in ((needles,) if isinstance(needles, str) else needles)):
            return kind
    return "other processes (scenario scripts, CLI subprocesses, pytest)"


def sample(since_ticks: int, seen: dict[str, list]) -> None:
    """Update ``seen`` (``pid:start`` -> [command line, CPU seconds]) with every process started after
    ``since_ticks`` (clock ticks since boot)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            start = int(fields[19])
            if start < since_ticks:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / TICK
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except (OSError, ValueError, IndexError):  # gone in between
            continue
        entry = seen.setdefault(f"{pid}:{start}", [cmd, cpu])
        entry[1] = cpu
        if cmd and "IDLE" not in cmd:  # a Ray worker renames itself once it runs something
            entry[0] = cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.3, help="seconds between samples")
    parser.add_argument("--json", help="also write every process's command line and CPU seconds here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    since, seen, t0 = int(uptime * TICK), {}, time.time()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(since, seen)
        time.sleep(args.every)
    wall = time.time() - t0
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for cmd, cpu in seen.values():
        totals[kind_of(cmd)][0] += 1
        totals[kind_of(cmd)][1] += cpu
    everything = sum(cpu for _, cpu in totals.values())
    print(f"\n{wall:.0f} s wall, {everything:.0f} CPU seconds in {len(seen)} processes "
          f"({everything / wall:.2f} cores busy on average); exit code {proc.returncode}")
    for kind, (n, cpu) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"{cpu:8.0f} s  {100 * cpu / everything:4.1f}%  {n:5d}  {kind}")
    if args.json:
        Path(args.json).write_text(json.dumps(seen, indent=0))
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
