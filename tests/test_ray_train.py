"""Exact resume under Ray Train: a TorchTrainer run whose worker is killed mid-task is restarted by
``ray.train.FailureConfig``, continues from ``ray.train.get_checkpoint()`` and ends with results bitwise identical to
an uninterrupted run of the same loop -- with its MLflow run continued, not duplicated."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from fomo_ray import trial_report

from fomo_ray.core import loop

from fomo_ray.engine import ray_train, scratch
from fomo_ray.core.checkpoint import load_state
from fomo_ray.config import load_config
from fomo_ray.models.metrics import point_summary, tidy_frame
from fomo_ray.provenance import platform_label
from fomo_ray.tracking.tracked_run import TrackedRun
from fomo_ray.tracking.writer import PLATFORM_TAG, TRAIN_KEYS, Tracker, as_percent, default_uri, summary_key

from _data_util import small_fifmini, tiny_sweep
from _edges_util import Fault, register_by_value, train_worker_in_worker

def test_scratch_of_a_dead_process_is_reclaimed_by_the_next_one(tmp_path, monkeypatch):
    """A worker that died hard left its checkpoint scratch behind: the next scratch directory on the node removes
    it, and nothing of a live process, of another host (a temp directory shared between containers) or of another
    program."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    prefix, tag = ray_train.CHECKPOINT_SCRATCH, scratch.owner_tag
    names = [f"{prefix}{tag(dead)}_a1", f"{prefix}{tag(dead)}_b2", f"{prefix}{tag(os.getpid())}_c3", f"{prefix}x_y",
             f"{prefix}{tag(dead)}", f"{prefix}0123abcd-{dead}_e5", f"{prefix}{dead}_f6", f"fomo_model_{tag(dead)}_d4"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "loop_state.pt").write_bytes(b"x")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # it has exited, and stays unreaped until wait()
    names.append(f"{prefix}{tag(zombie.pid)}_z9")
    (tmp_path / names[-1]).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    new = Path(scratch.scratch_dir(prefix))
    assert new.parent == tmp_path and scratch.owner_pid(new.name, prefix) == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new.name, *names[2:-1]])  # the zombie's went too
    zombie.wait()
    assert scratch.owner_pid(f"{prefix}{tag(dead)}_b2", "fomo_model_") is None


def test_pure_helpers():
    rec = [{"dataset": "D", "role": "adapt", "metric": "R@5", "value": 0.5},
           {"dataset": "E", "role": "eval", "metric": "top1", "value": 0.25}]
    full = [{**r, "value": r["value"] / 2, "eval_set": "full"} for r in rec]
    rep = trial_report.eval_report(3, rec + full, {"A_KA": 0.5, "A_ZS": 0.25, "GM": 0.35}, {"GM": 0.2})
    assert rep["kind"] == "eval" and rep["point"] == 3 and rep["ds/adapt/D/R@5"] == 0.5
    assert (rep["full/adapt/D/R@5"], rep["full_GM"]) == (0.25, 0.2)  # the full sets under their own names
    back = trial_report.records_from_report({**rep, "ds/eval/X/top1": float("nan")})  # NaN fill-ins dropped
    assert back == [{**r, "eval_set": "subset"} for r in rec] + full
    assert point_summary(back) == pytest.approx({"A_KA": 0.5, "A_ZS": 0.25, "GM": 0.25 ** 0.5 * 0.5 ** 0.5})
    assert point_summary(back, "full") == pytest.approx({"A_KA": 0.25, "A_ZS": 0.125, "GM": 0.125 ** 0.5 * 0.25 ** 0.5})
    assert point_summary(rec, "full") == {}
    assert ray_train.checkpoint_name(2, 40) == "cursor_t002_s0000040"
    cfg = load_config(None, {"ray.num_workers": 4, "ray.min_workers": 2, "ray.gpus_per_worker": 1.0})
    sc = ray_train.scaling_config(cfg)
    assert sc.num_workers == (2, 4) and sc.use_gpu and sc.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert ray_train.scaling_config(load_config()).num_workers == 1


class _Session:
    rank, world_size = 0, 1

    def __init__(self):
        self.reports = []

    def get_checkpoint(self):
        return None

    def report(self, metrics, checkpoint_dir, name):
        self.reports.append(metrics)


