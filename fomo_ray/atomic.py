"""Atomic file writes: write to a temp name in the target directory, then rename.

A reader (or a crashed run's successor) therefore never sees a half-written file under the final name: partial
outputs never look complete. The final file gets the mode a plain ``open(path, "w")`` would give it (0666 less the
umask): ``mkstemp`` creates 0600, which the rename would keep, and colleagues on a shared disk could not read the
results.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only be read by setting it, which would
    race with other threads creating files); where /proc is missing, read by setting it back at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def file_lock(lock_file: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_file`` for the block: concurrent processes (e.g. Ray trials) that need the same
    cached artefact wait here, and the first one builds it."""
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False))


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_path`, byte-identical for identical objects: given a file name, torch
    names the zip's records after it (here the random temp name); given a file object, always "archive"."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)
