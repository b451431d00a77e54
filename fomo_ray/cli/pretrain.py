"""``fomo-ray pretrain``: pretrain (or reuse the cached) tiny base CLIP on a benchmark's pool and print its zero-shot
accuracy next to chance (the work is :mod:`fomo_ray.prep.pretrain`; ``python data_prep/pretrain_base.py`` is the
same command)::

    fomo-ray pretrain [--config cfg.yaml] [--arch fomo-tiny-s] [--force] [--steps N] [key=value ...]
"""
from __future__ import annotations

import dataclasses
import sys

from fomo_ray.cli.text import Parser


def main(argv: list[str] | None = None) -> int:
    """``fomo-ray pretrain``: build FiF-mini if needed, then pretrain (or reuse) the tiny base CLIP and print its
    zero-shot accuracy next to chance."""
    from fomo_ray.models.backbones import TINY_ARCHS, BackboneError
    from fomo_ray.config import ConfigError, load_config
    from fomo_ray.core.inputs import RECIPES, base_checkpoint_path
    from fomo_ray.prep import ensure_benchmark
    from fomo_ray.prep.pretrain import PretrainError, ensure_base_checkpoint, format_zero_shot, read_meta

    p = Parser(prog="fomo-ray pretrain", description=main.__doc__)
    p.add_argument("--config", default=None, help="experiment YAML (data.* and backbone.name are used)")
    p.add_argument("--arch", default="", help=f"tiny architecture, one of {list(TINY_ARCHS)} (default: backbone.name)")
    p.add_argument("--all", action="store_true", help="pretrain every tiny architecture")
    p.add_argument("--force", action="store_true", help="retrain even if the cached checkpoint exists")
    p.add_argument("--steps", type=int, default=0, help="override the recipe's steps (changes the cache hash)")
    p.add_argument("--lr", type=float, default=0.0, help="override the recipe's lr (changes the cache hash)")
    p.add_argument("--batch-size", type=int, default=0, help="override the recipe's batch size")
    p.add_argument("--seed", type=int, default=-1, help="override the recipe's seed (the base is shared by all "
                   "experiment seeds by default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.root=data/fifmini")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        archs = list(TINY_ARCHS) if args.all else [args.arch or cfg.backbone.name]
        bench = ensure_benchmark(cfg)  # one place decides how a config's benchmark is found or built
        for arch in archs:
            if arch not in RECIPES:
                raise PretrainError(f"'{arch}' is not a tiny architecture; valid: {list(TINY_ARCHS)}")
            changes = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size)) if v}
            if args.seed >= 0:
                changes["seed"] = args.seed
            recipe = dataclasses.replace(RECIPES[arch], **changes)
            cached = base_checkpoint_path(bench.root, arch, recipe, bench.manifest["content_hash"]).is_file()
            path = ensure_base_checkpoint(arch, bench, recipe=recipe, force=args.force,
                                          progress=not args.no_progress, backend=cfg.data.loader)
            if cached and not args.force:  # a fresh training run has printed its table already
                meta = read_meta(path)
                print(f"base model {arch} ({path}), trained in {meta.get('stats', {}).get('wall_seconds')} s:\n"
                      f"{format_zero_shot(meta.get('zero_shot', []))}")
    except (ConfigError, PretrainError, BackboneError, ValueError) as e:
        print(f"fomo-ray pretrain: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
