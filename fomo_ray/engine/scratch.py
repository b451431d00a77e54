"""Scratch directories on a worker's local disk, for a checkpoint or a model on its way to storage.

Each holds a full training state (GBs at ViT-B/16 with its optimizer state). A worker that dies hard (killed by
the memory monitor, ``os._exit``, a lost Ray actor) never runs its ``finally``, so its directories would stay on the
node's disk for good, and a node that outlives a few failed attempts fills up. The directories are named after the
process that owns them and its machine (a hash of the host name: a temp directory shared with another container,
whose process ids are not this one's, is never reclaimed from), and every new one first removes those of processes
that no longer exist here."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> str:
    """A new directory ``<tmp>/<prefix><host>-<pid>_<random>`` (:func:`owner_tag`), after removing the ones of dead
    processes (any prefix ending in ``_``; the caller removes its own when done)."""
    reclaim(prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{owner_tag(os.getpid())}_")


def reclaim(prefix: str, root: str | Path | None = None) -> list[Path]:
    """Remove ``<root>/<prefix><host>-<pid>_*`` of this host for every pid not alive here; returns what it removed.
    Another host's directory, or one without an owner in its name (another program's), is left alone."""
    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(f"{prefix}*_*"):
        pid = owner_pid(d.name, prefix)
        if pid is not None and not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)  # another process may be reclaiming it at the same time
            removed.append(d)
    return removed


@functools.cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag(pid: int) -> str:
    """``<host>-<pid>``: a process of this machine (8 hex digits of its host name's hash)."""
    return f"{_host()}-{pid}"


def owner_pid(name: str, prefix: str) -> int | None:
    """The pid in ``<prefix><host>-<pid>_<random>`` when ``<host>`` is this machine, else None."""
    tag, sep, _ = name[len(prefix):].partition("_")
    host, dash, pid = tag.partition("-")
    return int(pid) if name.startswith(prefix) and sep and dash and host == _host() and pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine: one owned by another user counts, a zombie (dead, not yet
    reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = Path(f"/proc/{pid}/stat")
    if not Path("/proc").is_dir():  # not Linux: os.kill's answer is all there is
        return True
    try:  # the state letter after the command name's closing parenthesis
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # gone in between
        return False
