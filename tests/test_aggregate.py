"""Seeds as a sweep dimension (issue 17 item 2): the `seeds` key and flag, per-variant Student-t intervals, differences
to fine-tuning paired by seed, and the multi-seed report -- all hand-computed, no Ray."""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from fomo_ray.maths import aggregate

from fomo_ray.results import report, sweep_results

from fomo_ray.planning import sweep_spec
from fomo_ray.api import variant_summary
from fomo_ray.cli import sweep as sweep_cli
from fomo_ray.trial_report import SCORES
from fomo_ray.planning.sweep_spec import Dim, SweepError, spec_from_dict
from fomo_ray.tracking.writer import variant_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments" / "configs").glob("sweep_*.yaml"))
T2 = 4.302653  # Student t_{0.975} with 2 degrees of freedom (3 seeds)
T1 = 12.706205  # ... with 1 degree of freedom (2 seeds)
NAN = float("nan")

# variant: (method.name, merge weight, final GM per seed 0, 1, 2; None = that seed failed)
VARIANTS = {
    "finetune": ("finetune", NAN, [0.40, 0.50, 0.45]),
    "ema_w0.5": ("ema_merge", 0.5, [0.50, 0.62, 0.55]),
    "ema_w0.9": ("ema_merge", 0.9, [0.45, 0.52, 0.50]),
    "zero_shot": ("zero_shot", NAN, [0.30, 0.31, None]),
}


def _trials() -> pd.DataFrame:
    rows = []
    for variant, (method, weight, finals) in VARIANTS.items():
        for seed, final in enumerate(finals):
            rows.append({"run": f"{len(rows):03d}-{variant},seed={seed}", "status": "failed" if final is None else
                         "finished", "reason": "", "variant": variant, "method.name": method,
                         "method.merge.weight": weight, "seed": seed})
    return pd.DataFrame(rows)


def _tidy() -> pd.DataFrame:
    """Two points per trial, A_KA = A_ZS at each (so GM equals them): 0.2 at the zero-shot point, then the final
    value (the trajectory mean is (0.2 + final) / 2); a failed seed has its zero-shot point only."""
    rows = []
    for (_, t), final in zip(_trials().iterrows(), [f for *_, fs in VARIANTS.values() for f in fs]):
        for point, value in [(0, 0.2)] + ([] if final is None else [(1, final)]):
            rows += [(t["run"], point, ds, role, "top1", value, "subset")
                     for ds, role in (("A", "adapt"), ("E", "eval"))]
    return pd.DataFrame(rows, columns=["run", "point", "dataset", "role", "metric", "value", "eval_set"])


def _table() -> pd.DataFrame:
    return report.trial_table(_tidy(), _trials())


# --------------------------------------------------------------------------------------------------- numbers
def test_t_interval_by_hand():
    # mean 0.6, s = 0.1: half-width t_{0.975, 2} * 0.1 / sqrt(3)
    assert aggregate.ci_half_width([0.5, 0.6, 0.7]) == pytest.approx(T2 * 0.1 / math.sqrt(3), rel=1e-6)
    d = aggregate.describe([0.5, NAN, 0.7, 0.6])  # NaN left out
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.6) and d["std"] == pytest.approx(0.1)
    one = aggregate.describe([0.4])
    assert one["n"] == 1 and one["mean"] == 0.4 and math.isnan(one["std"]) and math.isnan(one["ci"])
    assert math.isnan(aggregate.ci_half_width([]))


