"""Issue 27, items 3-5: a GPU asked for is a GPU used (or the trial is refused before any step, naming the torch
build and the driver); checkpoints leave the critical path (rank != 0 holds no snapshot, writes happen in the
background, a failed MLflow upload after training is recorded and retried, never fails the run); no host sync per
step (finiteness read every ``tracking.log_every_n_steps`` steps, the training signal written off the training
thread). No Ray here: the trial body (``ray_train.continual_run``) runs with a stand-in session."""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from fomo_ray import trial_report

from fomo_ray.core import assembly, checkpoint, loop

from fomo_ray.engine import ray_train
from fomo_ray.config import load_config
from fomo_ray.core.loop import RunHooks, TrainingDiverged, run_stream
from fomo_ray.methods import REGISTRY
from fomo_ray.methods.finetune import FineTune

from _data_util import SCALE, small_fifmini, tiny_config

STEPS = 12  # one task of 12 steps (long enough for several finiteness reads between logging steps)


@pytest.fixture
def cfg_of(tmp_path, tmp_path_factory):
    bench = small_fifmini(tmp_path_factory)

    def make(**overrides):
        return tiny_config(bench.root, tmp_path, **{"data.scale": SCALE, "stream.num_tasks": 1,
                                                    "budget.total_ft_steps": STEPS, "data.num_workers": 1, **overrides})
    return make


# --------------------------------------------------------------------------------------------------- item 3: GPUs
NVIDIA_SMI = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+"""


class _Ran:
    def __init__(self, stdout="", error=None):
        self.stdout, self.error = stdout, error

    def __call__(self, *args, **kwargs):
        if self.error:
            raise self.error
        return self


def test_driver_is_read_without_cuda(tmp_path):
    assert assembly.nvidia_driver(_Ran(NVIDIA_SMI)) == \
        "NVIDIA driver 550.54.15 (supports CUDA up to 12.4) per nvidia-smi"
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
                    "GCC version:  gcc version 12.3.0\n")
    assert assembly.nvidia_driver(_Ran(error=FileNotFoundError("nvidia-smi")), str(proc)) == \
        f"NVIDIA kernel module 535.183.01 per {proc}"
    assert assembly.nvidia_driver(_Ran(error=FileNotFoundError()), str(tmp_path / "none")).startswith(
        "no NVIDIA driver found")


def test_a_gpu_asked_for_without_cuda_is_refused_naming_torch_and_driver(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert assembly.gpu_problem(0) == ""  # a CPU trial: nothing to check
    problem = assembly.gpu_problem(1.0, driver=lambda: "NVIDIA driver 550.54.15 (supports CUDA up to 12.4)")
    assert f"torch {torch.__version__}" in problem and "550.54.15" in problem
    assert (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build") in problem
    assert problem.startswith("ray.gpus_per_worker = 1 asks for a GPU, but CUDA is not available")
    with pytest.raises(assembly.DeviceUnavailable, match="asks for a GPU") as err:
        assembly.check_gpu(0.5)
    assert isinstance(err.value, ValueError)  # a sweep's function trial records it as deterministic, no retry
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert assembly.gpu_problem(1.0) == ""


class FakeSession:
    """``ray_train.Session`` without Ray: reports are kept; a checkpoint directory is "persisted" by copying."""
    rank, world_size = 0, 1

    def __init__(self, storage: Path):
        self.storage, self.reports, self.latest = storage, [], None

    def get_checkpoint(self):
        return self.latest

    def report(self, metrics, checkpoint_dir, name):
        self.reports.append((dict(metrics), name, sorted(p.name for p in Path(checkpoint_dir).iterdir())
                             if checkpoint_dir else None))
        if checkpoint_dir:
            dst = self.storage / name
            shutil.copytree(checkpoint_dir, dst, dirs_exist_ok=True)
            self.latest = _Persisted(str(dst))


class _Persisted:
    filesystem = None

    def __init__(self, path):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def test_gpu_trial_on_a_cpu_only_process_fails_before_any_step(cfg_of, tmp_path, monkeypatch):
    """The trial body itself (what a Ray Train worker and a Tune function trial run) ends with one ``failed``
    report naming the torch build: before the inputs, before any step, and with a final checkpoint that makes a
    relaunch replay the failure instead of retrying it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_step(*a, **k):
        raise AssertionError("the loop ran although no GPU was usable")

    monkeypatch.setattr(loop, "run_stream", no_step)
    monkeypatch.setattr(ray_train, "prepare_inputs_rank_zero_first", no_step)
    session = FakeSession(tmp_path / "storage")
    payload = ray_train.RunPayload(cfg=cfg_of(**{"ray.gpus_per_worker": 1.0}), run_name="gpu")
    final = ray_train.continual_run(payload, session)
    assert trial_report.is_kind(final, trial_report.ReportKind.FAILED)
    assert final["reason"].startswith("DeviceUnavailable: ray.gpus_per_worker = 1 asks for a GPU")
    assert f"torch {torch.__version__}" in final["reason"]
    [(metrics, name, files)] = session.reports
    assert name == "final_failed" and ray_train.STATUS_FILE in files
    # a relaunch (same storage) sees the ended run and replays it: deterministic, nothing retried
    again = ray_train.continual_run(payload, session)
    assert again == final and len(session.reports) == 1


