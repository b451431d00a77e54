"""FoMo-in-Flux scores from the tidy results table: A_KA, A_ZS, GM, trajectories, forgetting, backward transfer.

Roth, Udandarao et al. 2024, "A Practitioner's Guide to Continual Multimodal Pretraining" (arXiv 2408.14471), Sec. 3:
knowledge accumulation A_KA is the unweighted mean over the *adaptation* datasets of their test metric (zero-shot top-1
over the full class set; R@5 for retrieval sets), zero-shot retention A_ZS the same mean over the *evaluation-only*
datasets, and GM = sqrt(A_KA * A_ZS). Both are reported at every evaluation point (0 = before any update, t+1 = after
task t), as a trajectory and as its mean. Forgetting follows Chaudhry et al. 2018 ("Riemannian Walk for Incremental
Learning", f = max over earlier points - final); backward transfer follows Lopez-Paz & Ranzato 2017 ("Gradient Episodic
Memory", BWT = final - value right after the dataset was last trained on).

The scores are pure functions, DataFrame in, DataFrame out; :func:`save_results` and :func:`load_results` write and
read the table. Values are fractions in [0, 1].

One evaluation set per trajectory: every point of a run (0..T) is measured on the same fixed class-balanced subsets
(``eval_set == "subset"``, a fixed gallery for retrieval), so an unchanged model has an exactly flat trajectory; the
full test sets, evaluated as well at the ends (``evaluation.full_at_ends``, optionally every k tasks), are rows with
``eval_set == "full"``. Every score below reads one set (``eval_set``, default ``subset``), never both mixed.
The ``prompts`` column says which texts the scores were computed with (``evaluation.prompts`` for zero-shot top-1:
``primer``, ``openai_imagenet`` or ``simple_imagenet``; ``captions`` for retrieval); one run uses one setting, so it
labels rows and never splits a score.

Command line (``fomo-ray score``)::

    fomo-ray score runs/default/results.parquet [--run NAME] [--stream streams/random.json --num-tasks 4]
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

from fomo_ray.atomic import atomic_path
from fomo_ray.trial_report import SCORES
COLUMNS = ("run", "point", "dataset", "role", "metric", "value", "eval_set", "prompts")
REQUIRED = COLUMNS[:6]  # a table without eval_set (older fomo_ray, hand-made) reads as subsets, without prompts as
                        # the primer prompts (classification) and captions (retrieval), all older fomo_ray evaluated
ROLES = ("adapt", "eval")
EVAL_SETS = ("subset", "full")
#: the metric that enters A_KA / A_ZS for a dataset, in order of preference (retrieval sets report R@5)
HEADLINE_METRICS = ("R@5", "top1")


def default_prompts(metric: str) -> str:
    """The ``prompts`` of a result that does not name them (written before ``evaluation.prompts`` existed): the
    dataset's primer template for zero-shot top-1, the images' captions for retrieval recall."""
    return "captions" if str(metric).startswith("R@") else "primer"


def tidy_frame(records: Iterable[Mapping]) -> pd.DataFrame:
    """The tidy results table (:data:`COLUMNS`, in order) of result records; extra keys are dropped, a record
    without ``eval_set`` is a subset one, one without ``prompts`` gets :func:`default_prompts`. ``prompts`` names the
    texts the model's text tower encoded: ``evaluation.prompts`` (``primer``, ``openai_imagenet``, ...) for
    classification, ``captions`` for retrieval."""
    return pd.DataFrame([{**{c: r[c] for c in REQUIRED}, "eval_set": r.get("eval_set", "subset"),
                          "prompts": _prompts_of(r)} for r in records], columns=list(COLUMNS))


def _prompts_of(record: Mapping) -> str:
    given = record.get("prompts")
    return given if isinstance(given, str) and given else default_prompts(record["metric"])


class MetricsError(ValueError):
    """The results table is malformed; the message names the column, row or file."""


# --------------------------------------------------------------------------------------------------- validation
#: the evaluation point's column in tables written before it was named ``point`` (``task`` now means the task index)
LEGACY_POINT_COLUMN = "task"


def with_point_column(df: pd.DataFrame) -> pd.DataFrame:
    """The table with its evaluation-point column named ``point``.

    Tables written before the rename (a run's results.parquet / .csv, a sweep's results.csv and tidy.csv) call the
    evaluation point (0 = before any update, t+1 = after task t) ``task``, the word that now means only the task
    index. Every reader of such a table calls this, the one place old tables are read compatibly: a table with a
    ``task`` column and no ``point`` column gets it renamed; any other table is returned unchanged (not copied)."""
    if LEGACY_POINT_COLUMN in df.columns and "point" not in df.columns:
        return df.rename(columns={LEGACY_POINT_COLUMN: "point"})
    return df


def with_point_key(records: Iterable[Mapping]) -> list[dict]:
    """:func:`with_point_column` for result records (dicts): a loop checkpoint written before the rename holds its
    results so far (``LoopState.results``) with the point under ``task``; ``checkpoint.load_state`` reads them with
    it under ``point``, so an old run still resumes. Records that have a ``point`` are returned as they are."""
    return [{("point" if k == LEGACY_POINT_COLUMN else k): v for k, v in r.items()}
            if LEGACY_POINT_COLUMN in r and "point" not in r else dict(r) for r in records]


def validate_table(df: pd.DataFrame) -> pd.DataFrame:
    """Check columns, roles, evaluation points and duplicates; return the table with canonical dtypes. A table
    written before the rename (``task`` for the point) reads with :func:`with_point_column`."""
    df = with_point_column(df)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise MetricsError(f"results table lacks column(s) {missing}; expected at least {list(REQUIRED)}")
    out = df.copy()
    out["eval_set"] = out["eval_set"].fillna("subset").astype(str) if "eval_set" in out else "subset"
    bad_sets = sorted(set(out["eval_set"]) - set(EVAL_SETS))
    if bad_sets:
        raise MetricsError(f"results table: eval_set value(s) {bad_sets} are not one of {list(EVAL_SETS)}")
    out["run"] = out["run"].astype(str)
    out["dataset"] = out["dataset"].astype(str)
    out["role"] = out["role"].astype(str)
    out["metric"] = out["metric"].astype(str)
    given = out["prompts"] if "prompts" in out else pd.Series(None, index=out.index, dtype=object)
    out["prompts"] = given.where(given.notna(), out["metric"].map(default_prompts)).astype(str)
    bad_roles = sorted(set(out["role"]) - set(ROLES))
    if bad_roles:
        raise MetricsError(f"results table: role(s) {bad_roles} are not one of {list(ROLES)}")
    try:
        out["point"] = pd.to_numeric(out["point"], errors="raise").astype("int64")
        out["value"] = pd.to_numeric(out["value"], errors="raise").astype("float64")
    except (ValueError, TypeError) as e:
        raise MetricsError(f"results table: non-numeric 'point' or 'value' entries ({e})") from e
    if (out["point"] < 0).any():
        raise MetricsError("results table: 'point' is the evaluation point (0 = before any update) and must be >= 0")
    dup = out.duplicated(["run", "point", "dataset", "metric", "eval_set"], keep=False)
    if dup.any():
        first = out[dup].iloc[0]
        raise MetricsError(f"results table: duplicate rows for run={first['run']!r} point={first['point']} "
                           f"dataset={first['dataset']!r} metric={first['metric']!r} "
                           f"eval_set={first['eval_set']!r}")
    roles = out.groupby("dataset")["role"].nunique()
    if (roles > 1).any():
        raise MetricsError(f"results table: dataset(s) {sorted(roles[roles > 1].index)} appear with both roles")
    return out


# --------------------------------------------------------------------------------------------------- scores
def headline(df: pd.DataFrame, eval_set: str = "subset") -> pd.DataFrame:
    """One number per (run, point, dataset) of one evaluation set: R@5 for retrieval sets, top-1 otherwise (columns
    run, point, dataset, role, value)."""
    df = validate_table(df)
    df = df[df["eval_set"] == eval_set]
    parts = []
    for metric in HEADLINE_METRICS:
        parts.append(df[df["metric"] == metric])
    picked = pd.concat(parts).drop_duplicates(["run", "point", "dataset"], keep="first")
    return picked[["run", "point", "dataset", "role", "value"]].sort_values(["run", "point", "dataset"]).reset_index(
        drop=True)


def geometric_mean(a_ka: float, a_zs: float) -> float:
    """GM = sqrt(A_KA * A_ZS); NaN if either is missing."""
    if a_ka is None or a_zs is None or math.isnan(a_ka) or math.isnan(a_zs):
        return float("nan")
    return math.sqrt(a_ka * a_zs)


def summarize(df: pd.DataFrame, eval_set: str = "subset") -> pd.DataFrame:
    """A_KA, A_ZS and GM per (run, point) of one evaluation set: columns run, point, A_KA, A_ZS, GM (NaN where a role
    has no dataset). The default, the subsets, is the trajectory; ``full`` gives the full-test-set points."""
    h = headline(df, eval_set)
    rows = []
    for (run, point), g in h.groupby(["run", "point"], sort=True):
        a_ka = g.loc[g["role"] == "adapt", "value"].mean()
        a_zs = g.loc[g["role"] == "eval", "value"].mean()
        a_ka = float(a_ka) if not pd.isna(a_ka) else float("nan")
        a_zs = float(a_zs) if not pd.isna(a_zs) else float("nan")
        rows.append({"run": run, "point": int(point), "A_KA": a_ka, "A_ZS": a_zs, "GM": geometric_mean(a_ka, a_zs)})
    return pd.DataFrame(rows, columns=["run", "point", *SCORES])


def point_summary(records: Iterable[Mapping], eval_set: str = "subset") -> dict[str, float]:
    """The three scores (``SCORES``) of one evaluation point's records (dataset, role, metric, value, eval_set) on one
    evaluation set; empty when the point has no record of that set."""
    summary = summarize(pd.DataFrame([{**r, "run": "", "point": 0} for r in records]), eval_set)
    return {k: float(summary.iloc[0][k]) for k in SCORES} if len(summary) else {}


def trajectory_means(summary: pd.DataFrame) -> pd.DataFrame:
    """Per run: mean of A_KA, A_ZS, GM over all evaluation points (the paper's trajectory average) and the final
    point. Columns run, points, mean_A_KA, mean_A_ZS, mean_GM, final_A_KA, final_A_ZS, final_GM."""
    rows = []
    for run, g in summary.sort_values("point").groupby("run", sort=True):
        last = g.iloc[-1]
        rows.append({
            "run": run, "points": len(g),
            **{f"mean_{k}": float(g[k].mean()) for k in SCORES},
            **{f"final_{k}": float(last[k]) for k in SCORES},
        })
    return pd.DataFrame(rows)


def forgetting(df: pd.DataFrame, learned_at: Mapping[str, int] | None = None,
               eval_set: str = "subset") -> pd.DataFrame:
    """Per (run, dataset): initial, best earlier, final value, forgetting and backward transfer.

    forgetting = max over evaluation points before the final one - final (Chaudhry et al. 2018).
    backward_transfer = final - value at ``learned_at[dataset]`` (the evaluation point right after the last task that
    trained on it; Lopez-Paz & Ranzato 2017). Evaluation-only datasets are never trained on, so their reference point
    is 0 and BWT is the change against zero-shot. Adaptation datasets missing from ``learned_at``, and datasets whose
    reference point is the final one (GEM leaves the last task out), get NaN. Over the subset trajectory by default:
    comparing a subset point with a full-set one would report the change of sample as forgetting.
    """
    h = headline(df, eval_set)
    learned_at = dict(learned_at or {})
    rows = []
    for (run, dataset), g in h.groupby(["run", "dataset"], sort=True):
        g = g.sort_values("point")
        values = dict(zip(g["point"].astype(int), g["value"].astype(float)))
        role = g["role"].iloc[0]
        final_t = max(values)
        earlier = [v for t, v in values.items() if t < final_t]
        ref_t = 0 if role == "eval" else learned_at.get(dataset)
        ref = values.get(ref_t) if ref_t is not None else None
        rows.append({
            "run": run, "dataset": dataset, "role": role,
            "initial": values.get(0, float("nan")), "best_earlier": max(earlier) if earlier else float("nan"),
            "final": values[final_t],
            "forgetting": (max(earlier) - values[final_t]) if earlier else float("nan"),
            "backward_transfer": (values[final_t] - ref) if ref is not None and ref_t != final_t else float("nan"),
        })
    return pd.DataFrame(rows)


def learned_at_points(task_datasets: Sequence[Iterable[str]]) -> dict[str, int]:
    """``{dataset: evaluation point right after the last task containing it}`` from each task's dataset names."""
    out: dict[str, int] = {}
    for t, names in enumerate(task_datasets):
        for name in names:
            out[name] = t + 1
    return out


def stream_task_datasets(entries: Sequence[str], num_tasks: int) -> list[list[str]]:
    """Dataset names of each task of a stream (``DATASET+++class`` entries cut into tasks as in docs/BENCHMARK.md
    §Streams and tasks)."""
    from fomo_ray.data.stream import parse_entries, task_sizes

    parsed = parse_entries(list(entries))
    if num_tasks < 1 or num_tasks > max(len(parsed), 1):
        raise MetricsError(f"num_tasks={num_tasks} does not fit a stream of {len(parsed)} entries")
    out, start = [], 0
    for size in task_sizes(len(parsed), num_tasks):
        out.append(sorted({dataset for dataset, _ in parsed[start:start + size]}))
        start += size
    return out


# --------------------------------------------------------------------------------------------------- storage
def save_results(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the table atomically: parquet for ``.parquet`` (CSV beside it if no parquet engine), else CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = validate_table(df)
    if path.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401  # parquet engine
        except ImportError:
            path = path.with_suffix(".csv")
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path


def load_results(path: str | Path) -> pd.DataFrame:
    """Read a saved table (parquet or CSV by suffix) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"results table not found: {path}")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:  # pyarrow / csv parser errors have many types
        raise MetricsError(f"could not read results table {path}: {e}") from e
    try:
        return validate_table(df)
    except MetricsError as e:
        raise MetricsError(f"{path}: {e}") from e


# --------------------------------------------------------------------------------------------------- command line
def _pct(x: float) -> str:
    return "   n/a" if pd.isna(x) else f"{100 * x:6.2f}"


def format_report(df: pd.DataFrame, learned_at: Mapping[str, int] | None = None) -> str:
    """Human-readable report of a results table (percentages)."""
    summ = summarize(df)
    full = summarize(df, "full")
    means = trajectory_means(summ).set_index("run")
    forg = forgetting(df, learned_at)
    lines = []
    for run, g in summ.groupby("run", sort=True):
        lines += [f"run {run}", f"  {'point':>5}  {'A_KA':>6}  {'A_ZS':>6}  {'GM':>6}"]
        lines += [f"  {int(r.point):>5}  {_pct(r.A_KA)}  {_pct(r.A_ZS)}  {_pct(r.GM)}" for r in g.itertuples()]
        m = means.loc[run]
        lines.append(f"  {'mean':>5}  {_pct(m.mean_A_KA)}  {_pct(m.mean_A_ZS)}  {_pct(m.mean_GM)}   "
                     f"(trajectory of {int(m.points)} points)")
        lines.append(f"  {'final':>5}  {_pct(m.final_A_KA)}  {_pct(m.final_A_ZS)}  {_pct(m.final_GM)}")
        lines.append("  (every point on the same fixed subsets)")
        for r in full[full["run"] == run].itertuples():
            lines.append(f"  {'full':>5}  {_pct(r.A_KA)}  {_pct(r.A_ZS)}  {_pct(r.GM)}   (full test sets at point "
                         f"{int(r.point)})")
        lines.append(f"  {'dataset':<24} {'role':<5} {'initial':>7} {'best':>7} {'final':>7} {'forget':>7} {'BWT':>7}")
        for r in forg[forg["run"] == run].itertuples():
            lines.append(f"  {r.dataset:<24} {r.role:<5} {_pct(r.initial):>7} {_pct(r.best_earlier):>7} "
                         f"{_pct(r.final):>7} {_pct(r.forgetting):>7} {_pct(r.backward_transfer):>7}")
        lines.append("")
    return "\n".join(lines)
