"""Helpers for the Ray / MLflow / report tests (helper E's area).

``StandIn`` stands in for ``fomo_ray.core.loop.run_stream`` (same signature, same hooks, real ``LoopState`` checkpoints)
but has no data or model: a 2-parameter SGD toy whose "accuracies" are pure functions of its weights. It is used only
where a test is about scheduling or bookkeeping (placement, restore, directory policy), never to stand for the
benchmark's numbers; the end-to-end and exact-resume tests use the real loop.

Production code has no test seams: stand-ins and faults reach a Ray worker through a test-only *worker wrapper*
(:func:`trial_in_worker`, :func:`train_worker_in_worker`). A test monkeypatches ``fomo_ray.engine.tune_sweep.run_trial``
or ``fomo_ray.engine.ray_train.train_worker`` with it in the driver; Ray ships the wrapper to the worker by value (this
module is registered with ``ray.cloudpickle``), where it patches ``fomo_ray.core.loop.run_stream`` (and, for stand-ins,
turns ``fomo_ray.prep.ensure_inputs`` into a no-op: they need no data) and then calls the real function.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fomo_ray.core import checkpoint, loop

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    """Toy continual run: per task, ``steps`` SGD steps on w toward a task target; A = adapt score, E = eval score."""

    steps = 4
    bad_input_seed = 13
    crash_seed = 17  # an error that is not bad input (a bug, a lost resource): retried, then reported

    @staticmethod
    def records(w: np.ndarray) -> list[dict]:
        return [{"dataset": "A", "role": "adapt", "metric": "top1", "value": float(1 / (1 + math.exp(-w[0])))},
                {"dataset": "E", "role": "eval", "metric": "top1", "value": float(1 / (1 + math.exp(w[1] - 1)))}]

    @staticmethod
    def run_stream(cfg, *, hooks=None, resume=None):
        import os
        import time

        import pandas as pd

        calls = Path(cfg.output_dir) / "calls"  # one file per invocation: lets tests count (re)starts
        calls.mkdir(parents=True, exist_ok=True)
        (calls / f"seed{cfg.seed}-{'resume' if resume else 'start'}-{os.getpid()}-{time.time_ns()}").touch()
        hooks = hooks or loop.RunHooks()
        if cfg.seed == StandIn.bad_input_seed:  # bad input found while running: the same on every attempt
            from fomo_ray.data.format import DataError

            raise DataError(f"stream file {cfg.output_dir}/missing.json does not exist (seed {cfg.seed})")
        if cfg.seed == StandIn.crash_seed:
            raise RuntimeError(f"simulated crash in the trial (seed {cfg.seed})")
        lr, w_merge = cfg.optimizer.lr, cfg.method.merge.weight
        if resume is None:
            w, task, step, results = np.zeros(2), 0, 0, []
            rng = np.random.default_rng(cfg.seed)
            recs = StandIn.records(w)
            results += [{"run": cfg.name, "point": 0, **r} for r in recs]
            hooks.on_eval and hooks.on_eval(0, recs)
        else:
            w = resume.model["w"].numpy().copy()
            task, step, results = resume.task, resume.step, list(resume.results)
            rng = np.random.default_rng()
            rng.bit_generator.state = resume.rng["np"]
        for t in range(task, cfg.stream.num_tasks):
            start = step if t == task else 0
            for s in range(start, StandIn.steps):
                w = w + lr * (np.array([1.0, 1.0]) + 0.1 * rng.standard_normal(2)) * w_merge
                if not np.isfinite(w).all():
                    raise loop.TrainingDiverged(t, s, float("nan"), cfg.method.name)
                hooks.on_step and hooks.on_step(t, s, float(w.sum()), lr, None, t * StandIn.steps + s)
                k = cfg.ray.checkpoint_every_steps
                if k and (s + 1) % k == 0 and s + 1 < StandIn.steps and hooks.on_checkpoint:
                    hooks.on_checkpoint(StandIn._state(cfg, w, t, s + 1, rng, results, mid=True))
            recs = StandIn.records(w)
            results += [{"run": cfg.name, "point": t + 1, **r} for r in recs]
            hooks.on_eval and hooks.on_eval(t + 1, recs)
            hooks.on_checkpoint and hooks.on_checkpoint(StandIn._state(cfg, w, t + 1, 0, rng, results, mid=False))
        return pd.DataFrame(results)

    @staticmethod
    def _state(cfg, w, task, step, rng, results, mid):
        import torch

        return checkpoint.LoopState(run=cfg.name, task=task, step=step, model={"w": torch.from_numpy(w.copy())},
                              optimizer={"mid": True} if mid else None, method={}, buffer={},
                              rng={"np": rng.bit_generator.state}, results=list(results))


def register_by_value() -> None:
    """Ship this module to Ray workers by value (the tests directory is not on their import path)."""
    from ray import cloudpickle  # Ray's vendored copy is the one that pickles trainables

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Placement:
    """Records where Ray placed the trial (assigned resources, GPU ids, node) and waits until ``expected`` trials
    run at once -- proof of concurrent placement, not merely of a resource request. Then one evaluation point.
    Deliberately free of a model and data, so eight trials start quickly."""

    expected = 8
    timeout_s = 180.0

    @staticmethod
    def run_stream(cfg, *, hooks=None, resume=None):
        import json
        import os
        import time

        import ray

        ctx = ray.get_runtime_context()
        here = Path(cfg.output_dir) / "placements"
        here.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "resources": ctx.get_assigned_resources(), "gpu_ids": ray.get_gpu_ids(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "node_id": ctx.get_node_id()}
        tmp = here / f".{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, here / f"{os.getpid()}.json")
        deadline = time.time() + Placement.timeout_s
        while len(list(here.glob("*.json"))) < Placement.expected and time.time() < deadline:
            time.sleep(0.2)
        info["concurrent"] = len(list(here.glob("*.json")))
        (here / f"{os.getpid()}.done").write_text(json.dumps(info))
        hooks.on_eval(0, [{"dataset": "A", "role": "adapt", "metric": "top1", "value": 0.5},
                          {"dataset": "E", "role": "eval", "metric": "top1", "value": 0.5}])


# --------------------------------------------------------------------------------------------------- worker wrappers
@dataclasses.dataclass(frozen=True)
class Fault:
    """The rank-0 worker exits hard (``os._exit``) ``delay_s`` seconds after it finished optimizer step ``step`` of
    task ``task``, once -- ``marker`` records that it happened, so the restarted worker goes on. (Ray Train registers
    reports on a 2 s poll: a crash sooner than that after a checkpoint falls back to the checkpoint before it -- still
    exact, but it would not exercise a mid-task resume.)"""
    task: int
    step: int
    marker: str
    delay_s: float = 0.0

    def after_step(self, task: int, step: int) -> None:
        import os
        import time

        import ray.train

        rank0 = ray.train.get_context().get_world_rank() == 0
        if rank0 and (task, step) == (self.task, self.step) and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed at task {task} step {step} (pid {os.getpid()})\n")
            time.sleep(self.delay_s)
            os._exit(1)  # a hard crash: no cleanup, no exception handling, like a lost node


def _with_fault(run_stream: Callable[..., Any], fault: Fault) -> Callable[..., Any]:
    """``run_stream`` whose ``on_step`` hook also triggers ``fault`` (after the host's own hook); a fault with a
    ``checkpoint_now(host_hook)`` method also answers the loop's ``checkpoint_now`` (given the host's hook)."""
    def run(cfg, *, hooks=None, resume=None, **kwargs):
        hooks = hooks or loop.RunHooks()
        inner = hooks.on_step

        def on_step(task, step, *rest):
            if inner is not None:
                inner(task, step, *rest)
            fault.after_step(task, step)

        changed = {"on_step": on_step}
        if hasattr(fault, "checkpoint_now") and hooks.checkpoint_now is not None:
            changed["checkpoint_now"] = lambda: fault.checkpoint_now(hooks.checkpoint_now)
        return run_stream(cfg, hooks=dataclasses.replace(hooks, **changed), resume=resume, **kwargs)
    return run


def _patch_worker(runner: Any, fault: Fault | None) -> None:
    """In the worker process: substitute ``runner.run_stream`` for the loop's (no inputs needed then), add the fault."""
    from fomo_ray.core import loop as worker_loop

    if runner is not None:
        from fomo_ray import prep

        worker_loop.run_stream = runner.run_stream
        prep.ensure_inputs = lambda cfg: None  # a stand-in reads no data and no base checkpoint
    if fault is not None:
        worker_loop.run_stream = _with_fault(worker_loop.run_stream, fault)


