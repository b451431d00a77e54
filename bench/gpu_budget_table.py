"""The budget module's Tab.4-style table (docs/BENCHMARK.md §Budgets) measured on a GPU, side by side with the paper's
Tab. 4 steps per task (Roth et al. 2024, arXiv 2408.14471) and the ratio measured / reference per method.

Every row is ``fomo_ray.budgets.budget.method_record`` - one real training step of the method (set up by its registered
``setup``) counted by ``FlopCounterMode``, peak memory from ``torch.cuda.max_memory_allocated`` - turned into steps
per task by ``fomo_ray.budgets.budget.budget_rows`` (``steps_m = steps_ft * MAF(ft) / MAF(m)`` minus per-task work,
``steps_ft(T) = 28,400 // T``). Merge methods train like full fine-tuning (``cost_as = "finetune"``; merging counted
free), so they share the fine-tuning row.

Why the ratios are not 1 (say so next to the figures):
- batch: the reference used b = 512; the default here is 256 on the GPU (512 does not fit ViT-B-16's full
  fine-tuning in 80 GB with bf16 autocast). Parameters, gradients and optimizer state do not scale with the batch,
  activations do, so a PEFT method's memory multiplier (and with it its MAF and steps) depends on b;
- memory: here the peak of *allocated* CUDA memory in bf16 autocast (fp32 master weights); the reference's figures
  came from its own (broken: docs/BENCHMARK.md §Reference faults) scripts and fp16 autocast;
- EWC: the reference charged its 50k-sample Fisher pass on every step (14 steps); here it is charged once per task;
- FLOPs: counted by FlopCounterMode (matmuls, convolutions, attention) plus AdamW's elementwise work.

Rows are written to ``--out`` after each measurement, so a time limit keeps the finished ones. Usage::

    python bench/gpu_budget_table.py [--batch-size 256] [--arch ViT-B-16] [--out table.json] [--device cuda]
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: (row label, registered method, peft rank) in the order of the paper's Tab. 4
VARIANTS: tuple[tuple[str, str, int], ...] = (
    ("finetune", "finetune", 4), ("locked_text", "locked_text", 4), ("locked_image", "locked_image", 4),
    ("lnfit", "lnfit", 4), ("bitfit", "bitfit", 4), ("lora r=4", "lora", 4), ("lora r=64", "lora", 64),
    ("dora r=4", "dora", 4), ("vera r=4", "vera", 4), ("si", "si", 4), ("ewc", "ewc", 4),
)
MERGES_LABEL = "ema/zs/ft/offline merge"
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {"arch": "ViT-B-16", "batch_size": 256},
    "cpu-dry-run": {"arch": "fomo-tiny-s", "batch_size": 8},
}
TASKS = (20, 50, 100, 200)


def reference_steps(method: str, rank: int) -> int | None:
    """The paper's Tab. 4 steps per task (ViT-B/16, b = 512, T = 20) for ``method`` at peft ``rank``.

    Parsed from ``fomo_ray.budgets.budget.REFERENCE_STEPS_VITB16_T20`` ("1898 (r=4), 1891 (r=64)" -> rank 4: 1898); a
    rank the reference did not run gives ``None``."""
    from fomo_ray.budgets.budget import REFERENCE_STEPS_VITB16_T20

    text = REFERENCE_STEPS_VITB16_T20.get(method)
    if text is None:
        return None
    ranked = {int(r): int(s) for s, r in re.findall(r"(\d+) \(r=(\d+)\)", text)}
    if ranked:
        return ranked.get(rank)
    first = re.match(r"\d+", text)
    return int(first.group()) if first else None


def measure(label: str, method: str, rank: int, arch_spec, batch_size: int, device: torch.device,
            cache_dir: str, precision: str):
    from fomo_ray.budgets.budget import method_record
    from fomo_ray.config import load_config

    cfg = load_config(None, {"backbone.name": arch_spec.name, "backbone.pretrained": "",
                             "backbone.precision": precision, "method.name": method, "method.peft.rank": rank,
                             "budget.cache_dir": cache_dir})
    record = method_record(cfg, method, backbone=arch_spec, device=device, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def table_rows(measured: list[tuple[str, str, int, Any]]) -> list[dict[str, Any]]:
    """Tab.4 rows via ``budget.budget_rows`` with our labels, the reference and measured / reference at T = 20."""
    from fomo_ray.budgets.budget import PAPER_TOTAL_FT_STEPS, budget_rows

    ft = next(rec for label, _, _, rec in measured if label == "finetune")
    rows = []
    entries = measured + [(MERGES_LABEL, "ema_merge", 4, ft)]  # cost_as finetune: merging is counted free
    for (label, method, rank, rec), row in zip(entries, budget_rows([e[3] for e in entries], ft,
                                                                     PAPER_TOTAL_FT_STEPS, TASKS)):
        ref = reference_steps(method, rank)
        steps = row["T=20"]
        row = {"method": label, **{k: v for k, v in row.items() if k not in ("method", "paper ViT-B/16 T=20")}}
        row["reference T=20"] = ref
        row["ratio T=20"] = steps / ref if isinstance(steps, int) and ref else None
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    from fomo_ray.tables import format_cell  # after sys.path has the repo

    return format_cell(v)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Budget table (MAF, as Tab. 4) for {report['arch']} on {report['device_name']} ({report['profile']}), "
             f"batch {report['batch_size']} (reference: b = 512), image {report['image_size']} px, "
             f"{report['memory_kind']} memory; steps per task from 28,400 // T full fine-tuning steps.", ""]
    rows = report["rows"]
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    for label, err in report["errors"].items():
        lines += ["", f"**{label} failed:** {err}"]
    if report.get("missing"):
        lines += ["", f"Not measured (time limit or failure before them): {', '.join(report['missing'])}."]
    lines += ["", "Ratios differ from 1 because of the batch (activations scale with it, weights do not), bf16 "
                  "allocated-memory peaks vs the reference's fp16 figures, and EWC's Fisher charged per task here "
                  "(per step in the reference); see bench/gpu_budget_table.py."]
    return "\n".join(lines)


def write_json_atomic(path: Path, obj: Any) -> None:
    from fomo_ray.atomic import write_json  # after sys.path has the repo

    write_json(path, obj, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (the dry-run profile)")
    p.add_argument("--arch", default=None, help="default: ViT-B-16 on CUDA, fomo-tiny-s on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 8 on CPU")
    p.add_argument("--only", nargs="+", default=None, help="row labels to measure (finetune is always measured)")
    p.add_argument("--out", default=None, help="JSON report, rewritten after every row")
    p.add_argument("--cache-dir", default=None, help="budget cache (default: a fresh temp dir: always measure)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="budget-table-") as tmp:  # a fresh budget cache: always measure
        return run(args, args.cache_dir or tmp)


def run(args: argparse.Namespace, cache_dir: str) -> int:
    from fomo_ray.budgets.budget import backbone_spec

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profile = "gpu" if device.type == "cuda" else "cpu-dry-run"
    arch = args.arch or PROFILES[profile]["arch"]
    batch = args.batch_size or PROFILES[profile]["batch_size"]
    precision = "bf16" if device.type == "cuda" else "fp32"  # the loop's "auto" on each device
    spec = backbone_spec(arch)
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only or v[0] == "finetune"]
    report: dict[str, Any] = {"profile": profile, "arch": arch, "batch_size": batch, "image_size": spec.image_size,
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "precision": precision, "memory_kind": None, "rows": [], "errors": {},
                              "missing": [v[0] for v in variants], "seconds": {}}
    measured: list[tuple[str, str, int, Any]] = []
    for label, method, rank in variants:
        t0 = time.perf_counter()
        try:
            rec = measure(label, method, rank, spec, batch, device, cache_dir, precision)
            measured.append((label, method, rank, rec))
            report["memory_kind"] = rec.memory_kind
        except Exception as e:  # noqa: BLE001 - e.g. OOM of one method: recorded, the others still run
            report["errors"][label] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["seconds"][label] = time.perf_counter() - t0
        report["missing"].remove(label)
        if any(m[0] == "finetune" for m in measured):
            report["rows"] = table_rows(measured)
        report["markdown"] = markdown(report)
        if args.out:
            write_json_atomic(Path(args.out), report)
        if label == "finetune" and not measured:
            break  # without the fine-tuning reference no MAF can be formed
    report["markdown"] = markdown(report)
    if args.out:
        write_json_atomic(Path(args.out), report)
    print(report["markdown"])
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
