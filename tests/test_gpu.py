"""The GPU path (issue 7): what must hold on a CUDA device, checked by ``bench/gpu_check.sh`` (docs/GPU_CHECK.md).

Tests marked ``gpu`` run on ``FOMO_GPU_CHECK_DEVICE`` (default ``cuda``). ``tests/conftest.py`` skips them where
CUDA is missing; ``bench/gpu_check.sh`` runs this file with ``--noconftest`` and ``FOMO_GPU_CHECK_DEVICE=cpu`` for
its CPU dry run, so every test here also runs (and can fail) on a CPU. The unmarked tests are plain CPU tests:
the core modules must import without Ray/MLflow/FFCV (the GPU machine has none of them) and the device tables of the
MFU benchmark must map card names correctly.

The GPU machine has no FFCV, so it cannot *write* FiF-mini; the loop test opens the small copy that
``bench/make_gpu_wheels.sh`` builds (``data/gpu_check/fifmini``, carried to the GPU machine) and builds it itself
only where FFCV exists.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device(os.environ.get("FOMO_GPU_CHECK_DEVICE", "cuda"))
FIFMINI = Path(os.environ.get("FOMO_GPU_CHECK_FIFMINI", REPO / "data" / "gpu_check" / "fifmini"))
TINY = "fomo-tiny-s"
BLOCKED = ("ray", "mlflow", "ffcv")
CORE_MODULES = ("fomo_ray.core.loop", "fomo_ray.budgets.budget", "fomo_ray.models.evaluation", "fomo_ray.methods", "fomo_ray.maths.merge_ops",
                "fomo_ray.models.backbones", "fomo_ray.data.loaders", "fomo_ray.data.mixture", "fomo_ray.data.format")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # also under --noconftest: pretrained tags must never download
if DEVICE.type == "cpu":  # the dry run shares a small CPU with other work
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------------- helpers
class _Losses:
    """The loop's ``TaskLosses`` on one process: ``sum_over`` sums ``per_batch`` over n fresh losses."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def sum_over(self, n, per_batch):
        total = per_batch(self.loss_fn())
        for _ in range(n - 1):
            total = [a + b for a, b in zip(total, per_batch(self.loss_fn()))]
        return total


def _bench_module(name: str):
    """Import ``bench/<name>.py`` (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny(precision: str = "fp32", seed: int = 0):
    from fomo_ray.models.backbones import create_backbone

    torch.manual_seed(seed)
    return create_backbone(TINY, "", device=DEVICE, precision=precision)


def _batch(backbone, n: int = 8, seed: int = 0):
    """Random images and distinct real captions (tokenised by the backbone's own tokenizer) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=g)
    texts = [f"a photo of a {c} shape number {i}" for i, c in enumerate(["red", "blue", "green", "round"] * n)][:n]
    return images.to(DEVICE), backbone.tokenizer(texts).to(DEVICE)


def _loss(model, images, tokens, autocast=None):
    """The loop's training loss (fomo_ray.core.batch_step.batch_loss without the data plumbing)."""
    from fomo_ray.maths.losses import clip_loss

    with autocast or contextlib.nullcontext():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        return clip_loss(img, txt, model.logit_scale.exp())


def _tensors(obj, path=""):
    """``(path, tensor)`` for every tensor inside nested dicts/lists."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type == DEVICE.type


# --------------------------------------------------------------------------------------------------- CPU tests
BLOCKER = f"""
import importlib.abc, sys, traceback
BLOCKED = {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{{name}} is blocked: the GPU machine has no ray/mlflow/ffcv')
sys.meta_path.insert(0, Block())
for mod in sys.argv[1:]:
    try:
        __import__(mod)
    except ImportError:
        tb = traceback.extract_tb(sys.exc_info()[2])
        culprit = [f for f in tb if 'fomo_ray' in f.filename][-1:]
        where = f'{{culprit[0].filename}}:{{culprit[0].lineno}}' if culprit else '?'
        print(f'IMPORT-FAIL {{mod}} at {{where}}: {{sys.exc_info()[1]}}')
        sys.exit(1)
print('IMPORT-OK', sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))
"""


def _subprocess_env() -> dict[str, str]:
    """The current environment with the repo first on PYTHONPATH (the GPU machine's wheels stay reachable)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def test_core_modules_import_without_ray_mlflow_ffcv():
    """The GPU machine has no Ray, MLflow or FFCV: the loop, budget, evaluation, methods and merge code must import
    with those blocked (a meta-path finder raising ImportError), and the failure names module and line."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *CORE_MODULES], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=_subprocess_env())
    assert proc.returncode == 0 and "IMPORT-OK []" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_blocker_really_blocks():
    """The finder above is not vacuous: importing fomo_ray.tracking.writer (which imports mlflow) fails under it."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "fomo_ray.tracking.writer"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=_subprocess_env())
    assert proc.returncode == 1 and "IMPORT-FAIL fomo_ray.tracking.writer at" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA H100 NVL", None), ("NVIDIA A100-SXM4-80GB", None),
                                        ("cpu", None)])
