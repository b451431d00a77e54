"""``fomo-ray budget``: the Tab. 4-style MAF compute-budget table of a backbone (DESIGN §4)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``fomo-ray budget --backbone NAME [--batch-size B] [--image-size P] [--methods m1 m2 ...]``."""
    from fomo_ray.budget import FT_METHOD, PAPER_TOTAL_FT_STEPS, backbone_spec, budget_rows, method_record
    from fomo_ray.config import load_config
    from fomo_ray.tables import format_table

    p = argparse.ArgumentParser(prog="fomo-ray budget", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help="open_clip architecture or fomo-tiny-*")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's mixture.batch_size")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's native size")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (analytic memory)")
    p.add_argument("--total-ft-steps", type=int, default=PAPER_TOTAL_FT_STEPS,
                   help="full fine-tuning steps over the stream (paper: 28400)")
    p.add_argument("--config", default=None, help="experiment YAML (method settings, cache_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set method.peft.rank=64)")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        cfg = load_config(args.config, args.overrides).replace({"backbone.name": args.backbone})
        if args.methods is None:
            from fomo_ray.methods import REGISTRY

            args.methods = list(REGISTRY)
        spec = backbone_spec(args.backbone, args.image_size)
        bs = args.batch_size or cfg.mixture.batch_size
        kw = dict(backbone=spec, device=args.device, batch_size=bs)
        ft = method_record(cfg, FT_METHOD, **kw)
        records = [ft if m == FT_METHOD else method_record(cfg, m, **kw) for m in args.methods]
    except ValueError as e:  # ConfigError, BudgetError, unknown backbone or method: all name the culprit
        print(f"fomo-ray budget: {e}", file=sys.stderr)
        return 2
    print(f"backbone {spec.name}, batch {bs}, image {spec.image_size}px, device {ft.device_kind} "
          f"({ft.memory_kind} memory), steps_ft(T) = {args.total_ft_steps} // T")
    print(format_table(budget_rows(records, ft, args.total_ft_steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
