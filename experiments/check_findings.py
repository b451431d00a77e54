"""Check the paper's qualitative findings on this engine's own results (Roth et al. 2024, arXiv 2408.14471).

Runs each study that tests a finding over ``--seeds`` seeds (``runs/sweeps/findings_<study>``; a finished one is read,
an interrupted one resumed, and the trial cache replays trials other sweeps already finished), then prints, per
finding, the effect with its 95% Student-t interval over the seeds and whether FiF-mini confirms it
(``fomo_ray/maths/findings.py``). ``--write-readme`` (the flag keeps its old name) puts the table, with the date and
commit, into docs/FINDINGS.md between ``<!-- findings:start -->`` and ``<!-- findings:end -->``. It reports what the
engine shows: nothing here is tuned to agree with the paper. Usage::

    python experiments/check_findings.py [--seeds 3] [--studies merge_weights methods ...] [--write-readme]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
START, END = "<!-- findings:start -->", "<!-- findings:end -->"
DOC = REPO / "docs" / "FINDINGS.md"  # where the generated table lives


def study_results(study: str, seeds: int, overrides: dict, output_dir: str):
    """The results of ``findings_<study>``: read when finished, else run (or resumed) over ``seeds`` seeds."""
    import fomo_ray

    name = f"findings_{study}"
    directory = Path(output_dir) / "sweeps" / name
    if not (directory / "summary.json").is_file():
        res = fomo_ray.sweep(CONFIGS / f"sweep_{study}.yaml", name=name, seeds=seeds, resume=directory.is_dir(),
                             overrides={**overrides, "output_dir": output_dir})
        if res.interrupted:
            raise SystemExit(f"{name} was interrupted; rerun this command to resume it")
    return fomo_ray.load_results(directory)


def rows_for(studies: list[str], seeds: int, output_dir: str) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """The finding rows, and per study the commit and the platform its sweep ran at (as its driver recorded them)."""
    from fomo_ray.maths.findings import FINDINGS, check, order_vs_method
    from fomo_ray.provenance import recorded_platform

    rows, commits, platforms = [], {}, {}
    for f in [*FINDINGS, None]:
        study = f.study if f else "stream_orders"
        if study not in studies:
            continue
        res = study_results(study, seeds, dict(f.overrides) if f else {}, output_dir)
        commits[study] = str(res.summary.get("commit") or "not recorded")
        platforms[study] = recorded_platform(res.summary)
        rows += check(f, res.table) if f else order_vs_method(res.table)
    return rows, commits, platforms


def per_study(values: dict[str, str], show=str) -> str:
    """One value when every study shares it, else each study's."""
    if len(set(values.values())) == 1:
        return show(next(iter(values.values())))
    return ", ".join(f"{show(v)} ({s})" for s, v in values.items())


def commits_text(commits: dict[str, str]) -> str:
    """``commit abc`` when every study ran at one commit, else each study's; ``+changes`` marks a dirty checkout."""
    from fomo_ray.provenance import short_commit

    return ("commit " if len(set(commits.values())) == 1 else "commits ") + per_study(commits, short_commit)


def markdown(rows: list[dict], seeds: int, commits: dict[str, str], missing: dict[str, str] | None = None,
             platforms: dict[str, str] | None = None) -> str:
    """The docs/FINDINGS.md block; ``missing`` (``{study: claim}``) names the findings whose studies were left out,
    ``platforms`` (``{study: label}``) where their sweeps ran (the numbers hold there: docs/REPRODUCIBILITY.md)."""
    where = f"platform {per_study(platforms)}, " if platforms else ""
    head = [f"What `python experiments/check_findings.py --seeds {seeds}` showed on FiF-mini ({time.strftime('%Y-%m-%d')}, "
            f"sweeps run at {commits_text(commits)}, {where}"
            f"{os.cpu_count()} CPU cores; effects in percent points, mean over seeds ± 95% CI):", "",
            "| finding | effect (study) | paper | this engine | verdict |", "| --- | --- | --- | --- | --- |"]
    body = []
    for r in rows:
        value = "n/a" if r["mean"] != r["mean"] else (
            f"{100 * r['mean']:+.1f}" + ("" if r["ci"] != r["ci"] else f" ± {100 * r['ci']:.1f}") + f" (n={r['n_seeds']})")
        effect = str(r["effect"]).replace("|", "\\|")  # |x| in an effect's name would split the table's cells
        body.append(f"| {r['claim']} | {effect} ({r['study']}) | {r['paper']} | {value} | {r['verdict']} |")
    body += [f"| {claim} | ({study}) | | not run yet | |" for study, claim in (missing or {}).items()]
    return "\n".join(head + body)


def write_readme(text: str, readme: Path = DOC) -> None:
    from fomo_ray.provenance import write_block

    write_block(readme, START, END, text)


def main(argv: list[str] | None = None) -> int:
    from fomo_ray.maths.findings import FINDINGS, ORDER_CLAIM

    studies = sorted({f.study for f in FINDINGS} | {"stream_orders"})
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    ap.add_argument("--studies", nargs="+", choices=studies, default=studies, help="which studies to run or read")
    ap.add_argument("--output-dir", default="runs", help="where the sweeps and the trial cache live")
    ap.add_argument("--write-readme", action="store_true", help="put the table into docs/FINDINGS.md")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows, commits, platforms = rows_for(a.studies, a.seeds, str(Path(a.output_dir).resolve()))
    claims = {**{f.study: f.claim for f in FINDINGS}, "stream_orders": ORDER_CLAIM}
    text = markdown(rows, a.seeds, commits, {s: claims[s] for s in studies if s not in a.studies}, platforms)
    print(text)
    if a.write_readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
