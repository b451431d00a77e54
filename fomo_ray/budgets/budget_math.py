"""The paper's budget arithmetic on measured records (Roth et al. 2024, arXiv 2408.14471, Tab. 4;
docs/BENCHMARK.md §Budgets): steps per task from MAF ratios, the per-task charge, the table rows. Pure functions."""
from __future__ import annotations

import math
from typing import Any, Sequence

from fomo_ray.budgets.budget_records import CostRecord
from fomo_ray.budgets.step_measure import BudgetError

#: the paper's 28,400 full fine-tuning steps over the whole stream (ViT-B/16, b = 512)
PAPER_TOTAL_FT_STEPS = 28_400
TABLE_TASKS = (20, 50, 100, 200)
#: the paper's Tab. 4 steps per task (ViT-B/16, b = 512, T = 20), shown beside the measured ones
REFERENCE_STEPS_VITB16_T20: dict[str, str] = {
    "finetune": "1420", "locked_text": "1949", "locked_image": "12982", "lnfit": "3179", "bitfit": "3179",
    "lora": "1898 (r=4), 1891 (r=64)", "dora": "1893 (r=4)", "vera": "1898 (r=4)", "si": "1418",
    "ewc": "14 (Fisher per step)", "ema_merge": "1420", "zs_merge": "1420", "ft_merge": "1420",
    "offline_merge": "1420", "merge": "1420",
}


def ft_steps(total_ft_steps: int, num_tasks: int) -> int:
    """``steps_ft(T) = total // T`` (the paper's 28,400 // 20 = 1420)."""
    if num_tasks < 1:
        raise BudgetError(f"num_tasks must be >= 1, got {num_tasks}")
    steps = total_ft_steps // num_tasks
    if steps < 1:
        raise BudgetError(f"budget.total_ft_steps={total_ft_steps} over {num_tasks} tasks gives full fine-tuning "
                          f"{steps} steps per task; raise budget.total_ft_steps or lower stream.num_tasks")
    return steps


def mem_mult(m: CostRecord, ft: CostRecord) -> float:
    if m.memory_kind != ft.memory_kind:
        raise BudgetError(f"cannot compare memory of '{m.method}' ({m.memory_kind}) with '{ft.method}' "
                          f"({ft.memory_kind}); measure both on the same device kind")
    return m.peak_bytes / ft.peak_bytes


def maf(m: CostRecord, ft: CostRecord) -> float:
    """``MAF(m) = GFLOPs(m) * PeakMem(m) / PeakMem(ft)``."""
    return m.step_gflops * mem_mult(m, ft)


def task_charge_steps(m: CostRecord) -> float:
    """Per-task extra work of ``m`` in its own training steps (the memory multiplier cancels)."""
    return m.task_gflops / m.step_gflops if m.step_gflops > 0 else 0.0


def steps_from_costs(steps_ft: float, ft: CostRecord, m: CostRecord) -> int:
    """``floor(steps_ft * MAF(ft) / MAF(m) - per-task charge)``; 0 for a method that trains nothing.

    Raises :class:`BudgetError` naming the method and the budget when fewer than one step remains.
    """
    if m.trainable_params == 0:
        return 0
    ratio = maf(ft, ft) / maf(m, ft)
    charge = task_charge_steps(m)
    raw = steps_ft * ratio - charge
    steps = math.floor(raw + 1e-9)  # 1e-9: finetune's own ratio is 1 up to rounding
    if steps < 1:
        raise BudgetError(
            f"method '{m.method}' gets fewer than one step per task ({raw:.2f}): the budget of {steps_ft} full "
            f"fine-tuning steps "
            f"(MAF {maf(ft, ft):.4g}) buys {steps_ft * ratio:.2f} steps at MAF {maf(m, ft):.4g}, minus "
            f"{charge:.2f} steps of per-task extra work; raise budget.total_ft_steps or lower stream.num_tasks")
    return steps


def reference_steps(steps_ft: float, ft_ref: CostRecord, ft: CostRecord) -> float:
    """Full fine-tuning steps of this backbone that spend the budget of ``steps_ft`` fine-tuning steps of the
    reference backbone: ``steps_ft * GFLOPs(ft_ref) / GFLOPs(ft)`` (fine-tuning's memory multiplier is 1)."""
    return steps_ft * ft_ref.step_gflops / ft.step_gflops


def budget_rows(records: Sequence[CostRecord], ft: CostRecord, total_ft_steps: int = PAPER_TOTAL_FT_STEPS,
                tasks: Sequence[int] = TABLE_TASKS) -> list[dict[str, Any]]:
    """One Tab.4-style row per record: GFLOPs, memory, multiplier, MAF and steps per task at each T."""
    rows = []
    for r in records:
        row: dict[str, Any] = {"method": r.method, "trainable_M": r.trainable_params / 1e6,
                               "GFLOPs": r.step_gflops, "memory_MB": r.peak_bytes / 2**20}
        if r.trainable_params == 0:
            row.update({"mem_mult": None, "MAF": None, **{f"T={t}": 0 for t in tasks}})
        else:
            row.update({"mem_mult": mem_mult(r, ft), "MAF": maf(r, ft)})
            for t in tasks:
                try:
                    row[f"T={t}"] = steps_from_costs(ft_steps(total_ft_steps, t), ft, r)
                except BudgetError:
                    row[f"T={t}"] = "<1"
        row["paper ViT-B/16 T=20"] = REFERENCE_STEPS_VITB16_T20.get(r.method, "-")
        rows.append(row)
    return rows
