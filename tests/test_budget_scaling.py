"""The budget without a pass larger than a rank's batch (issue 27): a step at the global batch is counted on fake
tensors (a CPU, analytic memory) or extended from real steps at two small batches (``budget.scale_step``), and both
give exactly what one real step at the full batch gives (what the budget measured before), for every registered
method; a spy checks that no measurement runs a real batch larger than a rank's."""
from __future__ import annotations

import logging

import pytest
import torch

from _budget_util import tiny_spec

from fomo_ray.budgets import budget as B
from fomo_ray.budgets import step_measure
from fomo_ray.config import load_config

ARCH = "budget-scaling-tiny"  # one block per tower: every method's graph, in a fraction of a second
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
BATCH = 16
FIELDS = ("counted_gflops", "elementwise_gflops", "peak_bytes", "task_gflops", "trainable_params", "memory_kind",
          "batch_bytes", "checkpointed_batch_bytes")


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> B.BackboneSpec:
    return tiny_spec(tmp_path_factory.mktemp("model_cfg"), ARCH, TINY)


def _cost_names() -> list[str]:
    """Every registered method's measured cost once (merges, joint: cost_as finetune)."""
    from fomo_ray.methods import REGISTRY, build_method

    names = {}
    for name in sorted(REGISTRY):
        method = build_method(load_config(None, {"method.name": name}))
        names.setdefault(method.cost_as or name, name)
    return sorted(names)


def _record(spec, name: str, engine: str, cfg=None, rank_batch: int = 4, dtype=None):
    cfg = cfg or load_config(None, {})
    return B.measure_method(name, B.registry_cost(cfg, name), spec.factory, backbone=ARCH, batch_size=BATCH,
                            image_size=32, context_length=16, engine=engine, rank_batch=rank_batch,
                            autocast_dtype=dtype)


def _figures(r: B.CostRecord) -> tuple:
    return tuple(getattr(r, f) for f in FIELDS)


# --------------------------------------------------------------------------------------------------- exactness
def test_counted_and_scaled_steps_equal_one_real_step_at_the_full_batch_for_every_method(spec, tmp_path,
                                                                                         monkeypatch):
    """Per registered method: the count on fake tensors and the line through real steps at b = 2 and 4 give the same
    FLOPs, memory and per-task work as one real step at b = 16 (what MEASURE_VERSION 2 ran), hence the same steps."""
    names = _cost_names()
    assert {"finetune", "lora", "dora", "vera", "ewc", "si", "locked_image", "locked_text", "bitfit"} <= set(names)
    for name in names:
        direct = _record(spec, name, "direct")
        counted, scaled = _record(spec, name, "count"), _record(spec, name, "scale")
        assert _figures(counted) == _figures(direct), name
        assert _figures(scaled) == _figures(direct), name
        if direct.trainable_params:
            assert counted.measured == f"counted at b={BATCH} (fake tensors)"
            assert scaled.measured == "scaled from b=2, 4"
    # and so the steps per task of a run, through the cache, for every method of the registry
    from fomo_ray.methods import REGISTRY

    steps = {}
    for engine in ("direct", "count", "scale"):
        monkeypatch.setattr(B, "ENGINE", engine)
        cfg = load_config(None, {"budget.cache_dir": str(tmp_path / engine), "mixture.batch_size": BATCH,
                                 "budget.total_ft_steps": 20_000, "ray.num_workers": 4})
        steps[engine] = {m: B.steps_per_task(cfg, _cost_of(cfg, m), 10, backbone=spec,
                                             device="cpu") for m in sorted(REGISTRY)}
    assert steps["count"] == steps["direct"] and steps["scale"] == steps["direct"]
    assert steps["direct"]["bitfit"] > steps["direct"]["finetune"] == 2000 > steps["direct"]["ewc"]


