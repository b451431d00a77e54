"""MAF compute budgets (fomo_ray/budgets/budget.py, docs/BENCHMARK.md §Budgets), measured on a real (tiny) open_clip
CLIP."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _budget_util import tiny_spec

from fomo_ray.budgets import budget as B
from fomo_ray.cli.budget import main as budget_main
from fomo_ray.config import ExperimentConfig
from fomo_ray.tables import format_table

ARCH = "budget-test-tiny"  # self-contained: does not depend on fomo_ray/models/backbones.py
TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
BATCH = 4


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> B.BackboneSpec:
    return tiny_spec(tmp_path_factory.mktemp("model_cfg"), ARCH, TINY)


@pytest.fixture
def cfg(tmp_path) -> ExperimentConfig:
    return ExperimentConfig().replace({"budget.cache_dir": str(tmp_path / "cache"), "mixture.batch_size": BATCH,
                                       "budget.total_ft_steps": 2000})


# --------------------------------------------------------------------------------------------------- own methods
def full_ft(model):
    return model


def freeze_unless(keep):
    def prepare(model):
        for name, p in model.named_parameters():
            p.requires_grad_(keep(name))
        return model
    return prepare


bias_only = freeze_unless(lambda n: n.endswith("bias"))                      # BitFit-like
mlp_only = freeze_unless(lambda n: ".mlp.c_fc." in n)                       # PEFT-like: a small subset
locked_image = freeze_unless(lambda n: not n.startswith("visual."))        # frozen vision tower
OWN = {
    "finetune": B.MethodCost(full_ft),
    "bitfit": B.MethodCost(bias_only),
    "subset": B.MethodCost(mlp_only),
    "locked_image": B.MethodCost(locked_image),
    "ewc": B.MethodCost(full_ft, penalty_state=2, step_flops_per_param=B.PENALTY_FLOPS_PER_PARAM, task_passes=4),
    "ewc_no_fisher": B.MethodCost(full_ft, penalty_state=2, step_flops_per_param=B.PENALTY_FLOPS_PER_PARAM),
}


def steps(cfg, name, spec, num_tasks=10):
    return B.steps_per_task(cfg, name, num_tasks, costs=OWN, backbone=spec, device="cpu")


# --------------------------------------------------------------------------------------------------- budgets
def test_subset_and_bitfit_methods_get_more_steps_than_full_finetuning(cfg, spec):
    ft = steps(cfg, "finetune", spec)
    assert ft == 200  # 2000 // 10: finetune's own MAF ratio is exactly 1
    assert steps(cfg, "bitfit", spec) > ft
    assert steps(cfg, "subset", spec) > ft


def test_frozen_tower_gets_more_steps(cfg, spec):
    ft = B.method_record(cfg, "finetune", cost=OWN["finetune"], backbone=spec, device="cpu")
    locked = B.method_record(cfg, "locked_image", cost=OWN["locked_image"], backbone=spec, device="cpu")
    assert locked.counted_gflops < ft.counted_gflops      # no backward through the vision tower
    assert locked.peak_bytes < ft.peak_bytes              # no grads/AdamW state/saved activations there
    assert steps(cfg, "locked_image", spec) > steps(cfg, "finetune", spec)


def test_ewc_fisher_is_charged_per_task_not_per_step(cfg, spec):
    ft = B.method_record(cfg, "finetune", cost=OWN["finetune"], backbone=spec, device="cpu")
    ewc = B.method_record(cfg, "ewc", cost=OWN["ewc"], backbone=spec, device="cpu")
    plain = B.method_record(cfg, "ewc_no_fisher", cost=OWN["ewc_no_fisher"], backbone=spec, device="cpu")
    assert ewc.task_gflops == pytest.approx(4 * ewc.counted_gflops)  # 4 Fisher batches of forward + backward
    charge = B.task_charge_steps(ewc)
    assert 0 < charge < 4
    ratio = ft.step_gflops / B.maf(ewc, ft)
    for steps_ft in (1420, 142):  # the same charge whatever the task length: per task, not per step
        assert B.steps_from_costs(steps_ft, ft, ewc) == math.floor(steps_ft * ratio - charge + 1e-9)
        deficit = B.steps_from_costs(steps_ft, ft, plain) - B.steps_from_costs(steps_ft, ft, ewc)
        assert deficit in (math.floor(charge), math.ceil(charge))
    assert steps(cfg, "ewc", spec) < steps(cfg, "ewc_no_fisher", spec)


def test_fewer_than_one_step_per_task_is_an_error_naming_method_and_budget(cfg, spec):
    tight = cfg.replace({"budget.total_ft_steps": 20})
    with pytest.raises(B.BudgetError, match=r"method 'ewc' gets fewer than one step per task.*budget of 2 full"):
        B.steps_per_task(tight, "ewc", 10, costs=OWN, backbone=spec, device="cpu")
    with pytest.raises(B.BudgetError, match="total_ft_steps=20 over 40 tasks"):
        B.steps_per_task(tight, "finetune", 40, costs=OWN, backbone=spec, device="cpu")


def test_measuring_leaves_the_global_rng_untouched(cfg, spec):
    """A cache miss (model init, one step) must not shift the run's random numbers against a cache hit."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    B.steps_per_task(cfg, "bitfit", 10, costs=OWN, backbone=spec, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_equal_steps_mode_bypasses_maf(cfg, spec):
    def never(model):
        raise AssertionError("equal_steps must not measure anything")

    eq = cfg.replace({"budget.mode": "equal_steps"})
    assert B.steps_per_task(eq, "bitfit", 10, costs={"bitfit": B.MethodCost(never)}, backbone=spec) == 200


