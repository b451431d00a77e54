"""Models are built as their weights were trained: the activation (QuickGELU vs GELU) comes from open_clip's pretrained
registry for a tag, from a checkpoint's recorded meta, or from the user's declaration, and travels with saved bases
and exports. No download: a local file stands in for open_clip's download of a tag."""
import json

import pytest
import torch

import open_clip
from open_clip.model import QuickGELU
from open_clip.pretrained import _PRETRAINED

from fomo_ray.models.backbones import (BackboneError, base_meta, create_backbone, read_checkpoint, register_tiny_archs,
                                       resolve_quick_gelu, save_checkpoint)
from fomo_ray.config import load_config


QUICK_GELU_TAGS = sorted((arch, tag) for arch, tags in _PRETRAINED.items() for tag, cfg in tags.items()
                         if cfg.get("quick_gelu"))
GELU_TAGS = [("ViT-B-16", "laion2b_s34b_b88k"), ("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-L-14", "datacomp_xl_s13b_b90k")]


def activations(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


@pytest.fixture
def tag_without_download(monkeypatch, tmp_path):
    """create_backbone(arch, tag) through its real tag path, on the meta device, with open_clip's download and weight
    loading stood in for (every architecture of the registry, ViT-bigG included, builds in ~0.1 s and no memory), and
no tokenizer (some are Hugging Face tokenizers, which need the hub)."""
    import open_clip.factory as factory

    stand_in = tmp_path / "weights.bin"
    stand_in.write_bytes(b"")
    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, **kw: str(stand_in))
    monkeypatch.setattr(factory, "load_checkpoint", lambda *a, **kw: None)
    monkeypatch.setattr(factory, "_set_model_device_and_precision", lambda *a, **kw: None)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda *a, **kw: None)  # some are HF tokenizers (the hub)
    with torch.device("meta"):
        yield


def test_registry_has_quick_gelu_tags():
    assert ("ViT-B-16", "openai") in QUICK_GELU_TAGS and ("ViT-L-14", "dfn2b") in QUICK_GELU_TAGS
    assert len(QUICK_GELU_TAGS) >= 40


@pytest.mark.parametrize("arch,tag", QUICK_GELU_TAGS, ids=[f"{a}/{t}" for a, t in QUICK_GELU_TAGS])
def test_every_quick_gelu_tag_builds_quick_gelu(arch, tag, tag_without_download):
    bb = create_backbone(arch, tag, device="meta")
    assert bb.quick_gelu is True
    assert activations(bb.model) == {"QuickGELU"}


@pytest.mark.parametrize("arch,tag", GELU_TAGS)
def test_gelu_tags_stay_gelu(arch, tag, tag_without_download):
    bb = create_backbone(arch, tag, device="meta")
    assert bb.quick_gelu is False and activations(bb.model) == {"GELU"}


def test_a_declaration_against_the_tag_is_refused():
    with pytest.raises(BackboneError, match="backbone.quick_gelu says GELU.*'ViT-B-16/openai'.*QuickGELU"):
        resolve_quick_gelu("ViT-B-16", "openai", declared=False)
    assert resolve_quick_gelu("ViT-B-16", "openai", declared=True) is True
    assert resolve_quick_gelu("ViT-B-16-quickgelu", "") is True  # the -quickgelu arch declares it