def test_variant_table_means_and_intervals():
    v = aggregate.variant_table(_table()).set_index("label")
    assert list(v.index) == ["ema_w0.5", "ema_w0.9", "finetune", "zero_shot"]  # best mean final GM first
    assert v.loc["ema_w0.5", "n"] == 3 and v.loc["zero_shot", "n"] == 2  # the failed seed is left out
    s = math.sqrt(((0.50 - 0.556667) ** 2 + (0.62 - 0.556667) ** 2 + (0.55 - 0.556667) ** 2) / 2)
    assert v.loc["ema_w0.5", "final_GM_mean"] == pytest.approx(0.556667, abs=1e-6)
    assert v.loc["ema_w0.5", "final_GM_std"] == pytest.approx(s, rel=1e-4)
    assert v.loc["ema_w0.5", "final_GM_ci"] == pytest.approx(T2 * s / math.sqrt(3), rel=1e-4)
    assert v.loc["ema_w0.5", "mean_A_KA_mean"] == pytest.approx((0.2 + 0.556667) / 2, abs=1e-6)
    assert v.loc["zero_shot", "final_GM_ci"] == pytest.approx(T1 * math.sqrt(0.01 ** 2 / 2) / math.sqrt(2), rel=1e-4)
    # a point's overrides (method.name, the weight) are columns, but the label is the point's name
    assert v.loc["ema_w0.9", "method.merge.weight"] == 0.9 and v.loc["ema_w0.9", "variant"] == "ema_w0.9"
    assert aggregate.seeds_per_variant(_table()) == 3
    # api.variant_summary keeps its columns and adds the intervals
    summary = variant_summary(_table())
    assert "label" not in summary
    assert {"n", "final_GM_mean", "final_GM_std", "final_GM_ci", "mean_GM_ci"} <= set(summary)
    assert summary["final_GM_ci"].iloc[0] == pytest.approx(v.loc["ema_w0.5", "final_GM_ci"])


def test_paired_differences_to_finetune_skip_a_failed_seed():
    comp, note = aggregate.compare_to_baseline(_table())
    assert note == ""
    c = comp.set_index("variant")
    assert set(c["baseline"]) == {"finetune"} and list(c.index) == ["ema_w0.5", "ema_w0.9", "zero_shot"]
    # ema_w0.5 - finetune per seed: 0.10, 0.12, 0.10
    d, s = 0.32 / 3, math.sqrt(((0.10 - 0.32 / 3) ** 2 * 2 + (0.12 - 0.32 / 3) ** 2) / 2)
    assert c.loc["ema_w0.5", "n_pairs"] == 3
    assert c.loc["ema_w0.5", "final_GM_diff"] == pytest.approx(d)
    assert c.loc["ema_w0.5", "final_GM_diff_ci"] == pytest.approx(T2 * s / math.sqrt(3), rel=1e-5)
    assert c.loc["ema_w0.5", "mean_GM_diff"] == pytest.approx(d / 2)  # the zero-shot point is shared
    # zero_shot's seed 2 failed: only seeds 0 and 1 pair (-0.10, -0.19)
    assert c.loc["zero_shot", "n_pairs"] == 2
    assert c.loc["zero_shot", "final_GM_diff"] == pytest.approx(-0.145)
    assert c.loc["zero_shot", "final_GM_diff_ci"] == pytest.approx(T1 * math.sqrt(0.09 ** 2 / 2) / math.sqrt(2),
                                                                   rel=1e-5)
    # another baseline by name; an unknown one and a sweep without fine-tuning say so
    other, _ = aggregate.compare_to_baseline(_table(), baseline="ema_w0.9")
    assert set(other["baseline"]) == {"ema_w0.9"} and "finetune" in set(other["variant"])
    assert aggregate.compare_to_baseline(_table(), baseline="nope")[1].startswith("no comparison: baseline 'nope'")
    no_ft = _table()[_table()["variant"] != "finetune"]
    comp, note = aggregate.compare_to_baseline(no_ft)
    assert comp.empty and "method.name=finetune" in note and "baseline=" in note


def test_several_baselines_pair_within_the_same_budget():
    rows = []
    for budget, method, finals in [(60, "finetune", [0.40, 0.44]), (60, "ema_merge", [0.45, 0.47]),
                                   (120, "finetune", [0.50, 0.50]), (120, "ema_merge", [0.49, 0.53])]:
        for seed, f in enumerate(finals):
            rows.append({"run": f"{budget}-{method}-{seed}", "status": "finished", "budget.total_ft_steps": budget,
                         "method.name": method, "seed": seed,
                         **{f"{w}_{s}": f for w in ("final", "mean") for s in SCORES}})
    comp, note = aggregate.compare_to_baseline(pd.DataFrame(rows))
    c = comp.set_index("variant")
    ema60, ema120 = "total_ft_steps=60,method=ema_merge", "total_ft_steps=120,method=ema_merge"
    assert note == "" and dict(c["baseline"]) == {ema60: "total_ft_steps=60,method=finetune",
                                                  ema120: "total_ft_steps=120,method=finetune"}
    assert c.loc[ema60, "final_GM_diff"] == pytest.approx(0.04)
    assert c.loc[ema120, "final_GM_diff"] == pytest.approx(0.01)  # pairs -0.01, 0.03: s = 0.04 / sqrt(2)
    assert c.loc[ema120, "final_GM_diff_ci"] == pytest.approx(T1 * (0.04 / math.sqrt(2)) / math.sqrt(2))


