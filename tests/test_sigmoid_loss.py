"""SigLIP-style models (open_clip models with a ``logit_bias``) train with their sigmoid loss, everywhere a training
loss is computed (the loop's batch_loss, DDP's PairEncoder, the budget's and throughput's measured step); models
without one keep InfoNCE. Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (ICCV)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _test_archs import registered
from fomo_ray.core import distributed
from fomo_ray.budgets import step_measure
from fomo_ray.models.backbones import create_backbone
from fomo_ray.core.loop import batch_loss
from fomo_ray.maths.losses import clip_loss, contrastive_loss, siglip_loss


@pytest.fixture(scope="module")
def sigmoid_backbone():
    with registered():
        torch.manual_seed(0)
        return create_backbone("fomo-test-sigmoid", "")


def _features(n=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_siglip_loss_against_hand_computation_and_open_clip():
    img, txt = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    n = img.shape[0]
    want = 0.0
    for i in range(n):  # -sum_ij log sigmoid(z_ij (s <x_i, y_j> + b)) / n, z = +1 on the diagonal, -1 elsewhere
        for j in range(n):
            z = 1.0 if i == j else -1.0
            want -= math.log(1.0 / (1.0 + math.exp(-z * (10.0 * float(img[i] @ txt[j]) - 10.0))))
    got = siglip_loss(img, txt, scale, bias)
    assert float(got) == pytest.approx(want / n, rel=1e-5)
    from open_clip.loss import SigLipLoss

    assert float(got) == pytest.approx(float(SigLipLoss()(img, txt, scale, bias)), rel=1e-6)
    assert contrastive_loss(img, txt, scale, bias) == got  # the dispatch picks it when there is a bias
    assert contrastive_loss(img, txt, scale) == clip_loss(img, txt, scale)  # and InfoNCE without one
    assert abs(float(got) - float(clip_loss(img, txt, scale))) > 0.1
    with pytest.raises(ValueError, match=r"siglip_loss needs two \[B, D\]"):
        siglip_loss(img, txt[:3], scale, bias)


def test_a_model_with_a_logit_bias_trains_with_the_sigmoid_loss(sigmoid_backbone):
    """batch_loss (one process), PairEncoder (what DDP wraps) and the budget's step all use the sigmoid loss of the
    model's own scale and bias, and the bias gets a gradient (under DDP with find_unused_parameters=False an unused
    bias fails the second step)."""
    bb = sigmoid_backbone
    model = bb.model.train()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    tokens = bb.tokenizer([f"a photo of the number {i}" for i in range(4)])
    run = SimpleNamespace(model=model, backbone=bb, device=torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    loss = batch_loss(run, {"images": images, "tokens": tokens})
    loss.backward()
    assert model.logit_bias.grad is not None and float(model.logit_bias.grad.abs()) > 0

    with torch.no_grad():
        from fomo_ray.data.augment import model_input

        x = model_input(images, bb.image_size, bb.mean, bb.std)
        img, txt = model.encode_image(x, normalize=True), model.encode_text(tokens, normalize=True)
        scale, bias = model.logit_scale.exp(), model.logit_bias
        by_hand = siglip_loss(img, txt, scale, bias)
        assert float(loss) == pytest.approx(float(by_hand), rel=1e-6)
        assert abs(float(loss) - float(clip_loss(img, txt, scale))) > 0.1  # not InfoNCE
        out = distributed.PairEncoder(model)(x, tokens)
        assert len(out) == 4 and out[3] is model.logit_bias
        assert float(contrastive_loss(*out)) == pytest.approx(float(by_hand), rel=1e-6)
        assert float(step_measure.clip_loss(model(x, tokens))) == pytest.approx(float(by_hand), rel=1e-6)
        assert float(step_measure.clip_loss(dict(zip(("image_features", "text_features", "logit_scale", "logit_bias"),
                                                model(x, tokens))))) == pytest.approx(float(by_hand), rel=1e-6)
