"""Stream orderings of FoMo-in-Flux: every ordering of the paper, written as a FiF stream file.

A stream is an ordered list of concepts ``DATASET+++classname`` over the adaptation datasets (docs/BENCHMARK.md §Streams
and tasks). The orderings follow Roth, Udandarao et al., "A Practitioner's Guide to Continual Multimodal Pretraining"
(arXiv 2408.14471, §3 "data-centric stream orderings"):

- ``random``: a seeded permutation of all concepts;
- ``dataset_incremental``: whole datasets one after another (seeded dataset order, classes shuffled within);
- ``time_incremental``: datasets in release order (ties and classes within a dataset shuffled by the seed);
- ``frequency``: concept frequency in the pretraining data, rarest first;
- ``similarity``: greedy nearest-neighbour path over text embeddings of the class prompts of a backbone;
- ``difficulty`` (easy -> hard): by the backbone's zero-shot accuracy per class, most accurate first;
- each ordering reversed (``--reverse``), and ``reverse`` of an existing stream file.

The orderings are pure functions of a concept list plus a seed and a table (counts, embeddings, accuracies). The
tables that need a backbone (prompt embeddings, zero-shot accuracy) are computed in
:mod:`fomo_ray.prep.stream_orderings`, which also serves ``fomo-ray prepare stream --ordering ORDER (--bench ROOT |
--info-dir DIR) --out FILE [...]`` (:mod:`fomo_ray.cli.prepare`). Ties are broken by a seeded permutation so every
output is deterministic for a given seed.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from fomo_ray.atomic import write_json
from fomo_ray.data import fif_catalogue
from fomo_ray.data.format import SEP, DataError
from fomo_ray.data.stream import Entry, parse_entries

Concept = Entry  # (dataset NAME, classname)


class StreamError(DataError):
    """A stream, a table or a concept list is inconsistent; the message names the entry/dataset/class."""


# --------------------------------------------------------------------------------------------------- entries
def to_entries(concepts: Iterable[Concept]) -> list[str]:
    """``[(d, c), ...] -> ["d+++c", ...]`` (the FiF stream file format)."""
    return [f"{d}{SEP}{c}" for d, c in concepts]


def normalise(concepts: Sequence[Concept]) -> list[Concept]:
    """Map handle/alias tokens (``fgvcaircraft``, ``EUROSAT``) to download NAMEs, as the authors' loader does."""
    out = []
    for d, c in concepts:
        try:
            out.append((fif_catalogue.resolve(d), c))
        except fif_catalogue.CatalogueError:
            out.append((d, c))  # not a FiF dataset (e.g. FiF-mini): validate_stream decides
    return out


def validate_stream(concepts: Sequence[Concept], known: Mapping[str, Sequence[str]], source: str = "stream") -> None:
    """Every concept names a converted dataset and one of its classes, once. Raises StreamError naming the culprit."""
    seen: set[Concept] = set()
    classes = {d: set(cs) for d, cs in known.items()}
    for i, (d, c) in enumerate(concepts):
        if d not in classes:
            raise StreamError(
                f"{source}: entry {i} '{d}{SEP}{c}': dataset '{d}' is not one of the adaptation datasets here "
                f"({', '.join(known) or 'none'})")
        if c not in classes[d]:
            import difflib

            close = difflib.get_close_matches(c, list(known[d]), n=2)
            hint = f" (closest: {', '.join(repr(x) for x in close)})" if close else ""
            raise StreamError(f"{source}: entry {i} '{d}{SEP}{c}': '{c}' is not a class of {d}{hint}")
        if (d, c) in seen:
            raise StreamError(f"{source}: entry {i} '{d}{SEP}{c}' appears twice")
        seen.add((d, c))


# --------------------------------------------------------------------------------------------------- pure orderings
def _seeded_rank(n: int, seed: int) -> np.ndarray:
    """A seeded random rank per item: the tie-breaker of every sort below (deterministic per seed)."""
    return np.random.default_rng(seed).permutation(n)


def random_order(concepts: Sequence[Concept], seed: int) -> list[Concept]:
    """A seeded permutation of the concepts (the paper's random streams, one per seed)."""
    return [concepts[i] for i in np.random.default_rng(seed).permutation(len(concepts))]


