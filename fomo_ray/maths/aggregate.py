"""Seed statistics of a sweep: per-variant means with Student-t confidence intervals, and differences to a baseline
variant paired by seed. Pure functions of a trial table (pandas and scipy.stats; no files, no plots).

Input: a trial table (``report.trial_table``): one row per trial with its ``status``, the final and trajectory-mean
scores ``final_A_KA`` ... ``mean_GM`` (fractions) and its swept columns, ``seed`` among them when the sweep ran
several seeds (``seeds: N``). A *variant* is a trial's settings without its seed: the values of its swept columns
(dotted config keys and ``variant``) other than ``seed``. Only ``finished`` trials are counted.

Statistics of n values x_1..x_n (NaN values left out): the mean m, the sample standard deviation
s = sqrt(sum (x_i - m)^2 / (n - 1)) and the 95% confidence interval of the mean, m ± t_{0.975, n-1} · s / √n
(Student's t with n - 1 degrees of freedom, e.g. t = 4.302653 for n = 3). ``*_ci`` is that half-width,
t_{0.975, n-1} · s / √n; it and ``*_std`` are NaN for n < 2 (one seed has no spread).

Paired differences: a variant v against its baseline b over the seeds both finished, d_i = v_i - b_i; the mean of d
and its confidence interval as above over the n pairs. Pairing by seed removes what the seed shares between the
two runs (the stream's sampling, the data order), so it resolves smaller differences than two separate intervals.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import pandas as pd

from fomo_ray.config import short_key
from fomo_ray.trial_report import SCORES, TrialStatus

CONFIDENCE = 0.95
SCORE_COLUMNS = tuple(f"{when}_{s}" for when in ("final", "mean") for s in SCORES)
SEED = "seed"
VARIANT = "variant"  # the free name a points dimension usually has
REFERENCE = "reference"  # the reference trials' label (sweep key ``references``)
LABELS = (VARIANT, REFERENCE)  # label columns: their values are names, shown as they are
ALL = "all"  # the one variant of a sweep that swept nothing but its seeds
BASELINE_METHOD = "finetune"


# --------------------------------------------------------------------------------------------------- numbers
def _missing(v: Any) -> bool:
    return v is None or (not isinstance(v, str) and bool(pd.isna(v)))


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if not _missing(v)]


def ci_half_width(values: Iterable[Any], confidence: float = CONFIDENCE) -> float:
    """Half-width of the Student-t confidence interval of the mean: t_{(1+c)/2, n-1} · s / √n, with s the sample
    standard deviation (n - 1 in the denominator) of the n non-NaN values; NaN for n < 2."""
    x = _finite(values)
    n = len(x)
    if n < 2:
        return float("nan")
    from scipy import stats  # ~1 s to import: only when there is an interval to compute

    m = sum(x) / n
    s = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))
    return float(stats.t.ppf((1 + confidence) / 2, n - 1) * s / math.sqrt(n))


def describe(values: Iterable[Any], confidence: float = CONFIDENCE) -> dict[str, float]:
    """``{"n", "mean", "std", "ci"}`` of the non-NaN values: count, mean, sample standard deviation (ddof 1) and the
    confidence interval's half-width (:func:`ci_half_width`); mean NaN for no value, std and ci NaN for one."""
    x = _finite(values)
    n = len(x)
    mean = sum(x) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci": ci_half_width(x, confidence)}


# --------------------------------------------------------------------------------------------------- variants
def variant_keys(table: pd.DataFrame) -> list[str]:
    """The columns that name a trial's variant: swept dotted config keys, ``variant`` and ``reference``, never
    ``seed``."""
    return [c for c in table.columns if ("." in c or c in LABELS) and c != SEED]


