"""A sweep-wide compute budget (issue 28, item 5): ``sweep_budget: {gpu_hours | pflops}`` or ``--max-gpu-hours`` /
``--max-pflops``. The ledger's rules (pure), the board a trial asks, and a real sweep that runs only the trials that
fit, interrupted and resumed without exceeding its budget."""
from __future__ import annotations

import json

import pytest

from fomo_ray.engine import ray_train

from fomo_ray.planning import sweep_budget
from fomo_ray.cli import sweep as sweep_cli
from fomo_ray.config import load_config
from fomo_ray.planning.sweep_budget import Ledger, SweepBudget, SweepBudgetError, parse_sweep_budget
from fomo_ray.planning.sweep_spec import SweepError, spec_from_dict

from _edges_util import REPO


def test_parse_names_the_key_in_one_line():
    assert parse_sweep_budget({"gpu_hours": 40}) == SweepBudget("gpu_hours", 40.0)
    assert parse_sweep_budget(None) is None
    for bad in ({"gpu_hour": 4}, {"gpu_hours": 4, "pflops": 1}, {"pflops": 0}, {"pflops": "many"}, [4]):
        with pytest.raises(SweepBudgetError) as e:
            parse_sweep_budget(bad, "s.yaml")
        assert str(e.value).startswith("s.yaml: sweep_budget") and "\n" not in str(e.value)
    with pytest.raises(SweepError, match="sweep_budget.pflops must be a number > 0"):
        spec_from_dict({"name": "s", "space": {}, "sweep_budget": {"pflops": -1}})


def test_the_ledger_admits_what_fits_and_stops_the_sweep_at_its_limit():
    ledger = Ledger(SweepBudget("pflops", 10.0))
    assert ledger.admit("a", 4.0) == "" and ledger.admit("b", 4.0) == ""
    refused = ledger.admit("c", 4.0)  # 8 committed by the running trials + 4 > 10
    assert refused.startswith("budget: not started") and "10 PFLOPs" in refused and ledger.refused == ["c"]
    assert ledger.admit("a", 4.0) == ""  # a restarted trial was admitted before: it goes on
    assert ledger.admit("zs", 9.0, force=True) == ""  # a reference always runs, and counts
    del ledger.admitted["zs"]
    assert ledger.post("a", "x", 1.0) == "" and ledger.post("a", "x", 0.5) == ""  # a running total: the max counts
    assert ledger.post("a", "y", 1.0) == ""  # a second attempt spends on top of the first
    assert ledger.total() == 2.0 and ledger.committed() == 2.0 + 2.0 + 4.0
    ledger.post("a", "y", 1.0, final=True)  # a ended early (stopped): only what it spent stays committed
    assert ledger.committed() == 2.0 + 4.0 and ledger.admit("c", 4.0) == ""
    assert ledger.post("b", "z", 8.0).startswith("budget: the sweep spent 10 of 10 PFLOPs")
    again = Ledger.restored(SweepBudget("pflops", 20.0), json.loads(json.dumps(ledger.to_dict())))
    assert again.total() == 10.0 and again.admitted == ledger.admitted and again.refused == ["c"]
    assert again.budget.limit == 20.0  # a resumed sweep may raise (or lower) the limit; the spend stays


def test_needs_and_spend_in_each_unit():
    assert sweep_budget.trial_need("pflops", None, 3e6, 1, 0.0) == 3.0
    assert sweep_budget.trial_need("gpu_hours", 1800.0, 0.0, 4, 0.5) == 1.0  # 0.5 h x 4 workers x 0.5 GPU
    assert sweep_budget.trial_need("gpu_hours", 3600.0, 0.0, 2, 0.0) == 2.0  # CPU workers count as devices
    with pytest.raises(SweepBudgetError, match="trial lr3: a gpu_hours budget needs a time estimate"):
        sweep_budget.trial_need("gpu_hours", None, 1.0, 1, 1.0, "lr3")
    assert sweep_budget.attempt_spend("pflops", 6.0, 99.0, 1, 0.0, 1, 3) == 2.0
    assert sweep_budget.attempt_spend("gpu_hours", 6.0, 7200.0, 2, 1.0, 1, 3) == 4.0
    assert sweep_budget.plan_line(SweepBudget("pflops", 5.0), [2.0, 2.0, 2.0]).endswith(
        "(6 for all) fits 2 of 3 trial(s) in start order")


def test_a_trial_in_a_reused_process_counts_its_time_from_when_it_began(monkeypatch):
    """gpu_hours count an attempt from its process start; a later trial in a process Tune reused
    (``ray.reuse_trial_processes``) counts from when it began, not from the earlier trial's start."""
    import psutil

    from fomo_ray.engine import stop_board

    monkeypatch.setattr(stop_board, "_TRIALS_BEGUN", [])
    assert stop_board.attempt()[1] == psutil.Process().create_time()  # a Train worker: no Tune trial began here
    stop_board.trial_began()
    first = stop_board.attempt()
    assert first[1] == psutil.Process().create_time()  # the first trial of a process: its imports are its own
    stop_board.trial_began()
    second = stop_board.attempt()
    assert second[1] == stop_board._TRIALS_BEGUN[-1] > first[1] and second[0] != first[0]


