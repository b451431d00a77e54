"""Trials Ray loses to the infrastructure (issue: a node out of memory crashed the sweep): a worker killed by Ray's
memory monitor, a dead node or process is a retryable loss, never the trial's failure; once ``ray.max_failures``
retries are spent the sweep ends *interrupted* (exit 3) with its resume command and no traceback. The real memory
monitor does the killing here: a sweep started with a kill threshold below what the machine already uses."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from fomo_ray.results.sweep_results import infrastructure_reason
from fomo_ray.engine.tune_callbacks import restoring

from _data_util import budget_cache, small_fifmini

OOM_TEXT = """Failure # 1 (occurred at 2026-12-05_17-45-25)
2 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2) was 1.99GB used
OOM kill reason: Memory usage 2137731072B exceeded threshold of 1263809792B (5.0% of 25276194816B limit)
Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/en/latest/..."""


def test_infrastructure_losses_are_told_from_the_trials_own_errors():
    import ray.exceptions

    lost = infrastructure_reason(OOM_TEXT)
    assert lost.startswith("killed by Ray's memory monitor") and "exceeded threshold of 1263809792B" in lost
    assert infrastructure_reason(lost) == lost  # a printed reason reads the same
    try:  # what Tune's actor manager raised when the monitor killed a trial actor while it started
        try:
            raise ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")
        except Exception as e:
            raise RuntimeError(f"Caught unexpected exception: {e}") from e
    except RuntimeError as wrapped:
        assert infrastructure_reason(wrapped).startswith("killed by Ray's memory monitor")
    assert infrastructure_reason(ray.exceptions.NodeDiedError("node 1 died")) == "its node died"
    assert infrastructure_reason(ValueError("config key 'x'")) == ""
    assert infrastructure_reason("RuntimeError: CUDA error: device-side assert triggered") == ""


def test_a_sweep_ray_fails_under_is_restored_then_ends_interrupted(capsys):
    import ray.exceptions

    calls = []

    def fit(resume):
        calls.append(resume)
        if len(calls) == 1:
            raise RuntimeError("Caught unexpected exception") from ray.exceptions.OutOfMemoryError("low on memory")
        return "grid"

    assert restoring(fit, False, 3, "s") == "grid" and calls == [False, True]  # the second call restores
    assert "sweep s: Ray failed (killed by Ray's memory monitor" in capsys.readouterr().out

    def always(resume):
        raise ray.exceptions.NodeDiedError("node 1 died")

    assert restoring(always, False, 2, "s") == []  # an empty grid: the sweep prints its resume command
    assert "gave up after 2 tries" in capsys.readouterr().out

    def own(resume):
        raise ValueError("the trial's own error")

    with pytest.raises(ValueError):
        restoring(own, False, 3, "s")


@pytest.mark.ray
@pytest.mark.slow
def test_trials_the_memory_monitor_kills_end_the_sweep_interrupted_and_resumable(tmp_path, tmp_path_factory):
    bench = small_fifmini(tmp_path_factory)
    base = {"data.root": str(bench.root), "data.prepare_if_missing": False, "data.loader": "memory",
            "backbone.pretrained": "", "stream.num_tasks": 2, "budget.mode": "equal_steps",
            "budget.total_ft_steps": 2, "budget.cache_dir": budget_cache(bench.root), "mixture.batch_size": 8,
            "evaluation.subset_min": 2, "evaluation.subset_fraction": 0.01, "evaluation.full_at_ends": False,
            "ray.max_failures": 1, "ray.cpus_per_worker": 1.0}
    spec = tmp_path / "oom.yaml"
    spec.write_text(yaml.safe_dump({"name": "oom", "base": base, "space": {"variant": {"points": {
        "ft": {"method.name": "finetune"}, "ema": {"method.name": "ema_merge"}}}}}))
    # a kill threshold (1% of the machine's memory) below what Ray's own processes use: every trial worker is killed
    env = {**os.environ, "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100",
           "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "fomo_ray.cli", "sweep", str(spec), "--output-dir",
                           str(tmp_path / "out"), "--no-mlflow"], env=env, capture_output=True, text=True,
                          timeout=600)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 3, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert re.search(r"retry  00\d-\w+  killed by Ray's memory monitor", said), said[-3000:]
    assert re.search(r"LOST   00\d-\w+  killed by Ray's memory monitor", said), said[-3000:]
    assert "interrupted: 0 finished, 0 failed, 2 interrupted. Resume it with: python -m fomo_ray.cli sweep " in said
    assert "--name oom --resume" in said
    trials = pd.read_csv(tmp_path / "out" / "sweeps" / "oom" / "trials.csv")
    assert sorted(trials["run"]) == ["000-ema", "001-ft"] and set(trials["status"]) == {"interrupted"}
    assert trials["reason"].str.startswith("killed by Ray's memory monitor").all()
