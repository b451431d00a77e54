"""Recheck: does a Tune scheduler stopping TorchTrainer trials leak the workers' placement groups on this Ray?
(issue 15; the reason fomo_ray stops trials cooperatively, through the loop's ``should_stop`` hook).

Two sweeps of N trials, each trial a Tune function that drives a one-worker ``TorchTrainer`` (as fomo_ray's
multi-worker trials do) whose worker reports every 0.3 s for up to 40 reports:

- ``scheduler``: Tune stops each trial after 3 results (``RunConfig(stop=...)``: the trial's actor is killed, the way
  ASHA or the median rule stop trials);
- ``cooperative``: the worker itself returns after 3 reports (what fomo_ray's stopping rule does).

After each sweep it waits up to ``--settle`` seconds for Ray to clean up and prints the placement groups that are
still CREATED/PENDING and the CPUs not given back. Usage::

    python bench/pg_leak.py [--trials 3] [--settle 30]
"""
from __future__ import annotations

import argparse
import tempfile
import time


def worker_loop(config: dict) -> None:
    import ray.train

    for i in range(config["reports"]):
        time.sleep(0.3)
        ray.train.report({"step": i})


def trial(config: dict) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(worker_loop, train_loop_config={"reports": config["reports"]},
                           scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=ray.train.RunConfig(name=f"t{config['i']}_{config['mode']}",
                                                          storage_path=config["storage"],
                                                          callbacks=[TuneReportCallback()]))
    trainer.fit()


def live_groups() -> list[str]:
    from ray.util import placement_group_table

    return [f"{pg_id[:8]} {info['state']} {info.get('bundles')}" for pg_id, info in placement_group_table().items()
            if info["state"] in ("CREATED", "PENDING", "RESCHEDULING")]


def sweep(mode: str, a: argparse.Namespace, storage: str) -> tuple[list[str], float]:
    import ray
    from ray import tune

    reports = 40 if mode == "scheduler" else 3
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0.01}),
        param_space={"i": tune.grid_search(list(range(a.trials))), "mode": mode, "reports": reports,
                     "storage": storage},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name=mode, storage_path=storage, verbose=0,
                                  stop={"training_iteration": 3} if mode == "scheduler" else None))
    tuner.fit()
    deadline = time.time() + a.settle
    while time.time() < deadline and (live_groups() or ray.available_resources().get("CPU", 0) < 2.0):
        time.sleep(1.0)
    return live_groups(), 2.0 - ray.available_resources().get("CPU", 0.0)


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--settle", type=float, default=30.0)
    a = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray {ray.__version__}")
    with tempfile.TemporaryDirectory(prefix="pg_leak_") as storage:
        for mode in ("cooperative", "scheduler"):
            groups, cpus = sweep(mode, a, storage)
            print(f"{mode}: {len(groups)} placement group(s) still alive {a.settle:.0f} s after the sweep, "
                  f"{cpus:.2f} CPU not given back" + "".join(f"\n  {g}" for g in groups))
    ray.shutdown()


if __name__ == "__main__":
    main()
