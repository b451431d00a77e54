"""A sweep's directory state without Ray: the state file (``sweep.json``) a sweep opens or resumes, the check that a
resume keeps the study's settings, the stopping rule's history from partial results, the resume command."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from fomo_ray.atomic import write_text
from fomo_ray.provenance import code_version, platform, platform_label
from fomo_ray.planning.sweep_spec import (SWEEP_STATE_FILE, Dim, SweepError, SweepPlan, SweepSpec, identity_differences,
                                          sweep_identity)


def stopping_history(directory: Path, spec: SweepSpec) -> dict[str, dict[int, float]]:
    """The trajectory means an interrupted sweep's trials posted, from its partial results table, so the stopping
    rule of the resumed sweep still compares against them. A table written before the evaluation point's column
    was named ``point`` reads through :func:`fomo_ray.models.metrics.with_point_column`."""
    from fomo_ray.models.metrics import with_point_column
    from fomo_ray.planning.stopping import history_from_results

    path = directory / "results.csv"
    if spec.stopping is None or not path.is_file() or path.stat().st_size == 0:
        return {}
    try:
        return history_from_results(with_point_column(pd.read_csv(path)), spec.stopping.metric)
    except pd.errors.EmptyDataError:
        return {}


# The layout of what a sweep's Ray state holds: the modules it names (Tune pickles its callbacks and search by module
# path) and its trials' report keys. 1: fomo_ray 0.1; 2: fomo_ray 0.2 (the part folders, and an evaluation report's
# point under "point", no longer "task"). A sweep written under another layout cannot be restored.
STATE_LAYOUT = 2


def open_state(directory: Path, plan: SweepPlan, resume: bool) -> dict[str, Any]:
    """The sweep state of ``directory``: read back when resuming (a note when the platform changed), else new. A
    sweep written by a fomo_ray with another module layout is refused, naming the version and commit that wrote it."""
    path = directory / SWEEP_STATE_FILE
    if resume and path.is_file():
        state = json.loads(path.read_text())
        check_layout(state, directory)
        started_on = state.get("platform")
        if started_on and started_on != platform():  # not refused: a cluster's nodes may change between tries
            print(f"sweep {directory.name}: started on {platform_label(started_on)}, resumed on {platform_label()}; "
                  "the trials run now will not be bitwise comparable with those finished before "
                  "(docs/REPRODUCIBILITY.md)", flush=True)
        return state
    base = plan.base
    storage = (f"{base.ray.storage_path.rstrip('/')}/sweeps/{directory.name}" if base.ray.storage_path
               else str(directory))
    version, commit = code_version()
    state = {"name": directory.name, "layout": STATE_LAYOUT, "spec": plan.spec.name, "storage": storage, "tracking_uri": plan.tracking_uri,
             "fomo_ray_version": version, "commit": commit, "platform": platform(),
             "experiment": base.tracking.experiment, "parent_run_id": "",
             "identity": sweep_identity(base, space_json(plan.space))}
    write_text(path, json.dumps(state, indent=2))
    return state


def check_layout(state: Mapping[str, Any], directory: Path) -> None:
    """Refuse to resume a sweep whose Ray state names modules of another layout: Tune could not unpickle it."""
    written = state.get("layout", 1)
    if written != STATE_LAYOUT:
        version, commit = state.get("fomo_ray_version", "unknown"), state.get("commit", "unknown")
        raise SweepError(
            f"sweep '{directory.name}' at {directory} was written by fomo_ray {version} (commit {commit}, module "
            f"layout {written}); this fomo_ray ({code_version()[0]}) has module layout {STATE_LAYOUT} and cannot "
            f"restore its Ray state. Resume it with fomo_ray {version}"
            + (f" (git checkout {commit.split('+')[0]})" if commit != "unknown" else "")
            + ", or run the sweep anew with --fresh (a new directory; this one and its finished results are kept)")


def check_same_study(state: Mapping[str, Any], plan: SweepPlan, directory: Path) -> None:
    """Refuse to resume an interrupted sweep with other settings: its finished trials would share one table with
    trials of another config. Names every differing key."""
    if "identity" not in state:  # a sweep started before this check existed: nothing to compare with
        print(f"sweep {directory.name}: started by an older fomo_ray, its settings cannot be compared", flush=True)
        return
    diffs = identity_differences(state["identity"], sweep_identity(plan.base, space_json(plan.space)))
    if diffs:
        raise SweepError(f"sweep '{directory.name}' at {directory} was started with other settings ("
                         + "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
                         + "). Resuming would mix them in one table: rerun with the original settings to resume it, "
                         "or start a new sweep with --fresh")


def space_json(space: Mapping[str, Dim]) -> str:
    """The sweep space as JSON (its identity, and the parent run's ``sweep.space`` param)."""
    return json.dumps({k: {d.kind: list(d.values)} for k, d in space.items()}, default=str)


def resume_command(directory_name: str) -> str:
    """The command that resumes this sweep: the one that was run, naming the directory and asking to resume."""
    program = ("python -m fomo_ray.cli" if sys.argv[0].endswith("fomo_ray/cli/__main__.py") else
               f"python {sys.argv[0]}" if sys.argv[0].endswith(".py") else Path(sys.argv[0]).name)
    argv = [program, *(a for a in sys.argv[1:] if a not in ("--fresh", "--resume"))]
    drop = {i for i, a in enumerate(argv) if a == "--name"} | {i + 1 for i, a in enumerate(argv) if a == "--name"}
    argv = [a for i, a in enumerate(argv) if i not in drop and not a.startswith("--name=")]
    return " ".join([argv[0], *(shlex.quote(a) for a in [*argv[1:], "--name", directory_name, "--resume"])])
