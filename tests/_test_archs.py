"""Tiny test-only open_clip architectures (``tests/model_configs/*.json``): other tower families than fomo-tiny's,
offline and CPU-sized. All keep ``vocab_size`` 49408, open_clip's default SimpleTokenizer and a 32-token context, so
they share the fomo-tiny token ids of a FiF-mini build (``fomo_ray.data.tokens.tokenizer_key``). Their names avoid
"siglip": open_clip picks its (online) SigLIP tokenizer by name.

=================  ==========================================================================================
fomo-test-timm     CLIP: timm ``test_vit`` image tower (6 blocks, width 64, ``head.proj``), open_clip text tower
fomo-test-sigmoid  SigLIP's layout: CustomTextCLIP, timm ViT with the attention-pool head (``timm_pool: map``),
                   text tower with a ``text_projection`` Linear, ``init_logit_bias: -10`` (sigmoid loss)
fomo-test-rn       CLIP with open_clip's ModifiedResNet image tower (BatchNorm; no adaptable attention/MLP linear)
=================  ==========================================================================================
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

TEST_CONFIGS = Path(__file__).with_name("model_configs")


def register() -> None:
    """Make the test architectures known to open_clip (in this process; spawned ranks call it too)."""
    import open_clip

    if "fomo-test-timm" not in open_clip.list_models():
        open_clip.add_model_config(TEST_CONFIGS)


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """The test architectures are known inside the block and forgotten after it (other tests see open_clip's
    registry as it was)."""
    from open_clip import factory

    paths = list(factory._MODEL_CONFIG_PATHS)
    register()
    try:
        yield
    finally:
        factory._MODEL_CONFIG_PATHS[:] = paths
        factory._rescan_model_configs()
