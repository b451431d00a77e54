"""Makespan of one mixed-cost sweep in FIFO and in cost-aware (longest first) order, side by side (issue 15).

The sweep: model sizes x methods on FiF-mini (fomo-tiny-s / -m / -l x zero_shot / finetune; the model-size study's
stream, ``--tasks`` tasks and ``--total-ft-steps`` steps), on K = ``--slots`` concurrent one-CPU trials. It runs
twice, first in the grid's order (``order: fifo``), then longest first by the estimate printed before launch
(``order: cost``). The bases are random-init (a trial's cost does not depend on its weights). For each it reports
the makespan (first trial start to last trial end, from Tune's timestamps), the lower bound max(total / K, longest)
from that run's own trial durations, and their ratio (target for the cost order: <= 1.15), plus each trial's
estimated and actual wall time. Nothing is tracked in MLflow. Usage::

    python bench/sweep_makespan.py [--slots 2] [--tasks 4] [--total-ft-steps 120]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def spec(order: str, a: argparse.Namespace, out: str) -> dict:
    return {"name": f"makespan_{order}", "order": order,
            # random-init bases: the cost of a trial does not depend on its weights, and the m / l bases would
            # otherwise be pretrained first (tens of minutes on 2 cores)
            "base": {"output_dir": out, "stream.num_tasks": a.tasks, "budget.total_ft_steps": a.total_ft_steps,
                     "backbone.pretrained": "",
                     "tracking.enabled": False, "ray.cpus_per_worker": 1.0, "ray.max_concurrent_trials": a.slots},
            "space": {"backbone.name": {"grid": ["fomo-tiny-s", "fomo-tiny-m", "fomo-tiny-l"]},
                      "method.name": {"grid": ["zero_shot", "finetune"]}}}


def run(order: str, a: argparse.Namespace, out: str) -> dict:
    import fomo_ray
    from fomo_ray.planning.cost_estimate import makespan_bound

    res = fomo_ray.sweep(spec(order, a, out), progress=False, no_cache=True)  # the second order reruns every trial
    trials = res.trials.copy()
    tune_dir = res.directory / "tune"
    spans = []
    for run_name in trials["run"]:  # start = end - time_total_s of the trial's last result (epoch seconds)
        lines = (tune_dir / run_name / "result.json").read_text().splitlines()
        last = json.loads(lines[-1])
        spans.append((float(last["timestamp"]) - float(last["time_total_s"]), float(last["timestamp"])))
    trials["start"] = [s for s, _ in spans]
    make = max(e for _, e in spans) - min(s for s, _ in spans)
    bound = makespan_bound(list(trials["wall_s"]), a.slots)
    return {"order": order, "makespan": make, "bound": bound, "trials": trials.sort_values("start")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--total-ft-steps", type=int, default=120)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="makespan_") as out:
        runs = [run(order, a, out) for order in ("fifo", "cost")]
    print(f"\nmixed-cost sweep (3 sizes x zero_shot/finetune, T={a.tasks}, {a.total_ft_steps} fine-tuning steps) "
          f"on K = {a.slots} one-CPU slots")
    print("| order | makespan | bound max(total/K, longest) | makespan / bound |")
    print("|---|---|---|---|")
    for r in runs:
        print(f"| {r['order']} | {r['makespan']:.0f} s | {r['bound']:.0f} s | {r['makespan'] / r['bound']:.2f} |")
    print(f"cost-aware / FIFO makespan: {runs[1]['makespan'] / runs[0]['makespan']:.2f}")
    for r in runs:
        print(f"\n{r['order']}: trials in start order (estimate vs actual wall time)")
        print("| trial | est. s | actual s | actual / est. |")
        print("|---|---|---|---|")
        for _, t in r["trials"].iterrows():
            print(f"| {t['run']} | {t['est_s']:.0f} | {t['wall_s']:.0f} | {t['wall_s'] / t['est_s']:.2f} |")


if __name__ == "__main__":
    main()