def _datasets_in_order(concepts: Sequence[Concept]) -> list[str]:
    return list(dict.fromkeys(d for d, _ in concepts))


def _blocks(concepts: Sequence[Concept], dataset_order: Sequence[str], seed: int) -> list[Concept]:
    """Concatenate whole datasets in ``dataset_order``, each dataset's classes in a seeded shuffle."""
    by_ds: dict[str, list[Concept]] = {}
    for cpt in concepts:
        by_ds.setdefault(cpt[0], []).append(cpt)
    unknown = [d for d in by_ds if d not in dataset_order]
    if unknown:
        raise StreamError(f"dataset order lacks {', '.join(unknown)} (it lists {len(dataset_order)} datasets)")
    rng = np.random.default_rng(seed)
    out: list[Concept] = []
    for d in dict.fromkeys(dataset_order):  # a name listed twice must not duplicate its concepts
        block = by_ds.get(d, [])
        out += [block[i] for i in rng.permutation(len(block))]
    return out


def dataset_incremental(concepts: Sequence[Concept], seed: int,
                        dataset_order: Sequence[str] | None = None) -> list[Concept]:
    """Datasets one after another (seeded order unless given), classes shuffled within each dataset."""
    if dataset_order is None:
        names = _datasets_in_order(concepts)
        dataset_order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    return _blocks(concepts, dataset_order, seed + 1)


def time_incremental(concepts: Sequence[Concept], release_order: Sequence[str], seed: int) -> list[Concept]:
    """Datasets in release order (oldest first), classes shuffled within (paper: 'time-incremental')."""
    return _blocks(concepts, list(release_order), seed)


def frequency_order(concepts: Sequence[Concept], counts: Mapping[Concept, float], seed: int) -> list[Concept]:
    """Rarest concept first (lowest count in the pretraining data); equal counts in a seeded order."""
    missing = [c for c in concepts if c not in counts]
    if missing:
        raise StreamError(f"frequency table has no count for {len(missing)} concepts, e.g. "
                          f"{', '.join(to_entries(missing[:5]))}")
    rank = _seeded_rank(len(concepts), seed)
    order = sorted(range(len(concepts)), key=lambda i: (counts[concepts[i]], rank[i]))
    return [concepts[i] for i in order]


def difficulty_order(concepts: Sequence[Concept], accuracy: Mapping[Concept, float], seed: int) -> list[Concept]:
    """Easy -> hard: highest zero-shot accuracy first; equal accuracies in a seeded order."""
    missing = [c for c in concepts if c not in accuracy]
    if missing:
        raise StreamError(f"accuracy table has no value for {len(missing)} concepts, e.g. "
                          f"{', '.join(to_entries(missing[:5]))}")
    rank = _seeded_rank(len(concepts), seed)
    order = sorted(range(len(concepts)), key=lambda i: (-accuracy[concepts[i]], rank[i]))
    return [concepts[i] for i in order]


