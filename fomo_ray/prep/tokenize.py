"""Token ids of a benchmark's captions for the models that will read it (``fomo-ray prepare tokens``).

Preparation names models (``fomo-tiny-s``, ``ViT-B-16``), the data layer stores per tokenizer
(:mod:`fomo_ray.data.tokens`); this module maps one to the other without building any model
(:func:`fomo_ray.models.backbones.tokenizer_for`). FiF-mini generation and both converters write the ids of the default
model's tokenizer (every ``fomo-tiny-*`` shares it) plus those of any ``--model``; :func:`upgrade` adds missing ones to
an existing benchmark - written by an older fomo_ray, or for another model - keeping every old file until the new
manifest is in place. ``prep.ensure_inputs`` calls it for the run's model, so runs never meet an old-format root.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from fomo_ray.data.format import Benchmark
from fomo_ray.data.tokens import ensure_tokens, token_summary, tokenizer_key


def tokenizers_for(models: Sequence[str]) -> list[tuple[Callable[..., Any], int]]:
    """``(tokenizer, context_length)`` of each distinct model (empty: the default model); ``BackboneError`` names an
    unknown one."""
    from fomo_ray.models.backbones import DEFAULT_ARCH, tokenizer_for

    return [tokenizer_for(m) for m in dict.fromkeys(models or (DEFAULT_ARCH,))]


def upgrade(root: str | os.PathLike, models: Sequence[str] = (), say: Callable[[str], None] = print,
            say_present: bool = False) -> tuple[Benchmark, list[str]]:
    """Add the token ids the benchmark at ``root`` lacks for ``models`` (empty: the default model), saying one line
    per tokenizer written (and, with ``say_present``, per tokenizer already there); returns the benchmark and the
    keys written (empty when nothing was needed)."""
    tokenizers = tokenizers_for(models)
    bench, written = ensure_tokens(root, tokenizers)
    for key in written:
        say(f"upgraded {bench.root} for tokenizer {key}: added the token ids of every caption "
            f"({token_summary(bench, key)}); data files untouched")
    if say_present:
        for key in dict.fromkeys(tokenizer_key(tok, ctx) for tok, ctx in tokenizers):
            if key not in written:
                say(f"{bench.root} already has the token ids of tokenizer {key} ({token_summary(bench, key)}): "
                    f"nothing to do")
    return bench, written
