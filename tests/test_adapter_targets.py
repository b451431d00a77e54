"""LoRA / DoRA / VeRA on every tower family: targets resolved per tower, both towers adapted, or a clear refusal.

Tiny test-only architectures (``tests/_test_archs.py``): ``fomo-test-timm`` (a timm ViT image tower with a
``head.proj`` projection), ``fomo-test-sigmoid`` (SigLIP's layout: timm ViT with the attention-pool head,
CustomTextCLIP text tower with a ``text_projection`` Linear) and ``fomo-test-rn`` (open_clip's ModifiedResNet, whose
image tower has no adaptable attention/MLP linear). An HF text tower (RoBERTa layout) is built from a tiny
``transformers`` config in the test; ``fomo-tiny-s`` shows open_clip's own towers keep their targets.
"""
import copy
import re

import pytest
import torch
from torch import nn

from _test_archs import registered
from fomo_ray.core import distributed
from fomo_ray.models.backbones import create_backbone
from fomo_ray.config import load_config
from fomo_ray.results.export import merge_adapters
from fomo_ray.maths.losses import contrastive_loss
from fomo_ray.methods import build_method
from fomo_ray.methods import peft_methods as pm
from fomo_ray.methods.peft_methods import AdapterCoverageError, adapter_targets, is_adapted
from fomo_ray.methods.peft_mha import swap_attention, unswap_attention

KINDS = ("lora", "dora", "vera")


@pytest.fixture(scope="module")
def bases():
    """One random-init model per test architecture (copied by each test)."""
    out = {}
    with registered():
        for arch in ("fomo-test-timm", "fomo-test-sigmoid", "fomo-test-rn", "fomo-tiny-s"):
            torch.manual_seed(0)
            out[arch] = create_backbone(arch, "").model
    return out


def _setup(kind, model):
    return build_method(load_config(None, {"method.name": kind, "method.peft.rank": 2})).setup(model)


def _inputs(n=4, vocab=400):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, vocab, (n, 32), generator=g)


def _leafs(names, tower):
    return sorted({re.sub(r"\.\d+\.", ".*.", n.removeprefix(tower + ".")) for n in names})


