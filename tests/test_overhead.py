"""A trial's fixed costs (issue 28, item 5): timed once on this machine, cached beside the step speeds, added to the
cost estimate (which a sweep budget starts trials on). The timing runs on a fake clock here: the figures are the
clock's, so the arithmetic and the cache are checked exactly."""
from __future__ import annotations

import pytest

from fomo_ray.planning import overhead
from fomo_ray.config import load_config

from _data_util import SCALE, small_fifmini


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        self.now += 0.5  # every reading advances the clock: each timed span is at least one tick
        return self.now


@pytest.fixture(autouse=True)
def no_start_timed_yet(monkeypatch):
    """This process may have timed its start already (any sweep's estimate does): forget it, so the fake clock
    times it."""
    monkeypatch.setattr(overhead, "_STARTS", {})


@pytest.fixture
def cfg(tmp_path, tmp_path_factory):
    bench = small_fifmini(tmp_path_factory)
    return load_config(None, {"data.root": str(bench.root), "data.scale": SCALE, "backbone.pretrained": "",
                              "data.loader": "memory", "budget.cache_dir": str(tmp_path / "budget"),
                              "evaluation.subset_min": 4})


def test_fixed_costs_are_timed_once_and_cached_like_the_step_speed(cfg):
    clock, spawned = FakeClock(), []

    def spawn():  # a process start that takes 6 s of the fake clock
        spawned.append(1)
        clock.now += 6.0

    o = overhead.measured_overhead(cfg, clock=clock, spawn=spawn)
    assert o.start_s == 6.5 and o.build_s == 0.5 and o.checkpoint_s == 0.5
    assert o.decode_s == pytest.approx(0.5 / min(overhead.DECODE_SAMPLES, sum(
        len(r) for r in _eval_rows(cfg).values())))
    assert overhead.overhead_path(cfg, __import__("torch").device("cpu"), 1).is_file()
    again = overhead.measured_overhead(cfg, clock=clock, spawn=spawn)
    assert again == o and spawned == [1]  # read from the cache, not timed again
    other = cfg.replace({"evaluation.batch_size": 32})  # other evaluation settings: timed again, not stored here
    o2 = overhead.measured_overhead(other, clock=clock, spawn=spawn, store=False)
    assert not overhead.overhead_path(other, __import__("torch").device("cpu"), 1).is_file()
    # the process start is a fact of the environment, not of the settings: timed once for both
    assert spawned == [1] and o2.start_s == o.start_s


def test_the_process_start_is_timed_once_per_environment(tmp_path, monkeypatch):
    clock, spawned = FakeClock(), []

    def spawn():
        spawned.append(1)
        clock.now += 3.0

    assert overhead.process_start(tmp_path / "a", clock=clock, spawn=spawn) == 3.5
    assert overhead.process_start(tmp_path / "a", clock=clock, spawn=spawn) == 3.5 and spawned == [1]
    stored = list((tmp_path / "a").glob("start__*.json"))
    assert len(stored) == 1 and '"torch"' in stored[0].read_text()  # says what it was timed with
    overhead._STARTS.clear()  # another process: reads the stored figure
    assert overhead.process_start(tmp_path / "a", clock=clock, spawn=spawn) == 3.5 and spawned == [1]
    assert overhead.process_start(tmp_path / "b", clock=clock, spawn=spawn, store=False) == 3.5
    assert spawned == [1] and not (tmp_path / "b").exists()  # this process's figure, for another cache: not stored
    real = overhead.environment
    monkeypatch.setattr(overhead, "environment", lambda: {**real(), "torch": "0.0-other"})
    assert overhead.process_start(tmp_path / "a", clock=clock, spawn=spawn, store=False) == 3.5
    assert spawned == [1, 1] and len(list((tmp_path / "a").glob("start__*.json"))) == 1  # timed anew
    overhead.process_start(tmp_path / "a", clock=clock, spawn=spawn)
    assert spawned == [1, 1] and len(list((tmp_path / "a").glob("start__*.json"))) == 2  # once; stored when asked


def test_a_trial_without_its_benchmark_has_no_fixed_costs_yet(tmp_path):
    """Nothing is timed before the benchmark is found: a process start costs seconds, and a dry run on a fresh
    machine estimates every trial (the main job's took 65-72 s, 9-10 s without: bench/RESULTS.md)."""
    cfg = load_config(None, {"data.root": str(tmp_path / "none"), "budget.cache_dir": str(tmp_path / "b")})
    spawned = []
    assert overhead.measured_overhead(cfg, spawn=lambda: spawned.append(1)) is None
    assert spawned == []


def test_trial_seconds_and_checkpoints():
    o = overhead.Overhead("b", "cpu", 1, "h", start_s=5.0, build_s=2.0, loader_s=1.0, decode_s=0.01,
                          checkpoint_s=0.5)
    from fomo_ray.planning.cost_estimate import decoded_eval_images

    points = {0: False, 1: True, 2: False}  # the subset at 3 points, the full set once (after point 1's subset)
    loads = [(100, 10), (100, 10), (400, 10), (100, 10)]
    kept = overhead.trial_seconds(o, eval_images=decoded_eval_images(points, loads, subset_kept=True), checkpoints=4,
                                  train_images=1000)
    assert kept == pytest.approx(5 + 2 + 1 + 0.01 * (100 + 400 + 1000) + 0.5 * 4)
    redone = overhead.trial_seconds(o, eval_images=decoded_eval_images(points, loads, subset_kept=False),
                                    checkpoints=4, train_images=0)
    assert redone == pytest.approx(5 + 2 + 1 + 0.01 * 700 + 2)
    same_size = [(100, 10), (100, 10), (100, 10), (100, 10)]  # a full set as large as the subset still counts
    assert decoded_eval_images(points, same_size, subset_kept=True) == 200
    assert overhead.checkpoint_count([10, 10], 0) == 3  # two task ends and the final report
    assert overhead.checkpoint_count([10, 10, 0], 4) == 4 + 2 * 2  # steps 4 and 8 of each task


def test_the_estimate_adds_the_fixed_costs(cfg):
    from fomo_ray.planning import cost_estimate

    run = cfg.replace({"method.name": "finetune", "stream.num_tasks": 2, "budget.total_ft_steps": 4,
                       "budget.mode": "equal_steps", "mixture.batch_size": 8})
    with_fixed = cost_estimate.estimate_trial(run, "ft")
    o = overhead.measured_overhead(run)
    assert with_fixed.fixed_s is not None and with_fixed.fixed_s > o.start_s + o.build_s
    assert cost_estimate.estimate_rows([with_fixed])[0]["est_fixed_s"] == round(with_fixed.fixed_s, 2)


def _eval_rows(cfg):
    from fomo_ray.core.assembly import open_data
    from fomo_ray.models.evaluation import Evaluator

    return Evaluator(open_data(cfg), cfg.evaluation, cfg.seed, 32, (0.5,), (0.5,), backend="memory").rows(False)
