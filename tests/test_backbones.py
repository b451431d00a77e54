"""Backbones (real open_clip models, real checkpoint files) and the CLIP loss."""
import logging
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from fomo_ray.models.backbones import (TINY_ARCHS, BackboneError, available_archs, create_backbone, read_state_dict,
                                       save_checkpoint)
from fomo_ray.maths.losses import clip_loss

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns "initialized randomly" on purpose-built random models


def _logits(bb, seed=0):
    """Image-text logits of a fixed random batch (eval mode, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, bb.image_size, bb.image_size, generator=g)
    texts = bb.tokenizer(["a red circle", "a blue square", "two green stars", "the number seven"])
    bb.model.eval()
    with torch.no_grad():
        img, txt, scale = bb.model(images, texts)
    return scale * img @ txt.T


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_backbone("fomo-tiny-s")


def test_tiny_archs_are_registered_and_grow(tiny):
    sizes = []
    for name in TINY_ARCHS:
        bb = tiny if name == "fomo-tiny-s" else create_backbone(name)
        assert (bb.name, bb.image_size, bb.context_length) == (name, 32, 32)
        # transforms follow open_clip's preprocess config (OpenAI CLIP mean/std for these configs)
        assert bb.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
        assert bb.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
        sizes.append(sum(p.numel() for p in bb.model.visual.parameters()))
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert set(TINY_ARCHS) <= set(available_archs())


def test_tokenizer_is_offline_and_uses_the_short_context(tiny):
    tok = tiny.tokenizer(["a photo of a red circle."])
    assert tok.shape == (1, 32) and tok.dtype == torch.long
    assert int(tok.max()) < 49408  # inside the registered vocab


def test_real_architecture_by_name():
    bb = create_backbone("ViT-B-32")
    assert (bb.image_size, bb.context_length) == (224, 77)


def test_unknown_architecture_lists_valid_ones():
    with pytest.raises(BackboneError) as e:
        create_backbone("fomo-tiny-xl")
    msg = str(e.value)
    assert "unknown architecture 'fomo-tiny-xl'" in msg
    assert all(a in msg for a in TINY_ARCHS) and "ViT-B-16" in msg and "ViT-L-14" in msg


def test_unknown_tag_and_offline_tag_fail_clearly():
    with pytest.raises(BackboneError, match="neither a checkpoint file nor an open_clip pretrained tag.*openai"):
        create_backbone("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(BackboneError, match="could not fetch open_clip weights 'ViT-B-32/openai'.*HF_HUB_OFFLINE"):
        create_backbone("ViT-B-32", pretrained="openai")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(BackboneError, match="checkpoint file not found: .*absent.pt"):
        create_backbone("fomo-tiny-s", pretrained=str(tmp_path / "absent.pt"))


@pytest.mark.parametrize("fmt", ["plain", "training_dict_ddp", "safetensors", "save_checkpoint"])
def test_save_load_gives_identical_logits(tiny, tmp_path, fmt):
    state = tiny.model.state_dict()
    if fmt == "plain":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    elif fmt == "training_dict_ddp":
        path = tmp_path / "w.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = save_checkpoint(tiny.model, tmp_path / "w.pt", meta={"arch": "fomo-tiny-s", "steps": 1})
    loaded = create_backbone("fomo-tiny-s", pretrained=str(path))
    assert torch.equal(_logits(loaded), _logits(tiny))
    # a freshly initialised model differs: the equality above is not trivially true
    torch.manual_seed(123)
    assert not torch.allclose(_logits(create_backbone("fomo-tiny-s")), _logits(tiny))


def test_checkpoint_of_another_architecture_names_the_keys(tiny, tmp_path):
    path = tmp_path / "s.pt"
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(BackboneError) as e:
        create_backbone("fomo-tiny-m", pretrained=str(path))
    msg = str(e.value)
    assert "does not match architecture 'fomo-tiny-m'" in msg and str(path) in msg
    assert "mis-shaped keys" in msg and "ln_final.bias (checkpoint (128,) vs model (192,))" in msg
    assert "missing keys" in msg and "transformer.resblocks.2." in msg  # m has a third layer


def test_checkpoint_with_missing_and_unexpected_keys(tiny, tmp_path):
    state = dict(tiny.model.state_dict())
    state.pop("logit_scale")
    state["extra.head.weight"] = torch.zeros(2)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    expected = r"missing keys \(1\): logit_scale; unexpected keys \(1\): extra.head.weight"
    with pytest.raises(BackboneError, match=expected):
        create_backbone("fomo-tiny-s", pretrained=str(path))


class NotATensor:  # module-level so pickle can store it
    def __init__(self):
        self.payload = [1, 2, 3]


def test_non_tensor_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": NotATensor()}}, path)
    with pytest.raises(BackboneError, match=r"evil.pt is not a plain tensor file: torch.load\(weights_only=True\)"):
        read_state_dict(path)
    raw = tmp_path / "raw.pkl.pt"
    with open(raw, "wb") as f:
        pickle.dump(NotATensor(), f, protocol=2)  # torch's own protocol: no unrelated warning
    with pytest.raises(BackboneError, match="raw.pkl.pt"):
        create_backbone("fomo-tiny-s", pretrained=str(raw))


def test_checkpoint_with_non_tensor_values(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"visual.proj": [1.0, 2.0]}}, path)  # allowed by weights_only, but not tensors
    with pytest.raises(BackboneError, match="not tensors: \\['visual.proj'\\]"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------------------- CLIP loss
def test_clip_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    # cross-entropy with the diagonal as targets, written out: -log softmax along rows and along columns
    i2t = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    t2i = -(logits.diag() - logits.logsumexp(dim=0)).mean()
    assert clip_loss(img, txt, scale).item() == pytest.approx(0.5 * (i2t + t2i).item(), rel=1e-6)
    # perfectly aligned pairs with a sharp temperature: loss ~ 0; random pairing at scale 0: log(B)
    assert clip_loss(img, img, torch.tensor(100.0)).item() < 1e-3
    assert clip_loss(img, txt, torch.tensor(0.0)).item() == pytest.approx(math.log(5), rel=1e-6)


def test_clip_loss_trains_the_temperature(tiny):
    images = torch.randn(4, 3, 32, 32)
    texts = tiny.tokenizer(["a", "b", "c", "d"])
    tiny.model.train()
    img, txt, scale = tiny.model(images, texts)
    clip_loss(img, txt, scale).backward()
    assert tiny.model.logit_scale.grad is not None and tiny.model.logit_scale.grad.abs() > 0
    tiny.model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="two \\[B, D\\] feature matrices"):
        clip_loss(img[:3], txt, scale)


def test_loading_a_checkpoint_does_not_claim_random_init(tmp_path, caplog):
    """Issue 14, item 6: open_clip's "No pretrained weights loaded ... initialized randomly" is printed only when the
    model really is random, not when our checkpoint is loaded right after building it."""
    import logging

    from fomo_ray.models.backbones import create_backbone, save_checkpoint

    with caplog.at_level(logging.WARNING):
        bb = create_backbone("fomo-tiny-s", "")
    assert "initialized randomly" in caplog.text
    save_checkpoint(bb.model, tmp_path / "base.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_backbone("fomo-tiny-s", str(tmp_path / "base.pt"))
    assert "initialized randomly" not in caplog.text
