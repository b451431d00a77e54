"""Sweep cost estimates and the start order (issue 15): the pure scheduling math, a real trial's estimate against the
budget's own records and the evaluator's workload, a declared device, the printed table and the CLI flags."""
from __future__ import annotations

import pytest

from fomo_ray.budgets import budget
from fomo_ray.cli import sweep as sweep_cli
from fomo_ray.config import load_config
from fomo_ray.planning.cost_estimate import (DeclaredDevice, EstimateError, TrialCost, estimate_trial, eval_gflops,
                                             format_estimate, forward_gflops, lpt_order, makespan, makespan_bound)

from _edges_util import REPO


# --------------------------------------------------------------------------------------------------- pure math
def test_longest_first_reaches_the_bound_where_fifo_does_not():
    durations = [1.0, 1.0, 1.0, 1.0, 4.0]  # four short trials first in the grid, the long one last
    assert makespan(durations, 2) == 6.0                         # FIFO: the long trial starts at 2 and runs alone
    assert lpt_order(durations) == [4, 0, 1, 2, 3]               # ties keep the grid's order
    assert makespan(durations, 2, lpt_order(durations)) == 4.0
    assert makespan_bound(durations, 2) == 4.0                   # max(8 / 2, 4)
    assert makespan_bound([3.0, 3.0, 3.0], 2) == 4.5             # max(9 / 2, 3): no order reaches it here
    assert makespan([3.0, 3.0, 3.0], 2) == 6.0
    with pytest.raises(EstimateError, match="slots must be >= 1"):
        makespan(durations, 0)


def test_declared_device_and_its_checks():
    h100 = DeclaredDevice(989.0, 0.4)
    # the paper-scale trial: 28,400 steps x 123.8 GFLOP/sample x 512 samples at 40% of 989 TFLOP/s
    assert h100.seconds(28_400 * 123.8 * 512) / 3600 == pytest.approx(1.26, abs=0.01)
    with pytest.raises(EstimateError, match="--mfu must be in"):
        DeclaredDevice(989.0, 1.5)
    with pytest.raises(EstimateError, match="--device-tflops must be > 0"):
        DeclaredDevice(0.0, 0.4)


def test_the_table_lists_trials_in_start_order_with_totals_and_the_bound():
    costs = [TrialCost("short", "s", "finetune", 4, 40, 100.0, 10.0, 60.0),
             TrialCost("long", "l", "finetune", 4, 40, 900.0, 90.0, 600.0),
             TrialCost("new-data", "s", "finetune", 4, 40, 100.0, None, None)]
    text = format_estimate(costs[:2], 2, "timed")
    assert text.index("long") < text.index("short")
    assert "est. sweep wall time 10.0 min (bound max(total/K, longest) = 10.0 min)" in text
    assert "longest first" in text and "FIFO" in format_estimate(costs[:2], 2, "timed", order="fifo")
    unknown = format_estimate(costs, 2, "timed")
    assert "eval ?: the benchmark is not built yet" in unknown and "time ?: no throughput" in unknown