# --------------------------------------------------------------------------------------------------- measurement
def test_cpu_memory_figure_is_deterministic_and_analytic(cfg, spec):
    a = B.measure_method("finetune", OWN["finetune"], spec.factory, backbone=ARCH, batch_size=BATCH, image_size=32,
                         context_length=16)
    b = B.measure_method("finetune", OWN["finetune"], spec.factory, backbone=ARCH, batch_size=BATCH, image_size=32,
                         context_length=16)
    assert a == b and a.memory_kind == "cpu_analytic"
    model = spec.factory()
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(x.numel() * 4 for x in model.buffers())
    biases = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("bias"))
    bit = B.measure_method("bitfit", OWN["bitfit"], spec.factory, backbone=ARCH, batch_size=BATCH, image_size=32,
                           context_length=16)
    assert bit.trainable_params * 4 == biases
    # model + grads + 2 AdamW moments of the trainable parameters, plus the activations saved for backward
    saved_ft = a.peak_bytes - (params + buffers + 3 * params)
    saved_bitfit = bit.peak_bytes - (params + buffers + 3 * biases)
    assert 0 < saved_bitfit < saved_ft  # frozen matmuls need not keep their inputs for weight gradients


def test_attention_flops_are_counted_on_cpu(spec, monkeypatch):
    """FlopCounterMode alone misses the CPU attention kernel; the added formula counts exactly q/k/v-shaped work."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def measure():
        model = spec.factory()
        return B.measure_step(model, list(model.parameters()), BATCH, 32, 16).gflops

    with_attention = measure()
    from fomo_ray.budgets import step_measure

    monkeypatch.setattr(step_measure, "CPU_ATTENTION_FLOPS", {})  # where the measured step counts attention
    without = measure()
    vision_q, text_q = (BATCH, 1, 17, 64), (BATCH, 2, 16, 32)  # 16 patches + class token, 1 head; 16 tokens, 2 heads
    expected = sum(sdpa_flop_count(q, q, q) + sdpa_backward_flop_count(q, q, q, q) for q in (vision_q, text_q))
    assert (with_attention - without) * 1e9 == pytest.approx(expected)


def test_cache_is_hit_the_second_time_and_written_atomically(cfg, spec):
    calls = []

    def counting(model):
        calls.append(1)
        return model

    cost = B.MethodCost(counting)
    first = B.method_record(cfg, "finetune", cost=cost, backbone=spec, device="cpu")
    second = B.method_record(cfg, "finetune", cost=cost, backbone=spec, device="cpu")
    assert first == second and len(calls) == 1
    files = sorted(p.name for p in Path(cfg.budget.cache_dir).iterdir())
    assert files == [f"{ARCH}__finetune__b{BATCH}__px32__cpu__{first.settings_hash}.json"]  # no temp leftovers
    # another batch size is another measurement; a corrupt file is measured again, never trusted
    B.method_record(cfg.replace({"mixture.batch_size": BATCH + 1}), "finetune", cost=cost, backbone=spec,
                    device="cpu")
    assert len(calls) == 2
    path = B.cache_path(cfg.budget.cache_dir, ARCH, "finetune", BATCH, 32, "cpu", first.settings_hash)
    path.write_text("{not json")
    assert B.method_record(cfg, "finetune", cost=cost, backbone=spec, device="cpu") == first
    assert len(calls) == 3


def test_table_rows(cfg, spec):
    kw = dict(backbone=spec, device="cpu")
    ft = B.method_record(cfg, "finetune", cost=OWN["finetune"], **kw)
    bit = B.method_record(cfg, "bitfit", cost=OWN["bitfit"], **kw)
    rows = B.budget_rows([ft, bit], ft)
    assert [r["T=20"] for r in rows][0] == 1420 and rows[0]["T=200"] == 142
    assert rows[0]["mem_mult"] == 1.0 and rows[0]["MAF"] == pytest.approx(ft.step_gflops)
    assert rows[1]["T=20"] > 1420 and rows[1]["paper ViT-B/16 T=20"] == "3179"
    text = format_table(rows)
    assert "bitfit" in text and "T=100" in text


@pytest.mark.gpu
def test_cuda_memory_is_the_allocator_peak(cfg, spec):
    kw = dict(backbone=spec, device="cuda")
    a = B.method_record(cfg, "finetune", cost=OWN["finetune"], **kw)
    b = B.measure_method("finetune", OWN["finetune"], spec.factory, backbone=ARCH, batch_size=BATCH, image_size=32,
                         context_length=16, device="cuda", autocast_dtype=torch.bfloat16)
    assert a.memory_kind == "cuda_max_allocated" and a.device_kind.startswith("cuda-")
    assert a.counted_gflops == b.counted_gflops
    assert a.peak_bytes == pytest.approx(b.peak_bytes, rel=0.02)  # allocator workspaces may differ slightly
    assert B.steps_per_task(cfg, "bitfit", 10, costs=OWN, backbone=spec, device="cuda") > 200


# --------------------------------------------------------------------------------------------------- real registry
def _methods_or_skip():
    try:
        import fomo_ray.methods as methods
    except ImportError as e:  # the methods package is built by another helper; it may not import yet
        pytest.skip(f"fomo_ray.methods does not import yet: {e}")
    return methods


def test_real_method_registry_budgets(cfg, spec):
    methods = _methods_or_skip()
    kw = dict(backbone=spec, device="cpu")
    got = {m: B.steps_per_task(cfg, m, 10, **kw) for m in ("finetune", "bitfit", "lora", "locked_image", "ewc",
                                                             "ema_merge", "zero_shot")}
    assert set(got) <= set(methods.REGISTRY)
    assert got["bitfit"] > got["finetune"] and got["lora"] > got["finetune"]
    assert got["locked_image"] > got["finetune"]
    assert got["ema_merge"] == got["finetune"]  # merging is counted free
    assert got["ewc"] < got["finetune"]         # its penalty state and per-task Fisher pass cost steps
    assert got["zero_shot"] == 0                # nothing trainable, nothing spent


def test_cli_prints_a_table(cfg, spec, capsys):
    _methods_or_skip()
    from fomo_ray.models import backbones  # noqa: F401  (the CLI builds the backbone by name)

    rc = budget_main(["--backbone", "fomo-tiny-s", "--batch-size", "2", "--device", "cpu", "--methods", "finetune",
                 "bitfit", "--set", f"budget.cache_dir={cfg.budget.cache_dir}"])
    out = capsys.readouterr().out
    assert rc == 0 and "finetune" in out and "bitfit" in out and "1420" in out


def test_cli_uses_the_users_config_and_does_not_warn_per_model(cfg, capfd, caplog):
    """Issue 13: positional config overrides reach the measurement (a LoRA rank changes the trainable count), the
    table has a column for the config's own T and budget, and open_clip's random-init warning is not printed once per
    model built."""
    _methods_or_skip()
    from fomo_ray.models import backbones

    cache = f"budget.cache_dir={cfg.budget.cache_dir}"
    counts = {}
    for rank in (4, 16):
        assert budget_main([f"method.peft.rank={rank}", "stream.num_tasks=3", "budget.total_ft_steps=90", cache,
                            "--backbone", "fomo-tiny-s", "--batch-size", "2", "--device", "cpu",
                            "--methods", "finetune", "lora"]) == 0
        out = capfd.readouterr()
        assert "No pretrained weights" not in out.out + out.err + caplog.text
        lines = {line.split()[0]: line.split() for line in out.out.splitlines() if line.split()[:1] in (["finetune"],
                                                                                                       ["lora"])}
        assert "this config: T=3, total 90" in out.out and lines["finetune"][-1] == "30"  # 90 // 3
        counts[rank] = float(lines["lora"][1])
    assert counts[16] > counts[4]  # the override reached the measured model


class ToyAnchor:
    """A regulariser the budget has never heard of (registered only in this test): an L2 pull towards theta_0 once a
    task has ended, plus three passes over the task data per task. Its costs come from its own hooks."""

    name = "toy_anchor"
    cost_as = None

    def __init__(self, cfg, seed=0):
        self.cfg, self.anchor = cfg, None

    def setup(self, model):
        return model

    def steady_state(self, model):
        self.anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def extra_loss(self, model, t):
        if self.anchor is None:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        return sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchor))

    def extra_cost(self):
        from fomo_ray.costs import ExtraCost

        return ExtraCost(step_flops_per_param=4.0, task_passes=3)

    def state_dict(self):
        return {} if self.anchor is None else {"anchor": {str(i): a for i, a in enumerate(self.anchor)}}


def test_a_new_regulariser_is_charged_through_its_own_hooks(cfg, spec, monkeypatch):
    methods = _methods_or_skip()
    monkeypatch.setitem(methods.REGISTRY, "toy_anchor", ToyAnchor)
    kw = dict(backbone=spec, device="cpu")
    ft = B.method_record(cfg, "finetune", **kw)
    toy = B.method_record(cfg, "toy_anchor", **kw)
    assert toy.trainable_params == ft.trainable_params
    assert toy.task_gflops == pytest.approx(3 * toy.counted_gflops)  # its three passes per task
    assert toy.elementwise_gflops == pytest.approx((B.ADAMW_FLOPS_PER_PARAM + 4.0) * toy.trainable_params / 1e9)
    assert toy.peak_bytes > ft.peak_bytes + 4 * toy.trainable_params  # its anchor is held during training
    assert B.steps_per_task(cfg, "toy_anchor", 10, **kw) < B.steps_per_task(cfg, "finetune", 10, **kw)


def test_a_reference_backbone_gives_every_backbone_the_steps_of_the_same_compute(tmp_path):
    """Issue 17, item 4: with budget.reference_backbone a task's budget is fine-tuning the reference for steps_ft
    steps; a larger backbone gets the fewer steps that spend it, and so does every method on it."""
    from fomo_ray.budgets.budget import maf, method_record, steps_per_task
    from fomo_ray.config import load_config

    cfg = load_config(None, {"budget.cache_dir": str(tmp_path), "stream.num_tasks": 4, "budget.total_ft_steps": 400,
                             "mixture.batch_size": 8, "budget.reference_backbone": "fomo-tiny-s"})
    m = cfg.replace({"backbone.name": "fomo-tiny-m"})
    ft_s, ft_m = (method_record(c, "finetune", device="cpu") for c in (cfg, m))
    assert steps_per_task(cfg, "finetune", 4, device="cpu") == 100  # the reference itself: steps_ft
    fair = 100 * ft_s.step_gflops / ft_m.step_gflops
    assert steps_per_task(m, "finetune", 4, device="cpu") == int(fair) < 100
    lora_m = method_record(m.replace({"method.name": "lora"}), "lora", device="cpu")
    assert steps_per_task(m, "lora", 4, device="cpu") == int(fair * maf(ft_m, ft_m) / maf(lora_m, ft_m))
    assert steps_per_task(m.replace({"budget.reference_backbone": ""}), "finetune", 4, device="cpu") == 100
    assert steps_per_task(m.replace({"budget.mode": "equal_steps"}), "lora", 4, device="cpu") == int(fair)