def test_a_resumed_run_logs_no_point_or_step_twice(tmp_path):
    """A run resumed from a checkpoint older than its last logged point (its node died after the point was logged,
    before the next checkpoint was registered) repeats that point and those steps: MLflow, which appends, gets each
    once; the host still hears every report."""
    tr = Tracker(default_uri(tmp_path), "resume")
    run = tr.start_child(None, "t", {})
    rec = [{"dataset": "D", "role": "adapt", "metric": "top1", "value": 0.5},
           {"dataset": "E", "role": "eval", "metric": "top1", "value": 0.25}]
    payload = ray_train.RunPayload(load_config(None, {"tracking.log_every_n_steps": 2}), "t", "x", run)

    def attempt(points, steps):
        session = _Session()
        tracked = TrackedRun(tr, run, payload.cfg, steps=True)  # what rank 0 attaches (TrackedRun.attach)
        bridge = ray_train._Bridge(payload, session, run, tracked)
        for g in steps:
            tracked.on_step(0, g, 1.0 / (g + 1), 1e-3, 1.0, g)
        for point in points:
            bridge.on_eval(point, rec)
        bridge.flush_steps()
        return len(session.reports)

    assert attempt([0, 1], range(5)) == 2
    assert attempt([1, 2], range(3, 8)) == 2  # restarted from step 3 of task 0: steps 3-4 and point 1 again
    assert [s for s, _ in tr.metric_history(run, summary_key("GM"))] == [0, 1, 2]
    assert [s for s, _ in tr.metric_history(run, TRAIN_KEYS[0])] == list(range(8))


def _cfg(bench_root, out):
    """Tiniest real run: random-init fomo-tiny-s, 2 tasks x 4 steps of EMA-merge (merge history must survive the
    restart), a mid-task checkpoint every 2 steps, real FFCV loaders on a small FiF-mini."""
    return load_config(None, tiny_sweep(bench_root, out, **{
        "method.name": "ema_merge", "ray.checkpoint_every_steps": 2, "ray.max_failures": 2,
        "budget.mode": "equal_steps"}))


@pytest.mark.ray
@pytest.mark.slow
def test_worker_killed_mid_task_resumes_exactly(ray_local, tmp_path, tmp_path_factory, monkeypatch):
    bench = small_fifmini(tmp_path_factory)
    cfg = _cfg(bench.root, tmp_path)
    # the uninterrupted reference, in this process, with the worker's thread count (same float reduction order)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = loop.run_stream(cfg)
    finally:
        torch.set_num_threads(threads)

    tracker = Tracker(default_uri(tmp_path), "exact")
    run_id = tracker.start_child(None, "exact-resume", cfg.flat())
    marker = tmp_path / "killed.txt"
    # the worker dies 8 s after step 3 of the 2nd task, i.e. after the mid-task checkpoint at (task 1, step 2) was
    # registered: checkpoints are written and persisted by Ray's upload thread while training goes on, and Ray Train
    # commits one report per 2 s poll, so the reports queued before it (point 1, the task-end state) go first; the
    # fault reaches the workers through a test-only wrapper
    register_by_value()
    fault = Fault(task=1, step=3, marker=str(marker), delay_s=8.0)
    monkeypatch.setattr(ray_train, "train_worker", train_worker_in_worker(fault=fault))
    payload = ray_train.RunPayload(cfg=cfg, run_name="exact-resume", tracking_uri=tracker.uri, mlflow_run_id=run_id,
                                   storage_uri=str(tmp_path / "train"), keep_uploads=True)
    t0 = time.time()
    outcome = ray_train.fit_train_run(payload, name="exact-resume", storage_path=str(tmp_path / "train"))
    wall = time.time() - t0
    assert marker.is_file(), "the fault was never injected"
    assert outcome.metrics["kind"] == "done"
    killed = re.search(r"pid (\d+)", marker.read_text()).group(1)  # its task-end state went with it, not onto disk
    assert not list(Path(tempfile.gettempdir()).glob(f"{ray_train.CHECKPOINT_SCRATCH}{scratch.owner_tag(killed)}_*"))

    final = load_state(outcome.checkpoint)
    assert (final.task, final.step) == (cfg.stream.num_tasks, 0)
    resumed = tidy_frame(final.results)
    pd.testing.assert_frame_equal(resumed, reference, check_exact=True)  # bitwise, every dataset and point

    run = tracker.client.get_run(run_id)
    # the restarted worker continued the same MLflow run from the mid-task checkpoint taken before the kill
    assert run.data.tags[ray_train.RESUMED_TAG] == "cursor_t001_s0000002"
    assert len(tracker.client.search_runs([tracker.experiment_id])) == 1
    gm = dict(tracker.metric_history(run_id, summary_key("GM")))  # MLflow holds percent
    assert sorted(gm) == [0, 1, 2]
    from fomo_ray.models.metrics import summarize

    ref_gm = {t: as_percent(v) for t, v in summarize(reference).set_index("point")["GM"].items()}
    assert gm == pytest.approx(ref_gm, abs=0, rel=0)
    # every training step once: flushed at each checkpoint, so the steps replayed after the kill were never sent
    assert [s for s, _ in tracker.metric_history(run_id, TRAIN_KEYS[0])] == list(range(8))
    assert [f.path for f in tracker.client.list_artifacts(run_id, "checkpoints/final")] == \
        ["checkpoints/final/config.json", "checkpoints/final/fomo_ray_run.json",
         "checkpoints/final/fomo_ray_status.json", "checkpoints/final/loop_state.pt"]
    # the deployed model beside it, in open_clip's format (fomo_ray/results/export.py)
    assert "model/open_clip_pytorch_model.bin" in {f.path for f in tracker.client.list_artifacts(run_id, "model")}
    print(f"exact resume through a worker kill: {wall:.1f} s; resumed from {run.data.tags[ray_train.RESUMED_TAG]}")