def test_a_count_builds_its_model_unfilled_and_counts_what_a_filled_one_counts():
    """The count's model is built on the meta device (no random fills: most of a second per ViT-B/16, one model per
    method in a sweep's estimate), then given empty storage: the same parameters and buffers, and the same figures as
    a model built with its fills (a factory the meta device cannot run is built so)."""
    spec = B.backbone_spec("fomo-tiny-s")
    with torch.device("meta"):
        assert {p.device.type for p in spec.factory().parameters()} == {"meta"}  # the fast path, not the fallback

    def filled_only():
        if torch.get_default_device().type == "meta":
            raise RuntimeError("this factory cannot build on the meta device")
        return spec.factory()

    def layout(model):
        return [(n, t.shape, t.dtype, t.device.type, t.requires_grad)
                for n, t in [*model.named_parameters(), *model.named_buffers()]]

    assert layout(step_measure.unfilled(spec.factory, torch.device("cpu"))) == layout(spec.factory())
    assert layout(step_measure.unfilled(filled_only, torch.device("cpu"))) == layout(spec.factory())
    cfg = load_config(None, {})
    for name in ("finetune", "lora"):
        fast, filled = (B.measure_method(name, B.registry_cost(cfg, name), factory, backbone=spec.name,
                                         batch_size=BATCH, image_size=spec.image_size,
                                         context_length=spec.context_length, engine="count")
                        for factory in (spec.factory, filled_only))
        assert _figures(fast) == _figures(filled) and fast.measured == f"counted at b={BATCH} (fake tensors)", name


def _cost_of(cfg, name: str) -> str:
    from fomo_ray.methods import build_method

    m = build_method(cfg.replace({"method.name": name}))
    return m.cost_as or m.name


@pytest.mark.parametrize("arch", ["fomo-test-rn", "fomo-test-sigmoid"])
def test_the_count_is_exact_under_bf16_autocast_and_on_other_tower_families(arch):
    """bf16 autocast (the paper preset's precision on a CPU): layer and batch norm save float32 statistics, which
    the fake kernels would give in bf16 (step_measure._CpuKernelDtypes); a BatchNorm tower and a sigmoid-loss model."""
    from _test_archs import registered

    with registered():
        spec = B.BackboneSpec(arch, lambda: __import__("open_clip").create_model(arch, pretrained=None), 32, 32)
        cfg = load_config(None, {})
        for name in ("finetune", "locked_image", "ewc"):
            direct = B.measure_method(name, B.registry_cost(cfg, name), spec.factory, backbone=arch, batch_size=8,
                                      image_size=32, context_length=32, engine="direct",
                                      autocast_dtype=torch.bfloat16)
            for engine in ("count", "scale"):
                other = B.measure_method(name, B.registry_cost(cfg, name), spec.factory, backbone=arch,
                                         batch_size=8, image_size=32, context_length=32, engine=engine,
                                         rank_batch=4, autocast_dtype=torch.bfloat16)
                assert _figures(other) == _figures(direct), (arch, name, engine)


def test_a_model_that_cannot_run_fake_is_measured_on_small_real_batches(spec, caplog):
    """A step that reads a value (here a penalty that branches on one) cannot be counted on fake tensors: the count
    falls back to real steps at b = 2 and 4, extended exactly, with a warning naming the method."""
    def penalty(model):
        p = next(model.parameters())
        return (p ** 2).sum() * (1.0 if float(p.detach().abs().max()) > 0 else 0.0)

    cost = B.MethodCost(lambda model: model, extra_loss=penalty)
    kw = dict(backbone=ARCH, batch_size=BATCH, image_size=32, context_length=16, rank_batch=4)
    with caplog.at_level(logging.WARNING, logger="fomo_ray.budgets.budget"):
        fell_back = B.measure_method("branchy", cost, spec.factory, engine="auto", **kw)
    assert fell_back.measured == "scaled from b=2, 4" and "cannot be counted on fake tensors" in caplog.text
    assert _figures(fell_back) == _figures(B.measure_method("branchy", cost, spec.factory, engine="direct", **kw))


