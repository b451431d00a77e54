"""Cooperative early stopping on the shipped LR study, against the same study without it (issue 15).

Runs ``experiments/configs/sweep_lr_schedules.yaml`` (15 trials) twice on this machine, K = ``--slots`` one-CPU
trials at a time: first as shipped (every trial runs its whole stream), then with a stopping rule (default: the
median rule on the trajectory-mean GM from task 2, at least 3 trials at the point). It reports the compute the rule
saved (estimated GFLOPs of the tasks not run, over the sweep's planned GFLOPs), the wall times, which trials it
stopped and where, and whether the best configuration (final GM over the finished trials) is the one found without
stopping. The first run also gives the estimate-vs-actual table for a shipped study. The sweeps stay under
``--out`` (a finished one is read, not rerun), so the analysis can be repeated; ``key=value`` arguments override the
study (a quick smoke run: ``stream.num_tasks=3 budget.total_ft_steps=6``). Usage::

    python bench/early_stopping.py [--slots 2] [--rule median] [--min-tasks 2] [--margin 0] [--min-trials 3]
                                   [--out runs/bench_early_stopping] [key=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
STUDY = REPO / "experiments" / "configs" / "sweep_lr_schedules.yaml"


def sweep(a: argparse.Namespace, stopping: dict | None):
    """The study as shipped (or with the rule), run under ``a.out``; read back when it already finished."""
    import yaml

    import fomo_ray
    from fomo_ray.config import parse_override

    raw = yaml.safe_load(STUDY.read_text())
    raw["name"] += "_stopped" if stopping else "_full"
    directory = Path(a.out) / "sweeps" / raw["name"]
    if (directory / "summary.json").is_file():
        return fomo_ray.load_results(directory)
    raw["base"] = {**raw["base"], **dict(parse_override(o) for o in a.overrides), "output_dir": a.out,
                   "tracking.enabled": False, "ray.cpus_per_worker": 1.0, "ray.max_concurrent_trials": a.slots}
    if stopping:
        raw["stopping"] = stopping
    # both runs really train: no trial is replayed from the cache
    return fomo_ray.sweep(raw, progress=False, no_cache=True, resume=directory.is_dir())


def best(res) -> tuple[str, float]:
    """The finished trial with the highest final GM: (its label, final GM in percent)."""
    table = res.table
    done = table[table["status"] == "finished"].sort_values("final_GM", ascending=False)
    return str(done.iloc[0]["run"]).split("-", 1)[1], 100 * float(done.iloc[0]["final_GM"])


def share_run(trials) -> float:
    return float(trials["done_gflops"].sum()) / float(trials["est_gflops"].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--rule", default="median", choices=["median", "trails_best"])
    ap.add_argument("--min-tasks", type=int, default=2)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--min-trials", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_early_stopping"))
    a = ap.parse_args()
    rule = {"rule": a.rule, "min_tasks": a.min_tasks, "margin": a.margin, "min_trials": a.min_trials}
    full, stopped = sweep(a, None), sweep(a, rule)
    ft, st = full.trials, stopped.trials
    print(f"\nLR study ({len(ft)} trials) on K = {a.slots} one-CPU slots; rule {rule}")
    print("| | wall time | trials stopped | est. compute run | best variant (final GM) |")
    print("|---|---|---|---|---|")
    for name, res in (("no stopping", full), ("with the rule", stopped)):
        n = int((res.trials["status"] == "stopped").sum())
        variant, gm = best(res)
        print(f"| {name} | {res.summary['wall_s'] / 60:.1f} min | {n} | {100 * share_run(res.trials):.0f}% | "
              f"{variant} ({gm:.1f}) |")
    print(f"compute saved: {100 * (1 - share_run(st)):.0f}%; wall time ratio (with / without): "
          f"{stopped.summary['wall_s'] / full.summary['wall_s']:.2f}; same best configuration: "
          f"{best(full)[0] == best(stopped)[0]}")
    print("\nstopped trials:")
    for _, t in st[st["status"] == "stopped"].iterrows():
        print(f"  {t['run']}: {t['reason']}")
    print("\nestimate vs actual, the shipped LR study without stopping (trials in start order):")
    print("| trial | est. s | actual s | actual / est. |")
    print("|---|---|---|---|")
    for _, t in ft.sort_values("run").iterrows():
        print(f"| {t['run']} | {t['est_s']:.0f} | {t['wall_s']:.0f} | {t['wall_s'] / t['est_s']:.2f} |")
    print(f"sweep: estimated {full.summary['estimate_s'] / 60:.1f} min, actual {full.summary['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
