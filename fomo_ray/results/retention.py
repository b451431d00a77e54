"""What a finished trial keeps on disk (``ray.keep_after_run``).

While a trial runs, Ray keeps its newest ``ray.keep_checkpoints`` checkpoints, so a crash or a preemption resumes
exactly. Once the trial has ended (done, or stopped by its stopping rule), nothing resumes from them any more (a
relaunch of an ended run reads only the status file beside its final state), so :func:`settle` trims them:

- ``deployed`` (default): the final checkpoint only, in deployed form: the open_clip export of the weights the run
  evaluated (``model/``) with the run's config, status and MLflow run id. Training-only tensors (a merge's θ0 and
  running average, the training weights beside a merge, a regulariser's buffers) are dropped: they only serve to
  continue the stream, and for a merge method they are most of the state (the default sweep's EMA trials: 86 MB of
  state for a 29 MB model). When the run's MLflow ``model/`` artifact lies on the same filesystem, its weights file
  and the export's are one file (a hard link), so the weights are stored once.
- ``state``: the final checkpoint, whole (to continue the stream or audit the training weights).
- ``all``: every checkpoint Ray kept.

A trial that failed or is still running is never trimmed. Trimming happens only where the checkpoints are a local
path (a local sweep directory or a mounted shared disk); on ``s3://``-style storage Ray's ``keep_checkpoints``
applies as before.
"""
from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fomo_ray.results.export import DEPLOYED_DIR, is_deployed_form

CHECKPOINT_PATTERNS = ("final_*", "checkpoint_*", "cursor_*")  # Tune's and Train's checkpoint directory names


@dataclass(frozen=True)
class Settled:
    """What :func:`settle` did: the final checkpoint kept, the bytes freed, and whether its weights are shared with
    MLflow's ``model/`` artifact (a hard link)."""

    final: Path | None
    freed: int
    linked: bool = False


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """A run's checkpoint directories under ``root`` (a Tune trial or a Train run directory), oldest first; Train's
    ``final_*`` sorts after its cursors."""
    root = Path(root)
    found: list[Path] = []
    for pattern in reversed(CHECKPOINT_PATTERNS):
        found += sorted(d for d in root.glob(pattern) if d.is_dir())
    return found


def settle(root: str, keep: str, cfg: Any, run_name: str, mlflow_model: Path | None = None) -> Settled:
    """Trim the checkpoints of an ended run under ``root`` as ``keep`` says (module docstring). ``mlflow_model`` is
    the run's MLflow ``model/`` artifact as a local directory, when it is one. Raises nothing a caller must handle
    beyond ``OSError`` / ``ValueError`` from reading the state: the caller reports them and keeps going."""
    if keep == "all" or "://" in root or not Path(root).is_dir():
        return Settled(None, 0)
    dirs = checkpoint_dirs(root)
    if not dirs:
        return Settled(None, 0)
    final, freed = dirs[-1], 0
    for old in dirs[:-1]:
        freed += _size(old)
        shutil.rmtree(old, ignore_errors=True)
    linked = False
    if keep == "deployed" and not is_deployed_form(final):
        freed += _to_deployed(final, cfg, run_name, mlflow_model)
    if is_deployed_form(final) and mlflow_model is not None:
        linked = link_same_files(final / DEPLOYED_DIR, mlflow_model)
    return Settled(final, freed, linked)


def _to_deployed(final: Path, cfg: Any, run_name: str, mlflow_model: Path | None) -> int:
    """Put the export of ``final``'s loop state into ``final/model``, then drop the loop state: the run's MLflow
    ``model/`` artifact when it is a local export (logged from this very state when the run finished: copied, the
    weights as hard links where the filesystem allows), else written from the state. The export is complete (under
    a temporary name, then renamed) before anything is deleted."""
    from fomo_ray.core import checkpoint
    from fomo_ray.results import export

    state_file = final / checkpoint.LOOP_STATE_FILE
    if not state_file.is_file():
        return 0
    tmp = final / f".{DEPLOYED_DIR}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if mlflow_model is not None and export.is_deployed_form(mlflow_model.parent):
        shutil.copytree(mlflow_model, tmp, copy_function=_link_or_copy)
    else:
        export.save_open_clip(tmp, cfg, export.deployed_state(cfg, checkpoint.load_state(final)), run=run_name,
                              source=f"the final task-end state of run {run_name}")
    os.replace(tmp, final / DEPLOYED_DIR)
    freed = state_file.stat().st_size
    state_file.unlink()
    return freed


def link_same_files(ours: Path, theirs: Path) -> bool:
    """Replace each file of ``ours`` that is byte-identical to the same-named file of ``theirs`` by a hard link to
    it (one copy on disk, two names). False when none could be linked (another filesystem, different bytes)."""
    linked = False
    for mine in ours.iterdir():
        other = theirs / mine.name
        if not (mine.is_file() and other.is_file()):
            continue
        if os.path.samefile(mine, other):
            linked = True
            continue
        if mine.stat().st_size != other.stat().st_size or not filecmp.cmp(mine, other, shallow=False):
            continue
        tmp = mine.with_name(f".{mine.name}.link")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(other, tmp)
        except OSError:  # another filesystem (or no hard links there): the copy stays
            continue
        os.replace(tmp, mine)
        linked = True
    return linked


def local_artifact_dir(artifact_uri: str, sub: str) -> Path | None:
    """``artifact_uri/sub`` as a local directory when an MLflow run's artifacts are plain files here (a ``file:``
    URI or a path), else None (a tracking server's or object store's)."""
    if artifact_uri.startswith("file://"):
        artifact_uri = artifact_uri[len("file://"):]
    elif "://" in artifact_uri or artifact_uri.startswith(("mlflow-artifacts:", "runs:")):
        return None
    d = Path(artifact_uri) / sub
    return d if d.is_dir() else None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (or no hard links there)
        shutil.copy2(src, dst)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