def test_the_line_is_exact_in_integers_and_the_loss_is_measured_at_the_full_batch(spec):
    assert step_measure._on_line(2, 110, 4, 210, 512) == 110 + 50 * 510
    assert B.sample_batches(512, 64) == (2, 4) and B.sample_batches(512, 3) == (2, 3)
    assert B.sample_batches(512, 1) == (1, 2) and B.sample_batches(4, 64) == (4,)
    # the loss's b x b logits: quadratic in b, so measured at the batch itself, never extended
    flops = [step_measure.measure_loss(b, (32, "float32", (True, True, True)))[0] for b in (2, 4, 8)]
    assert flops[2] - flops[1] != flops[1] - flops[0]
    assert flops[2] == 3 * 2 * 8 * 8 * 32  # I @ T^T forward, two matmuls backward: 2 b^2 d each
    frozen_text = step_measure.measure_loss(8, (32, "float32", (True, False, True)))[0]
    assert frozen_text == 2 * 2 * 8 * 8 * 32  # no gradient for a frozen tower's features


# --------------------------------------------------------------------------------------------------- the spy
def test_no_measurement_runs_a_real_batch_larger_than_a_ranks(spec, tmp_path, monkeypatch):
    """Every synthetic batch a measurement builds goes through step_measure.clip_batch: record its size and whether it
    was real. The global batch is 16 on 4 ranks (a rank's batch: 4), also with 2 accumulation micro-batches (2)."""
    from fomo_ray.methods import REGISTRY

    from fomo_ray.budgets import step_measure

    seen: list[tuple[int, bool]] = []
    real = step_measure.clip_batch

    def spy(batch_size, *args, **kwargs):
        images, tokens = real(batch_size, *args, **kwargs)
        seen.append((batch_size, not hasattr(images, "fake_mode")))
        return images, tokens

    monkeypatch.setattr(step_measure, "clip_batch", spy)  # where the measured step builds its batch
    for engine, accum, largest in (("auto", 1, 0), ("scale", 1, 4), ("scale", 2, 2)):
        monkeypatch.setattr(B, "ENGINE", engine)
        seen.clear()
        cfg = load_config(None, {"budget.cache_dir": str(tmp_path / f"{engine}{accum}"), "mixture.batch_size": BATCH,
                                 "budget.total_ft_steps": 20_000, "ray.num_workers": 4,
                                 "optimizer.accum_steps": accum})
        assert B.rank_batch(cfg) == 4 // accum
        for m in sorted(REGISTRY):
            B.steps_per_task(cfg, _cost_of(cfg, m), 10, backbone=spec, device="cpu")
        assert seen, engine
        assert max((b for b, is_real in seen if is_real), default=0) == largest, (engine, accum, seen)
        if engine == "auto":  # on a CPU everything is counted: the full batch, fake
            assert {b for b, _ in seen} == {BATCH}


def test_a_rank_batch_follows_the_workers_and_accumulation():
    cfg = load_config(None, {"mixture.batch_size": 512, "ray.num_workers": 8})
    assert B.rank_batch(cfg) == 64 and B.rank_batch(cfg.replace({"optimizer.accum_steps": 4})) == 16
    assert B.rank_batch(load_config(None, {"mixture.batch_size": 10, "ray.num_workers": 3})) == 4  # ceil


@pytest.mark.gpu
def test_cuda_scaled_memory_is_close_to_one_step_at_the_full_batch(spec):
    """On CUDA the allocator's forward+backward peak is extended along the line (not exact: allocator rounding)."""
    cfg = load_config(None, {})
    for name in ("finetune", "locked_image"):
        kw = dict(backbone=ARCH, batch_size=64, image_size=32, context_length=16, device="cuda", rank_batch=8)
        direct = B.measure_method(name, B.registry_cost(cfg, name), spec.factory, engine="direct", **kw)
        scaled = B.measure_method(name, B.registry_cost(cfg, name), spec.factory, engine="scale", **kw)
        assert scaled.counted_gflops == direct.counted_gflops
        assert scaled.peak_bytes == pytest.approx(direct.peak_bytes, rel=0.05)
