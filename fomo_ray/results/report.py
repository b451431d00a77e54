"""Sweep reports from the tidy results table: a per-trial table, trajectory plot, Pareto front, merge-weight plot.

Follows the presentation of Roth, Udandarao et al. 2024 ("A Practitioner's Guide to Continual Multimodal
Pretraining", arXiv 2408.14471): every run is a trajectory in the (A_KA, A_ZS) plane starting at the shared zero-shot
point, scored by its final point and by the mean over the trajectory; the interesting runs are those on the Pareto
front of accumulation vs retention, and the merge study plots final A_KA / A_ZS / GM against the merge weight w.

Files (written under temp names, then renamed): ``table.csv``, ``table.md``, ``trajectories.png``, ``pareto.png``,
and with a numeric swept key ``vs_<key>.png``. A sweep over several seeds (``seeds: N``) adds ``variants.csv`` and
``variants.md`` (per variant: mean ± 95% confidence interval over its seeds, ``fomo_ray.maths.aggregate``) and
``vs_baseline.md`` (each variant minus fine-tuning, paired by seed), and draws ``pareto.png`` and ``vs_<key>.png``
from the variants' means with their confidence intervals as error bars.

Command line::

    fomo-ray report runs/sweeps/merge_weights            # a sweep directory (tidy.csv + trials.csv)
    fomo-ray report results.csv --out report/            # any tidy table (run, point, dataset, role, metric, value)
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display (CI, cluster heads)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fomo_ray.maths import aggregate
from fomo_ray.atomic import atomic_path, write_text  # noqa: E402
from fomo_ray.models.metrics import load_results, summarize, trajectory_means  # noqa: E402
from fomo_ray.trial_report import SCORES, TrialStatus  # noqa: E402

RUN_TABLES = ("results.parquet", "results.csv")  # what `fomo-ray run` writes in its run directory


class ReportError(ValueError):
    """Input for a report is missing or malformed; the message names the file or column."""


# --------------------------------------------------------------------------------------------------- pure tables
def pareto_mask(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """True where point i is not dominated (another point >= in both and > in one); both axes maximised."""
    pts = list(zip(xs, ys))
    out = []
    for i, (x, y) in enumerate(pts):
        dominated = any((a >= x and b >= y and (a > x or b > y)) for j, (a, b) in enumerate(pts) if j != i)
        out.append(not dominated)
    return out


def trial_table(tidy: pd.DataFrame, trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per trial: its status, final and trajectory-mean A_KA, A_ZS, GM, the Pareto flag and the trial's
    swept values; sorted by final GM (best first). Only a ``finished`` trial has final and mean scores and can be on
    the Pareto front: a failed, stopped or interrupted trial's last point is not its final one (its partial
    trajectory stays in the tidy table and the trajectory plot, marked). Final and mean scores are on the fixed
    subsets every point shares; ``full_*`` are the final point's scores on the full test sets, where evaluated."""
    table = trajectory_means(summarize(tidy))
    full = summarize(tidy, "full")
    if not full.empty:  # the final point's full-test-set scores (a point 0 alone is not a final one)
        last = full.sort_values("point").groupby("run").tail(1)
        last = last[last["point"] > 0].set_index("run")
        table = table.merge(last[list(SCORES)].add_prefix("full_").reset_index(), on="run", how="left")
    if trials is not None and not trials.empty:
        extra = [c for c in trials.columns if c not in table.columns and c not in ("error", "reason")]
        table = table.merge(trials[["run", *extra]], on="run", how="left")
    if "status" not in table.columns:  # a bare tidy table (a single run): complete by construction
        table["status"] = TrialStatus.FINISHED
    table["status"] = table["status"].fillna(TrialStatus.INTERRUPTED)
    unfinished = table["status"] != TrialStatus.FINISHED
    table.loc[unfinished, [c for c in table.columns if c.startswith(("final_", "mean_", "full_"))]] = float("nan")
    done = table[~unfinished]
    table["pareto"] = False
    table.loc[done.index, "pareto"] = pareto_mask(done["final_A_KA"].tolist(), done["final_A_ZS"].tolist())
    return table.sort_values("final_GM", ascending=False, na_position="last").reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    """Markdown table of the scores in percent (what the experiments print and MLflow shows)."""
    from fomo_ray.tables import format_table as render

    labels = [c for c in table.columns if "." in c or c in ("variant", "reference")]
    full = [f"full_{s}" for s in SCORES if f"full_{s}" in table.columns]
    compute = ["train_gflops"] if "train_gflops" in table.columns else []
    cols = ["run", *labels, "status", *[f"final_{s}" for s in SCORES], *[f"mean_{s}" for s in SCORES], *full,
            *compute, "pareto"]
    head = ["run", *labels, "status", "final A_KA", "final A_ZS", "final GM", "mean A_KA", "mean A_ZS", "mean GM",
            *[f"full-set {c[5:]}" for c in full], *(["train TFLOPs"] if compute else []), "Pareto"]

    def text(c: str, v) -> str:
        if c.startswith(("final_", "mean_", "full_")):
            return "n/a" if pd.isna(v) else f"{100 * v:.1f}"
        if c == "pareto":
            return "*" if v else ""
        if c == "train_gflops":
            return "" if pd.isna(v) else f"{v / 1e3:,.1f}"
        return "" if pd.isna(v) else str(v)

    rows = [{c: text(c, r[c]) for c in cols} for _, r in table[cols].iterrows()]
    return render(rows, cols, headers=head, markdown=True, cell=str)


