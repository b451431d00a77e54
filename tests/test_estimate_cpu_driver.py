"""Estimates without the trials' device (issue 27, item 2): a CPU-only driver never runs a real step at a trial's full
batch. The paper preset's methods sweep (ViT-B/16, b = 512) dry-runs in a child process under a RAM bound; GPU
trials estimated on a CPU get provisional steps, unless their own GPU's budget records are in the cache."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fomo_ray.budgets import budget, step_measure
from fomo_ray.config import load_config
from fomo_ray.planning.cost_estimate import DeclaredDevice, estimate_trial, format_estimate

from _edges_util import REPO

RSS_LIMIT = 4 * 2**30  # issue 27: under 4 GB of RAM
TIME_TARGET_S = 60     # issue 27: under a minute (reported, not asserted: a shared 2-core CI box is no timer)


@pytest.mark.slow  # ~40 s on an idle 2-core machine (its docstring), 161 s in a busy one
def test_the_paper_methods_sweep_dry_runs_on_a_cpu_driver_in_bounded_memory(tmp_path):
    """``fomo-ray sweep sweep_methods.yaml --dry-run --no-input-check --preset paper --device-tflops 989 --mfu 0.4``
    (no FiF data here): every trial's budget is counted at b = 512 on fake tensors (no 40 GB step), nothing is
    written, the child's peak RSS stays under 4 GB. (Its wall time, ~40 s on an idle 2-core machine, is printed; bench/ holds speed targets.)"""
    argv = [str(REPO / "experiments" / "configs" / "sweep_methods.yaml"), "--dry-run", "--no-input-check",
            "--preset", "paper",
            "--device-tflops", "989", "--mfu", "0.4", "--no-mlflow", "--data-root", str(tmp_path / "no_fif"),
            f"budget.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}"]
    # The child prints its own VmHWM: wait4's ru_maxrss would also count the pytest parent's peak, which a vfork'd
    # child inherits until exec (Linux keeps the larger of the two), so a long test session inflated it.
    code = (f"import sys; from fomo_ray.cli.sweep import main; rc = main({argv!r}); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
            "print(f'child VmHWM {hwm} kB'); sys.exit(rc)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out_path = tmp_path / "out.txt"
    t0 = time.perf_counter()
    with open(out_path, "w") as out:
        child = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, env=env,
                               cwd=tmp_path)
    seconds = time.perf_counter() - t0
    text = out_path.read_text()
    assert child.returncode == 0, text[-3000:]
    peak = int(text.rsplit("child VmHWM ", 1)[1].split()[0]) * 1024
    print(f"paper methods dry run on the CPU driver: {seconds:.0f} s (target {TIME_TARGET_S} s), "
          f"peak RSS {peak / 2**30:.2f} GiB")
    assert "cost estimate (declared device: 989 TFLOP/s x 0.4 MFU" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert rows["finetune"][1] == "28,400"  # 20 tasks x 1420: the paper's fine-tuning budget
    for name in ("locked_image", "lora_r4", "lora_r64", "dora_r4", "vera_r4", "bitfit", "ewc", "si"):
        assert int(rows[name][1].replace(",", "")) > 0 and not rows[name][1].endswith("*"), name  # CPU trials
    assert peak < RSS_LIMIT, f"peak RSS {peak / 2**30:.2f} GiB"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()  # a dry run writes nothing