def test_points_that_set_their_own_keys_still_pair_with_the_baseline():
    """Issue 29, item 9: named points that set different keys (EMA's weight, LoRA's rank, a fine-tuning point with a
    meta schedule) beside the references: each variant pairs with the fine-tuning baseline of its own schedule (the
    key the two fine-tuning baselines differ in), none is dropped because another point set a key."""
    spec = {"finetune": ("finetune", "finetune", NAN, NAN, NAN), "ft_ar": ("", "finetune", NAN, NAN, "ar_cosine"),
            "ema_w0.5": ("", "ema_merge", 0.5, NAN, NAN), "lora_r4": ("", "lora", NAN, 4, NAN),
            "zero_shot": ("zero_shot", "zero_shot", NAN, NAN, NAN), "joint": ("joint", "joint", NAN, NAN, NAN)}
    rows = []
    for name, (ref, method, weight, rank, meta) in spec.items():
        for seed in (0, 1):
            final = 0.4 + 0.01 * len(rows)
            rows.append({"run": f"{len(rows):03d}-{name},seed={seed}", "status": "finished",
                         "variant": "" if ref else name, "reference": ref or NAN, "method.name": method,
                         "method.merge.weight": weight, "method.peft.rank": rank, "schedule.meta": meta,
                         "seed": seed, **{f"{w}_{s}": final for w in ("final", "mean") for s in SCORES}})
    comp, note = aggregate.compare_to_baseline(pd.DataFrame(rows))
    c = comp.set_index("variant")
    assert note == "" and sorted(c.index) == ["ema_w0.5", "joint", "lora_r4", "zero_shot"]
    assert set(c["baseline"]) == {"finetune"} and (c["n_pairs"] == 2).all()
    assert c.loc["ema_w0.5", "final_GM_diff"] == pytest.approx(0.04)  # runs 4, 5 minus runs 0, 1


def test_a_sweep_of_seeds_alone_is_one_variant():
    table = pd.DataFrame({"run": ["a", "b"], "status": ["finished"] * 2, "seed": [0, 1],
                          **{c: [0.4, 0.6] for c in aggregate.SCORE_COLUMNS}})
    v = aggregate.variant_table(table)
    assert list(v["label"]) == ["all"] and v.loc[0, "n"] == 2 and v.loc[0, "final_GM_mean"] == pytest.approx(0.5)
    assert aggregate.seeds_per_variant(table.drop(columns="seed")) == 1


def test_parent_run_metrics_per_variant():
    m = variant_metrics(aggregate.variant_table(_table()).to_dict("records"))
    assert m["Variants/ema_w0.5/final_GM_mean"] == 55.67  # percent, rounded to 0.01 at logging
    assert set(k for k in m if k.startswith("Variants/finetune/")) == {
        f"Variants/finetune/{s}_{a}" for s in ("final_GM", "mean_GM") for a in ("mean", "ci")}
    odd = variant_metrics([{"label": "lr=0.0001,path=/a/b", "final_GM_mean": 0.5, "final_GM_ci": NAN}])
    assert odd == {"Variants/lr_0.0001_path__a_b/final_GM_mean": 50.0}  # one section; NaN left out


# --------------------------------------------------------------------------------------------------- reports
def test_multi_seed_report_writes_variant_tables_and_error_bar_plots(tmp_path):
    files = report.build_report(_tidy(), _trials(), tmp_path, x_key="method.merge.weight")
    assert sorted(f.name for f in files) == ["pareto.png", "table.csv", "table.md", "trajectories.png",
                                             "variants.csv", "variants.md", "vs_baseline.md", "vs_weight.png"]
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000
    md = (tmp_path / "variants.md").read_text()
    assert "| variant | seeds | final A_KA | final A_ZS | final GM | mean A_KA |" in md
    assert "| ema_w0.5 | 3 | 55.7 ± 15.0 |" in md and "| zero_shot | 2 | 30.5 ± 6.4 |" in md
    vs = (tmp_path / "vs_baseline.md").read_text()
    assert "| variant | baseline | pairs | Δ final GM | Δ mean GM |" in vs
    assert "| ema_w0.5 | finetune | 3 | +10.7 ± 2.9 | +5.3 ± 1.4 |" in vs
    assert "| zero_shot | finetune | 2 | -14.5 ± 57.2 |" in vs
    saved = pd.read_csv(tmp_path / "variants.csv")
    assert list(saved["label"]) == ["ema_w0.5", "ema_w0.9", "finetune", "zero_shot"]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    no_ft = _trials()["variant"] != "finetune"
    report.build_report(_tidy(), _trials()[no_ft], tmp_path / "no_ft")
    assert "note: no comparison" in (tmp_path / "no_ft" / "vs_baseline.md").read_text()


