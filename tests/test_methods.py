"""Methods on a real tiny open_clip model: trainable-parameter sets, adapters reaching attention and MLP, the
merge/EWC/SI math against hand computation, state round trips and bad input."""
import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from fomo_ray.models.backbones import create_backbone
from fomo_ray.config import ConfigError, load_config
from fomo_ray.maths.merge_ops import MergeError
from fomo_ray.methods import REGISTRY, UnknownMethodError, build_method
from fomo_ray.methods.finetune import is_image_tower, is_text_tower


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return create_backbone("fomo-tiny-s", pretrained="").model


def _setup(name, base_model, **overrides):
    cfg = load_config(None, {"method.name": name, **overrides})
    method = build_method(cfg)
    model = method.setup(copy.deepcopy(base_model))
    return method, model


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 400, (2, 32), generator=g)


# --------------------------------------------------------------------------------------------------- registry
def test_unknown_method_lists_valid_names():
    cfg = load_config(None, {"method.name": "lora_plus"})
    with pytest.raises(UnknownMethodError, match="valid: finetune, .*lora.*ema_merge"):
        build_method(cfg)
    with pytest.raises(ConfigError):  # callers can treat it like every other config error
        build_method(cfg)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_builds_sets_up_and_round_trips_state(name, base_model):
    method, model = _setup(name, base_model)
    assert isinstance(model, nn.Module) and hasattr(model, "encode_image")
    state = method.state_dict()
    fresh = build_method(load_config(None, {"method.name": name}))
    fresh.setup(copy.deepcopy(base_model))
    fresh.load_state_dict(copy.deepcopy(state))
    _assert_same_state(fresh.state_dict(), state)
    doc = REGISTRY[name].__doc__ or ""
    cites = re.search(r"[A-Z][a-z]+[^()]* (19|20)\d\d", doc) and ('"' in doc or "arXiv" in doc)
    assert cites, f"method '{name}': the class docstring must cite its paper (authors, year, title or arXiv id)"


def _assert_same_state(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# --------------------------------------------------------------------------------------------------- trainable sets
def test_finetune_trains_everything(base_model):
    _, model = _setup("finetune", base_model)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


def test_locked_image_freezes_exactly_the_image_tower(base_model):
    _, model = _setup("locked_image", base_model)
    names = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == {n for n in names if not is_image_tower(n)}
    assert any(n.startswith("visual.") for n in names) and "logit_scale" in _trainable(model)
    assert "text_projection" in _trainable(model) and "token_embedding.weight" in _trainable(model)


def test_locked_text_freezes_exactly_the_text_tower(base_model):
    _, model = _setup("locked_text", base_model)
    trainable = _trainable(model)
    assert trainable and all(n.startswith("visual.") or n == "logit_scale" for n in trainable)
    assert {n for n, _ in model.named_parameters() if n.startswith("visual.")} <= trainable
    assert not any(is_text_tower(n) for n in trainable)


def test_bitfit_trains_only_and_all_biases(base_model):
    _, model = _setup("bitfit", base_model)
    trainable = _trainable(model)
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert "visual.transformer.resblocks.0.attn.in_proj_bias" in trainable  # MHA's packed q/k/v bias counts


def test_lnfit_trains_only_layernorm_params(base_model):
    _, model = _setup("lnfit", base_model)
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
             for p, _ in mod.named_parameters(recurse=False)}
    assert _trainable(model) == norms
    assert {"ln_final.weight", "visual.ln_pre.bias", "visual.ln_post.weight",
            "transformer.resblocks.1.ln_2.weight"} <= norms


ADAPTER_PARAM = {"lora": r"\.lora_[AB]\.default\.weight$", "dora": r"\.lora_(A|B|magnitude_vector)\.default",
                 "vera": r"\.vera_lambda_[bd]\.default$"}


@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_peft_trains_only_adapters_on_attention_and_mlp_of_both_towers(kind, base_model):
    method, model = _setup(kind, base_model, **{"method.peft.rank": 2})
    trainable = _trainable(model)
    assert trainable and all(re.search(ADAPTER_PARAM[kind], n) for n in trainable), sorted(trainable)[:5]
    for tower, blocks in (("visual.transformer", 2), ("transformer", 2)):
        for b in range(blocks):
            for target in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
                prefix = f"{tower}.resblocks.{b}.{target}."
                assert any(n.startswith(prefix) for n in trainable), f"no {kind} adapter on {prefix}"
    # adapters are part of the model's own state dict (so of every checkpoint)
    assert any(re.search(ADAPTER_PARAM[kind], k) for k in model.state_dict())


