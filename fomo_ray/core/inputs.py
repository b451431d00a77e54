"""Where a config's inputs live, and whether they are ready: read-only look-ups, never builds.

A run needs a benchmark (``data.root``) and zero-shot weights theta_0 (``backbone.pretrained``). Making them is
preparation (``fomo_ray/prep/``: FiF-mini generation, converters, pretraining the tiny base), which the CLI and the
sweep driver call through ``prep.ensure_inputs``; the runtime core (the loop and its assembly) only *finds* them here
and, when one is missing or stale, raises :class:`InputsMissing` saying which command prepares it. So this module
holds the facts both sides must agree on: FiF-mini's generator identity and the tiny bases' recipes and cache paths.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fomo_ray.config import ConfigError
from fomo_ray.data.format import DataError

FIFMINI_NAME = "fifmini"
FIFMINI_GENERATOR_VERSION = 1  # bump whenever the drawn content changes; a cached build with another version is rebuilt


class InputsMissing(DataError):
    """A run's benchmark or base checkpoint is missing or stale; the message names it and the command to prepare it."""


class PreparedByRun(InputsMissing):
    """Missing, and what ``fomo-ray run`` or a sweep prepares before it starts (FiF-mini, caption token ids, the
    tiny base): a dry run reports it instead of refusing the config."""


def fifmini_generator_info(seed: int, image_size: int, scale: float) -> dict:
    """What a FiF-mini build records in its manifest (``generator``): its content is a pure function of this."""
    return {"name": FIFMINI_NAME, "version": FIFMINI_GENERATOR_VERSION, "seed": int(seed),
            "image_size": int(image_size), "scale": float(scale)}


@dataclass(frozen=True)
class PretrainConfig:
    """The pretraining recipe of one tiny architecture (every field enters the checkpoint hash)."""

    # measured for fomo-tiny-s on FiF-mini (2-core CPU): 1200 steps -> whole command 3 min 43 s, SHAPES 59% top-1;
    # 800 steps leave SHAPES at 43% and COUNTS at 46%; 1400 reach 57-95% but leave no margin to the 5-min budget
    steps: int = 1200
    batch_size: int = 128        # in-batch negatives; a step is ~0.15 s on 2 idle cores
    lr: float = 1e-3             # from scratch; 2e-3 was worse at 800 steps (SHAPES 35% vs 43%)
    weight_decay: float = 0.1    # on matrices only (open_clip convention: no decay on biases/norms/embeddings/scale)
    warmup_frac: float = 0.1     # linear warmup then cosine, as the per-task schedule
    min_lr_ratio: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2             # CPU matmul reductions split by thread count: pinned so the base is a pure function
                                 # of this recipe on any machine (same CPU ISA), not of the caller's thread setting

    def digest(self, arch: str, content_hash: str) -> str:
        """10 hex digits over the architecture, this recipe and the data's content hash."""
        blob = json.dumps({"arch": arch, "recipe": dataclasses.asdict(self), "data": content_hash}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


#: per-architecture recipes, a size ladder: as in real CLIP ladders, pretraining compute grows with size (more FLOPs
#: per step and at least as many steps), so a larger base starts better. At fomo-tiny-s's 1,200 steps the
#: fomo-tiny-m base started below it (zero-shot A_ZS 80.4 vs 81.7); the ladder table of docs/BENCHMARK.md shows
#: what they give.
#: Larger models take a lower peak LR, the usual practice for from-scratch transformers.
RECIPES: dict[str, PretrainConfig] = {
    "fomo-tiny-s": PretrainConfig(),
    "fomo-tiny-m": PretrainConfig(steps=2400, lr=7e-4),
    "fomo-tiny-l": PretrainConfig(steps=2400, lr=5e-4),
}


def base_checkpoint_path(root: str | Path, arch: str, recipe: PretrainConfig, content_hash: str) -> Path:
    """``<root>/base_models/<arch>-<digest>.pt``: the cached base of ``arch`` pretrained on the benchmark at ``root``."""
    return Path(root) / "base_models" / f"{arch}-{recipe.digest(arch, content_hash)}.pt"


def auto_base_path(arch: str, bench) -> Path:
    """Where ``backbone.pretrained = auto`` finds the base of the tiny architecture ``arch`` for ``bench`` (it may not
    exist yet); ConfigError for an architecture without a pretraining recipe."""
    if arch not in RECIPES:
        raise ConfigError(f"config key 'backbone.pretrained': 'auto' only exists for the tiny architectures "
                          f"{list(RECIPES)}; give '{arch}' an open_clip tag or a checkpoint file")
    return base_checkpoint_path(bench.root, arch, RECIPES[arch], bench.manifest["content_hash"])
