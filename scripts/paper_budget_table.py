"""The paper-budget table of docs/REAL_DATA.md: the paper preset's steps per task at T = 20 for ViT-B/16, beside Tab. 4.

    python scripts/paper_budget_table.py [--write-readme] [--batches B1 B2]

Every method of the preset is measured exactly as the budget measures it (``fomo_ray.budgets.budget.method_record``,
what ``fomo-ray budget --preset paper`` prints): one training step of a random-weight model at the paper's global batch
of 512, counted on fake tensors on the CPU (FlopCounterMode FLOPs; analytic memory of parameters, gradients, optimizer
and method state and every tensor saved for backward), so nothing of that size is allocated (~40 GB for fine-tuning
alone) and no extrapolation is needed. The steps follow as in the budget, ``steps_m = steps_ft * MAF(finetune) /
MAF(m)`` with ``MAF = GFLOPs * mem_mult`` (per-task extra work, e.g. EWC's Fisher pass, left out here; ``fomo-ray
budget`` subtracts it). ``--batches B1 B2`` instead measures at two small batches and extends both figures along the
line through them to b = 512 (how this table was made before the budget counted at the full batch): FLOPs and saved
activations grow linearly with the batch, parameter, gradient, optimizer and method state do not, and the loss's
``b x b`` logits, the one quadratic term, are under 1 GFLOP and a few MB at 512 -- the two ways agree to within 0.02%
of any figure (locked_image: 13,522 steps counted, 13,524 extended from b = 4 and 8). ``--write-readme``
puts the block between the ``paper-budget`` markers of docs/REAL_DATA.md (the flag keeps its old name), so the numbers
there are always this script's output. Takes about a minute on 2 CPU cores (records are cached in the config's
``budget.cache_dir``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- paper-budget:start -->", "<!-- paper-budget:end -->"
DOC = REPO / "docs" / "REAL_DATA.md"  # where the generated table lives
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random-weight models: nothing to download
METHODS = ("finetune", "locked_image", "locked_text", "lora", "dora", "vera", "bitfit", "lnfit", "ewc", "si",
           "ema_merge")
PAPER_T20 = {"finetune": 1420, "locked_image": 12982, "locked_text": 1949, "lora": 1898, "dora": 1893, "vera": 1898,
             "bitfit": 3179, "lnfit": 3179, "ewc": 14, "si": 1418, "ema_merge": 1420}  # Tab. 4, ViT-B/16, b = 512


def extend(small: float, large: float, b_small: int, b_large: int, b: int) -> float:
    """The value at batch ``b`` on the line through (b_small, small) and (b_large, large)."""
    return large + (large - small) / (b_large - b_small) * (b - b_large)


def rows(batches: tuple[int, int] | None = None, target: int = 512) -> list[dict]:
    """One row per method at b = ``target``: the budget's own record at that batch, or (``batches``) the line through
    the records at two small batches."""
    from fomo_ray.budgets.budget import backbone_spec, method_record
    from fomo_ray.config import load_config
    from fomo_ray.planning.presets import preset_path

    cfg = load_config(preset_path("paper"))
    spec = backbone_spec(cfg.backbone.name)
    steps_ft = cfg.budget.total_ft_steps // cfg.stream.num_tasks

    def at(method: str) -> tuple[float, float]:
        if batches is None:
            r = method_record(cfg, method, backbone=spec, batch_size=target)
            return r.step_gflops, r.peak_bytes
        lo, hi = (method_record(cfg, method, backbone=spec, batch_size=b) for b in batches)
        return (extend(lo.step_gflops, hi.step_gflops, *batches, target),
                extend(lo.peak_bytes, hi.peak_bytes, *batches, target))

    ft_gflops, ft_bytes = at("finetune")
    out = []
    for m in METHODS:
        gflops, peak = at(m)
        steps = int(steps_ft * ft_gflops * ft_bytes / (gflops * peak))
        out.append({"method": m, "GFLOPs": gflops, "memory_GB": peak / 2**30, "mem_mult": peak / ft_bytes,
                    "steps": steps, "paper": PAPER_T20[m], "ratio": steps / PAPER_T20[m]})
    return out


def block(table: list[dict], batches: tuple[int, int] | None) -> str:
    from fomo_ray.provenance import platform_label

    how = ("one step at b = 512 counted on fake tensors on the CPU (the budget's own record)" if batches is None else
           f"every method measured on the CPU at b = {batches[0]} and {batches[1]} and extended linearly to b = 512")
    lines = [f"`python scripts/paper_budget_table.py` ({platform_label()}; {time.strftime('%Y-%m-%d')}): ViT-B-16 at "
             f"224 px, the paper preset, {how}; steps per task at T = 20.", "",
             "| method | GFLOPs / step | memory (GB) | mem_mult | steps (ours) | steps (Tab. 4) | ours / Tab. 4 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        lines.append(f"| {r['method']} | {r['GFLOPs']:,.0f} | {r['memory_GB']:.1f} | {r['mem_mult']:.2f} | "
                     f"{r['steps']:,} | {r['paper']:,} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs=2, default=None, metavar=("B1", "B2"),
                    help="extend from two small batches instead of the budget's record at b = 512")
    ap.add_argument("--write-readme", action="store_true", help="write the table into docs/REAL_DATA.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    batches = tuple(sorted(args.batches)) if args.batches else None
    text = block(rows(batches), batches)
    print(text)
    print(f"({(time.perf_counter() - t0) / 60:.1f} min, cached measurements included)", file=sys.stderr)
    if args.write_readme:
        readme = DOC
        before, rest = readme.read_text().split(START, 1)
        readme.write_text(f"{before}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
        print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