def _pm(mean: float, ci: float, sign: bool = False) -> str:
    """``75.0 ± 2.1`` in percent (the half-width alone is left out where there is none: one seed)."""
    if pd.isna(mean):
        return "n/a"
    text = f"{100 * mean:+.1f}" if sign else f"{100 * mean:.1f}"
    return text if pd.isna(ci) else f"{text} ± {100 * ci:.1f}"


def format_variants(variants: pd.DataFrame) -> str:
    """Markdown table of ``aggregate.variant_table``: per variant its finished seeds and each score's mean ± the
    half-width of its 95% confidence interval, in percent."""
    from fomo_ray.tables import format_table as render

    head = ["variant", "seeds", *[f"{w} {s}" for w in ("final", "mean") for s in SCORES]]
    rows = [{"variant": str(r["label"]), "seeds": str(r["n"]),
             **{c.replace("_", " ", 1): _pm(r[f"{c}_mean"], r[f"{c}_ci"])
                for c in aggregate.SCORE_COLUMNS}} for _, r in variants.iterrows()]
    return render(rows, head, markdown=True, cell=str)


def format_comparison(comparison: pd.DataFrame, note: str = "") -> str:
    """Markdown table of ``aggregate.compare_to_baseline``: each variant minus its baseline, paired by seed, in
    percentage points (mean ± 95% confidence half-width), the GM columns first; ``note`` (why a comparison is
    missing) above it."""
    from fomo_ray.tables import format_table as render

    order = ["final_GM", "mean_GM", "final_A_KA", "final_A_ZS", "mean_A_KA", "mean_A_ZS"]
    head = ["variant", "baseline", "pairs", *[f"Δ {c.replace('_', ' ', 1)}" for c in order]]
    rows = [{"variant": str(r["variant"]), "baseline": str(r["baseline"]), "pairs": str(r["n_pairs"]),
             **{f"Δ {c.replace('_', ' ', 1)}": _pm(r[f"{c}_diff"], r[f"{c}_diff_ci"], sign=True) for c in order}}
            for _, r in comparison.iterrows()]
    parts = [f"note: {note}"] if note else []
    if rows:
        parts.append(render(rows, head, markdown=True, cell=str))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------------- plots
def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib picks the format from the suffix
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_trajectories(summary: pd.DataFrame, path: Path, status: Mapping[str, str] | None = None) -> Path:
    """:func:`trajectories_figure`, saved to ``path``."""
    return _save(trajectories_figure(summary, status), path)