@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_adapters_on_attention_out_proj_are_live(kind, base_model):
    """The silent no-op of LoRA on MHA.out_proj must not happen: perturbing only the attention output projection's
    adapter changes both towers' outputs."""
    _, model = _setup(kind, base_model, **{"method.peft.rank": 2})
    model.eval()
    images, texts = _inputs()
    before = model.encode_image(images), model.encode_text(texts)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random, not constant: a constant shift of every feature is removed by the next LayerNorm
        for n, p in model.named_parameters():
            if p.requires_grad and ".attn.out_proj." in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    after = model.encode_image(images), model.encode_text(texts)
    assert (after[0] - before[0]).abs().max() > 1e-4
    assert (after[1] - before[1]).abs().max() > 1e-4


def test_peft_adapter_starts_as_identity(base_model):
    """LoRA's B=0 init: the adapted model computes what the base computes (the swap + injection is exact)."""
    _, model = _setup("lora", base_model)
    base = copy.deepcopy(base_model).eval()
    model.eval()
    images, texts = _inputs()
    torch.testing.assert_close(model.encode_image(images), base.encode_image(images), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_text(texts), base.encode_text(texts), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- merges
def _shift(model, delta):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(delta)


def _sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,w", [("ema_merge", 0.5), ("ema_merge", 0.25), ("zs_merge", 0.3),
                                    ("ft_merge", 0.7), ("offline_merge", 0.5)])
def test_merge_presets_against_hand_computation(name, w, base_model):
    method, model = _setup(name, base_model, **{"method.merge.weight": w})
    theta0 = _sd(model)
    deployed, experts = theta0, []
    for t, delta in enumerate((0.1, -0.3, 0.2)):
        start = method.training_weights(t, model)
        expected_start = {"ema_merge": deployed, "ft_merge": deployed, "zs_merge": theta0,
                          "offline_merge": theta0}[name]
        if start is not None:
            model.load_state_dict(start)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, expected_start[k])
        _shift(model, delta)
        theta_t = _sd(model)
        method.after_task(model, t, iter(()))
        experts.append(theta_t)
        if name in ("ema_merge", "zs_merge"):
            deployed = {k: w * theta_t[k] + (1 - w) * deployed[k] for k in theta0}
        elif name == "ft_merge":
            deployed = {k: w * theta_t[k] + (1 - w) * theta0[k] for k in theta0}
        else:  # offline merge with interpolate = the mean of all experts
            deployed = {k: sum(e[k] for e in experts) / len(experts) for k in theta0}
        got = method.deployed_weights(t, model)
        for k in theta0:
            torch.testing.assert_close(got[k], deployed[k], rtol=1e-5, atol=1e-6)
        # the raw trained weights stay in the model (deployment never overwrites them)
        assert all(torch.equal(model.state_dict()[k], theta_t[k]) for k in theta0)


def test_general_merge_reads_the_time_triple_from_config(base_model):
    method, model = _setup("merge", base_model, **{"method.merge.init": "previous_trained",
                                                    "method.merge.deploy": "zero_shot_anchor",
                                                    "method.merge.operator": "task_arithmetic",
                                                    "method.merge.weight": 0.5})
    theta0 = _sd(model)
    _shift(model, 0.2)
    method.after_task(model, 0, iter(()))
    assert method.training_weights(1, model) is None  # previous_trained: continue from theta_1
    got = method.deployed_weights(0, model)
    k = "visual.proj"
    torch.testing.assert_close(got[k], theta0[k] + 0.5 * 0.2 * torch.ones_like(theta0[k]))


def test_merge_bad_input(base_model):
    with pytest.raises(MergeError, match="unknown merge operator 'avg'.*interpolate"):
        build_method(load_config(None, {"method.name": "ema_merge", "method.merge.operator": "avg"}))
    with pytest.raises(ValueError, match="slerp"):
        build_method(load_config(None, {"method.name": "offline_merge", "method.merge.operator": "slerp"}))
    with pytest.raises(ConfigError, match="method.merge.weight"):
        load_config(None, {"method.name": "ema_merge", "method.merge.weight": 1.5})
    with pytest.raises(ConfigError, match="method.peft.rank"):
        load_config(None, {"method.name": "lora", "method.peft.rank": 0})


