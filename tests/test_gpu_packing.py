"""Fractional-GPU packing without a GPU (issue 7, item 3): Ray schedules *logical* resources, so a local Ray with
num_gpus=4 on this CPU machine must run 8 trials at 0.5 GPU each as 8 concurrent placements -- the scheduling the
GPU clusters rely on, exercised through the sweep engine's own trial resources (``ray.gpus_per_worker``)."""
from __future__ import annotations

import collections
import json
import time

import pytest

from fomo_ray.engine import tune_sweep as sweep
from fomo_ray.planning.sweep_spec import spec_from_dict

from _edges_util import Placement, register_by_value, trial_in_worker

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_4_logical_gpus(monkeypatch):
    import ray

    from fomo_ray.core.assembly import LOGICAL_GPUS

    monkeypatch.setenv(LOGICAL_GPUS, "1")  # before ray.init: its workers inherit it (no CUDA here, on purpose)
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, object_store_memory=150 * 2**20)
    yield
    ray.shutdown()


def test_eight_half_gpu_trials_pack_onto_four_gpus(ray_4_logical_gpus, tmp_path, monkeypatch):
    register_by_value()
    monkeypatch.setattr(sweep, "run_trial", trial_in_worker(Placement))  # trials run Placement instead of the loop
    monkeypatch.setattr(sweep, "ensure_sweep_inputs", lambda base, space: None)  # Placement reads no inputs
    spec = spec_from_dict({
        "name": "packing",
        "base": {"output_dir": str(tmp_path), "tracking.enabled": False, "stream.num_tasks": 1,
                 "ray.gpus_per_worker": 0.5, "ray.cpus_per_worker": 0.25},
        "space": {"seed": {"grid": list(range(8))}}})
    t0 = time.time()
    out = sweep.run_sweep(spec, progress=False)
    wall = time.time() - t0
    placed = [json.loads(p.read_text()) for p in (tmp_path / "placements").glob("*.done")]
    assert len(placed) == 8 and len({p["pid"] for p in placed}) == 8
    # all eight were running at the same moment (each waited until it saw the other seven)
    assert [p["concurrent"] for p in placed] == [8] * 8
    for p in placed:
        assert p["resources"] == {"GPU": 0.5, "CPU": 0.25}
        assert len(p["gpu_ids"]) == 1 and p["cuda_visible_devices"] == str(p["gpu_ids"][0])
    # two trials share each of the four logical GPUs
    assert collections.Counter(int(p["gpu_ids"][0]) for p in placed) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert sorted(out.results["run"]) == sorted(out.trials["run"]) and len(out.trials) == 8
    assert (out.trials["status"] == "finished").all()
    print(f"8 x 0.5-GPU trials placed concurrently on 4 logical GPUs in {wall:.1f} s")
