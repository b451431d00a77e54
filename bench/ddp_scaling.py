"""Data-parallel scaling of the continual loop: W = 1 against W = 2 ranks, side by side in one run (issue 12).

Each W runs the real loop (``loop.run_stream``) on FiF-mini in W spawned processes joined by ``torch.distributed``
(gloo on CPU; ``--backend nccl`` with one GPU per rank where GPUs exist), one torch thread per rank, the same config:
fomo-tiny-s, one task of ``--steps`` fine-tuning steps at batch ``--batch-size``, evaluation before and after (on the
fixed subsets). Per W it reports, from rank 0 (every rank does the same amount of work):

- training steps/s (from ``on_step`` times, after ``--warmup`` steps) and the speed-up over W = 1;
- data time per step: the time to build this rank's part of the batch (decode, crop, token pick; on the prefetch
  thread), and the time the step waited for it (with ``--prefetch 0`` the whole build is on the step);
- evaluation time of the last evaluation point (each rank encodes its share of the batches, then the features are
  gathered; the first point also pays the loaders' one-time compilation, so it is not shown).

W = 1 runs first, then W = 2, then W = 1 again; the two W = 1 runs are averaged, so slow drifts of a shared machine
hit both sides. Usage::

    python bench/ddp_scaling.py [--steps 24] [--batch-size 64] [--backend gloo|nccl] [--prefetch 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def _config(a, out: str):
    from fomo_ray.config import load_config

    return load_config(None, {
        "data.root": str(REPO / "data" / "fifmini"), "data.prepare_if_missing": False, "data.loader": "ffcv",
        "data.num_workers": 1, "data.prefetch": a.prefetch, "backbone.pretrained": "", "method.name": "finetune",
        "stream.num_tasks": 1, "budget.mode": "equal_steps", "budget.total_ft_steps": a.steps,
        "mixture.batch_size": a.batch_size, "evaluation.full_at_ends": False, "output_dir": out,
        "budget.cache_dir": os.path.join(out, "budget"), "tracking.enabled": False, "seed": 0})


def _rank(rank: int, world: int, a, init: str, out: str) -> None:
    torch.set_num_threads(1)
    from fomo_ray.core import loop

    device = "cpu"
    if a.backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(a.backend, init_method=f"file://{init}", rank=rank, world_size=world)
    from fomo_ray.data import mixture

    waits, builds, evals, stamps = [], [], [], []
    real_batches, real_eval, real_build = loop.task_batches, loop.evaluate_point, mixture.MixedBatches.batch

    def timed_build(self, step, out=None):
        t0 = time.perf_counter()
        batch = real_build(self, step, out)
        builds.append(time.perf_counter() - t0)
        return batch

    class Timed:  # the prefetcher, timing how long each step waits for its batch
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __next__(self):
            t0 = time.perf_counter()
            batch = next(self.inner)
            waits.append(time.perf_counter() - t0)
            return batch

    def timed_eval(*args, **kwargs):
        t0 = time.perf_counter()
        records = real_eval(*args, **kwargs)
        evals.append(time.perf_counter() - t0)
        return records

    loop.task_batches = lambda *args, **kwargs: Timed(real_batches(*args, **kwargs))
    loop.evaluate_point = timed_eval
    mixture.MixedBatches.batch = timed_build
    try:
        hooks = loop.RunHooks(on_step=lambda *_: stamps.append(time.perf_counter()))
        loop.run_stream(_config(a, out), hooks=hooks, device=device)
    finally:
        dist.destroy_process_group()
    usable = stamps[a.warmup:]
    result = {"steps_per_s": (len(usable) - 1) / (usable[-1] - usable[0]),
              "wait_s_per_step": statistics.mean(waits[a.warmup:]), "build_s_per_step": statistics.mean(builds[a.warmup:]),
              "eval_s_per_point": evals[-1]}  # the last point: the first one also compiles the loaders
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def measure(a, world: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ddp_scaling_") as out:
        mp.spawn(_rank, args=(world, a, os.path.join(out, "pg"), out), nprocs=world, join=True)
        return json.loads(Path(out, "rank0.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    from fomo_ray.prep.fifmini import ensure_fifmini

    ensure_fifmini(REPO / "data" / "fifmini")
    first, two, second = measure(a, 1), measure(a, 2), measure(a, 1)
    one = {k: (first[k] + second[k]) / 2 for k in first}
    print(f"ddp scaling: fomo-tiny-s, batch {a.batch_size}, {a.steps} steps ({a.warmup} warm-up), backend "
          f"{a.backend}, prefetch {a.prefetch}, 1 torch thread per rank, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| W | steps/s | speed-up | batch build ms/step (rank 0) | step waits for data ms | eval s/point |")
    print("| --- | --- | --- | --- | --- | --- |")
    for w, r in ((1, one), (2, two)):
        print(f"| {w} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / one['steps_per_s']:.2f}x | "
              f"{1e3 * r['build_s_per_step']:.2f} | {1e3 * r['wait_s_per_step']:.2f} | {r['eval_s_per_point']:.2f} |")
    print(f"(W = 1 twice: {first['steps_per_s']:.2f} and {second['steps_per_s']:.2f} steps/s)")


if __name__ == "__main__":
    main()
