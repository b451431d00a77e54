"""Adapter methods through ``peft``: LoRA, DoRA and VeRA on the attention and MLP linears of both towers.

Which linears those are depends on the tower's family, so the targets are resolved per tower by inspecting the
model (:func:`adapter_targets`), never assumed:

==========  ===========================================  =========================================================
family      towers                                       attention and MLP linears (patterns in :data:`FAMILY_LINEARS`)
==========  ===========================================  =========================================================
open_clip   open_clip's own ``Transformer`` (ViT, text)  ``attn.q_proj/k_proj/v_proj/out_proj``, ``mlp.c_fc/c_proj``
timm        ``TimmModel`` (SigLIP's ViT, EVA, ConvNeXt)  ``attn.qkv`` (or ``q_proj/k_proj/v_proj``), ``attn.proj``,
                                                         ``mlp.fc1/fc2`` (``fc1_g/fc1_x``); SigLIP's attention-pool
                                                         head ``attn_pool.q/kv/proj/mlp.*``
hf          ``HFTextEncoder`` (BERT, RoBERTa, XLM-R, mT5)  ``attention.self.query/key/value``,
                                                         ``attention.output.dense``, ``intermediate.dense``,
                                                         ``output.dense``; T5's ``SelfAttention.q/k/v/o``,
                                                         ``DenseReluDense.wi*/wo``
==========  ===========================================  =========================================================

Left out on purpose: the towers' projection heads into the joint space (``visual.proj`` and ``text_projection`` are
bare Parameters or a ``text.text_projection`` Linear; timm's ``head.proj`` / ``trunk.head``; the HF ``proj``), which
are not attention or MLP (Roth et al. 2024 adapt "the attention and MLP linears of both towers"); HF's unused
``pooler.dense``; and linears whose weights their module reads directly, where an adapter would be a silent no-op:
``nn.MultiheadAttention.out_proj`` and open_clip's ModifiedResNet ``attnpool`` (``F.multi_head_attention_forward``).

open_clip's attention is ``nn.MultiheadAttention``, which peft cannot adapt fully (DoRA/VeRA take ``nn.Linear`` only;
LoRA on ``out_proj`` alone is a no-op), so :func:`inject_adapters` first swaps it for the numerically identical
:class:`~fomo_ray.methods.peft_mha.LinearAttention`, then resolves the targets, injects the adapters *into the CLIP
module itself* (peft's tuner classes modify it in place, so the adapters are part of ``model.state_dict()``, hence
of every checkpoint, and persist across tasks; only adapter parameters train) and checks the coverage
(:func:`check_coverage`): every attention/MLP linear of *both* towers must now carry an adapter. A tower with none
found, or with some left out, raises :class:`AdapterCoverageError` naming the tower, how many were adapted and the
linears it holds — a run never goes on as "LoRA" while a tower trains nothing (e.g. open_clip's RN50: its image
tower has no adaptable attention or MLP linear).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from torch import nn

from fomo_ray.config import PeftConfig
from fomo_ray.methods.base import Method
from fomo_ray.methods.peft_mha import swap_attention

ADAPTER_KINDS = ("lora", "dora", "vera")

#: per tower family, the attention and MLP linears as regexes over a linear's name inside its tower (``re.search``)
FAMILY_LINEARS: dict[str, tuple[str, ...]] = {
    "open_clip": (r"(^|\.)attn\.(q_proj|k_proj|v_proj|out_proj)$",  # LinearAttention after swap_attention
                  r"(^|\.)mlp\.(c_fc|c_proj)$"),
    "timm": (r"(^|\.)(attn|attn_pool)\.(qkv|q|k|v|kv|q_proj|k_proj|v_proj|proj)$",
             r"(^|\.)mlp\.(fc1|fc1_g|fc1_x|fc2)$"),
    "hf": (r"(^|\.)attention\.self\.(query|key|value)$", r"(^|\.)attention\.output\.dense$",  # BERT family
           r"(^|\.)intermediate\.dense$", r"(^|\.)layer\.\d+\.output\.dense$",
           r"(^|\.)SelfAttention\.(q|k|v|o)$", r"(^|\.)DenseReluDense\.(wi|wi_0|wi_1|wo)$"),  # T5 / mT5 encoders
}


class AdapterCoverageError(ValueError):
    """The adapters miss (part of) a tower the method must adapt; the message names the tower, how many of its
    attention/MLP linears were adapted and the linears found there."""


# --------------------------------------------------------------------------------------------------- towers
def towers(model: nn.Module) -> dict[str, nn.Module]:
    """The two towers by attribute name: ``visual`` and the text tower (``text`` for open_clip's CustomTextCLIP,
    i.e. SigLIP/EVA/HF text; ``transformer`` for CLIP, whose text tower's blocks live there)."""
    text = "text" if isinstance(getattr(model, "text", None), nn.Module) else "transformer"
    return {"visual": model.visual, text: getattr(model, text)}


def tower_family(tower: nn.Module) -> str:
    """``timm`` for open_clip's ``TimmModel``, ``hf`` for its ``HFTextEncoder``, else ``open_clip`` (its own
    VisionTransformer, TextTransformer, Transformer, ModifiedResNet)."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel

    if isinstance(tower, TimmModel):
        return "timm"
    if isinstance(tower, HFTextEncoder):
        return "hf"
    return "open_clip"


def _plain_linears(tower: nn.Module) -> list[str]:
    """Names (inside ``tower``) of its ``nn.Linear`` layers that run as layers: not those inside an
    ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` directly)."""
    mha = {n for n, m in tower.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [n for n, m in tower.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[0] not in mha]


def adapter_targets(model: nn.Module) -> dict[str, list[str]]:
    """Per tower (``visual``, ``text``/``transformer``), the full module names of its attention and MLP linears
    (:data:`FAMILY_LINEARS` of the tower's family). Call it after ``swap_attention``: open_clip's blocks have their
    attention linears only then."""
    out = {}
    for name, tower in towers(model).items():
        patterns = [re.compile(p) for p in FAMILY_LINEARS[tower_family(tower)]]
        out[name] = [f"{name}.{n}" for n in _plain_linears(tower) if any(p.search(n) for p in patterns)]
    return out


def tower_linears(model: nn.Module) -> dict[str, list[str]]:
    """Per tower, the names (inside the tower) of every linear layer it holds (what a coverage error lists)."""
    return {name: [n for n, m in tower.named_modules() if isinstance(m, nn.Linear)]
            for name, tower in towers(model).items()}


def _distinct(names: Sequence[str], shown: int = 6) -> str:
    """``blocks.0.attn.qkv, blocks.1.attn.qkv`` -> ``blocks.*.attn.qkv``: the first few distinct layer kinds."""
    kinds = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names))
    more = f", ... ({len(kinds) - shown} more)" if len(kinds) > shown else ""
    return (", ".join(kinds[:shown]) + more) or "none"


# --------------------------------------------------------------------------------------------------- peft
def peft_config(kind: str, cfg: PeftConfig, targets: Sequence[str]):
    """The peft config object for ``kind`` with this project's hyperparameters, targeting exactly the modules
    ``targets`` (full names, e.g. from :func:`adapter_targets`; peft matches a listed name exactly)."""
    from peft import LoraConfig, VeraConfig

    if cfg.rank < 1:
        raise ValueError(f"config key 'method.peft.rank' must be >= 1, got {cfg.rank}")
    targets = list(targets)
    if kind in ("lora", "dora"):
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          use_dora=kind == "dora", bias="none")
    if kind == "vera":
        # projection_prng_key fixes the shared frozen random matrices A, B, so every run draws the same ones
        return VeraConfig(r=cfg.rank, vera_dropout=cfg.dropout, target_modules=targets, projection_prng_key=0,
                          save_projection=True, bias="none")
    raise ValueError(f"unknown adapter kind '{kind}'; valid: {', '.join(ADAPTER_KINDS)}")


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` is a peft adapter layer wrapping a base layer (LoRA, DoRA, VeRA)."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "base_layer")


def check_coverage(model: nn.Module, kind: str, targets: Mapping[str, Sequence[str]],
                   linears: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """How many attention/MLP linears of each tower carry an adapter now; raises :class:`AdapterCoverageError`
    for the first tower where none was found or some were left out. ``targets``: :func:`adapter_targets`;
    ``linears``: :func:`tower_linears` of the model before injection (named in the error)."""
    counts = {}
    for tower, names in targets.items():
        adapted = sum(is_adapted(model.get_submodule(n)) for n in names)
        if not names or adapted < len(names):
            module = model.get_submodule(tower)
            what = (f"adapts {adapted} of the {len(names)} attention/MLP linears" if names else
                    "finds no attention/MLP linear it can adapt (0 adapted)")
            raise AdapterCoverageError(
                f"{kind} {what} of tower '{tower}' ({tower_family(module)} {type(module).__name__}; "
                f"{len(linears[tower])} linears there: {_distinct(linears[tower])}): {kind} adapts both towers, so "
                f"it cannot train this architecture")
        counts[tower] = adapted
    return counts


def inject_adapters(model: nn.Module, kind: str, cfg: PeftConfig) -> nn.Module:
    """Swap MHA for linear attention, inject ``kind`` adapters into the attention and MLP linears of both towers
    in place, freeze everything else, check the coverage; return ``model``."""
    from peft.tuners.lora import LoraModel
    from peft.tuners.vera import VeraModel

    swap_attention(model)
    targets, linears = adapter_targets(model), tower_linears(model)
    if all(targets.values()):  # else check_coverage names the tower without any (nothing is injected)
        tuner_cls = VeraModel if kind == "vera" else LoraModel
        # The tuner replaces target modules inside ``model`` and marks only adapter weights trainable; it keeps no
        # state of its own that the layers do not hold (VeRA's shared A/B are registered on every adapted layer).
        tuner_cls(model, peft_config(kind, cfg, [n for names in targets.values() for n in names]), "default")
    check_coverage(model, kind, targets, linears)
    return model


class LoRA(Method):
    """Low-rank adapters ``W + (alpha/r)·B·A`` (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language
    Models", ICLR). Ranks 4 and 64 in Roth et al. 2024 (arXiv 2408.14471)."""

    name = "lora"
    reads = ("peft.",)

    def setup(self, model: nn.Module) -> nn.Module:
        return inject_adapters(model, "lora", self.cfg.peft)


class DoRA(Method):
    """Weight-decomposed low-rank adaptation: a learned magnitude times a LoRA-updated direction (Liu et al. 2024,
    "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML)."""

    name = "dora"
    reads = ("peft.",)

    def setup(self, model: nn.Module) -> nn.Module:
        return inject_adapters(model, "dora", self.cfg.peft)


class VeRA(Method):
    """Vector-based random matrix adaptation: frozen shared random A, B and trained scaling vectors (Kopiczko,
    Blankevoort, Asano 2024, "VeRA: Vector-based Random Matrix Adaptation", ICLR)."""

    name = "vera"
    reads = ("peft.rank", "peft.dropout")  # VeRA has no alpha: its scaling vectors are trained

    def setup(self, model: nn.Module) -> nn.Module:
        return inject_adapters(model, "vera", self.cfg.peft)