def test_a_sweeps_report_baseline_is_the_variant_its_comparison_subtracts(tmp_path, capsys):
    """A study whose every variant fine-tunes (the schedule study) names its baseline in the sweep YAML
    (``report: {baseline: ...}``); the sweep records it, ``fomo-ray report`` uses it, and ``--baseline`` overrides it."""
    import json

    from fomo_ray.cli.report import main as report_main
    from fomo_ray.models.metrics import save_results

    spec = spec_from_dict({"name": "s", "space": {"method.name": {"grid": ["finetune"]}},
                           "report": {"x": "method.merge.weight", "baseline": "ema_w0.9"}})
    assert (spec.report_x, spec.report_baseline) == ("method.merge.weight", "ema_w0.9")
    with pytest.raises(SweepError, match=r"unknown report key\(s\) \['baselin'\]; valid: \['x', 'baseline'\]"):
        spec_from_dict({"name": "s", "space": {}, "report": {"baselin": "cosine"}})
    with pytest.raises(SweepError, match="'report' must be a mapping"):
        spec_from_dict({"name": "s", "space": {}, "report": "cosine"})
    save_results(_tidy(), tmp_path / "tidy.csv")
    _trials().to_csv(tmp_path / "trials.csv", index=False)
    (tmp_path / "summary.json").write_text(json.dumps({"report_baseline": "ema_w0.9"}))
    assert report_main([str(tmp_path)]) == 0
    vs = (tmp_path / "report" / "vs_baseline.md").read_text()
    assert "| ema_w0.5 | ema_w0.9 | 3 | +6.7 ± 7.2 |" in vs and "| finetune | ema_w0.9 | 3 |" in vs
    assert report_main([str(tmp_path), "--baseline", "finetune"]) == 0
    assert "| ema_w0.5 | finetune | 3 | +10.7 ± 2.9 |" in (tmp_path / "report" / "vs_baseline.md").read_text()
    capsys.readouterr()
    sweep_cli.print_variants(_table(), "ema_w0.9")  # the sweep command's own summary uses it too
    assert "| ema_w0.5 | ema_w0.9 | 3 | +6.7 ± 7.2 |" in capsys.readouterr().out


def test_single_seed_report_is_unchanged(tmp_path):
    one = _trials()[_trials()["seed"] == 0]
    files = report.build_report(_tidy()[_tidy()["run"].isin(one["run"])], one, tmp_path, x_key="method.merge.weight")
    assert sorted(f.name for f in files) == ["pareto.png", "table.csv", "table.md", "trajectories.png",
                                             "vs_weight.png"]


def test_print_summary_adds_the_variant_tables(capsys):
    sweep_cli.print_variants(_table())
    out = capsys.readouterr().out
    assert "| ema_w0.5 | 3 | 55.7 ± 15.0 |" in out and "| ema_w0.5 | finetune | 3 | +10.7 ± 2.9 |" in out
    sweep_cli.print_variants(_table()[_table()["seed"] == 0])
    assert capsys.readouterr().out == ""  # one seed: the per-trial table says it all


# --------------------------------------------------------------------------------------------------- the spec
SPACE = {"variant": {"points": {"ft": {"method.name": "finetune"}, "ema": {"method.name": "ema_merge"}}}}


def _plan(**spec):
    return sweep_spec.plan_sweep(spec_from_dict({"name": "s", "space": SPACE, **spec}))


