"""The size-ladder table of docs/BENCHMARK.md: each tiny base's zero-shot scores beside what its pretraining cost.

    fomo-ray pretrain --all                                # once per machine: the bases are cached under data/
    python scripts/ladder_table.py [--data-root data/fifmini] [--write-readme]

Reads every cached base of ``backbone.TINY_ARCHS`` (its recipe, wall time and full-test-set zero-shot records, as
``fomo-ray pretrain`` stored them), counts the FLOPs of one pretraining step (``budget.measure_step``: the same CLIP
step at the recipe's batch size), and prints the block that ``--write-readme`` puts between the ``size-ladder``
markers of docs/BENCHMARK.md (the flag keeps its old name), so its numbers are always the output of a pretraining run,
never typed in.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- size-ladder:start -->", "<!-- size-ladder:end -->"
DOC = REPO / "docs" / "BENCHMARK.md"  # where the generated table lives
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny architectures need no download; never wait on the network


def step_gflops(arch: str, batch_size: int) -> tuple[float, int]:
    """Counted GFLOPs of one pretraining step of ``arch`` at ``batch_size``, and its parameter count."""
    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.budgets.budget import measure_step

    bb = create_backbone(arch, pretrained="", device="cpu")
    m = measure_step(bb.model, list(bb.model.parameters()), batch_size, bb.image_size, bb.context_length)
    return m.gflops, m.total_params


def ladder_rows(bench, recipes: dict | None = None) -> list[dict]:
    """One row per tiny architecture (increasing size) whose base ``recipes`` (default ``inputs.RECIPES``) made."""
    from fomo_ray.models.backbones import TINY_ARCHS
    from fomo_ray.core.inputs import RECIPES, base_checkpoint_path
    from fomo_ray.models.metrics import point_summary
    from fomo_ray.prep.pretrain import read_meta
    from fomo_ray.provenance import recorded_platform

    rows = []
    for arch in TINY_ARCHS:
        recipe = (recipes or RECIPES)[arch]
        path = base_checkpoint_path(bench.root, arch, recipe, bench.manifest["content_hash"])
        if not path.is_file():
            raise SystemExit(f"no cached base for {arch} at {path}: run `fomo-ray pretrain --all` first")
        meta = read_meta(path)
        gflops, params = step_gflops(arch, recipe.batch_size)
        records = [{**r, "run": arch, "point": 0, "eval_set": "full"} for r in meta["zero_shot"]]
        by_name = {r["dataset"] + (" R@5" if r["metric"] == "R@5" else ""): r["value"] for r in records
                   if r["metric"] in ("top1", "R@5")}
        rows.append({"arch": arch, "params": params, "steps": recipe.steps, "batch": recipe.batch_size,
                     "lr": recipe.lr, "pflops": gflops * recipe.steps / 1e6, "minutes": meta["stats"]["wall_seconds"] / 60,
                     **point_summary(records, "full"), "eval": {d: v for d, v in by_name.items()
                                                                if _role(meta, d) == "eval"},
                     "platform": recorded_platform(meta)})
    return rows


def _role(meta: dict, dataset: str) -> str:
    return next(r["role"] for r in meta["zero_shot"] if r["dataset"] == dataset.removesuffix(" R@5"))


def markdown(rows: list[dict]) -> str:
    from fomo_ray.provenance import commit_stamp

    names = list(rows[0]["eval"])
    # the bases' numbers hold for the platform that trained them (docs/REPRODUCIBILITY.md)
    where = "; ".join(sorted({r["platform"] for r in rows}))
    head = [f"The size ladder's bases on FiF-mini ({time.strftime('%Y-%m-%d')}, {commit_stamp()}, {os.cpu_count()} CPU cores, "
            f"{where}, `scripts/ladder_table.py`; zero-shot on the full test sets, percent):", "",
            "| base | params | pretraining (steps x batch, lr) | PFLOPs | minutes here | A_KA | A_ZS | GM | "
            + " | ".join(names) + " |", "| --- " * (8 + len(names)) + "|"]
    body = [f"| {r['arch']} | {r['params'] / 1e6:.1f} M | {r['steps']:,} x {r['batch']}, {r['lr']:g} | {r['pflops']:.2f} "
            f"| {r['minutes']:.1f} | {100 * r['A_KA']:.1f} | {100 * r['A_ZS']:.1f} | {100 * r['GM']:.1f} | "
            + " | ".join(f"{100 * r['eval'][n]:.1f}" for n in names) + " |" for r in rows]
    return "\n".join(head + body)


def write_readme(text: str, readme: Path = DOC) -> int:
    from fomo_ray.provenance import write_block

    write_block(readme, START, END, text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(REPO / "data" / "fifmini"), help="the benchmark the bases were trained on")
    ap.add_argument("--write-readme", action="store_true", help="put the table into docs/BENCHMARK.md")
    a = ap.parse_args(argv)
    from fomo_ray.data.format import open_benchmark

    text = markdown(ladder_rows(open_benchmark(a.data_root)))
    print(text)
    return write_readme(text) if a.write_readme else 0


if __name__ == "__main__":
    sys.exit(main())
