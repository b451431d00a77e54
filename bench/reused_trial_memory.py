"""A reused trial process's memory: one sweep of ``--trials`` fine-tuning trials (seeds 0..N-1, 2 tasks x 8 steps,
the main job's evaluation subsets) on one slot (``ray.max_concurrent_trials=1``), so that Tune runs them one after
the other in one process (``ray.reuse_trial_processes``, the default). Each trial's resident memory (RSS) is read in
its process as it starts and as it ends; the table shows whether a process that runs many trials grows.

    python bench/reused_trial_memory.py --data-root data/fifmini [--trials 10] [--output-dir DIR]

The benchmark at ``--data-root`` must exist (``fomo-ray prepare fifmini`` or the main job builds it); tracking is off.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path


def noting_rss(path: str):
    """``tune_sweep.run_trial``, appending ``pid start|end RSS-MiB`` lines to ``path`` around the real trial."""
    def run_trial(config, setup):
        import psutil

        real = importlib.import_module("fomo_ray.engine.tune_sweep").run_trial
        proc = psutil.Process()

        def note(when: str) -> None:
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {when} {proc.memory_info().rss / 2**20:.0f}\n")

        note("start")
        try:
            return real(config, setup)
        finally:
            note("end")
    return run_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--output-dir", default="")
    args = parser.parse_args()
    from ray import cloudpickle

    import fomo_ray
    from fomo_ray.engine import tune_sweep

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="reused_trial_memory_"))
    log = out / "rss.txt"
    out.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the wrapper runs in the trial process
    tune_sweep.run_trial = noting_rss(str(log))
    fomo_ray.sweep({"name": "reused_trial_memory", "space": {"seed": {"grid": list(range(args.trials))}},
                    "base": {"data.root": str(Path(args.data_root).resolve()), "output_dir": str(out),
                             "method.name": "finetune", "stream.num_tasks": 2, "budget.total_ft_steps": 16,
                             "evaluation.subset_fraction": 0.1, "evaluation.subset_min": 100,  # as the main job
                             "tracking.enabled": False, "ray.max_concurrent_trials": 1}},
                   progress=False, no_cache=True)
    rows = [line.split() for line in log.read_text().splitlines()]
    print(f"trial processes: {len({pid for pid, _, _ in rows})}")
    print("trial | RSS at start (MiB) | RSS at end (MiB)")
    for i, (start, end) in enumerate(zip(rows[::2], rows[1::2])):
        print(f"{i:5d} | {start[2]:>18} | {end[2]:>16}")


if __name__ == "__main__":
    main()