# --------------------------------------------------------------------------------------------------- item 4
def test_only_rank_zero_snapshots(cfg_of, monkeypatch):
    """A rank other than 0 gets a marker with the same cursor at every checkpoint and never copies the state."""
    cfg = cfg_of(**{"ray.checkpoint_every_steps": 5})
    rank0 = []
    run_stream(cfg, hooks=RunHooks(on_checkpoint=rank0.append))
    assert all(isinstance(s, checkpoint.LoopState) for s in rank0)
    monkeypatch.setattr(checkpoint, "snapshots_here", lambda: False)

    def no_snapshot(*a, **k):
        raise AssertionError("a rank other than 0 took a snapshot")

    monkeypatch.setattr(checkpoint, "snapshot", no_snapshot)
    other = []
    run_stream(cfg, hooks=RunHooks(on_checkpoint=other.append))
    assert all(isinstance(s, checkpoint.CheckpointMarker) for s in other)
    assert [(s.task, s.step) for s in other] == [(s.task, s.step) for s in rank0] == [(0, 5), (0, 10), (1, 0)]
    assert [ray_train.checkpoint_position(s) for s in other] == [ray_train.checkpoint_position(s) for s in rank0]


def test_background_writes_never_overlap_the_next_snapshot(tmp_path):
    """The writer thread writes a run's states in order; the next snapshot (wait_for_write) waits for the previous
    write and raises its error on the training thread."""
    gate, seen = threading.Event(), []

    def slow():
        gate.wait(5)
        seen.append(threading.current_thread().name)

    checkpoint.write_in_background("r", slow)
    waiter = threading.Thread(target=checkpoint.wait_for_write, args=("r",))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not seen  # still waiting for the write
    gate.set()
    waiter.join(5)
    assert seen and seen[0].startswith("fomo_ray-checkpoint")
    checkpoint.write_in_background("r", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        checkpoint.wait_for_write("r")
    checkpoint.wait_for_write("r")  # raised once, then forgotten


def test_final_uploads_policy():
    cfg = load_config(None, {})
    shared = cfg.replace({"ray.storage_path": "/mnt/shared/fomo_ray"})
    P = ray_train.RunPayload
    # a pointer instead of a copy, on shared storage and on the driver's own disk alike
    assert ray_train.final_uploads(P(cfg=cfg, run_name="a")) == ["model"]
    assert ray_train.final_uploads(P(cfg=shared, run_name="a")) == ["model"]
    assert ray_train.final_uploads(P(cfg=shared, run_name="a", keep_uploads=True)) == ["checkpoints/final", "model"]
    assert ray_train.final_uploads(P(cfg=cfg, run_name="a", keep_uploads=True)) == ["checkpoints/final", "model"]
    assert ray_train.final_uploads(P(cfg=cfg, run_name="a", keep_uploads=True, log_checkpoints=False)) == ["model"]


def test_a_failed_upload_after_training_still_finishes_and_is_retried(cfg_of, tmp_path, monkeypatch):
    from fomo_ray.tracking.writer import Tracker, default_uri

    tracker = Tracker(default_uri(tmp_path), "uploads")
    run_id = tracker.start_child(None, "upload", {})
    cfg = cfg_of(**{"budget.total_ft_steps": 2, "tracking.log_every_n_steps": 1})
    payload = ray_train.RunPayload(cfg=cfg, run_name="upload", tracking_uri=tracker.uri, mlflow_run_id=run_id,
                                   keep_uploads=True)

    def store_down(self, *a, **k):
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(Tracker, "log_artifacts", store_down)
    session = FakeSession(tmp_path / "storage")
    final = ray_train.continual_run(payload, session)
    assert trial_report.is_kind(final, trial_report.ReportKind.DONE)  # the trial finished: its results stand
    assert session.reports[-1][1] == "final_done"
    tags = tracker.client.get_run(run_id).data.tags
    assert tags[ray_train.UPLOAD_PENDING_TAG] == "checkpoints/final,model"
    assert "artifact store unreachable" in tags[ray_train.UPLOAD_ERROR_TAG]
    assert tags[ray_train.FINAL_CHECKPOINT_TAG] == str(tmp_path / "storage" / "final_done")  # the pointer
    # every training step reached MLflow (written off the training thread, flushed at the end)
    assert [s for s, _ in tracker.metric_history(run_id, "Training/loss")] == [0, 1]
    monkeypatch.undo()
    assert ray_train.retry_pending_uploads(tracker) == {run_id: []}
    arts = {f.path for f in tracker.client.list_artifacts(run_id, "checkpoints/final")}
    assert "checkpoints/final/loop_state.pt" in arts
    assert any(f.path.startswith("model/") for f in tracker.client.list_artifacts(run_id, "model"))
    tags = tracker.client.get_run(run_id).data.tags
    assert ray_train.UPLOAD_PENDING_TAG not in tags and ray_train.UPLOAD_ERROR_TAG not in tags


# --------------------------------------------------------------------------------------------------- item 5
class NaNAtStep(FineTune):
    """Test double: a regulariser that is NaN at step 3 of task 0."""

    name = "nan_at_3"
    calls = 0

    def extra_loss(self, model, t):
        NaNAtStep.calls += 1
        return torch.tensor(float("nan")) if NaNAtStep.calls == 4 else None


def test_nan_is_read_later_but_names_its_step_and_nothing_after_it_is_kept(cfg_of, monkeypatch):
    """log_every_n_steps = 5: the NaN of step 3 is read at the checkpoint after step 3 (every 2 steps) -- the run
    fails naming step 3, and no checkpoint (or evaluation) ever holds the weights that step left."""
    monkeypatch.setitem(REGISTRY, "nan_at_3", NaNAtStep)
    NaNAtStep.calls = 0
    cfg = cfg_of(**{"method.name": "nan_at_3", "tracking.log_every_n_steps": 5, "ray.checkpoint_every_steps": 2})
    steps, states = [], []
    with pytest.raises(TrainingDiverged, match=r"loss is nan at task 0, step 3 \(method 'nan_at_3'\)") as err:
        run_stream(cfg, hooks=RunHooks(on_step=lambda t, s, loss, *_: steps.append((s, float(loss))),
                                       on_checkpoint=states.append))
    assert (err.value.task, err.value.step) == (0, 3)
    assert [s for s, _ in steps] == [0, 1, 2, 3]  # the step that caused it was the last one run
    assert [(s.task, s.step) for s in states] == [(0, 2)]  # the checkpoint after step 3 was refused
    assert all(torch.isfinite(v).all() for v in states[0].model.values())
    # without a checkpoint, the read every 5 steps finds it: step 4 ran on NaN weights, nothing kept them
    NaNAtStep.calls, steps = 0, []
    with pytest.raises(TrainingDiverged, match="step 3"):
        run_stream(cfg.replace({"ray.checkpoint_every_steps": 0}),
                   hooks=RunHooks(on_step=lambda t, s, loss, *_: steps.append(s)))
    assert steps == [0, 1, 2, 3, 4]


_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "__array__", "cpu")