def test_targets_are_resolved_per_tower_family(bases):
    timm_clip = copy.deepcopy(bases["fomo-test-timm"])
    swap_attention(timm_clip)
    t = adapter_targets(timm_clip)
    assert list(t) == ["visual", "transformer"] and len(t["visual"]) == 6 * 4 and len(t["transformer"]) == 6
    assert _leafs(t["visual"], "visual") == ["trunk.blocks.*.attn.proj", "trunk.blocks.*.attn.qkv",
                                             "trunk.blocks.*.mlp.fc1", "trunk.blocks.*.mlp.fc2"]
    # SigLIP's layout: the attention-pool head (attention + MLP) is adapted, the projection heads are not
    siglip = copy.deepcopy(bases["fomo-test-sigmoid"])
    swap_attention(siglip)
    t = adapter_targets(siglip)
    assert list(t) == ["visual", "text"] and len(t["visual"]) == 6 * 4 + 5
    assert {n for n in t["visual"] if "attn_pool" in n} == {f"visual.trunk.attn_pool.{x}" for x in
                                                            ("q", "kv", "proj", "mlp.fc1", "mlp.fc2")}
    assert _leafs(t["text"], "text") == ["transformer.resblocks.*.attn.k_proj", "transformer.resblocks.*.attn.out_proj",
                                         "transformer.resblocks.*.attn.q_proj", "transformer.resblocks.*.attn.v_proj",
                                         "transformer.resblocks.*.mlp.c_fc", "transformer.resblocks.*.mlp.c_proj"]
    heads = {"visual.head.proj", "text.text_projection"}
    assert isinstance(siglip.text.text_projection, nn.Linear) and not heads & {n for v in t.values() for n in v}
    # open_clip's own towers: exactly the six q/k/v/out + c_fc/c_proj linears of every block, as before
    tiny = copy.deepcopy(bases["fomo-tiny-s"])
    swap_attention(tiny)
    t = adapter_targets(tiny)
    for tower, prefix in (("visual", "visual.transformer"), ("transformer", "transformer")):
        assert t[tower] == [f"{prefix}.resblocks.{b}.{x}" for b in range(2) for x in
                            ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.mark.parametrize("arch", ["fomo-test-timm", "fomo-test-sigmoid"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapters_cover_both_towers_of_timm_tower_models(bases, arch, kind):
    """Every attention/MLP linear of both towers carries an adapter, only adapters train, and every one of them
    gets a gradient from the model's loss through what DDP wraps (find_unused_parameters=False)."""
    model = _setup(kind, copy.deepcopy(bases[arch]))
    for tower, names in adapter_targets_before_injection(bases[arch]).items():
        assert names and all(is_adapted(model.get_submodule(n)) for n in names), (tower, names[:3])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"\.(lora_|vera_lambda_)", n) for n in trainable), trainable[:5]
    assert {n.split(".")[0] for n in trainable} == {"visual", "text" if arch == "fomo-test-sigmoid" else "transformer"}
    images, tokens = _inputs()
    contrastive_loss(*distributed.PairEncoder(model)(images, tokens)).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def adapter_targets_before_injection(base):
    model = copy.deepcopy(base)
    swap_attention(model)
    return adapter_targets(model)


def test_hf_text_tower_is_adapted_on_its_attention_and_mlp_linears(bases):
    """An HF text tower (open_clip's HFTextEncoder, RoBERTa layout): query/key/value, attention.output.dense,
    intermediate.dense, output.dense of every layer; not its unused pooler nor the projection head."""
    from open_clip.hf_model import HFTextEncoder
    from transformers import RobertaConfig

    model = copy.deepcopy(bases["fomo-test-sigmoid"])
    config = RobertaConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40)
    model.text = HFTextEncoder("roberta", output_dim=64, config=config, pooler_type="mean_pooler",
                               proj_type="linear")
    model = _setup("lora", model)
    text = [n for n, m in model.text.named_modules() if is_adapted(m)]
    assert _leafs(text, "") == ["transformer.encoder.layer.*.attention.output.dense",
                                "transformer.encoder.layer.*.attention.self.key",
                                "transformer.encoder.layer.*.attention.self.query",
                                "transformer.encoder.layer.*.attention.self.value",
                                "transformer.encoder.layer.*.intermediate.dense",
                                "transformer.encoder.layer.*.output.dense"]
    assert len(text) == 2 * 6 and not is_adapted(model.text.proj)
    images, tokens = _inputs(vocab=500)
    contrastive_loss(*distributed.PairEncoder(model)(images, tokens)).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_a_tower_without_adaptable_linears_is_refused_naming_it(bases, kind):
    """open_clip's ModifiedResNet (RN50 family): its only linears are the attention pool's, whose weights
    F.multi_head_attention_forward reads directly (an adapter there would be a silent no-op)."""
    with pytest.raises(AdapterCoverageError) as err:
        _setup(kind, copy.deepcopy(bases["fomo-test-rn"]))
    msg = str(err.value)
    assert "\n" not in msg and f"{kind} finds no attention/MLP linear" in msg and "tower 'visual'" in msg
    assert "ModifiedResNet" in msg and "4 linears there: attnpool.k_proj, attnpool.q_proj" in msg
    assert isinstance(err.value, ValueError)


def test_adapters_missing_part_of_a_tower_are_refused(bases, monkeypatch):
    """The check after injection: peft adapting only some of the resolved linears (here: the config handed to peft
    drops the image tower's MLP linears) stops the run, naming the tower and the count."""
    real = pm.peft_config
    monkeypatch.setattr(pm, "peft_config", lambda kind, cfg, targets: real(
        kind, cfg, [n for n in targets if not (n.startswith("visual.") and ".mlp." in n)]))
    with pytest.raises(AdapterCoverageError, match=r"lora adapts 12 of the 24 attention/MLP linears of tower "
                                                   r"'visual' \(timm TimmModel; 25 linears there: "
                                                   r"trunk\.blocks\.\*\.attn\.qkv, "):
        _setup("lora", copy.deepcopy(bases["fomo-test-timm"]))


@pytest.mark.parametrize("kind", KINDS)
def test_merged_adapters_of_a_timm_tower_model_load_strictly_into_the_plain_architecture(bases, kind):
    """export's path (merge_adapters + unswap_attention) gives open_clip's own keys and computes what the adapted
    model computes, for a timm image tower and a CustomTextCLIP text tower."""
    base = bases["fomo-test-sigmoid"]
    model = _setup(kind, copy.deepcopy(base)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking adapters, so that the merge is not the identity
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    images, tokens = _inputs()
    want = model.encode_image(images), model.encode_text(tokens)
    merge_adapters(model)
    unswap_attention(model)
    plain = copy.deepcopy(base).eval()
    untrained = plain.encode_image(images)
    plain.load_state_dict(model.state_dict(), strict=True)
    assert (want[0] - untrained).abs().max() > 1e-3  # the adapters changed the features: the check below is not void
    torch.testing.assert_close(plain.encode_image(images), want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain.encode_text(tokens), want[1], rtol=1e-4, atol=1e-5)
