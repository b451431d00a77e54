"""Resident memory of `fomo-ray ui`: the UI process, `mlflow server` and its uvicorn worker, on the store of a small
finished sweep (the figure in docs/TRACKING.md).

Without ``--output-dir`` it first runs a tiny real sweep into a temporary directory (2 trials x 2 tasks of the real
loop on fomo-tiny-s, random init, a 5 %-scale FiF-mini, as tests/test_ui_browser.py). Then it starts `fomo-ray ui`,
waits for the address it prints, and samples the process tree (/proc: every descendant of `fomo-ray ui`) idle and
after headless Chromium rendered the printed runs table and one trial's chart page (the server then has answered the
UI's API calls). Per process it reads VmRSS (resident, shared pages counted in every process) and Pss (shared pages
split between the processes that map them) from /proc/<pid>/smaps_rollup; Pss sums to what the tree really holds.
Usage::

    python bench/ui_memory.py [--output-dir DIR] [--port 5077]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_sweep(out: Path) -> None:
    import fomo_ray.engine.tune_sweep as sweep
    from fomo_ray.prep.fifmini import ensure_fifmini
    from fomo_ray.planning.sweep_spec import spec_from_dict

    bench = ensure_fifmini(out / "fifmini", seed=0, scale=0.05, progress=False)
    spec = spec_from_dict({
        "name": "ui_memory",
        "base": {"output_dir": str(out), "data.root": str(bench.root), "data.scale": 0.05, "backbone.pretrained": "",
                 "stream.num_tasks": 2, "budget.total_ft_steps": 8, "mixture.batch_size": 16,
                 "evaluation.subset_min": 20, "data.num_workers": 1, "budget.cache_dir": str(out / "budget"),
                 "ray.cpus_per_worker": 1.0},
        "space": {"variant": {"points": {"finetune": {"method.name": "finetune"},
                                         "ema": {"method.name": "ema_merge", "method.merge.weight": 0.5}}}}})
    sweep.run_sweep(spec, progress=False)


def tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            kids.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def memory(pid: int) -> dict[str, tuple[float, float]]:
    """``{command: (VmRSS MiB, Pss MiB)}`` for ``pid`` and its descendants."""
    out = {}
    for p in tree(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:90]
            rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1))
            pss = int(re.search(r"Pss:\s+(\d+)", Path(f"/proc/{p}/smaps_rollup").read_text()).group(1))
        except (OSError, AttributeError):
            continue
        out[f"{p} {cmd}"] = (rss / 1024, pss / 1024)
    return out


def report(label: str, mem: dict[str, tuple[float, float]]) -> None:
    print(f"{label}: VmRSS sum {sum(r for r, _ in mem.values()):.0f} MiB, Pss sum {sum(p for _, p in mem.values()):.0f}"
          f" MiB over {len(mem)} processes")
    for cmd, (rss, pss) in mem.items():
        print(f"    {rss:6.0f} MiB rss {pss:6.0f} MiB pss  {cmd}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", default="", help="a finished sweep's output_dir (default: run a tiny sweep)")
    ap.add_argument("--port", type=int, default=5077)
    args = ap.parse_args()
    tmp = None
    if not args.output_dir:
        tmp = tempfile.mkdtemp(prefix="ui_memory_")
        t0 = time.time()
        tiny_sweep(Path(tmp))
        print(f"tiny sweep: {time.time() - t0:.0f} s")
    out_dir = args.output_dir or tmp
    proc = subprocess.Popen([sys.executable, "-m", "fomo_ray.cli", "ui", "--output-dir", out_dir, "--port",
                             str(args.port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        t0, url = time.time(), ""
        for line in proc.stdout:
            m = re.search(r"MLflow UI for \S+ at (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if not url:
            print("fomo-ray ui printed no address", file=sys.stderr)
            return 1
        print(f"address after {time.time() - t0:.1f} s: {url}")
        report("idle", memory(proc.pid))
        chromium = shutil.which("chromium")
        if chromium:
            from fomo_ray.tracking.writer import Tracker, default_uri

            tr = Tracker(default_uri(out_dir), "fomo_ray")
            run = tr.client.search_runs([tr.experiment_id], "tags.`fomo_ray.kind` = 'trial'", max_results=1)[0]
            page = (url.split("/#/")[0] + f"/#/experiments/{tr.experiment_id}/runs/{run.info.run_id}/model-metrics"
                    "?workflowType=machine_learning")
            peak: dict[str, tuple[float, float]] = {}
            for target in (url, page):
                cmd = [chromium, "--headless", "--disable-gpu", "--virtual-time-budget=20000", "--dump-dom", target]
                if os.geteuid() == 0:
                    cmd.insert(1, "--no-sandbox")
                subprocess.run(cmd, capture_output=True, timeout=180)
                now = memory(proc.pid)
                if sum(p for _, p in now.values()) > sum(p for _, p in peak.values()):
                    peak = now
            report("after rendering the runs table and a chart page", peak)
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