def test_no_host_read_between_logging_steps(cfg_of, monkeypatch):
    """Counts every explicit read of a tensor's value (item, float, bool, ..., .cpu()) that fomo_ray's own code makes
    on the training thread: between two logging steps (log_every_n_steps = 4) the step loop makes none; the
    finiteness of the 4 losses is read once at every 4th step (and at the task's end)."""
    fomo_dir = str(Path(assembly.__file__).parent)
    main = threading.main_thread()
    counter = {"reads": 0, "where": []}
    for name in _READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, __real=real, __name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if threading.current_thread() is main and caller.startswith(fomo_dir):
                counter["reads"] += 1
                counter["where"].append((__name, caller.rsplit("/", 1)[-1], sys._getframe(1).f_lineno))
            return __real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step = []
    cfg = cfg_of(**{"tracking.log_every_n_steps": 4})

    def on_step(t, s, loss, lr, norm, g):
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0  # the hook gets the loss unread
        per_step.append((s, counter["reads"], list(counter["where"])))
        counter["where"].clear()

    run_stream(cfg, hooks=RunHooks(on_step=on_step))
    monkeypatch.undo()
    reads = [b - a for (_, a, _), (_, b, _) in zip(per_step, per_step[1:])]  # reads after step s, up to step s + 1
    # after steps 3 and 7 (the 4th and 8th) the check reads once; every other step: none
    expected = [1 if (s + 1) % 4 == 0 else 0 for s in range(STEPS - 1)]
    assert reads == expected, [w for _, _, w in per_step]