# --------------------------------------------------------------------------------------------------- real trials
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from _data_util import small_fifmini, tiny_sweep

    bench = small_fifmini(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("estimate")
    return load_config(None, tiny_sweep(bench.root, tmp, **{"stream.num_tasks": 3,
                                                             "budget.total_ft_steps": 9})).resolved()


def test_a_trials_estimate_is_the_budgets_steps_and_the_evaluators_workload(tiny):
    from fomo_ray.core.assembly import open_data
    from fomo_ray.models.evaluation import Evaluator

    cost = estimate_trial(tiny, "ft")
    record = budget.method_record(tiny, "finetune", device="cpu")
    assert (cost.tasks, cost.steps) == (3, 9)
    assert cost.train_gflops == pytest.approx(9 * record.step_gflops)
    ev = Evaluator(open_data(tiny), tiny.evaluation, tiny.seed, 32, (0.0,), (1.0,), backend="memory")
    # every point on the subsets, points 0 and 3 on the full test sets as well
    loads = [ev.workload(False)] * 4 + [ev.workload(True)] * 2
    assert cost.eval_gflops == pytest.approx(eval_gflops(loads, *forward_gflops("fomo-tiny-s")))
    assert cost.seconds > 0

    joint = estimate_trial(tiny.replace({"method.name": "joint"}), "joint")
    assert (joint.tasks, joint.steps) == (1, 9) and joint.train_gflops == pytest.approx(cost.train_gflops)
    zs = estimate_trial(tiny.replace({"method.name": "zero_shot"}), "zs")
    assert (zs.steps, zs.train_gflops, zs.eval_gflops) == (0, 0.0, cost.eval_gflops)
    ewc_cfg = tiny.replace({"method.name": "ewc", "budget.mode": "maf", "budget.total_ft_steps": 60})
    ewc = estimate_trial(ewc_cfg, "ewc")  # its Fisher pass is charged per task, beside its steps
    ewc_record = budget.method_record(ewc_cfg, "ewc", device="cpu")
    assert ewc.train_gflops == pytest.approx(ewc.steps * ewc_record.step_gflops + 3 * ewc_record.task_gflops)
    assert ewc.steps == 3 * budget.steps_per_task(ewc_cfg, "ewc", 3, device="cpu")

    declared = estimate_trial(tiny, "ft", device=DeclaredDevice(10.0, 0.5))
    assert declared.seconds == pytest.approx(cost.total_gflops / 5e3)
    two = estimate_trial(tiny.replace({"ray.num_workers": 2}), "ft", device=DeclaredDevice(10.0, 0.5))
    assert two.seconds == pytest.approx(declared.seconds / 2)  # ideal data-parallel scaling


def test_a_gpu_trial_estimated_without_a_gpu_has_no_time_unless_declared(tiny, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = tiny.replace({"ray.gpus_per_worker": 1.0})
    assert estimate_trial(gpu, "gpu").seconds is None
    assert estimate_trial(gpu, "gpu", device=DeclaredDevice(989.0, 0.4)).seconds > 0


def test_cli_estimate_flags(capsys, tmp_path):
    path = str(REPO / "experiments" / "configs" / "sweep_lr_schedules.yaml")
    common = [path, "--dry-run", "--no-mlflow", f"budget.cache_dir={tmp_path / 'cache'}", "stream.num_tasks=2"]
    assert sweep_cli.main([*common, "--device-tflops", "989"]) == 2
    assert "--device-tflops and --mfu go together" in capsys.readouterr().err
    assert sweep_cli.main([*common, "--device-tflops", "989", "--mfu", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "cost estimate (declared device: 989 TFLOP/s x 0.4 MFU" in out and "total " in out
    assert not (tmp_path / "cache").exists()  # a dry run measures what it needs and writes nothing


def test_reference_trials_keep_their_estimate_in_the_trials_table():
    """A reference trial of a space with several keys (its table row fills method.name from its bundle) is matched to
    its own estimate, beside its wall time."""
    import pandas as pd

    from fomo_ray.results.sweep_results import with_estimates
    from fomo_ray.planning.sweep_spec import plan_sweep, spec_from_dict

    plan = plan_sweep(spec_from_dict({"name": "s", "references": ["zero_shot", "joint"], "space": {
        "stream.ordering": {"grid": ["random", "dataset_incremental"]}, "method.name": {"grid": ["finetune"]}}}))
    costs = [TrialCost(label=label, backbone="b", method="m", tasks=1, steps=1, train_gflops=1.0, eval_gflops=1.0,
                       seconds=s) for label, s in (("ordering=random,method=finetune", 60.0), ("zero_shot", 20.0),
                                                   ("joint", 58.0))]
    trials = pd.DataFrame([
        {"run": "000-r", "status": "finished", "reference": None, "stream.ordering": "random",
         "method.name": "finetune"},
        {"run": "004-joint", "status": "finished", "reference": "joint", "stream.ordering": None,
         "method.name": "joint"},
        {"run": "005-zero_shot", "status": "finished", "reference": "zero_shot", "stream.ordering": None,
         "method.name": "zero_shot"}])
    assert with_estimates(trials, costs, plan)["est_s"].tolist() == [60.0, 58.0, 20.0]
