"""Where a result comes from: fomo_ray's version and the git commit of the checkout the code runs from."""
from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def code_version() -> tuple[str, str]:
    """``(version, commit)``: ``fomo_ray.__version__`` (else the installed package's) and ``git rev-parse HEAD`` of
    the checkout this package is imported from, with ``+changes`` when tracked files differ from it ("unknown"
    outside a checkout, e.g. an installed wheel)."""
    import fomo_ray

    version = getattr(fomo_ray, "__version__", "")
    if not version:
        try:
            from importlib.metadata import version as installed

            version = installed("fomo_ray")
        except Exception:  # noqa: BLE001 - not installed either
            version = "unknown"
    where = Path(fomo_ray.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", head.stdout.strip()):
            return version, "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return version, "unknown"
    return version, head.stdout.strip() + ("+changes" if dirty else "")


def short_commit(commit: str) -> str:
    """A recorded commit as generated tables show it: 12 hex digits, plus ``with uncommitted changes`` for a
    ``+changes`` one."""
    return commit[:12] + (" with uncommitted changes" if commit.endswith("+changes") else "")


def commit_stamp() -> str:
    """How a generated table names the code it ran: ``commit`` and this checkout's :func:`short_commit`."""
    return f"commit {short_commit(code_version()[1])}"


def write_block(path: str | Path, start: str, end: str, text: str) -> None:
    """Replace what lies between the markers ``start`` and ``end`` in the file ``path`` by ``text`` (the README's
    generated tables: every number in them is the output of a script, never typed in)."""
    path = Path(path)
    body = path.read_text()
    if body.count(start) != 1 or body.count(end) != 1:
        raise SystemExit(f"{path} needs exactly one {start} ... {end} block")
    before, rest = body.split(start, 1)
    path.write_text(f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
