"""``fomo-ray budget``: the Tab. 4-style MAF compute-budget table of a backbone (docs/BENCHMARK.md §Budgets;
docs/REAL_DATA.md compares the paper preset's with Tab. 4)."""
from __future__ import annotations

import sys
from typing import Sequence

from fomo_ray.cli.text import Parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fomo-ray budget [config.yaml | --preset paper] [key=value ...] [--backbone NAME] [--methods m1 m2 ...]``: per
    method, the measured GFLOPs, memory, MAF and steps per task at T = 20/50/100/200 of the paper's budget, plus the
    steps per task this config gets (its stream.num_tasks and budget.total_ft_steps). Every figure is one step at the
    global batch as if on one device (the paper's b = 512 included, on a CPU: the step is counted on fake tensors,
    nothing of its size is allocated)."""
    from fomo_ray.budgets.budget import (FT_METHOD, PAPER_TOTAL_FT_STEPS, BudgetError, backbone_spec, budget_rows,
                                         method_record, rank_batch, steps_per_task)
    from fomo_ray.config import load_config
    from fomo_ray.tables import format_table

    p = Parser(prog="fomo-ray budget", description=main.__doc__)
    p.add_argument("args", nargs="*", help="an optional experiment YAML, then dotted overrides (method.peft.rank=64)")
    p.add_argument("--preset", default=None,
                   help="start from a preset instead of a config file: 'paper' (experiments/configs/presets/paper.yaml)")
    p.add_argument("--backbone", default=None, help="open_clip architecture or fomo-tiny-* (default: backbone.name)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's mixture.batch_size")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's native size")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (analytic memory)")
    p.add_argument("--total-ft-steps", type=int, default=PAPER_TOTAL_FT_STEPS,
                   help="full fine-tuning steps over the stream for the T=20..200 columns (paper: 28400)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (same as a key=value argument)")
    args = p.parse_intermixed_args(list(argv) if argv is not None else None)  # key=value before or after flags
    config = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = [*(args.args[1:] if config else args.args), *args.overrides]
    try:
        if args.preset:
            from fomo_ray.planning.presets import preset_path

            if config:
                raise ValueError(f"give a config file ({config}) or --preset {args.preset}, not both")
            config = preset_path(args.preset)
        cfg = load_config(config, overrides)
        if args.backbone:
            cfg = cfg.replace({"backbone.name": args.backbone})
        if args.methods is None:
            from fomo_ray.methods import REGISTRY

            args.methods = list(REGISTRY)
        spec = backbone_spec(cfg.backbone.name, args.image_size)
        bs = args.batch_size or cfg.mixture.batch_size
        kw = dict(backbone=spec, device=args.device, batch_size=bs)
        ft = method_record(cfg, FT_METHOD, **kw)
        records = [ft if m == FT_METHOD else method_record(cfg, m, **kw) for m in args.methods]
    except ValueError as e:  # ConfigError, BudgetError, unknown backbone or method: all name the culprit
        print(f"fomo-ray budget: {e}", file=sys.stderr)
        return 2
    print(f"backbone {spec.name}, batch {bs}, image {spec.image_size}px, device {ft.device_kind} "
          f"({ft.memory_kind} memory), steps_ft(T) = {args.total_ft_steps} // T; models are built with random "
          f"weights (only their shapes and FLOPs matter); every figure is one step at the global batch {bs} as if "
          f"on one device, {ft.measured or 'read from the cache'}, with no real pass over more than a rank's batch "
          f"({rank_batch(cfg, bs)})")
    rows = budget_rows(records, ft, args.total_ft_steps)
    t, mine = cfg.stream.num_tasks, f"this config: T={cfg.stream.num_tasks}, total {cfg.budget.total_ft_steps}"
    cfg = cfg.replace({"mixture.batch_size": bs})
    for row, r in zip(rows, records):  # exactly what a run of this config trains (budget.mode, cost_as included)
        try:
            row[mine] = steps_per_task(cfg, _cost_name(cfg, r.method), t, backbone=spec, device=args.device) \
                if r.trainable_params else 0
        except BudgetError:
            row[mine] = "<1"
    print(format_table(rows))
    return 0


def _cost_name(cfg, method: str) -> str:
    """The name a method's steps are budgeted under (its ``cost_as``, e.g. a merge is charged as fine-tuning)."""
    from fomo_ray.methods import build_method

    m = build_method(cfg.replace({"method.name": method}))
    return m.cost_as or m.name


if __name__ == "__main__":
    sys.exit(main())