def test_seeds_key_adds_the_last_grid_dimension():
    plan = _plan(seeds=3)
    assert list(plan.space) == ["variant", "seed"] and plan.space["seed"] == Dim("grid", (0, 1, 2))
    assert plan.total == 6
    labels = [sweep_spec.trial_label(c, plan.space) for c in sweep_spec.grid_points(plan.space)]
    assert labels[:3] == ["ft,seed=0", "ft,seed=1", "ft,seed=2"]
    assert _plan(seeds=2, base={"seed": 5}).space["seed"].values == (5, 6)  # from the base seed
    one = _plan()
    assert list(one.space) == ["variant"] and one.total == 2 and one.spec.seeds == 1  # the default adds nothing
    assert "seeds" in sweep_spec.SPEC_KEYS
    note = sweep_results.sweep_description(plan.spec, plan, "s")  # the parent run's note in the MLflow UI
    assert "`seed`: grid [0, 1, 2]" in note and "3 seeds per variant" in note and "Variants/" in note
    assert "seeds per variant" not in sweep_results.sweep_description(one.spec, one, "s")


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_seeds_must_be_a_positive_integer(bad):
    with pytest.raises(SweepError, match=r"<dict>: seeds must be an integer >= 1"):
        spec_from_dict({"name": "s", "seeds": bad})


def test_seeds_refuse_a_space_that_sets_the_seed():
    with pytest.raises(SweepError, match=r"'seeds: 2' and the space key 'seed'"):
        _plan(seeds=2, space={**SPACE, "seed": {"grid": [0, 1]}})
    with pytest.raises(SweepError, match=r"'seeds: 2' and point 'variant=ft'"):
        _plan(seeds=2, space={"variant": {"points": {"ft": {"seed": 3}}}})
    with pytest.raises(SweepError, match="optuna chooses its own trials"):
        _plan(seeds=2, search="optuna", space={"method.merge.weight": {"choice": [0.1, 0.9]}})
    assert _plan(space={**SPACE, "seed": {"grid": [0, 1]}}).total == 4  # one seed: a swept seed is fine


def test_seeds_flag_and_every_shipped_study(capsys):
    ap = argparse.ArgumentParser()
    sweep_cli.add_arguments(ap)
    path = CONFIGS[0]
    spec = sweep_cli.spec_from_args(path, ap.parse_intermixed_args(["--seeds", "3", "--no-mlflow"]))
    assert spec.seeds == 3
    assert sweep_cli.spec_from_args(path, ap.parse_intermixed_args([])).seeds == 1
    assert sweep_cli.main([str(path), "--dry-run", "--no-mlflow", "--seeds", "0"]) == 2
    assert "seeds must be an integer >= 1" in capsys.readouterr().err
    for path in CONFIGS:  # every study takes seeds through the spec key / flag, its default unchanged
        spec = sweep_spec.load_sweep(path, {"tracking.enabled": False})
        assert spec.seeds == 1
        one, two = sweep_spec.plan_sweep(spec), sweep_spec.plan_sweep(replace(spec, seeds=2))
        assert two.total == 2 * one.total and list(two.space)[-1] == "seed", path.name


def test_reference_trials_are_variants_of_their_own_and_finetune_is_the_baseline():
    """``references:`` trials carry a ``reference`` label and no swept value: each is a variant of its own."""
    from fomo_ray.maths.aggregate import compare_to_baseline, variant_table

    def _scores(x):
        return {f"{w}_{k}": x for w in ("final", "mean") for k in ("A_KA", "A_ZS", "GM")}

    rows = []
    for seed in (0, 1):
        rows += [{"run": f"w{seed}", "status": "finished", "variant": "ema_w0.5", "reference": None,
                  "method.name": "ema_merge", "seed": seed, **_scores(0.5 + seed / 10)},
                 {"run": f"z{seed}", "status": "finished", "variant": None, "reference": "zero_shot",
                  "method.name": "zero_shot", "seed": seed, **_scores(0.3)},
                 {"run": f"f{seed}", "status": "finished", "variant": None, "reference": "finetune",
                  "method.name": "finetune", "seed": seed, **_scores(0.4 + seed / 10)}]
    table = pd.DataFrame(rows)
    v = variant_table(table)
    assert sorted(v["label"]) == ["ema_w0.5", "finetune", "zero_shot"] and set(v["n"]) == {2}
    d, note = compare_to_baseline(table)
    assert note == "" and sorted(d["variant"]) == ["ema_w0.5", "zero_shot"] and set(d["baseline"]) == {"finetune"}
    assert d.set_index("variant").loc["ema_w0.5", "final_GM_diff"] == pytest.approx(0.1)
