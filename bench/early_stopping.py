"""Cooperative early stopping on the shipped LR study, against the same study without it (issue 15).

Runs ``experiments/configs/sweep_lr_schedules.yaml`` (15 trials) twice on this machine, K = ``--slots`` one-CPU
trials at a time: first as shipped (every trial runs its whole stream), then with a stopping rule (default: the
median rule on the trajectory-mean GM from task 2, at least 3 trials at the point). It reports the compute the rule
saved (estimated GFLOPs of the tasks not run, over the sweep's planned GFLOPs), the wall times, which trials it
stopped and where, and whether the best configuration (final GM over the finished trials) is the one found without
stopping. The first run also gives the estimate-vs-actual table for a shipped study. Usage::

    python bench/early_stopping.py [--slots 2] [--rule median] [--min-tasks 2] [--margin 0] [--min-trials 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
STUDY = REPO / "experiments" / "configs" / "sweep_lr_schedules.yaml"


def sweep(a: argparse.Namespace, out: str, stopping: dict | None):
    import yaml

    import fomo_ray

    raw = yaml.safe_load(STUDY.read_text())
    raw["base"] = {**raw["base"], "output_dir": out, "tracking.enabled": False, "ray.cpus_per_worker": 1.0,
                   "ray.max_concurrent_trials": a.slots}
    if stopping:
        raw["stopping"] = stopping
        raw["name"] += "_stopped"
    return fomo_ray.sweep(raw, progress=False, no_cache=True)  # both runs really train: nothing replayed


def best(res) -> tuple[str, float]:
    table = res.table()
    done = table[table["status"] == "finished"].sort_values("final_GM", ascending=False)
    return str(done.iloc[0]["run"]).split("-", 1)[1], float(done.iloc[0]["final_GM"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--rule", default="median", choices=["median", "trails_best"])
    ap.add_argument("--min-tasks", type=int, default=2)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--min-trials", type=int, default=3)
    a = ap.parse_args()
    rule = {"rule": a.rule, "min_tasks": a.min_tasks, "margin": a.margin, "min_trials": a.min_trials}
    with tempfile.TemporaryDirectory(prefix="early_stop_") as out:
        full = sweep(a, out, None)
        stopped = sweep(a, out, rule)
    ft, st = full.trials, stopped.trials
    planned = float(st["est_gflops"].sum())
    saved = 1.0 - float(st["done_gflops"].sum()) / planned
    print(f"\nLR study ({len(ft)} trials) on K = {a.slots} one-CPU slots; rule {rule}")
    print("| | wall time | trials stopped | est. compute run | best variant (final GM) |")
    print("|---|---|---|---|---|")
    for name, res in (("no stopping", full), ("with the rule", stopped)):
        n = int((res.trials["status"] == "stopped").sum())
        run_share = float(res.trials["done_gflops"].sum()) / float(res.trials["est_gflops"].sum())
        variant, gm = best(res)
        print(f"| {name} | {res.summary['wall_s'] / 60:.1f} min | {n} | {100 * run_share:.0f}% | {variant} "
              f"({gm:.1f}) |")
    print(f"compute saved: {100 * saved:.0f}%; wall time ratio (with / without): "
          f"{stopped.summary['wall_s'] / full.summary['wall_s']:.2f}; same best configuration: "
          f"{best(full)[0] == best(stopped)[0]}")
    print("\nstopped trials:")
    for _, t in st[st["status"] == "stopped"].iterrows():
        print(f"  {t['run']}: {t['reason']}")
    print("\nestimate vs actual, shipped LR study without stopping (trials in start order):")
    print("| trial | est. s | actual s | actual / est. |")
    print("|---|---|---|---|")
    for _, t in ft.iterrows():
        print(f"| {t['run']} | {t['est_s']:.0f} | {t['wall_s']:.0f} | {t['wall_s'] / t['est_s']:.2f} |")
    print(f"sweep: estimated {full.summary['estimate_s'] / 60:.1f} min, actual {full.summary['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
