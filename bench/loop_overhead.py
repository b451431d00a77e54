"""Overhead of the continual loop over a bare PyTorch loop, and the cost of one EMA merge vs one training step.

Both loops train the same tiny CLIP (same architecture, initial weights, batch size, AdamW param groups,
precision, grad clip) with full fine-tuning:

- *loop*: ``fomo_ray.core.loop.run_stream`` on FiF-mini (one task, in-memory decoded images, ``data.loader=memory``):
  P/D/B mixing, seeded crops, caption sampling (stored token ids), normalisation, LR schedule, NaN check, hooks,
  the prefetch thread -- everything a real run does per step. Steps/s is taken from ``on_step`` timestamps, so the zero-shot evaluation and set-up before the
  first step and the evaluation after the last are excluded.
- *bare*: batches pre-built in memory (images + token ids), then forward / CLIP loss / backward / clip / step.

The ratio loop/bare comes from one run of this script (both measured in the same process, back to back).
``merge_ops.merge_from_config`` with the EMA-merge settings on the model's state dict is timed against one bare
training step.

    python bench/loop_overhead.py [--steps 60] [--batch-size 64] [--arch fomo-tiny-s] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _config(root: Path, args, out: Path):
    from fomo_ray.config import load_config

    return load_config(None, {
        "data.root": str(root), "data.prepare_if_missing": False, "data.loader": "memory",
        "backbone.name": args.arch, "backbone.pretrained": "", "backbone.precision": "fp32",
        "method.name": "finetune", "stream.num_tasks": 1, "budget.mode": "equal_steps",
        "budget.total_ft_steps": args.steps, "mixture.batch_size": args.batch_size,
        "evaluation.subset_min": 2, "evaluation.subset_fraction": 0.01, "evaluation.full_at_ends": False,
        "output_dir": str(out), "tracking.enabled": False, "seed": 0,
    })


def steps_per_second(stamps: list[float], warmup: int) -> float:
    """Steady-state rate from per-step end times, skipping ``warmup`` steps (allocator / first-batch effects)."""
    usable = stamps[warmup:]
    return (len(usable) - 1) / (usable[-1] - usable[0])


def time_loop(cfg, warmup: int) -> float:
    from fomo_ray.core.loop import RunHooks, run_stream

    stamps: list[float] = []
    run_stream(cfg, hooks=RunHooks(on_step=lambda *_: stamps.append(time.perf_counter())), device="cpu")
    return steps_per_second(stamps, warmup)


def bare_batches(cfg, n: int):
    """``n`` real mixed batches of the run (normalised images + token ids), materialised before timing: the bare
    loop pays no data work at all, so the ratio charges the loop for building its batches."""
    from fomo_ray.core.assembly import build_run
    from fomo_ray.core.loop import task_batches

    from fomo_ray.data.augment import model_input

    run = build_run(cfg, "cpu")
    bb = run.backbone
    with task_batches(run, 0, run.plan[0].rows, 0, n) as batches:
        return [(model_input(b["images"], bb.image_size, bb.mean, bb.std), b["tokens"]) for b in batches]


def time_bare(cfg, batches, steps: int, warmup: int) -> tuple[float, list[float], dict]:
    """A plain PyTorch loop over the same model/optimizer/precision; returns (steps/s, step times, final weights)."""
    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.maths.optim import make_optimizer
    from fomo_ray.maths.losses import clip_loss
    from fomo_ray.seeding import derive_seed, seed_everything

    seed_everything(derive_seed(cfg.seed, "setup"))  # the loop's initial weights
    bb = create_backbone(cfg.backbone.name, "", device="cpu", precision=cfg.backbone.precision)
    model = bb.model.train()
    opt = make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    stamps, durations = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        images, tokens = batches[i % len(batches)]
        with bb.autocast("cpu"):
            loss = clip_loss(model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True),
                             model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
        opt.step()
        stamps.append(time.perf_counter())
        durations.append(stamps[-1] - t0)
    return steps_per_second(stamps, warmup), durations[warmup:], model.state_dict()


def time_ema_merge(cfg, state: dict, repeats: int = 10) -> float:
    """Median seconds of one EMA-merge step m_t = w*theta_t + (1-w)*m_{t-1} over the whole state dict."""
    from fomo_ray.maths import merge_ops

    prev = {k: v.clone() for k, v in state.items()}
    new = {k: v + 0.01 for k, v in state.items()}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        merge_ops.merge_from_config(cfg.method.merge, prev, [new], [cfg.method.merge.weight])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--arch", default="fomo-tiny-s")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", default="", help="FiF-mini directory (default: a 5%%-scale build in a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fomo_ray.prep.fifmini import ensure_fifmini

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_root) if args.data_root else Path(tmp) / "fifmini"
        if not args.data_root:
            ensure_fifmini(root, seed=0, scale=0.05, progress=False)
        cfg = _config(root, args, Path(tmp) / "runs")
        batches = bare_batches(cfg, 8)
        # bare - loop - bare: a machine whose load drifts during the run biases neither side
        bare_before, step_times, state = time_bare(cfg, batches, args.steps, args.warmup)
        loop = time_loop(cfg, args.warmup)
        bare_after, more_times, _ = time_bare(cfg, batches, args.steps, args.warmup)
        merge = time_ema_merge(cfg, state)
    bare = (bare_before + bare_after) / 2
    step = statistics.median(step_times + more_times)
    n_params = sum(v.numel() for v in state.values())
    print(f"arch {args.arch} ({n_params / 1e6:.2f}M params), batch {args.batch_size}, fp32, "
          f"{args.threads} threads, {args.steps} steps ({args.warmup} warm-up steps excluded)")
    print(f"bare PyTorch loop : {bare:7.2f} steps/s  (before the loop {bare_before:.2f}, after {bare_after:.2f})")
    print(f"fomo_ray loop     : {loop:7.2f} steps/s")
    print(f"loop / bare       : {loop / bare:7.3f}  (overhead {100 * (bare / loop - 1):.1f}% per step)")
    print(f"one EMA merge     : {1e3 * merge:7.2f} ms  vs one training step {1e3 * step:7.2f} ms "
          f"(merge = {merge / step:.3f} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