def trajectories_figure(summary: pd.DataFrame, status: Mapping[str, str] | None = None) -> plt.Figure:
    """A_KA (x) vs A_ZS (y): one line per trial from the zero-shot point through one point per task. A trial that
    did not finish (``status``) is dashed, its last point an ``x``, and its label says why."""
    status = status or {}
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for run, g in summary.sort_values("point").groupby("run", sort=True):
        done = status.get(run, TrialStatus.FINISHED) == TrialStatus.FINISHED
        label = run if done else f"{run} ({status[run]})"
        ax.plot(100 * g["A_KA"], 100 * g["A_ZS"], marker="o", ms=3, lw=1.2, ls="-" if done else "--", label=label)
        ax.scatter(100 * g["A_KA"].iloc[-1], 100 * g["A_ZS"].iloc[-1], s=30 if done else 60, zorder=3,
                   marker="o" if done else "x")
    zs = summary[summary["point"] == 0]
    if not zs.empty:
        ax.scatter(100 * zs["A_KA"].mean(), 100 * zs["A_ZS"].mean(), marker="*", s=200, c="k", zorder=4,
                   label="zero-shot")
    ax.set_xlabel("knowledge accumulation A_KA (%)")
    ax.set_ylabel("zero-shot retention A_ZS (%)")
    ax.set_title("trajectories (zero-shot point, then one point per task)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_pareto(table: pd.DataFrame, path: Path) -> Path:
    """:func:`pareto_figure`, saved to ``path``."""
    return _save(pareto_figure(table), path)


def pareto_figure(table: pd.DataFrame) -> plt.Figure:
    """Final (A_KA, A_ZS) per trial with the Pareto front connected."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ax.scatter(100 * table["final_A_KA"], 100 * table["final_A_ZS"], c=["C3" if p else "C0" for p in table["pareto"]])
    for _, r in table.iterrows():
        ax.annotate(str(r["run"]), (100 * r["final_A_KA"], 100 * r["final_A_ZS"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front = table[table["pareto"]].sort_values("final_A_KA")
    ax.plot(100 * front["final_A_KA"], 100 * front["final_A_ZS"], c="C3", lw=1, label="Pareto front")
    return _pareto_axes(fig, ax, "final A_KA (%)", "final A_ZS (%)")


def plot_vs_key(table: pd.DataFrame, key: str, path: Path) -> Path:
    """:func:`vs_key_figure`, saved to ``path``."""
    return _save(vs_key_figure(table, key), path)


def vs_key_figure(table: pd.DataFrame, key: str) -> plt.Figure:
    """Final A_KA / A_ZS / GM against a numeric swept key (e.g. the merge weight w); trials without the key (the
    reference points: fine-tune, zero-shot, joint) are drawn as horizontal lines."""
    swept = table[table[key].notna()].sort_values(key)
    refs = table[table[key].isna()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True)
    for ax, s in zip(axes, SCORES):
        ax.plot(swept[key].astype(float), 100 * swept[f"final_{s}"], marker="o", c="k", label=f"final {s}")
        ax.plot(swept[key].astype(float), 100 * swept[f"mean_{s}"], marker=".", ls=":", c="gray",
                label=f"trajectory mean {s}")
        for i, (_, r) in enumerate(refs.iterrows()):
            ax.axhline(100 * r[f"final_{s}"], ls="--", lw=1, c=f"C{i}", label=_ref_label(r))
        ax.set_xlabel(key)
        ax.set_ylabel(f"{s} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"final scores vs {key}")
    return fig


def _ref_label(r: pd.Series) -> str:
    """A reference line's name: its point's label (``variant``), the reference it is (``references:``), or its run."""
    return next((str(r[k]) for k in ("variant", "reference") if isinstance(r.get(k), str)), str(r["run"]))


def _bars(ci: Sequence[float]) -> list[float]:
    """Error bar half-lengths in percent (none where a variant has one seed)."""
    return [0.0 if pd.isna(v) else 100 * float(v) for v in ci]


def variant_pareto_figure(variants: pd.DataFrame) -> plt.Figure:
    """Mean final (A_KA, A_ZS) per variant (``aggregate.variant_table``) with 95% confidence intervals as error
    bars, the Pareto front of the means connected."""
    v = variants.dropna(subset=["final_A_KA_mean", "final_A_ZS_mean"])
    front = pareto_mask(v["final_A_KA_mean"].tolist(), v["final_A_ZS_mean"].tolist())
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for (_, r), on in zip(v.iterrows(), front):
        ax.errorbar([100 * r["final_A_KA_mean"]], [100 * r["final_A_ZS_mean"]], xerr=_bars([r["final_A_KA_ci"]]),
                    yerr=_bars([r["final_A_ZS_ci"]]), fmt="o", ms=5, capsize=3, c="C3" if on else "C0")
        ax.annotate(f"{r['label']} (n={r['n']})", (100 * r["final_A_KA_mean"], 100 * r["final_A_ZS_mean"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    pts = v[front].sort_values("final_A_KA_mean")
    ax.plot(100 * pts["final_A_KA_mean"], 100 * pts["final_A_ZS_mean"], c="C3", lw=1, label="Pareto front of means")
    return _pareto_axes(fig, ax, "final A_KA (%), mean over seeds ± 95% CI",
                        "final A_ZS (%), mean over seeds ± 95% CI")


def _pareto_axes(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str) -> plt.Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _lines(swept: pd.DataFrame, key: str) -> list[tuple[str, pd.DataFrame]]:
    """One line per value of the other keys that vary along ``key`` (e.g. one per method in a budget sweep); a key
    that differs in every row (a point's name) or never does not split the line."""
    keys = [c for c in aggregate.variant_keys(swept) if c != key]
    split = [c for c in keys if 1 < swept[c].nunique(dropna=False) < len(swept)]
    if not split:
        return [("", swept)]
    return [(",".join(str(x) for x in (vals if isinstance(vals, tuple) else (vals,))), g)
            for vals, g in swept.groupby(split, dropna=False, sort=True)]


def variant_vs_key_figure(variants: pd.DataFrame, key: str) -> plt.Figure:
    """Mean final and trajectory-mean A_KA / A_ZS / GM per variant against a numeric swept key, with 95% confidence
    intervals as error bars; variants without the key (the reference points) as horizontal lines with their
    interval shaded."""
    swept = variants[variants[key].notna()].sort_values(key)
    refs = variants[variants[key].isna()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True)
    for ax, s in zip(axes, SCORES):
        for i, (name, g) in enumerate(_lines(swept, key)):
            x = g[key].astype(float)
            tag = f" {name}" if name else ""
            ax.errorbar(x, 100 * g[f"final_{s}_mean"], yerr=_bars(g[f"final_{s}_ci"]), marker="o", capsize=3,
                        c="k" if not name else f"C{i}", label=f"final {s}{tag}")
            ax.errorbar(x, 100 * g[f"mean_{s}_mean"], yerr=_bars(g[f"mean_{s}_ci"]), marker=".", ls=":", capsize=2,
                        c="gray" if not name else f"C{i}", alpha=0.7, label=f"trajectory mean {s}{tag}")
        for i, (_, r) in enumerate(refs.iterrows()):
            m, ci = 100 * r[f"final_{s}_mean"], r[f"final_{s}_ci"]
            ax.axhline(m, ls="--", lw=1, c=f"C{i + 3}", label=str(r["label"]))
            if not pd.isna(ci):
                ax.axhspan(m - 100 * ci, m + 100 * ci, color=f"C{i + 3}", alpha=0.12)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{s} (%), mean over seeds ± 95% CI")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"final scores vs {key} (mean over seeds, 95% confidence intervals)")
    return fig




def write_variant_report(table: pd.DataFrame, out: Path, x_key: str = "", baseline: str = "") -> list[Path]:
    """The multi-seed part of a report (a trial table with several seeds per variant): ``variants.csv``,
    ``variants.md``, ``vs_baseline.md``, and ``pareto.png`` / ``vs_<key>.png`` from the variants' means with error
    bars. Returns the files written."""
    variants = aggregate.variant_table(table)
    comparison, note = aggregate.compare_to_baseline(table, baseline)
    with atomic_path(out / "variants.csv") as tmp:
        variants.to_csv(tmp, index=False)
    ci = f"{100 * aggregate.CONFIDENCE:.0f}%"
    files = [out / "variants.csv",
             write_text(out / "variants.md", format_variants(variants) + f"\n\n(percent; mean over the finished "
                         f"seeds ± the half-width of its {ci} Student-t confidence interval, none for one seed)\n"),
             write_text(out / "vs_baseline.md", format_comparison(comparison, note) + f"\n\n(percentage points: "
                         f"variant minus baseline, paired by seed over the seeds both finished; mean ± {ci} "
                         "Student-t half-width)\n")]
    files.append(_save(variant_pareto_figure(variants), out / "pareto.png"))
    if x_key and x_key in variants.columns and variants[x_key].notna().sum() >= 2:
        files.append(_save(variant_vs_key_figure(variants, x_key), out / f"vs_{x_key.rsplit('.', 1)[-1]}.png"))
    return files


# --------------------------------------------------------------------------------------------------- assembly
def build_report(tidy: pd.DataFrame, trials: pd.DataFrame | None, out_dir: str | Path, x_key: str = "",
                 baseline: str = "") -> list[Path]:
    """Write the table and plots for a tidy results table; return the files written. With several seeds per
    variant, also the variant tables and error-bar plots (:func:`write_variant_report`; ``baseline``: the variant
    label the paired comparison subtracts, default fine-tuning)."""
    summary = summarize(tidy)
    table = trial_table(tidy, trials)
    if x_key and x_key not in table.columns:  # refused before anything is written
        close = difflib.get_close_matches(x_key, [str(c) for c in table.columns], n=3, cutoff=0.5)
        raise ReportError(f"report x key '{x_key}' is not a column of the trials table"
                          + (f"; did you mean {', '.join(close)}?" if close else
                             f"; columns: {', '.join(sorted(map(str, table.columns)))}"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    with atomic_path(out / "table.csv") as tmp:
        table.to_csv(tmp, index=False)
    files += [out / "table.csv", write_text(out / "table.md", format_table(table) + "\n")]
    files.append(plot_trajectories(summary, out / "trajectories.png", dict(zip(table["run"], table["status"]))))
    if aggregate.seeds_per_variant(table) > 1:
        return files + write_variant_report(table, out, x_key, baseline)
    files.append(plot_pareto(table[table["status"] == TrialStatus.FINISHED], out / "pareto.png"))
    if x_key and table[x_key].notna().sum() >= 2:
        files.append(plot_vs_key(table, x_key, out / f"vs_{x_key.rsplit('.', 1)[-1]}.png"))
    return files


def load_sweep_tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    """(tidy, trials or None, summary.json or {}) from a sweep directory, a ``fomo-ray run`` directory or a tidy
    table file (.csv / .parquet)."""
    path = Path(path)
    if path.is_dir() and not (path / "tidy.csv").is_file():
        run_table = next((path / n for n in RUN_TABLES if (path / n).is_file()), None)
        if run_table is None:
            raise ReportError(f"{path} holds no tidy.csv (a sweep directory) and no results.parquet (a `fomo-ray "
                              "run` directory)")
        return load_results(run_table), None, {}
    if path.is_file() and path.name == "results.csv" and (path.parent / "tidy.csv").is_file():
        raise ReportError(f"{path} is a sweep's per-point summary (A_KA, A_ZS, GM); give the sweep directory "
                          f"{path.parent} or its tidy.csv (per dataset), which the report and scores are made from")
    if path.is_dir():
        tidy_path = path / "tidy.csv"
        trials = pd.read_csv(path / "trials.csv") if (path / "trials.csv").is_file() else None
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
        return load_results(tidy_path), trials, summary
    return load_results(path), None, {}