def test_peak_table_by_device_name(name, peak):
    mfu = _bench_module("train_step_mfu")
    assert mfu.peak_bf16_tflops(name) == peak


def test_mfu_math():
    mfu = _bench_module("train_step_mfu")
    # 10 steps of 20,000 GFLOPs in 0.5 s = 400 TFLOP/s; on a 989 TFLOP/s card that is 40.4 % MFU
    assert mfu.achieved_tflops(20_000.0, 10, 0.5) == pytest.approx(400.0)
    assert mfu.mfu(400.0, 989.0) == pytest.approx(400 / 989)
    assert mfu.mfu(400.0, None) is None


def test_reference_steps_parsing():
    table = _bench_module("gpu_budget_table")
    assert table.reference_steps("finetune", 4) == 1420
    assert table.reference_steps("lora", 4) == 1898 and table.reference_steps("lora", 64) == 1891
    assert table.reference_steps("dora", 4) == 1893 and table.reference_steps("dora", 64) is None
    assert table.reference_steps("ewc", 4) == 14 and table.reference_steps("nonexistent", 4) is None


# --------------------------------------------------------------------------------------------------- device tests
PLACED_METHODS = ("finetune", "lora", "bitfit", "ewc", "si", "ema_merge", "offline_merge")
STATEFUL = {"ewc", "si", "ema_merge", "offline_merge"}  # methods whose state_dict holds tensors after a task


@pytest.mark.gpu
@pytest.mark.parametrize("name", PLACED_METHODS)
def test_device_placement_of_model_and_method_state(name):
    """After setup, a training step and a task end, every model tensor and every tensor the method keeps lives on
    the device (the reference kept EWC/SI state on the CPU: docs/BENCHMARK.md §Reference faults). offline_merge keeps
    its experts on the CPU on purpose (long streams); its deployed weights must still be on the device."""
    from fomo_ray.config import load_config
    from fomo_ray.maths.optim import make_optimizer
    from fomo_ray.methods import build_method

    cfg = load_config(None, {"method.name": name, "method.reg.ewc_fisher_batches": 2})
    bb = _tiny()
    method = build_method(cfg)
    model = method.setup(bb.model)
    images, tokens = _batch(bb)
    opt = make_optimizer(model, cfg)
    for t in range(2):  # task 1 exercises the penalties/merges that only exist after task 0
        loss = _loss(model, images, tokens)
        extra = method.extra_loss(model, t)
        loss = loss + extra if extra is not None else loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.after_step(model, t, 0, 1e-4)
        method.after_task(model, t, _Losses(lambda: _loss(model, images, tokens)))
    off = [n for n, v in _tensors(dict(model.state_dict())) if not _on_device(v)]
    assert not off, f"{name}: model tensors not on {DEVICE}: {off[:5]}"
    if name == "lora":  # the adapters are part of the model (and so of its placement and checkpoints)
        assert any("lora_A" in n for n in model.state_dict()), "no LoRA adapter in the model's state dict"
    state = {k: v for k, v in method.state_dict().items() if k != "experts"}
    assert bool(list(_tensors(state))) == (name in STATEFUL), f"{name}: unexpected method state {list(state)}"
    off = [n for n, v in _tensors(state) if not _on_device(v)]
    assert not off, f"{name}: method state not on {DEVICE}: {off[:5]}"
    deployed = method.deployed_weights(1, model)
    off = [n for n, v in deployed.items() if not _on_device(v)]
    assert not off, f"{name}: deployed weights not on {DEVICE}: {off[:5]}"


