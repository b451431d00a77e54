"""Helpers for the Ray / MLflow / report tests (helper E's area).

``StandIn`` is a stand-in for ``fomo_ray.loop`` with the same runner protocol (run_stream, RunHooks, LoopState,
save_state, load_state, TrainingDiverged) but no data or model: a 2-parameter SGD toy whose "accuracies" are pure
functions of its weights. It is used only where a test is about scheduling or bookkeeping (placement, restore,
directory policy), never to stand for the benchmark's numbers; the end-to-end and exact-resume tests use the real loop.
"""
from __future__ import annotations

import dataclasses
import math
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fomo_ray import loop

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    """Toy continual run: per task, ``steps`` SGD steps on w toward a task target; A = adapt score, E = eval score."""

    RunHooks = loop.RunHooks
    LoopState = loop.LoopState
    TrainingDiverged = loop.TrainingDiverged
    save_state = staticmethod(loop.save_state)
    load_state = staticmethod(loop.load_state)
    steps = 4

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
        lr, w_merge = cfg.optimizer.lr, cfg.method.merge.weight
        if resume is None:
            w, task, step, results = np.zeros(2), 0, 0, []
            rng = np.random.default_rng(cfg.seed)
            recs = StandIn.records(w)
            results += [{"run": cfg.name, "task": 0, **r} for r in recs]
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
                hooks.on_step and hooks.on_step(t, s, float(w.sum()), lr)
                k = cfg.ray.checkpoint_every_steps
                if k and (s + 1) % k == 0 and s + 1 < StandIn.steps and hooks.on_checkpoint:
                    hooks.on_checkpoint(StandIn._state(cfg, w, t, s + 1, rng, results, mid=True))
            recs = StandIn.records(w)
            results += [{"run": cfg.name, "task": t + 1, **r} for r in recs]
            hooks.on_eval and hooks.on_eval(t + 1, recs)
            hooks.on_checkpoint and hooks.on_checkpoint(StandIn._state(cfg, w, t + 1, 0, rng, results, mid=False))
        return pd.DataFrame(results)

    @staticmethod
    def _state(cfg, w, task, step, rng, results, mid):
        import torch

        return loop.LoopState(run=cfg.name, task=task, step=step, model={"w": torch.from_numpy(w.copy())},
                              optimizer={"mid": True} if mid else None, method={}, buffer={},
                              rng={"np": rng.bit_generator.state}, results=list(results))


def register_by_value() -> None:
    """Ship this module to Ray workers by value (the tests directory is not on their import path)."""
    from ray import cloudpickle  # Ray's vendored copy is the one that pickles trainables

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Placement:
    """Records where Ray placed the trial (assigned resources, GPU ids, node) and waits until ``expected`` trials
    run at once -- proof of concurrent placement, not merely of a resource request. Then one evaluation point.
    Deliberately free of torch and the loop (it is shipped by value), so eight trials start quickly."""

    expected = 8
    timeout_s = 180.0

    @dataclasses.dataclass
    class RunHooks:
        on_eval: Any = None
        on_step: Any = None
        on_checkpoint: Any = None
        should_stop: Any = None

    class TrainingDiverged(RuntimeError):
        pass

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