def greedy_path(embeddings: np.ndarray, start: int) -> list[int]:
    """Greedy nearest-neighbour path: from ``start``, always step to the most cosine-similar unvisited row.

    Ties go to the lowest index (``argmax``), so the path is a deterministic function of the embeddings.
    O(N^2 d) time, O(N d) memory: one matrix-vector product per step, no N x N matrix (FiF has 18k concepts).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if n == 0:
        return []
    if not 0 <= start < n:
        raise StreamError(f"similarity path start {start} is outside 0..{n - 1}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    visited = np.zeros(n, dtype=bool)
    path = [start]
    visited[start] = True
    cur = start
    for _ in range(n - 1):
        sims = x @ x[cur]
        sims[visited] = -np.inf
        cur = int(np.argmax(sims))
        visited[cur] = True
        path.append(cur)
    return path


def similarity_order(concepts: Sequence[Concept], embeddings: np.ndarray, seed: int) -> list[Concept]:
    """Concepts along a greedy nearest-neighbour path over their prompt embeddings; the seed picks the start."""
    if len(embeddings) != len(concepts):
        raise StreamError(f"{len(embeddings)} embeddings for {len(concepts)} concepts")
    start = int(np.random.default_rng(seed).integers(len(concepts))) if concepts else 0
    return [concepts[i] for i in greedy_path(embeddings, start)]


# --------------------------------------------------------------------------------------------------- tables
def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


def caption_counts(captions: Iterable[str], concepts: Sequence[Concept]) -> dict[Concept, int]:
    """Number of captions that mention each concept's classname as a whole-word phrase (case-insensitive).

    The paper ranks concepts by their frequency in the pretraining data; counting caption mentions is the
    text-side estimate (Udandarao et al. 2024, "No 'Zero-Shot' Without Exponential Data", count concepts the same way).
    Each caption counts once per phrase. Runs in O(total words x longest phrase) via an n-gram set lookup.
    """
    phrases = {c: _words(c) for _, c in concepts}
    wanted = {p for p in phrases.values() if p}
    longest = max((len(p) for p in wanted), default=0)
    hits: dict[tuple[str, ...], int] = dict.fromkeys(wanted, 0)
    for cap in captions:
        w = _words(cap)
        found = {w[i:i + n] for n in range(1, longest + 1) for i in range(len(w) - n + 1)} & wanted
        for p in found:
            hits[p] += 1
    return {cpt: hits.get(phrases[cpt[1]], 0) for cpt in concepts}


def read_table(path: str | Path, concepts: Sequence[Concept], what: str) -> dict[Concept, float]:
    """A per-concept number from JSON ``{"D+++c" or "c": value}`` or CSV ``concept,value`` (header optional).

    Keys ``DATASET+++classname`` match one concept; a bare ``classname`` key applies to that class in every dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"{what} table not found: {path}")
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise StreamError(f"{what} table {path} must be a JSON object {{concept: value}}")
        items = list(raw.items())
    else:
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and not _is_number(rows[0][-1]):
            rows = rows[1:]  # header
        items = [(SEP.join(r[:-1]) if len(r) > 2 else r[0], r[-1]) for r in rows]
    table: dict[str, float] = {}
    for k, v in items:
        if not _is_number(v):
            raise StreamError(f"{what} table {path}: value {v!r} of '{k}' is not a number")
        table[k] = float(v)
    out = {}
    for d, c in concepts:
        v = table.get(f"{d}{SEP}{c}", table.get(c))
        if v is not None:
            out[(d, c)] = v
    return out


def _is_number(v: object) -> bool:
    try:
        float(v)  # type: ignore[arg-type]
        return not isinstance(v, bool)
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------- concept sources
def concepts_from_benchmark(bench) -> tuple[list[Concept], dict[str, str]]:
    """All (dataset, class) pairs of the adaptation datasets of a converted benchmark, plus their templates."""
    concepts: list[Concept] = []
    templates: dict[str, str] = {}
    for name, info in bench.datasets.items():
        if info.role != "adapt" or not info.classnames:
            continue
        concepts += [(name, c) for c in info.classnames]
        templates[name] = info.template
    return concepts, templates


def concepts_from_info_dir(info_dir: str | Path, names: Sequence[str] = fif_catalogue.ADAPT_NAMES
                           ) -> tuple[list[Concept], dict[str, str]]:
    """Concepts straight from the authors' ``00_info/<NAME>_classnames.json`` (no conversion needed)."""
    info_dir = Path(info_dir)
    concepts: list[Concept] = []
    templates: dict[str, str] = {}
    for name in names:
        spec = fif_catalogue.CATALOGUE[fif_catalogue.resolve(name)]
        path = info_dir / f"{spec.name}_classnames.json"
        if not path.is_file():
            raise StreamError(f"class list of {spec.name} not found: {path}")
        concepts += [(spec.name, c) for c in json.loads(path.read_text())]
        templates[spec.name] = spec.template
    return concepts, templates


# --------------------------------------------------------------------------------------------------- files
def write_stream(path: str | Path, entries: Sequence[str]) -> Path:
    """Write a FiF stream file atomically (temp name + rename)."""
    return write_json(path, list(entries), indent=0)


def read_stream(path: str | Path) -> list[str]:
    """A stream file as written by the authors or by us: a JSON list of 'DATASET+++classname' strings."""
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"stream file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise StreamError(f"stream file {path} must hold a JSON list of 'DATASET{SEP}classname' strings")
    parse_entries(data, str(path))  # every entry is DATASET+++classname (the runs' parser, data.stream)
    return data