@pytest.mark.gpu
def test_bf16_autocast_forward_backward_matches_fp32():
    """Under the backbone's bf16 autocast the linears run in bf16 while master weights and gradients stay fp32,
    and loss and gradients agree with an fp32 step of the same weights (bf16 keeps ~3 significant digits)."""
    bb = _tiny(precision="bf16")
    assert bb.precision == "bf16"
    images, tokens = _batch(bb, n=16)
    seen = []
    hook = bb.model.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    loss_bf16 = _loss(bb.model, images, tokens, bb.autocast())
    hook.remove()
    loss_bf16.backward()
    grads_bf16 = torch.cat([p.grad.flatten() for p in bb.model.parameters() if p.grad is not None])
    assert seen == [torch.bfloat16], f"MLP ran in {seen} under bf16 autocast"
    assert all(p.dtype == torch.float32 for p in bb.model.parameters())
    assert grads_bf16.dtype == torch.float32 and torch.isfinite(grads_bf16).all()

    bb.model.zero_grad(set_to_none=True)
    loss_fp32 = _loss(bb.model, images, tokens)
    loss_fp32.backward()
    grads_fp32 = torch.cat([p.grad.flatten() for p in bb.model.parameters() if p.grad is not None])
    assert float(loss_bf16.detach()) == pytest.approx(float(loss_fp32.detach()), rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(grads_bf16.double(), grads_fp32.double(), dim=0)
    assert cos > 0.99, f"bf16 and fp32 gradients disagree (cosine {float(cos):.4f})"


def _loop_cfg(tmp_path, method: str):
    from fomo_ray.config import load_config

    return load_config(None, {
        "name": "gpu-check", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "data.root": str(FIFMINI), "data.loader": "memory", "data.prepare_if_missing": False, "data.num_workers": 0,
        "backbone.name": TINY, "backbone.pretrained": "", "backbone.precision": "auto",
        "stream.num_tasks": 2, "budget.mode": "equal_steps", "budget.total_ft_steps": 6,
        "budget.cache_dir": str(tmp_path / "budget"), "mixture.batch_size": 32, "method.name": method,
        "evaluation.subset_min": 50, "tracking.enabled": False,
    })


@pytest.fixture(scope="module")
def fifmini_small():
    """The small FiF-mini: opened as carried (no FFCV on the GPU machine), built here only where FFCV exists."""
    from fomo_ray.data.format import open_benchmark
    from fomo_ray.data.loaders import ffcv_available

    if not (FIFMINI / "manifest.json").is_file():
        if not ffcv_available():
            pytest.fail(f"no FiF-mini at {FIFMINI} and no FFCV to write one: run bench/make_gpu_wheels.sh on a "
                        f"machine with FFCV and carry data/gpu_check to this one")
        from fomo_ray.prep.fifmini import ensure_fifmini

        ensure_fifmini(FIFMINI, seed=0, image_size=32, scale=0.05, progress=False)
    from fomo_ray.models.backbones import tokenizer_for
    from fomo_ray.data.tokens import add_tokens

    open_benchmark(FIFMINI)
    return add_tokens(FIFMINI, *tokenizer_for(TINY))  # a copy written before token ids: upgraded (no FFCV needed)


@pytest.mark.gpu
def test_training_images_reach_the_device_as_uint8_and_are_normalised_there(fifmini_small):
    """Issue 11: the prefetcher copies uint8 batches (pinned, side stream on CUDA) and ``model_input`` converts and
    normalises them on the device; what arrives equals the host batch, also after the pinned buffers are reused."""
    from fomo_ray.models.backbones import tokenizer_for
    from fomo_ray.data.augment import model_input
    from fomo_ray.data.mixture import MixedBatches, mixture_sizes
    from fomo_ray.data.prefetch import Prefetcher
    from fomo_ray.data.tokens import tokenizer_key

    key = tokenizer_key(*tokenizer_for(TINY))
    mixed = MixedBatches(fifmini_small, None, np.arange(24), None, mixture_sizes(16, (0.5, 0.5, 0.0), True), 0, 0,
                         token_key=key, backend="memory", image_size=32, num_workers=1)
    with Prefetcher(mixed.batch, range(8), DEVICE, depth=2, image_shape=(16, 32, 32, 3)) as batches:
        got = list(batches)
    for step, b in enumerate(got):
        host = mixed.batch(step)
        assert b["images"].device.type == DEVICE.type and b["images"].dtype == torch.uint8
        assert torch.equal(b["images"].cpu(), host["images"]) and torch.equal(b["tokens"].cpu(), host["tokens"])
        x = model_input(b["images"], 32)
        assert x.device.type == DEVICE.type and x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
        assert torch.allclose(x.cpu(), model_input(host["images"], 32), atol=1e-6)


@pytest.mark.gpu
def test_loop_two_tasks_on_device(tmp_path, fifmini_small):
    """fomo_ray.core.loop.run_stream for 2 tasks of EMA-merge on the device with the memory loader: every step's loss is
    finite, three evaluation points (0, 1, 2) cover every dataset, and the model and merge state live on the device."""
    from fomo_ray.core.assembly import build_run
    from fomo_ray.core.loop import RunHooks, run_stream

    cfg = _loop_cfg(tmp_path, "ema_merge")
    run = build_run(cfg, DEVICE)
    assert all(_on_device(p) for p in run.model.parameters())
    assert run.backbone.precision == ("bf16" if DEVICE.type == "cuda" else "fp32")
    del run
    steps = []
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    df = run_stream(cfg, hooks=RunHooks(on_step=lambda t, s, loss, lr, *_: steps.append((t, s, loss))), device=DEVICE)
    assert [(t, s) for t, s, _ in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all(math.isfinite(loss) for *_, loss in steps)
    assert sorted(df["point"].unique()) == [0, 1, 2]
    names = set(fifmini_small.dataset_names) - {n for n, d in fifmini_small.datasets.items() if d.role == "pool"}
    for point, group in df.groupby("point"):
        assert set(group["dataset"]) == names, f"evaluation point {point} misses {names - set(group['dataset'])}"
    assert df["value"].between(0.0, 1.0).all() and np.isfinite(df["value"]).all()
    if DEVICE.type == "cuda":
        assert torch.cuda.max_memory_allocated(DEVICE) > 0, "the loop allocated nothing on the GPU"


def _state(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 32, generator=g).to(dtype), "a.bias": torch.randn(64, generator=g).to(dtype),
            "blocks.0.w": torch.randn(16, 16, generator=g).to(dtype), "blocks.1.w": torch.randn(16, 16, generator=g),
            "ids": torch.arange(7)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_operators_on_device(dtype):
    """Every operator of merge_ops.OPERATORS runs on device tensors, keeps device and dtype, and equals the CPU
    merge; DARE draws its masks from device generators, so there it must be deterministic per seed instead."""
    from fomo_ray.maths import merge_ops

    base, e1, e2 = _state(0, dtype), _state(1, dtype), _state(2, dtype)
    on = lambda sd: {k: v.to(DEVICE) for k, v in sd.items()}  # noqa: E731
    for name in merge_ops.OPERATORS:
        experts, weights = ([e1], [0.3]) if name == "slerp" else ([e1, e2], [0.3, 0.4])
        params = {"seed": 5} if "seed" in merge_ops.operator_params(name) else {}
        got = merge_ops.merge(name, on(base), [on(e) for e in experts], weights, **params)
        assert list(got) == list(base), name
        for k, v in got.items():
            assert v.device.type == DEVICE.type and v.dtype == base[k].dtype, f"{name}: {k} {v.device} {v.dtype}"
        if name == "dare":
            again = merge_ops.merge(name, on(base), [on(e) for e in experts], weights, **params)
            assert all(torch.equal(got[k], again[k]) for k in got), "DARE is not deterministic on the device"
            continue
        ref = merge_ops.merge(name, base, experts, weights, **params)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for k in ref:
            torch.testing.assert_close(got[k].cpu(), ref[k], atol=tol, rtol=tol, msg=f"{name}: {k} differs")


@pytest.mark.gpu
def test_ema_merge_of_real_backbones_on_device():
    """The EMA-merge step on two real (tiny CLIP) state dicts on the device is (1-w)*m + w*theta exactly."""
    from fomo_ray.maths import merge_ops

    a, b = _tiny(seed=0).model.state_dict(), _tiny(seed=1).model.state_dict()
    merged = merge_ops.merge("interpolate", a, [b], [0.25])
    for k, v in a.items():
        assert _on_device(merged[k])
        if v.is_floating_point():
            torch.testing.assert_close(merged[k], 0.75 * v + 0.25 * b[k], atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_ddp_one_process(tmp_path):
    """torch.distributed with one process (NCCL on CUDA, gloo on CPU) through a file:// store: an all_reduce, and
    one DDP training step of a tiny CLIP that gives the same weights as the same step without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.arange(4.0, device=DEVICE) + 1
        dist.all_reduce(x)
        assert x.device.type == DEVICE.type and x.tolist() == [1.0, 2.0, 3.0, 4.0]

        plain = _tiny(seed=3)
        twin = _tiny(seed=3)
        ddp = DDP(twin.model, device_ids=[DEVICE.index or 0] if DEVICE.type == "cuda" else None)
        images, tokens = _batch(plain)
        for model, net in ((plain.model, plain.model), (twin.model, ddp)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            from fomo_ray.maths.losses import clip_loss

            img, txt, scale = net(images, tokens)[:3]
            clip_loss(img, txt, scale).backward()
            opt.step()
        for (n, p), q in zip(plain.model.named_parameters(), twin.model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=f"DDP step differs at {n}")
        assert any(not torch.equal(p, q) for p, q in zip(plain.model.parameters(), _tiny(seed=3).model.parameters()))
    finally:
        dist.destroy_process_group()
