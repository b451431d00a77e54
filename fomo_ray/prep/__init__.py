"""Preparation: making a run's inputs, never part of a run. The runtime core (loop, assembly, methods, budget,
evaluation) never imports this package; it only *finds* inputs through :mod:`fomo_ray.core.inputs` and raises
``InputsMissing`` naming the command below when one is absent.

- :mod:`.fifmini` (drawing in ``fifmini_draw`` / ``_scenes`` / ``_text``): the embedded FiF-mini benchmark
  (``fomo-ray prepare fifmini``);
- :mod:`.pretrain`: the tiny base CLIP theta_0 pretrained on a benchmark's pool (``fomo-ray pretrain``);
- :mod:`.convert_fif` (sources in ``fif_sources``) and :mod:`.convert_webdataset`: real FoMo-in-Flux data and web
  shards to the FFCV format (``fomo-ray prepare fif`` / ``pool``), sharing :mod:`.staging`;
- :mod:`.stream_orderings`: stream orderings that need a model or a pool (``fomo-ray prepare stream``);
- :mod:`.tokenize`: the token ids of every caption for a model's tokenizer, written at generation and conversion
  and added to older benchmarks (``fomo-ray prepare tokens``).

:func:`ensure_inputs` is the one entry point that makes sure a config's data (with the token ids of its model) and
base exist; the ``fomo-ray run`` command, the sweep driver and the Ray Train workers call it before building a run.
Submodules are imported lazily, so ``import fomo_ray.prep`` stays cheap.
"""
from __future__ import annotations

from typing import Any


def ensure_benchmark(cfg: Any) -> Any:
    """The opened benchmark of ``cfg.data``; FiF-mini is built (or reused) first when ``data.benchmark`` is
    ``fifmini`` and ``data.prepare_if_missing`` is on, with the token ids of the default model and of
    ``backbone.name``. Other benchmarks are only opened (``DataError`` if absent)."""
    from fomo_ray.data.format import open_benchmark
    from fomo_ray.core.inputs import FIFMINI_NAME

    d = cfg.data
    if d.benchmark == FIFMINI_NAME and d.prepare_if_missing:
        from fomo_ray.models.backbones import DEFAULT_ARCH
        from fomo_ray.prep.fifmini import ensure_fifmini

        return ensure_fifmini(d.root, d.generator_seed, d.image_size, scale=d.scale, progress=False,
                              models=(DEFAULT_ARCH, cfg.backbone.name))
    return open_benchmark(d.root)


def ensure_caption_tokens(cfg: Any) -> None:
    """Add the token ids of ``backbone.name``'s tokenizer to the benchmark (``data.root``) and to a separate pool
    (``data.pool``) where they are missing - an older format, or a model nobody wrote them for - printing one line
    per root upgraded. The run's core never tokenises, and raises ``TokensMissing`` without them."""
    from pathlib import Path

    from fomo_ray.prep.tokenize import upgrade

    roots = [Path(cfg.data.root)]
    if cfg.data.pool and Path(cfg.data.pool).resolve() != roots[0].resolve():
        roots.append(Path(cfg.data.pool))
    for root in roots:
        upgrade(root, [cfg.backbone.name])


def ensure_inputs(cfg: Any) -> None:
    """Make sure the benchmark and the zero-shot weights of ``cfg`` exist: builds FiF-mini when the config asks for it
    (:func:`ensure_benchmark`), adds the caption token ids of the run's model where missing
    (:func:`ensure_caption_tokens`) and pretrains the tiny base when ``backbone.pretrained`` is ``auto`` and its cached
    checkpoint is missing. All are cached and locked, so this returns quickly when they exist and concurrent callers
    build each input once. Raises ``ConfigError`` for ``auto`` on an architecture without a recipe, as a run would.
    """
    bench = ensure_benchmark(cfg)
    ensure_caption_tokens(cfg)
    if cfg.backbone.pretrained != "auto":
        return
    from fomo_ray.core.inputs import auto_base_path

    if not auto_base_path(cfg.backbone.name, bench).is_file():  # the run's own look-up (ConfigError without a recipe)
        from fomo_ray.prep.pretrain import ensure_base_checkpoint

        ensure_base_checkpoint(cfg.backbone.name, bench, backend=cfg.data.loader)
