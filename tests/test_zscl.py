"""ZSCL (fomo_ray/methods/zscl.py) on a real tiny open_clip model: the distillation term, its gradient, the weight
ensemble and the budget's charge for the initial model's forward."""
from __future__ import annotations

import copy

import pytest
import torch

from fomo_ray.models.backbones import create_backbone
from fomo_ray.config import load_config
from fomo_ray.methods import build_method
from fomo_ray.methods.zscl import distillation


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return create_backbone("fomo-tiny-s", pretrained="").model


def _reference(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 400, (n, 32), generator=g)


def _zscl(base_model, **overrides):
    method = build_method(load_config(None, {"method.name": "zscl", "method.zscl.ref_size": 8,
                                             "method.zscl.ref_batch": 4, **overrides}))
    model = method.setup(copy.deepcopy(base_model))
    method.use_reference(*_reference())
    return method, model


def test_distillation_is_zero_at_the_initial_model_and_positive_after_an_update(base_model):
    method, model = _zscl(base_model)
    at_init = float(method.extra_loss(model, 0).detach())
    # zero up to float32 rounding: the no-grad forward on theta_0 and the graph-building one need not take the same
    # kernels (1.3e-7 on one 2-core x86 machine, exactly 0.0 on another); an update moves it by orders of magnitude
    assert at_init == pytest.approx(0.0, abs=1e-5)
    images, texts = _reference()
    loss = -(model(images, texts)[0] @ model(images, texts)[1].T).diagonal().sum()  # one CLIP-like SGD update
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1.0 * p.grad
    after = float(method.extra_loss(model, 0).detach())
    assert after > 1e-4 and after > 1e3 * abs(at_init)


def test_distillation_gradient_reaches_only_trainable_parameters(base_model):
    method, model = _zscl(base_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for name, p in model.named_parameters():  # freeze the image tower for this test
        p.requires_grad_(not name.startswith("visual."))
    model.zero_grad(set_to_none=True)
    method.extra_loss(model, 0).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(not n.startswith("visual.") for n in grads)
    assert "text_projection" in grads
    assert all(not t.requires_grad and t.grad is None for t in method.theta0.values())


def test_distillation_math_against_hand_computation():
    logits, logits0 = torch.tensor([[2.0, 0.0], [0.5, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    T = 2.0

    def kl(p_logits, q_logits):  # KL(softmax(q) || softmax(p)) per row, mean over rows
        p, q = torch.softmax(p_logits / T, 1), torch.softmax(q_logits / T, 1)
        return float((q * (q.log() - p.log())).sum(1).mean())

    expected = T * T * (kl(logits, logits0) + kl(logits.T, logits0.T))
    assert float(distillation(logits, logits0, T)) == pytest.approx(expected, rel=1e-6)


def test_reference_batches_cycle_and_the_ensemble_is_the_running_mean(base_model):
    method, model = _zscl(base_model, **{"method.zscl.we_every": 2})
    assert method.training_weights(0, model) is None
    start = {k: v.clone() for k, v in model.state_dict().items()}
    snaps = []
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        if (step + 1) % 2 == 0:
            snaps.append({k: v.clone() for k, v in model.state_dict().items()})
        method.after_step(model, 0, step, 0.1)
    assert method.draws == 4 and method.members == 2
    method.after_task(model, 0, iter(()))
    k = "visual.proj"
    mean = (start[k] + snaps[0][k] + snaps[1][k]) / 3
    torch.testing.assert_close(method.deployed_weights(0, model)[k], mean)
    assert method.training_weights(1, model)[k].equal(method.deployed_weights(0, model)[k])  # next task starts there
    images, tokens = method._reference_batch()
    assert torch.equal(tokens, _reference()[1][:4])  # 4 draws of 4 from 8: back at the start of the cycle
    off, model2 = _zscl(base_model, **{"method.zscl.we_every": 0})
    off.after_task(model2, 0, iter(()))
    assert off.training_weights(1, model2) is None


def test_zscl_without_its_reference_set_refuses_to_train(base_model):
    method = build_method(load_config(None, {"method.name": "zscl"}))
    model = method.setup(copy.deepcopy(base_model))
    with pytest.raises(RuntimeError, match="reference set"):
        method.extra_loss(model, 0)


def test_budget_charges_the_initial_models_forward(tmp_path):
    from fomo_ray.budgets import budget as B

    cfg = load_config(None, {"budget.cache_dir": str(tmp_path), "mixture.batch_size": 8,
                             "method.zscl.ref_batch": 8})
    ft = B.method_record(cfg, "finetune", device="cpu")
    zscl = B.method_record(cfg, "zscl", device="cpu")
    # the reference batch's forward+backward through the current model and a forward of theta_0: more than the
    # training batch of the same size costs
    assert zscl.counted_gflops > 1.5 * ft.counted_gflops
    assert zscl.peak_bytes > ft.peak_bytes  # theta_0 and the ensemble are held
    bigger = B.method_record(cfg.replace({"method.zscl.ref_batch": 16, "method.zscl.ref_size": 16}), "zscl",
                             device="cpu")
    assert bigger.counted_gflops > zscl.counted_gflops and bigger.settings_hash != zscl.settings_hash