def _keyed(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(table, variant key columns); a sweep of seeds alone is one variant (a ``variant`` column ``all``), and a
    table with neither swept keys nor seeds groups by run."""
    keys = variant_keys(table)
    if keys:
        return table, keys
    if SEED in table.columns:
        return table.assign(**{VARIANT: ALL}), [VARIANT]
    return table, ["run"]


def _part(key: str, value: Any) -> str:
    if _missing(value):
        return ""
    value = value.item() if hasattr(value, "item") else value
    if key in (*LABELS, "run"):
        return str(value)
    return f"{short_key(key)}={value:.4g}" if isinstance(value, float) else f"{short_key(key)}={value}"


def label_columns(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The key columns a variant's label shows: with a ``variant`` (or ``reference``) column, the columns it
    determines (a point's overrides, e.g. ``method.name`` of point ``finetune``) are left out."""
    names = [c for c in keys if c in LABELS]
    if not names or table.empty:
        return list(keys)
    by = table.groupby(names, dropna=False)
    return [c for c in keys if c in names or not (by[c].nunique(dropna=False) <= 1).all()]


def variant_labels(table: pd.DataFrame, keys: Sequence[str] | None = None) -> pd.Series:
    """A readable label per row, like a trial label without its seed: ``ema_w0.5``, ``lr=0.0001,method=finetune``
    (the columns of :func:`label_columns`, NaN values left out)."""
    if keys is None:
        table, keys = _keyed(table)
    shown = label_columns(table, keys)
    labels = [",".join(p for p in (_part(c, r[c]) for c in shown) if p) or ALL for _, r in table.iterrows()]
    return pd.Series(labels, index=table.index, dtype=object)


def seeds_per_variant(table: pd.DataFrame) -> int:
    """The most distinct seeds any variant ran (any status); 1 without a ``seed`` column or trials."""
    if SEED not in table.columns or table.empty:
        return 1
    table, keys = _keyed(table)
    return int(table.groupby(keys, dropna=False)[SEED].nunique().max())


def variant_table(table: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per variant (finished trials grouped by :func:`variant_keys`): its key columns, ``label``, ``n`` (finished
    trials) and for each of final / trajectory-mean A_KA, A_ZS, GM the ``_mean``, ``_std`` (ddof 1) and ``_ci``
    (95% Student-t half-width, :func:`ci_half_width`) over its seeds; best mean final GM first."""
    table, keys = _keyed(table)
    stat_cols = [f"{c}_{a}" for c in SCORE_COLUMNS for a in ("mean", "std", "ci")]
    labels = variant_labels(table, keys)
    done = table[table["status"] == TrialStatus.FINISHED]
    if done.empty:
        return pd.DataFrame(columns=[*keys, "label", "n", *stat_cols])
    rows = []
    for values, g in done.groupby(keys, dropna=False, sort=False):
        row: dict[str, Any] = {**dict(zip(keys, values)), "label": labels[g.index[0]], "n": len(g)}
        for c in SCORE_COLUMNS:
            d = describe(g[c], confidence)
            row.update({f"{c}_mean": d["mean"], f"{c}_std": d["std"], f"{c}_ci": d["ci"]})
        rows.append(row)
    out = pd.DataFrame(rows, columns=[*keys, "label", "n", *stat_cols])
    return out.sort_values("final_GM_mean", ascending=False, na_position="last").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------- baseline
def baseline_mask(variants: pd.DataFrame, baseline: str = "") -> pd.Series:
    """Which variants (rows with a ``label``) are the baseline: ``baseline`` given, the variants whose label is it
    or has it as one of its comma-separated parts (``method=finetune`` picks fine-tuning at every budget); by
    default those whose ``method.name`` is ``finetune`` or whose ``variant`` name contains ``finetune``."""
    if baseline:
        return variants["label"].map(lambda lbl: lbl == baseline or baseline in str(lbl).split(","))
    mask = pd.Series(False, index=variants.index)
    if "method.name" in variants.columns:
        mask |= variants["method.name"] == BASELINE_METHOD
    for key in LABELS:
        if key in variants.columns:
            mask |= variants[key].map(lambda v: isinstance(v, str) and BASELINE_METHOD in v)
    return mask


def _same(a: Any, b: Any) -> bool:
    """Equal key values, two missing ones (a key a point does not set) included."""
    return _missing(a) and _missing(b) if _missing(a) or _missing(b) else bool(a == b)


def _per_seed(table: pd.DataFrame) -> pd.DataFrame:
    """Finished trials' scores per (label, seed); trials sharing both (``num_samples`` > 1) are averaged."""
    done = table[table["status"] == TrialStatus.FINISHED]
    seeds = done[SEED] if SEED in done.columns else pd.Series(0, index=done.index)
    frame = done[list(SCORE_COLUMNS)].astype(float).assign(label=done["_label"], seed=seeds)
    return frame.groupby(["label", "seed"], sort=False).mean()


def compare_to_baseline(table: pd.DataFrame, baseline: str = "",
                        confidence: float = CONFIDENCE) -> tuple[pd.DataFrame, str]:
    """(comparison, note): per variant other than the baseline, the mean difference to its baseline variant of
    each final and trajectory-mean score, paired by seed over the seeds both finished (d_i = v_i - b_i), with its
    95% Student-t half-width (:func:`ci_half_width`); columns ``variant``, ``baseline``, ``n_pairs``, ``<score>_diff``,
    ``<score>_diff_ci``; largest final-GM gain first.

    The baseline (:func:`baseline_mask`) may be several variants, e.g. fine-tuning at each budget: each variant is
    then paired with the (first) baseline that shares its values of the keys the baselines differ in (the same
    budget; a key both leave unset counts as the same), the variant and reference names apart.
    ``note`` says why a comparison is missing (no baseline, no baseline for a variant); empty when none is."""
    table, keys = _keyed(table)
    cols = ["variant", "baseline", "n_pairs", *[f"{c}_{a}" for c in SCORE_COLUMNS for a in ("diff", "diff_ci")]]
    empty = pd.DataFrame(columns=cols)
    if table.empty:
        return empty, "no trials"
    table = table.assign(_label=variant_labels(table, keys))
    variants = table.drop_duplicates("_label")[[*keys, "_label"]].rename(columns={"_label": "label"})
    is_base = baseline_mask(variants, baseline)
    if not is_base.any():
        wanted = f"baseline {baseline!r} is" if baseline else (
            f"no variant runs method.name={BASELINE_METHOD} or is named *{BASELINE_METHOD}*, so a baseline is")
        return empty, (f"no comparison: {wanted} not among the variants ({', '.join(variants['label'])}); "
                       "choose one with baseline=<variant label>")
    bases = variants[is_base]
    # the keys the baselines themselves differ in (a budget), never their names: a variant is paired with the
    # baseline that has its values of those keys (unset matching unset); a key only other points set is no context
    context = [k for k in keys if k not in LABELS and bases[k].nunique(dropna=False) > 1]
    scores = _per_seed(table)
    rows, unmatched = [], []
    for _, v in variants[~is_base].iterrows():
        match = [b for _, b in bases.iterrows() if all(_same(v[k], b[k]) for k in context)]
        if not match:
            unmatched.append(v["label"])
            continue
        b = match[0]
        mine = scores.loc[v["label"]] if v["label"] in scores.index.get_level_values(0) else None
        theirs = scores.loc[b["label"]] if b["label"] in scores.index.get_level_values(0) else None
        common = mine.index.intersection(theirs.index) if mine is not None and theirs is not None else []
        row: dict[str, Any] = {"variant": v["label"], "baseline": b["label"], "n_pairs": len(common)}
        for c in SCORE_COLUMNS:
            d = describe((mine.loc[common, c] - theirs.loc[common, c]) if len(common) else [], confidence)
            row.update({f"{c}_diff": d["mean"], f"{c}_diff_ci": d["ci"]})
        rows.append(row)
    notes = [f"no baseline with the same {', '.join(context)} for: {', '.join(unmatched)}"] if unmatched else []
    if not rows:
        return empty, "; ".join(notes) or f"no comparison: every variant is a baseline ({', '.join(bases['label'])})"
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values("final_GM_diff", ascending=False, na_position="last").reset_index(drop=True), \
        "; ".join(notes)
