"""The MHA -> LinearAttention swap is exact: same outputs (fp32 tolerance), same gradients, invertible."""
import copy

import pytest
import torch
from torch import nn

from fomo_ray.models.backbones import create_backbone
from fomo_ray.methods.peft_mha import LinearAttention, swap_attention, unswap_attention

TOL = dict(rtol=1e-5, atol=1e-6)


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random init leaves MHA biases at exactly 0; add noise so the q/k/v bias split is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    bb = create_backbone("fomo-tiny-s", pretrained="")
    return _perturbed(bb.model), bb.tokenizer


def _inputs(tokenizer):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    texts = tokenizer(["a photo of a red circle", "two small blue squares on a striped background", "cat"])
    return images, texts


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_swapped_clip_matches_original(tiny, mode):
    model, tokenizer = tiny
    swapped = copy.deepcopy(model)
    assert swap_attention(swapped) == 4  # 2 blocks per tower
    assert not any(isinstance(m, nn.MultiheadAttention) for m in swapped.modules())
    images, texts = _inputs(tokenizer)
    getattr(model, mode)(), getattr(swapped, mode)()
    torch.testing.assert_close(swapped.encode_image(images), model.encode_image(images), **TOL)
    torch.testing.assert_close(swapped.encode_text(texts), model.encode_text(texts), **TOL)


def test_causal_text_mask_is_honoured(tiny):
    """The text tower's causal mask must reach LinearAttention: without it the outputs would differ."""
    model, tokenizer = tiny
    swapped = copy.deepcopy(model)
    swap_attention(swapped)
    _, texts = _inputs(tokenizer)
    masked = swapped.encode_text(texts)
    saved = swapped.attn_mask
    swapped.attn_mask = None
    try:
        unmasked = swapped.encode_text(texts)
    finally:
        swapped.attn_mask = saved
    assert (masked - unmasked).abs().max() > 1e-3


def test_gradients_match(tiny):
    model, tokenizer = tiny
    swapped = copy.deepcopy(model)
    swap_attention(swapped)
    images, texts = _inputs(tokenizer)
    for m in (model, swapped):
        m.zero_grad()
        (m.encode_image(images).square().sum() + m.encode_text(texts).square().sum()).backward()
    mha = model.transformer.resblocks[1].attn
    lin = swapped.transformer.resblocks[1].attn
    qkv_grad = torch.cat([lin.q_proj.weight.grad, lin.k_proj.weight.grad, lin.v_proj.weight.grad])
    torch.testing.assert_close(qkv_grad, mha.in_proj_weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lin.out_proj.weight.grad, mha.out_proj.weight.grad, rtol=1e-4, atol=1e-6)


def _causal(n):
    return torch.full((n, n), float("-inf")).triu_(1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "float_causal", "bool_causal", "per_head_3d", "key_padding"])
def test_linear_attention_matches_mha(batch_first, mask_kind):
    torch.manual_seed(2)
    n, length, dim, heads = 2, 5, 16, 4
    mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    lin = LinearAttention.from_mha(mha)
    x = torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)
    kwargs = {}
    if mask_kind == "float_causal":
        kwargs["attn_mask"] = _causal(length)
    elif mask_kind == "bool_causal":
        kwargs["attn_mask"] = torch.ones(length, length, dtype=torch.bool).triu_(1)
    elif mask_kind == "per_head_3d":
        kwargs["attn_mask"] = torch.randn(n * heads, length, length)
    elif mask_kind == "key_padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * length, [False] * (length - 2) + [True] * 2])
    for mode in ("train", "eval"):
        mha.train(mode == "train"), lin.train(mode == "train")
        expected = mha(x, x, x, need_weights=False, **kwargs)[0]
        got, weights = lin(x, x, x, need_weights=False, **kwargs)
        assert weights is None
        torch.testing.assert_close(got, expected, **TOL)


def test_unswap_restores_open_clip_layout_exactly(tiny):
    model, _ = tiny
    swapped = copy.deepcopy(model)
    swap_attention(swapped)
    assert swap_attention(swapped) == 0  # idempotent
    assert unswap_attention(swapped) == 4
    original, restored = model.state_dict(), swapped.state_dict()
    assert list(restored) == list(original)
    for k in original:
        assert torch.equal(restored[k], original[k]), k


def test_refuses_cross_attention_layout():
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
    with pytest.raises(ValueError, match="self-attention"):
        LinearAttention.from_mha(mha)