@pytest.mark.ray
@pytest.mark.slow
def test_two_ddp_workers_run_one_run(ray_local, tmp_path, tmp_path_factory):
    """num_workers=2: two CPU workers (gloo) train one run data-parallel; every rank reports, rank 0 alone logs to
    MLflow (no duplicated metrics), and the results agree with one process (same global batches; only the order of
    floating-point sums differs, so accuracies may move by a sample or two)."""
    bench = small_fifmini(tmp_path_factory)
    single = _cfg(bench.root, tmp_path).replace({"ray.checkpoint_every_steps": 0, "stream.num_tasks": 2})
    cfg = single.replace({"ray.num_workers": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = loop.run_stream(single)
    finally:
        torch.set_num_threads(threads)
    tracker = Tracker(default_uri(tmp_path), "ddp")
    run_id = tracker.start_child(None, "ddp", cfg.flat())
    payload = ray_train.RunPayload(cfg=cfg, run_name="ddp", tracking_uri=tracker.uri, mlflow_run_id=run_id,
                                   storage_uri=str(tmp_path / "train"))
    t0 = time.time()
    tracker.set_tags(run_id, {PLATFORM_TAG: "the opener's"})  # rank 0 tags where the training computes
    outcome = ray_train.fit_train_run(payload, name="ddp", storage_path=str(tmp_path / "train"))
    wall = time.time() - t0
    run = tracker.client.get_run(run_id)
    assert run.data.tags[ray_train.WORLD_TAG] == "2" and run.data.tags[PLATFORM_TAG] == platform_label()
    assert run.data.tags["fomo_ray.quick_gelu"] == "false"  # the tiny base: GELU, as it was trained
    assert [s for s, _ in tracker.metric_history(run_id, summary_key("GM"))] == [0, 1, 2]  # one writer, not two
    loss_steps = [s for s, _ in tracker.metric_history(run_id, TRAIN_KEYS[0])]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps  # the training signal, from rank 0 alone
    ddp = tidy_frame(load_state(outcome.checkpoint).results)
    # MLflow points at the final checkpoint Ray persisted (written by rank 0's upload thread, off the training loop)
    assert run.data.tags[ray_train.FINAL_CHECKPOINT_TAG] == outcome.checkpoint
    assert ray_train.UPLOAD_PENDING_TAG not in run.data.tags
    assert (ddp["value"] - reference["value"]).abs().max() <= 0.05
    assert ddp[ddp["point"] == 0]["value"].tolist() == reference[reference["point"] == 0]["value"].tolist()
    print(f"2-worker DDP TorchTrainer run: {wall:.1f} s; max |diff| vs one process "
          f"{(ddp['value'] - reference['value']).abs().max():.4f}")
