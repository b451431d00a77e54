"""Streams: FiF stream files -> validated concept lists -> T tasks -> index sets over the train split.

A stream is an ordered list of concepts ``DATASET+++classname`` over the adaptation datasets (docs/BENCHMARK.md §Streams
and tasks); it is cut into T contiguous tasks, task i holding ``N//T + (1 if i < N%T else 0)`` entries, and a task's
update data D_t is *all* train images of its (dataset, class) pairs - an index set over ``train.beton``, never a copy.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .format import SEP, Benchmark, DataError

Entry = tuple[str, str]  # (dataset NAME, classname)


def _closest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_entries(raw: object, where: str = "stream") -> list[Entry]:
    """A JSON-decoded stream (list of ``"DATASET+++classname"``) -> ``[(dataset, classname), ...]``.

    The one parser of stream entries: runs (:func:`load_stream`) and the ordering tools (``orderings.read_stream``,
    ``prepare stream --check``) all read entries through it. The dataset token is kept as written."""
    if not isinstance(raw, list):
        raise DataError(f"{where}: a stream must be a JSON list of 'DATASET{SEP}classname', got {type(raw).__name__}")
    out = []
    for i, e in enumerate(raw):
        if not isinstance(e, str) or SEP not in e:
            raise DataError(f"{where}: entry {i} {e!r} is not of the form 'DATASET{SEP}classname'")
        d, c = e.split(SEP, 1)  # a dataset name never contains SEP (format checks it), so the first one splits
        out.append((d, c))
    return out


def validate_entries(entries: Sequence[Entry], bench: Benchmark, where: str = "stream") -> None:
    """Every entry names an adaptation class of ``bench``, and none repeats; errors name the culprit."""
    seen: dict[Entry, int] = {}
    for i, (d, c) in enumerate(entries):
        info = bench.datasets.get(d)
        if info is None:
            adapt = [n for n, x in bench.datasets.items() if x.role == "adapt"]
            raise DataError(f"{where}: entry {i} '{d}{SEP}{c}' names unknown dataset '{d}'{_closest(d, adapt)}; "
                            f"adaptation datasets: {adapt}")
        if info.role != "adapt":
            raise DataError(f"{where}: entry {i} '{d}{SEP}{c}': dataset '{d}' has role '{info.role}' "
                            f"(only adaptation datasets have train data to stream)")
        if c not in info.classnames:
            raise DataError(f"{where}: entry {i} '{d}{SEP}{c}' names unknown class '{c}' of dataset '{d}'"
                            f"{_closest(c, info.classnames)}")
        if (d, c) in seen:
            raise DataError(f"{where}: duplicate entry '{d}{SEP}{c}' at positions {seen[(d, c)]} and {i}")
        seen[(d, c)] = i


def load_stream(path: str | os.PathLike, bench: Benchmark) -> list[Entry]:
    """Read and validate a FiF stream file against ``bench``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"stream file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"stream file {path} is not valid JSON: {e}") from e
    entries = parse_entries(raw, str(path))
    if not entries:
        raise DataError(f"stream file {path} is empty")
    validate_entries(entries, bench, str(path))
    return entries


def task_sizes(n: int, num_tasks: int) -> list[int]:
    """Entries per task: task i gets ``n // T + (1 if i < n % T else 0)`` (docs/BENCHMARK.md §Streams and tasks)."""
    if num_tasks < 1:
        raise DataError(f"number of tasks T must be >= 1, got {num_tasks}")
    if num_tasks > n:
        raise DataError(f"number of tasks T={num_tasks} is larger than the number of stream entries N={n}")
    return [n // num_tasks + (1 if i < n % num_tasks else 0) for i in range(num_tasks)]


def split_tasks(entries: Sequence[Entry], num_tasks: int, by_dataset: bool = False) -> list[list[Entry]]:
    """Cut the stream into ``num_tasks`` contiguous tasks.

    ``by_dataset=True`` (dataset-incremental streams) cuts only at dataset boundaries: the runs of consecutive
    entries of one dataset are the units, dealt to tasks with the same formula (T = number of runs gives one
    dataset per task).
    """
    if not by_dataset:
        out, start = [], 0
        for size in task_sizes(len(entries), num_tasks):
            out.append(list(entries[start:start + size]))
            start += size
        return out
    runs: list[list[Entry]] = []
    for e in entries:
        if runs and runs[-1][0][0] == e[0]:
            runs[-1].append(e)
        else:
            runs.append([e])
    try:
        groups = split_tasks(runs, num_tasks)
    except DataError:
        raise DataError(f"number of tasks T={num_tasks} is larger than the number of dataset runs "
                        f"({len(runs)}) in a dataset-incremental stream") from None
    return [[e for run in g for e in run] for g in groups]


def task_rows(bench: Benchmark, entries: Sequence[Entry], split: str = "train") -> np.ndarray:
    """Sorted row ids (int64) of every ``split`` image of the given (dataset, class) pairs."""
    validate_entries(entries, bench, "task")
    ds, labels = bench.meta(split)
    width = max(len(i.classnames) for i in bench.datasets.values()) + 1
    wanted = [bench.dataset_index(d) * width + bench.datasets[d].classnames.index(c) for d, c in entries]
    code = ds.astype(np.int64) * width + labels
    return np.flatnonzero(np.isin(code, np.asarray(wanted, dtype=np.int64))).astype(np.int64)


def resolve_stream(bench: Benchmark, file: str = "", ordering: str = "random") -> Path:
    """The stream file a config names: ``file`` if given, else the benchmark's stream for ``ordering``."""
    return Path(file) if file else bench.stream_path(ordering)