def test_step_logger_writes_off_the_training_thread_and_stops_at_a_nan():
    from fomo_ray.tracking.writer import StepLogger

    class Client:
        def __init__(self):
            self.batches, self.threads, self.fail = [], [], False

        def log_batch(self, run_id, metrics):
            if self.fail:
                raise OSError("store down")
            self.threads.append(threading.current_thread().name)
            self.batches.append([(m.key, m.step, m.value) for m in metrics])

    class FakeTracker:
        client = Client()

    tracker = FakeTracker()
    steps = StepLogger(tracker, "run", every=2, global_batch=8)
    losses = [torch.tensor(1.0), torch.tensor(0.5), torch.tensor(float("nan")), torch.tensor(0.25)]
    for s, loss in enumerate(losses):
        steps.step(0, s, loss, 1e-3, torch.tensor(2.0), s)
    steps.flush()
    loss_steps = [(g, v) for b in tracker.client.batches for k, g, v in b if k == "Training/loss"]
    assert loss_steps[:2] == [(0, 1.0), (1, 0.5)] and loss_steps[2][0] == 2 and math.isnan(loss_steps[2][1])
    assert len(loss_steps) == 3  # the step after the NaN trained on its weights: dropped
    assert all(name.startswith("fomo_ray-steps") for name in tracker.client.threads)
    tracker.client.fail = True
    fresh = StepLogger(tracker, "run", every=1, global_batch=8)
    fresh.step(0, 0, torch.tensor(1.0), 1e-3, None, 0)  # sent at once; fails in the background
    with pytest.raises(OSError, match="store down"):
        fresh.flush()  # raised on the training thread
    fresh.close()