@pytest.fixture(scope="module")
def vit_b32_openai_file(tmp_path_factory):
    """A random ViT-B-32 state dict standing in for the 'openai' download (open_clip's plain state-dict format)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path_factory.mktemp("tag") / "vit_b32_openai.bin"
    torch.save(model.state_dict(), path)
    return path


def test_tag_loads_real_weights_with_quick_gelu_then_base_and_export_keep_it(vit_b32_openai_file, monkeypatch,
                                                                              tmp_path):
    import open_clip.factory as factory

    from fomo_ray.results.export import save_open_clip

    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, **kw: str(vit_b32_openai_file))
    bb = create_backbone("ViT-B-32", "openai")  # open_clip's real tag path, weights loaded from the stand-in
    assert bb.quick_gelu and activations(bb.model) == {"QuickGELU"}
    expected = bb.model.state_dict()

    # a saved base records the activation and is rebuilt with it (no declaration needed)
    base = save_checkpoint(bb.model, tmp_path / "base.pt", meta=base_meta(bb))
    assert read_checkpoint(base)[1]["quick_gelu"] is True
    again = create_backbone("ViT-B-32", str(base))
    assert again.quick_gelu and activations(again.model) == {"QuickGELU"}
    with pytest.raises(BackboneError, match="backbone.quick_gelu says GELU.*checkpoint .*base.pt"):
        create_backbone("ViT-B-32", str(base), quick_gelu=False)

    # an export of a run on that tag records it in open_clip's own config, so plain open_clip rebuilds it so
    cfg = load_config(None, {"backbone.name": "ViT-B-32", "backbone.pretrained": "openai"})
    out = save_open_clip(tmp_path / "export", cfg, expected)
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True
    assert json.loads((out / "fomo_ray.json").read_text())["quick_gelu"] is True
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert activations(model) == {"QuickGELU"}


def test_a_file_without_a_record_is_gelu_unless_declared(tmp_path):
    torch.manual_seed(0)
    bb = create_backbone("fomo-tiny-s")
    path = tmp_path / "plain.pt"
    torch.save(bb.model.state_dict(), path)
    assert activations(create_backbone("fomo-tiny-s", str(path)).model) == {"GELU"}
    declared = create_backbone("fomo-tiny-s", str(path), quick_gelu=True)
    assert declared.quick_gelu and activations(declared.model) == {"QuickGELU"}


def test_openai_torchscript_loads_with_quick_gelu(tmp_path):
    """OpenAI's released .pt files are TorchScript archives in fp16 with three extra non-parameter entries."""
    register_tiny_archs()
    torch.manual_seed(0)
    model = open_clip.create_model("fomo-tiny-s", pretrained=None, force_quick_gelu=True).eval()
    for name, value in (("input_resolution", 32), ("context_length", 32), ("vocab_size", 49408)):
        if hasattr(model, name):  # a plain attribute in open_clip, a tensor entry in OpenAI's files
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 49407, (2, 32))
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)
        traced = torch.jit.trace(model, (images, tokens), strict=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))

    bb = create_backbone("fomo-tiny-s", str(path))
    assert bb.quick_gelu and activations(bb.model) == {"QuickGELU"}
    with torch.no_grad():
        assert torch.allclose(bb.model.eval().encode_image(images, normalize=True), expected, atol=1e-6)


def test_an_unreadable_file_names_the_supported_formats(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BackboneError, match="garbage.pt.*Supported: .*safetensors.*TorchScript"):
        create_backbone("fomo-tiny-s", str(bad))


def test_tracking_names_the_activation_a_run_builds(tmp_path):
    """MLflow's fomo_ray.quick_gelu tag says how the run's model was built (the config says null: the weights decide)."""
    from fomo_ray.models.backbones import activation_tags

    def tag(**keys):
        return activation_tags(load_config(None, keys))["fomo_ray.quick_gelu"]

    assert tag() == "false"  # the tiny base (pretrained auto)
    assert tag(**{"backbone.name": "ViT-B-16", "backbone.pretrained": "openai"}) == "true"
    assert tag(**{"backbone.name": "ViT-B-16", "backbone.pretrained": "laion2b_s34b_b88k"}) == "false"
    gone = str(tmp_path / "gone.pt")
    assert tag(**{"backbone.name": "ViT-B-16", "backbone.pretrained": gone}) == "unknown"
    assert tag(**{"backbone.name": "ViT-B-16", "backbone.pretrained": gone, "backbone.quick_gelu": True}) == "true"
