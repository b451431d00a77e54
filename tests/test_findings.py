"""The paper's findings checked on a study's trial table (issue 17, item 6): per-seed effects with a Student-t
interval and a verdict that follows the paper's sign; the script's table (fomo_ray/maths/findings.py,
experiments/check_findings.py). Hand-made trial tables: what the sweeps produce is tested elsewhere."""
from __future__ import annotations

import importlib.util
import math

import pandas as pd
import pytest

from fomo_ray.maths.findings import FINDINGS, check, order_vs_method, overall, per_seed_difference, verdict

from _edges_util import REPO


def _scores(x: float, **extra) -> dict:
    return {**{f"{w}_{k}": x for w in ("final", "mean") for k in ("A_KA", "A_ZS", "GM")}, **extra}


def _row(run, seed, status="finished", **cols):
    return {"run": run, "seed": seed, "status": status, **cols}


def test_verdicts_follow_the_papers_sign_and_the_interval():
    assert verdict(0.05, 0.01, +1) == "confirmed" and verdict(-0.05, 0.01, -1) == "confirmed"
    assert verdict(-0.05, 0.01, +1) == "contradicted" and verdict(0.01, 0.05, +1) == "inconclusive"
    assert verdict(0.05, math.nan, +1) == "inconclusive (one seed)" and verdict(math.nan, math.nan, +1) == "no data"
    assert overall([{"verdict": "confirmed"}, {"verdict": "inconclusive"}]) == "inconclusive"
    assert overall([{"verdict": "confirmed"}, {"verdict": "contradicted"}]) == "contradicted"


def test_merging_effect_is_paired_by_seed_and_skips_unfinished_trials():
    merge = next(f for f in FINDINGS if f.study == "merge_weights")
    rows = []
    for seed, (ft, w1, w9) in enumerate([(0.40, 0.45, 0.43), (0.30, 0.36, 0.34), (0.35, 0.39, 0.37)]):
        rows += [_row(f"f{seed}", seed, reference="finetune", **_scores(ft)),
                 _row(f"a{seed}", seed, variant="ema_w0.1", **_scores(w1)),
                 _row(f"b{seed}", seed, variant="ema_w0.9", **_scores(w9))]
    rows.append(_row("x", 3, "failed", variant="ema_w0.1", **_scores(0.9)))  # no finished baseline: left out
    table = pd.DataFrame(rows)
    d = per_seed_difference(table, merge.effects[0])
    assert d.round(6).tolist() == [0.04, 0.05, 0.03]  # mean of the merges minus fine-tune, per seed
    (r,) = check(merge, table)
    assert r["n_seeds"] == 3 and r["mean"] == pytest.approx(0.04)
    assert r["ci"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5) and r["verdict"] == "confirmed"
    assert dict(merge.overrides) == {"stream.num_tasks": 8}  # the long horizon the finding is about


def test_peft_needs_both_effects_and_stream_order_against_method():
    peft = next(f for f in FINDINGS if f.study == "methods")
    rows = []
    for seed, d in enumerate((0.02, 0.03, 0.025)):
        rows += [_row(f"f{seed}", seed, reference="finetune", **{"method.name": "finetune"}, **_scores(0.4)),
                 _row(f"l{seed}", seed, variant="lora_r4", **{"method.name": "lora"},
                      **_scores(0.4, final_A_ZS=0.4 + d, final_A_KA=0.4 - d))]
    results = check(peft, pd.DataFrame(rows))
    assert [r["verdict"] for r in results] == ["confirmed", "confirmed"] and overall(results) == "confirmed"

    rows = []
    for seed in range(3):
        for order, o in (("random", 0.0), ("dataset_incremental", 0.005 * (seed + 1))):
            for method, m in (("finetune", 0.0), ("ema_merge", 0.05)):
                rows.append(_row(f"{order}{method}{seed}", seed, **{"stream.ordering": order, "method.name": method},
                                 **_scores(0.3 + o + m)))
    (r,) = order_vs_method(pd.DataFrame(rows))
    assert r["mean"] == pytest.approx(0.01 - 0.05) and r["verdict"] == "confirmed"


def test_the_script_renders_its_table_and_writes_only_between_its_markers(tmp_path):
    spec = importlib.util.spec_from_file_location("check_findings", REPO / "experiments" / "check_findings.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.markdown([{"claim": "c", "study": "s", "effect": "e", "n_seeds": 3, "mean": 0.012, "ci": 0.004,
                             "paper": "+", "verdict": "confirmed"}], 3, {"s": "a" * 40})
    assert text.splitlines()[-1] == "| c | e (s) | + | +1.2 ± 0.4 (n=3) | confirmed |"
    assert f"sweeps run at commit {'a' * 12}, " in text  # the commit the sweeps ran at, not the reader's checkout
    piped = script.markdown([{"claim": "c", "study": "s", "effect": "|a| - |b|", "n_seeds": 3, "mean": 0.01,
                              "ci": 0.01, "paper": "-", "verdict": "v"}], 3, {"s": "a" * 40})
    assert piped.splitlines()[-1].count(" | ") == 4  # five cells: the effect's own bars are escaped
    left = script.markdown([], 3, {"s": "a" * 40}, {"methods": "PEFT retains"})
    assert left.splitlines()[-1] == "| PEFT retains | (methods) | | not run yet | |"
    two = script.commits_text({"s": "a" * 40, "t": "b" * 40 + "+changes"})
    assert two == f"commits {'a' * 12} (s), {'b' * 12} with uncommitted changes (t)"
    where = script.markdown([], 3, {"s": "a" * 40, "t": "a" * 40}, platforms={"s": "CPU X", "t": "CPU Y"})
    # where each study's numbers hold
    assert f"sweeps run at commit {'a' * 12}, platform CPU X (s), CPU Y (t), " in where
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{script.START}\nold\n{script.END}\nb\n")
    script.write_readme("new", readme)
    assert readme.read_text() == f"a\n{script.START}\nnew\n{script.END}\nb\n"