def _real(module: str, name: str, wrapper: Any) -> Callable[..., Any]:
    real = getattr(importlib.import_module(module), name)
    if real is wrapper:  # only in the process whose module the test patched: the wrapper belongs in a Ray worker
        raise RuntimeError(f"{module}.{name} is patched in this process; the worker wrapper runs in Ray workers only")
    return real


def trial_in_worker(runner: Any = None, fault: Fault | None = None) -> Callable[..., Any]:
    """A stand-in for ``fomo_ray.engine.tune_sweep.run_trial`` that runs the real trial with ``runner`` / ``fault``
    injected."""
    def run_trial(config, setup):  # the real one's name and signature: Tune names the trainable after it
        _patch_worker(runner, fault)
        return _real("fomo_ray.engine.tune_sweep", "run_trial", run_trial)(config, setup)
    return run_trial


def trial_noting_pid(directory: str) -> Callable[..., Any]:
    """A stand-in for ``fomo_ray.engine.tune_sweep.run_trial`` that runs the real trial, first leaving a file named
    after its process id in ``directory``: the processes a sweep's trials ran in."""
    def run_trial(config, setup):
        import os

        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, str(os.getpid())).touch()
        return _real("fomo_ray.engine.tune_sweep", "run_trial", run_trial)(config, setup)
    return run_trial


def train_worker_in_worker(runner: Any = None, fault: Fault | None = None) -> Callable[..., Any]:
    """A stand-in for ``fomo_ray.engine.ray_train.train_worker`` (Ray Train's ``train_loop_per_worker``), same
    injection."""
    def train_worker(payload):  # one parameter, as Ray Train passes train_loop_config
        _patch_worker(runner, fault)
        return _real("fomo_ray.engine.ray_train", "train_worker", train_worker)(payload)
    return train_worker