# --------------------------------------------------------------------------------------------------- GPU trials
@pytest.fixture
def gpu_trial(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only driver
    return load_config(None, {"data.root": str(tmp_path / "no_data"), "data.prepare_if_missing": False,
                              "backbone.pretrained": "", "stream.num_tasks": 2, "budget.total_ft_steps": 400,
                              "mixture.batch_size": 8, "budget.cache_dir": str(tmp_path / "budget"),
                              "ray.gpus_per_worker": 1.0, "method.name": "lora"})


def test_gpu_trials_estimated_on_a_cpu_get_provisional_steps(gpu_trial):
    h100 = DeclaredDevice(989.0, 0.4)
    lora = estimate_trial(gpu_trial, "lora", device=h100, store=False)
    ft = estimate_trial(gpu_trial.replace({"method.name": "finetune"}), "ft", device=h100, store=False)
    assert lora.provisional and not ft.provisional  # fine-tuning's steps do not depend on memory
    assert lora.steps == 2 * budget.steps_per_task(gpu_trial, "lora", 2, device="cpu", store=False)
    text = format_estimate([lora, ft], 1, h100.describe())
    assert f"{lora.steps:,}*" in text and "steps*: provisional" in text
    cpu = estimate_trial(gpu_trial.replace({"ray.gpus_per_worker": 0.0}), "lora", device=h100, store=False)
    assert not cpu.provisional and cpu.steps == lora.steps  # this driver is a CPU trial's own device


def test_gpu_trials_read_the_records_their_gpu_cached(gpu_trial):
    """Once a trial's GPU measured (and cached) fine-tuning and the method, a CPU driver reads those records: the
    steps are the trials' own, not provisional."""
    kind = "cuda-NVIDIA_TEST_GPU"
    spec = budget.backbone_spec(gpu_trial.backbone.name)
    records = {}
    for name, scale in (("finetune", 1.0), ("lora", 0.5)):  # made-up GPU memory: half of fine-tuning's for LoRA
        cpu = budget.method_record(gpu_trial, name, device="cpu")
        ft_bytes = records["finetune"].peak_bytes if records else cpu.peak_bytes
        gpu = dataclasses.replace(cpu, device_kind=kind, memory_kind="cuda_max_allocated",
                                  peak_bytes=int(ft_bytes * scale))
        path = budget.cache_path(gpu_trial.budget.cache_dir, spec.name, name, 8, spec.image_size, kind,
                                 cpu.settings_hash)
        path.write_text(json.dumps(dataclasses.asdict(gpu)))
        records[name] = gpu
    assert budget.cached_kinds(gpu_trial, "lora") == ["cpu", kind]
    lora = estimate_trial(gpu_trial, "lora", device=DeclaredDevice(989.0, 0.4))
    assert not lora.provisional
    assert lora.steps == 2 * budget.steps_from_costs(200, records["finetune"], records["lora"])
    with pytest.raises(budget.BudgetError, match="no cached budget record of 'vera'"):
        budget.method_record(gpu_trial, "vera", device="cpu", kind=kind)  # never measured on a kind it is not


def test_a_training_step_is_timed_at_a_small_batch_and_scaled_by_flops(tmp_path, monkeypatch):
    """The throughput behind un-declared estimates times a step at most a rank's batch and TIMED_BATCH (16), never a
    trial's global batch, and scales it by the budget's FLOP counts at both batches."""
    from fomo_ray.planning import throughput

    cfg = load_config(None, {"mixture.batch_size": 64, "ray.num_workers": 2, "budget.cache_dir": str(tmp_path)})
    seen = []
    real = step_measure.clip_batch

    def spy(batch_size, *args, **kwargs):
        images, tokens = real(batch_size, *args, **kwargs)
        if not hasattr(images, "fake_mode"):
            seen.append(batch_size)
        return images, tokens

    monkeypatch.setattr(step_measure, "clip_batch", spy)
    monkeypatch.setattr(throughput, "_median_seconds", lambda fn, repeats: 1.0)  # one "second" per timed call
    speed = throughput.time_work(cfg, "finetune", device=torch.device("cpu"), threads=1)
    # the training step at 16; the evaluation encode (no gradient) at the evaluation's own batch, as a run does
    assert speed.timed_batch == throughput.TIMED_BATCH == 16
    assert seen == [16, min(throughput.EVAL_SAMPLES, cfg.evaluation.batch_size)]
    ratio = throughput._step_flops(cfg, "finetune", 64) / throughput._step_flops(cfg, "finetune", 16)
    assert speed.step_s == pytest.approx(ratio) and 3.5 < ratio < 4  # ~4x the work, plus AdamW's fixed part