# slow: a dry run of a shipped sweep measures its methods' steps and, where the benchmark is built, times a trial's
# fixed costs (fomo_ray/planning/overhead.py: a fresh interpreter importing Ray, torch and MLflow): 20-40 s in a clone
@pytest.mark.slow
def test_the_flags_set_the_budget_and_the_dry_run_says_what_fits(tmp_path, capsys):
    path = str(REPO / "experiments" / "configs" / "sweep_merge_weights.yaml")
    argv = [path, "--dry-run", f"output_dir={tmp_path / 'runs'}", f"budget.cache_dir={tmp_path / 'budget'}"]
    assert sweep_cli.main(argv + ["--max-pflops", "1e-9"]) == 0
    assert "sweep budget 1e-09 PFLOPs: the estimate" in capsys.readouterr().out
    assert sweep_cli.main(argv + ["--max-pflops", "1", "--max-gpu-hours", "2"]) == 2
    assert "give one sweep budget, not both" in capsys.readouterr().err
    assert sweep_cli.main(argv + ["--max-gpu-hours", "0"]) == 2
    assert "--max-gpu-hours: sweep_budget.gpu_hours must be a number > 0" in capsys.readouterr().err


class _Session:
    rank, world_size = 0, 1

    def report(self, metrics, checkpoint_dir, name):
        pass


@pytest.mark.ray
def test_a_running_trial_stops_at_a_task_boundary_once_the_sweep_spent_its_budget(ray_local):
    import ray

    from fomo_ray.engine import stop_board

    rec = [{"dataset": "D", "role": "adapt", "metric": "top1", "value": 0.5},
           {"dataset": "E", "role": "eval", "metric": "top1", "value": 0.25}]
    board = stop_board.start_budget_board(SweepBudget("gpu_hours", 1e-9), None)
    try:
        cfg = load_config(None, {"stream.num_tasks": 3})

        def bridge(stoppable):
            spend = {"unit": "gpu_hours", "need": 1e-10, "stoppable": stoppable}
            return ray_train._Bridge(ray_train.RunPayload(cfg, f"t{stoppable}", spend=spend), _Session(), "", None)

        going, reference = bridge(True), bridge(False)
        for b in (going, reference):
            b.on_eval(1, rec)  # this process has run for longer than 1e-9 GPU-hours
        assert going.should_stop() and going.stop_reason.startswith("budget: the sweep spent")
        assert not reference.should_stop()  # a reference trial is never stopped by the budget
        snapshot = ray.get(board.snapshot.remote())
        assert set(snapshot["spent"]) == {"tTrue", "tFalse"} and snapshot["spent"]["tTrue"]
    finally:
        ray.kill(board)  # the name is free for the sweep below


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_runs_only_the_trials_its_budget_holds_also_across_a_resume(ray_local, tmp_path, tmp_path_factory):
    from _data_util import small_fifmini, tiny_sweep

    from fomo_ray.engine import tune_sweep
    from fomo_ray.planning.cost_estimate import estimate_plan
    from fomo_ray.planning.sweep_spec import plan_sweep
    from fomo_ray.tracking.writer import Tracker

    bench = small_fifmini(tmp_path_factory)
    raw = {"name": "spend", "base": tiny_sweep(bench.root, tmp_path, **{
        "budget.total_ft_steps": 4, "ray.max_concurrent_trials": 1, "method.name": "finetune"}),
        "space": {"optimizer.lr": {"grid": [1e-5, 1e-4, 1e-3]}}}
    need = estimate_plan(plan_sweep(spec_from_dict(raw)))[0].total_gflops / 1e6  # the same for the three
    spec = spec_from_dict({**raw, "sweep_budget": {"pflops": 2.5 * need}})  # holds two of the three

    first = tune_sweep.run_sweep(spec, stop_after_trials=1)  # interrupted once one trial finished
    assert first.interrupted
    saved = json.loads((first.directory / tune_sweep.SWEEP_STATE_FILE).read_text())["budget"]
    assert Ledger.restored(spec.sweep_budget, saved).total() == pytest.approx(need)

    out = tune_sweep.run_sweep(spec, if_exists="resume")
    status = out.trials.set_index("run")["status"]
    assert sorted(status) == ["finished", "finished", "stopped"], out.trials
    refused = out.trials[out.trials["status"] == "stopped"].iloc[0]
    assert refused["reason"].startswith("budget: not started") and refused["run"] not in set(out.results["run"])
    assert out.budget.startswith("budget: spent ") and out.budget.endswith("; 1 trial(s) not started for it")
    summary = json.loads((out.directory / tune_sweep.SUMMARY_FILE).read_text())
    ledger = Ledger.restored(spec.sweep_budget, summary["budget"])
    assert ledger.total() == pytest.approx(2 * need) and ledger.total() <= spec.sweep_budget.limit
    parent = Tracker(out.tracking_uri, "fomo_ray").client.get_run(out.parent_run_id)
    assert parent.data.metrics["Budget/spent"] == pytest.approx(2 * need, rel=1e-4)
    assert parent.data.metrics["Budget/not_started"] == 1



def test_trials_the_budget_stopped_are_not_early_stoppings_savings():
    import pandas as pd

    from fomo_ray.results.sweep_results import compute_saved

    trials = pd.DataFrame({"status": ["finished", "stopped"], "est_gflops": [10.0, 10.0], "done_gflops": [10.0, 5.0]})
    assert compute_saved(trials) == 0.25  # no reason column: every stop counts
    assert compute_saved(trials.assign(reason=["", "stopped at point 2: ..."])) == 0.25
    assert compute_saved(trials.assign(reason=["", "budget: the sweep spent 1 of 1 PFLOPs"])) is None
