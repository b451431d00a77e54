"""The paper's qualitative findings, checked against this engine's own results (``experiments/check_findings.py``).

Roth, Udandarao et al. 2024 ("A Practitioner's Guide to Continual Multimodal Pretraining", arXiv 2408.14471) draw
five conclusions that people reuse. Each :class:`Finding` names the study that tests it and how to measure it on a
trial table of that study run over several seeds (``report.trial_table``: one row per trial, its ``seed``, its
status and final / trajectory-mean scores): an effect, a per-seed difference between two groups of trials averaged
over the seeds with a 95% Student-t interval (``aggregate.describe``), and the sign the paper reports. The verdict is
``confirmed`` when the interval excludes 0 on the paper's side, ``contradicted`` when it excludes 0 on the other
side, ``inconclusive`` otherwise (and with fewer than two seeds). Pure functions: no sweeps, no files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from fomo_ray.maths.aggregate import describe
from fomo_ray.trial_report import TrialStatus

Pick = Callable[[pd.DataFrame], pd.Series]  # a row mask over a trial table


@dataclass(frozen=True)
class Effect:
    name: str          # what is compared, e.g. "trajectory-mean GM, best merge - fine-tune"
    score: str         # the trial-table column (fractions)
    a: Pick            # the trials averaged on the plus side, per seed
    b: Pick            # ... on the minus side
    sign: int          # +1: the paper finds a > b; -1: a < b


@dataclass(frozen=True)
class Finding:
    claim: str
    study: str                     # the sweep YAML under experiments/configs (sweep_<study>.yaml)
    effects: tuple[Effect, ...]    # all must be confirmed for the finding to be confirmed
    overrides: tuple[tuple[str, object], ...] = ()  # what the check changes in the study (e.g. a longer stream)


def _col(table: pd.DataFrame, key: str) -> pd.Series:
    return table[key] if key in table.columns else pd.Series([None] * len(table), index=table.index)


def method_is(*names: str) -> Pick:
    return lambda t: _col(t, "method.name").isin(names)


def label_is(*names: str) -> Pick:
    """Trials whose point label (``variant``) or reference is one of ``names``."""
    return lambda t: _col(t, "variant").isin(names) | _col(t, "reference").isin(names)


def label_startswith(prefix: str) -> Pick:
    return lambda t: _col(t, "variant").map(lambda v: isinstance(v, str) and v.startswith(prefix))


def per_seed_difference(table: pd.DataFrame, effect: Effect) -> pd.Series:
    """Per seed: mean of ``effect.score`` over the finished ``a`` trials minus the mean over the finished ``b``
    trials (seeds where either side has no finished trial are left out)."""
    done = table[table["status"] == TrialStatus.FINISHED]
    seed = done["seed"] if "seed" in done.columns else pd.Series(0, index=done.index)
    a = done[effect.a(done)].groupby(seed[effect.a(done)])[effect.score].mean()
    b = done[effect.b(done)].groupby(seed[effect.b(done)])[effect.score].mean()
    common = a.index.intersection(b.index)
    return (a.loc[common] - b.loc[common]).astype(float)


def verdict(mean: float, ci: float, sign: int) -> str:
    if math.isnan(mean):
        return "no data"
    if math.isnan(ci):
        return "inconclusive (one seed)"
    lo, hi = mean - ci, mean + ci
    if (sign > 0 and lo > 0) or (sign < 0 and hi < 0):
        return "confirmed"
    if (sign > 0 and hi < 0) or (sign < 0 and lo > 0):
        return "contradicted"
    return "inconclusive"


def check(finding: Finding, table: pd.DataFrame) -> list[dict[str, object]]:
    """One row per effect of ``finding`` measured on its study's trial table."""
    rows = []
    for e in finding.effects:
        d = describe(per_seed_difference(table, e))
        rows.append({"claim": finding.claim, "study": finding.study, "effect": e.name, "n_seeds": d["n"],
                     "mean": d["mean"], "ci": d["ci"], "paper": "+" if e.sign > 0 else "-",
                     "verdict": verdict(d["mean"], d["ci"], e.sign)})
    return rows


def overall(rows: list[dict[str, object]]) -> str:
    """A finding is confirmed when every effect is, contradicted when any is, else inconclusive."""
    verdicts = [r["verdict"] for r in rows]
    if verdicts and all(v == "confirmed" for v in verdicts):
        return "confirmed"
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    return "inconclusive"


PEFT = ("lora", "dora", "vera", "bitfit", "lnfit")

FINDINGS: tuple[Finding, ...] = (
    Finding("merging gives the best long-horizon accumulation/retention trade-off", "merge_weights",
            (Effect("trajectory-mean GM, EMA merges - fine-tune", "mean_GM", label_startswith("ema_w"),
                    label_is("finetune"), +1),),
            overrides=(("stream.num_tasks", 8),)),
    Finding("PEFT retains but accumulates little", "methods",
            (Effect("final A_ZS, PEFT - fine-tune", "final_A_ZS", method_is(*PEFT), label_is("finetune"), +1),
             Effect("final A_KA, PEFT - fine-tune", "final_A_KA", method_is(*PEFT), label_is("finetune"), -1))),
    Finding("meta-schedules improve retention", "lr_schedules",
            (Effect("final A_ZS, with - without meta-schedule", "final_A_ZS",
                    lambda t: _col(t, "schedule.meta").map(lambda v: isinstance(v, str) and v != "none"),
                    lambda t: _col(t, "variant").isin(("cosine", "rsqrt")), +1),)),
    Finding("larger models do better at equal compute", "model_sizes",
            (Effect("trajectory-mean GM, fomo-tiny-l - fomo-tiny-s (fine-tune, equal compute)", "mean_GM",
                    lambda t: method_is("finetune")(t) & (_col(t, "backbone.name") == "fomo-tiny-l"),
                    lambda t: method_is("finetune")(t) & (_col(t, "backbone.name") == "fomo-tiny-s"), +1),)),
)


ORDER_CLAIM = "stream order matters less than the method"  # checked by order_vs_method on the stream-order study


def order_vs_method(table: pd.DataFrame) -> list[dict[str, object]]:
    """"Stream order matters less than the method": per seed, |order effect| - |method effect| on trajectory-mean
    GM in the stream-order study (ordering x method), where the order effect is the mean over methods of
    dataset-incremental - random and the method effect the mean over orders of EMA merge - fine-tune."""
    order = per_seed_difference(table, Effect("", "mean_GM", lambda t: _col(t, "stream.ordering") ==
                                              "dataset_incremental",
                                              lambda t: _col(t, "stream.ordering") == "random", +1))
    method = per_seed_difference(table, Effect("", "mean_GM", method_is("ema_merge"), method_is("finetune"), +1))
    common = order.index.intersection(method.index)
    d = describe(order.loc[common].abs() - method.loc[common].abs())
    return [{"claim": ORDER_CLAIM, "study": "stream_orders",
             "effect": "|order effect| - |method effect|, trajectory-mean GM", "n_seeds": d["n"], "mean": d["mean"],
             "ci": d["ci"], "paper": "-", "verdict": verdict(d["mean"], d["ci"], -1)}]