# --------------------------------------------------------------------------------------------------- regularisers
def _loss(model, images, texts):
    return model.encode_image(images).square().mean() + model.encode_text(texts).square().mean()


class _Losses:
    """The loop's ``TaskLosses`` on one process over given losses (the real one runs in test_loop / test_ddp)."""

    def __init__(self, losses):
        self.losses = losses

    def sum_over(self, n, per_batch):
        parts = [per_batch(loss) for loss in self.losses[:n]]
        return [sum(p[i] for p in parts) for i in range(len(parts[0]))]


def test_ewc_fisher_penalty_against_hand_computation(base_model):
    method, model = _setup("ewc", base_model, **{"method.reg.ewc_lambda": 10.0, "method.reg.ewc_gamma": 0.5,
                                                  "method.reg.ewc_fisher_batches": 2})
    images, texts = _inputs()
    assert method.extra_loss(model, 0) is None  # no penalty before the first Fisher
    params = dict(model.named_parameters())
    fisher = {}
    for t in range(2):
        batches = [(images[i:i + 1], texts[i:i + 1]) for i in range(2)]
        grads = [torch.autograd.grad(_loss(model, *b), list(params.values()), allow_unused=True) for b in batches]
        new = {n: sum(torch.zeros_like(params[n]) if g[i] is None else g[i] ** 2 for g in grads) / 2
               for i, n in enumerate(params)}
        fisher = {n: 0.5 * fisher[n] + new[n] if fisher else new[n] for n in params}
        # a third batch is offered but ewc_fisher_batches=2 must use two
        method.after_task(model, t, _Losses([_loss(model, *b) for b in batches + [(images, texts)]]))
        anchor = {n: p.detach().clone() for n, p in params.items()}
        _shift(model, 0.01 * (t + 1))
    penalty = method.extra_loss(model, 1)
    expected = 0.5 * 10.0 * sum((fisher[n] * (params[n].detach() - anchor[n]) ** 2).sum() for n in params)
    torch.testing.assert_close(penalty, expected, rtol=1e-4, atol=1e-8)
    penalty.backward()
    n = "visual.proj"
    torch.testing.assert_close(params[n].grad, 10.0 * fisher[n] * (params[n].detach() - anchor[n]),
                               rtol=1e-4, atol=1e-10)


def test_si_path_integral_and_penalty_against_hand_computation(base_model):
    method, model = _setup("si", base_model, **{"method.reg.si_c": 2.0, "method.reg.si_xi": 0.5})
    params = dict(model.named_parameters())
    theta_star = {n: p.detach().clone() for n, p in params.items()}
    images, texts = _inputs()
    omega = {n: torch.zeros_like(p) for n, p in params.items()}
    assert method.extra_loss(model, 0) is None
    for step, lr in enumerate((0.1, 0.05)):
        model.zero_grad()
        _loss(model, images, texts).backward()
        for n, p in params.items():
            if p.grad is not None:  # logit_scale is unused by this loss
                omega[n] += lr * p.grad ** 2
        method.after_step(model, 0, step, lr)
        _shift(model, 0.01)
    method.after_task(model, 0, iter(()))
    big = {n: omega[n] / ((params[n].detach() - theta_star[n]) ** 2 + 0.5) for n in params}
    anchor = {n: p.detach().clone() for n, p in params.items()}
    _shift(model, -0.02)
    expected = 2.0 * sum((big[n] * (params[n].detach() - anchor[n]) ** 2).sum() for n in params)
    torch.testing.assert_close(method.extra_loss(model, 1), expected, rtol=1e-4, atol=1e-8)
    assert all(torch.count_nonzero(o) == 0 for o in method.omega_small)  # omega restarts every task


# --------------------------------------------------------------------------------------------------- task plans
def test_zero_shot_and_joint_plans(base_model):
    rows = [np.array([5, 1, 3]), np.array([2, 4]), np.array([9])]
    zs, model = _setup("zero_shot", base_model)
    assert not _trainable(model)
    assert [p.steps for p in zs.task_plan(rows, 7)] == [0, 0, 0]
    joint, _ = _setup("joint", base_model)
    (plan,) = joint.task_plan(rows, 7)
    assert plan.steps == 21 and plan.rows.tolist() == [1, 2, 3, 4, 5, 9]
    ft, _ = _setup("finetune", base_model)
    assert [(p.rows.tolist(), p.steps) for p in ft.task_plan(rows, 7)] == [([5, 1, 3], 7), ([2, 4], 7), ([9], 7)]
