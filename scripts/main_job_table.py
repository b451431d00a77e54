"""The README's main-job results table, from a finished run of the main job, stamped with date, commit and machine.

    python experiments/sweep_merge_weights.py --output-dir /tmp/fresh          # a fresh run of the main job
    python scripts/main_job_table.py /tmp/fresh/sweeps/merge_weights --write-readme

Prints the block (and with ``--write-readme`` replaces the one between the README's ``main-job-results`` markers),
so the numbers in the README are always the output of a run, never typed in. The commit and the platform are the ones
the sweep ran at, as its driver recorded them (``+changes`` when that checkout had uncommitted changes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- main-job-results:start -->", "<!-- main-job-results:end -->"


def commit(summary: dict) -> str:
    """The commit the sweep ran at (recorded in its state by the driver); never the checkout reading it."""
    return str(summary.get("commit") or "not recorded")[:12]


def variant(row) -> str:
    """Its variant's label, or the reference it is (``references: true``), or the run's name."""
    for key in ("variant", "reference"):
        value = row.get(key)
        if isinstance(value, str) and value:
            return value
    return str(row["run"])


def label(row) -> str:
    """The trial as the study names it: its variant, the merge weight spelled out, joint marked as the bound."""
    variant = globals()["variant"](row)
    if variant.startswith("ema_w"):
        return f"ema_merge w={variant[len('ema_w'):]}"
    return "joint (upper bound)" if variant == "joint" else variant


def block(sweep_dir: Path) -> str:
    import fomo_ray
    from fomo_ray.provenance import recorded_platform  # the driver's: the numbers hold there (docs/REPRODUCIBILITY.md)

    res = fomo_ray.load_results(sweep_dir)
    if res.interrupted or not res.summary:
        raise SystemExit(f"{sweep_dir} is not a finished sweep (no summary.json)")
    table = res.table
    order = {"zero_shot": 0, "finetune": 2, "joint": 3}
    table = table.assign(_k=[order.get(variant(r), 1) for _, r in table.iterrows()])
    table = table.sort_values(["_k", "run"])
    cfg = res.summary.get("identity", {}).get("config", {})
    lines = [f"What the main job showed on {os.cpu_count()} CPU cores ({recorded_platform(res.summary)}; "
             f"{time.strftime('%Y-%m-%d')}, commit {commit(res.summary)}, "
             f"`scripts/main_job_table.py`; {res.summary.get('wall_s', 0) / 60:.1f} min for the {len(table)} trials "
             f"once data and base were cached; T = {cfg.get('stream.num_tasks', '?')}, lr {cfg.get('optimizer.lr', '?')}"
             f", the tiny base; percent):", "",
             "| trial | status | final A_KA | final A_ZS | final GM | trajectory-mean GM | final GM, full test sets |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in table.iterrows():
        scores = [r["final_A_KA"], r["final_A_ZS"], r["final_GM"], r["mean_GM"], r.get("full_GM", float("nan"))]
        lines.append(f"| {label(r)} | {r['status']} | " + " | ".join(
            "n/a" if s != s else f"{100 * s:.1f}" for s in scores) + " |")
    return "\n".join(lines)


def write_readme(text: str, readme: Path = REPO / "README.md") -> None:
    from fomo_ray.provenance import write_block

    write_block(readme, START, END, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", nargs="?", default="runs/sweeps/merge_weights", help="finished main-job sweep directory")
    ap.add_argument("--write-readme", action="store_true", help="replace the README's main-job results block")
    args = ap.parse_args(argv)
    text = block(Path(args.sweep))
    print(text)
    if args.write_readme:
        write_readme(text)
        print(f"wrote {REPO / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
