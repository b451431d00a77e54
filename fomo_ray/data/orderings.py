"""Stream orderings of FoMo-in-Flux: every ordering of the paper, written as a FiF stream file.

A stream is an ordered list of concepts ``DATASET+++classname`` over the adaptation datasets (DESIGN §1). The
orderings follow Roth, Udandarao et al., "A Practitioner's Guide to Continual Multimodal Pretraining" (arXiv
2408.14471, §3 "data-centric stream orderings"):

- ``random``: a seeded permutation of all concepts;
- ``dataset_incremental``: whole datasets one after another (seeded dataset order, classes shuffled within);
- ``time_incremental``: datasets in release order (ties and classes within a dataset shuffled by the seed);
- ``frequency``: concept frequency in the pretraining data, rarest first;
- ``similarity``: greedy nearest-neighbour path over text embeddings of the class prompts of a backbone;
- ``difficulty`` (easy -> hard): by the backbone's zero-shot accuracy per class, most accurate first;
- each ordering reversed (``--reverse``), and ``reverse`` of an existing stream file.

The orderings are pure functions of a concept list plus a seed and a table (counts, embeddings, accuracies); the
glue that computes the tables from a pool, a backbone or a converted benchmark is kept apart below them. Ties are
broken by a seeded permutation so every output is deterministic for a given seed.

CLI: ``fomo-ray prepare stream --ordering ORDER (--bench ROOT | --info-dir DIR) --out FILE [...]``; see ``--help``.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from fomo_ray.atomic import write_json
from fomo_ray.data import fif_catalogue

SEP = "+++"
Concept = tuple[str, str]  # (dataset NAME, classname)


class StreamError(ValueError):
    """A stream, a table or a concept list is inconsistent; the message names the entry/dataset/class."""


# --------------------------------------------------------------------------------------------------- entries
def to_entries(concepts: Iterable[Concept]) -> list[str]:
    """``[(d, c), ...] -> ["d+++c", ...]`` (the FiF stream file format)."""
    return [f"{d}{SEP}{c}" for d, c in concepts]


def parse_entries(entries: Sequence[str], source: str = "stream") -> list[Concept]:
    """``["d+++c", ...] -> [(d, c), ...]``; the dataset token is kept as written (see ``normalise``)."""
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, str) or SEP not in e:
            raise StreamError(f"{source}: entry {i} {e!r} is not of the form 'DATASET{SEP}classname'")
        d, c = e.split(SEP, 1)  # classnames never start a second '+++', the dataset token never contains one
        out.append((d, c))
    return out


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


# --------------------------------------------------------------------------------------------------- model glue
def prompt_embeddings(backbone, concepts: Sequence[Concept], templates: Mapping[str, str],
                      batch_size: int = 256) -> np.ndarray:
    """L2-normalised text embeddings of ``template.format(classname)`` for every concept (DESIGN §2 orderings)."""
    import torch

    prompts = [templates[d].format(c) for d, c in concepts]
    model = backbone.model.eval()
    device = next(model.parameters()).device
    chunks = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            tokens = backbone.tokenizer(prompts[i:i + batch_size]).to(device)
            feats = model.encode_text(tokens).float()
            chunks.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 1))


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-1 accuracy of each class (NaN for a class without samples)."""
    correct = np.bincount(labels, weights=(predictions == labels).astype(float), minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / total, np.nan)


def zero_shot_accuracy_table(bench, backbone, *, split: str = "train", max_per_class: int = 20, seed: int = 0,
                             batch_size: int = 128, backend: str = "ffcv") -> dict[Concept, float]:
    """Per-class zero-shot top-1 accuracy of ``backbone`` on the adaptation datasets of a converted benchmark.

    Uses at most ``max_per_class`` images per class (a seeded draw) of ``split``; classes without images get 0.0
    (nothing known about them counts as hard). ``backend="memory"`` decodes the whole split into RAM: fine for
    small benchmarks, use FFCV for real FiF.
    """
    import torch

    from fomo_ray.data.loaders import make_loader

    ds_ids, labels = bench.meta(split)
    concepts, templates = concepts_from_benchmark(bench)
    names = list(bench.datasets)
    table: dict[Concept, float] = {}
    rng = np.random.default_rng(seed)
    model = backbone.model.eval()
    for name in dict.fromkeys(d for d, _ in concepts):
        info = bench.datasets[name]
        rows = np.flatnonzero(ds_ids == names.index(name))
        rows = np.concatenate([rng.permutation(rows[labels[rows] == k])[:max_per_class]
                               for k in range(len(info.classnames))] or [np.zeros(0, int)])
        rows = np.sort(rows).astype(np.int64)
        acc = np.zeros(len(info.classnames))
        if len(rows):
            text = prompt_embeddings(backbone, [(name, c) for c in info.classnames], templates)
            preds, labs = [], []
            loader = make_loader(bench, split, rows, batch_size, train=False, seed=seed,
                                 image_size=backbone.image_size, backend=backend, mean=backbone.mean, std=backbone.std)
            with torch.no_grad():
                for images, batch_rows in loader:
                    img = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1).numpy()
                    preds.append((img @ text.T).argmax(1))
                    labs.append(labels[np.asarray(batch_rows)])
            acc = np.nan_to_num(per_class_accuracy(np.concatenate(preds), np.concatenate(labs), len(acc)))
        table.update({(name, c): float(a) for c, a in zip(info.classnames, acc)})
    return table


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
    parse_entries(data, str(path))
    return data


# --------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fomo-ray prepare stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--ordering", choices=[*BUILDERS, "reverse"], help="which ordering to build")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bench", help="converted benchmark root (its adaptation datasets give the concepts)")
    src.add_argument("--info-dir", help="the authors' data_lib/00_info folder (concepts without converting)")
    p.add_argument("--datasets", default="", help="comma-separated subset of adaptation datasets")
    p.add_argument("--out", help="stream file to write (JSON list of DATASET+++classname)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reverse", action="store_true", help="write the reverse of the ordering")
    p.add_argument("--input", help="reverse: the stream file to reverse; with --check: the file to validate")
    p.add_argument("--check", action="store_true", help="validate --input against --bench/--info-dir and exit")
    p.add_argument("--release-order", help="time_incremental: JSON list of dataset names, oldest first "
                                           "(default: release years in fif_catalogue)")
    p.add_argument("--dataset-order", help="dataset_incremental: JSON list of dataset names (default: seeded)")
    p.add_argument("--frequency-table", help="frequency: JSON/CSV concept -> count")
    p.add_argument("--pool", help="frequency: converted pool root; counts classname mentions in its captions")
    p.add_argument("--accuracy-table", help="difficulty: JSON/CSV concept -> zero-shot accuracy")
    p.add_argument("--backbone", default="", help="similarity/difficulty: open_clip architecture")
    p.add_argument("--pretrained", default="", help="similarity/difficulty: pretrained tag or checkpoint file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--split", default="train", help="difficulty: split whose images are scored")
    p.add_argument("--max-per-class", type=int, default=20, help="difficulty: images scored per class")
    p.add_argument("--loader", choices=("ffcv", "memory"), default="ffcv", help="difficulty: image loader backend")
    return p


def _load_concepts(args) -> tuple[list[Concept], dict[str, str], object | None]:
    """Concepts (and templates) of the adaptation datasets from --bench or --info-dir, cut to --datasets."""
    wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bench = None
    if args.bench:
        from fomo_ray.data.format import open_benchmark

        bench = open_benchmark(args.bench)
        concepts, templates = concepts_from_benchmark(bench)
    elif args.info_dir:
        names = [fif_catalogue.resolve(d) for d in wanted] if wanted else fif_catalogue.ADAPT_NAMES
        concepts, templates = concepts_from_info_dir(args.info_dir, names)
    else:
        raise StreamError("give --bench (a converted benchmark) or --info-dir (the authors' 00_info folder)")
    if wanted:
        wanted = [d if d in templates else fif_catalogue.resolve(d) for d in wanted]
        unknown = [d for d in wanted if d not in templates]
        if unknown:
            raise StreamError(f"--datasets: {', '.join(unknown)} not among the adaptation datasets "
                              f"({', '.join(templates)})")
        concepts = [c for c in concepts if c[0] in wanted]
    return concepts, templates, bench


def _read_name_list(path: str, what: str) -> list[str]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise StreamError(f"{what} file {path} must be a JSON list of dataset names")
    return [fif_catalogue.resolve(x) if x in fif_catalogue.ALIASES else x for x in data]


def _backbone(args):
    if not args.backbone:
        raise StreamError(f"--ordering {args.ordering} needs --backbone (and usually --pretrained)")
    from fomo_ray.backbones import create_backbone

    return create_backbone(args.backbone, args.pretrained, device=args.device)


def _random(args, concepts, templates, bench) -> list[Concept]:
    return random_order(concepts, args.seed)


def _dataset_incremental(args, concepts, templates, bench) -> list[Concept]:
    order = _read_name_list(args.dataset_order, "--dataset-order") if args.dataset_order else None
    return dataset_incremental(concepts, args.seed, order)


def _time_incremental(args, concepts, templates, bench) -> list[Concept]:
    if args.release_order:
        order = _read_name_list(args.release_order, "--release-order")
    else:
        unknown = [d for d in templates if d not in fif_catalogue.CATALOGUE]
        if unknown:
            raise StreamError(f"no release year known for {', '.join(unknown)} (not FiF datasets): "
                              "pass --release-order FILE (a JSON list of dataset names, oldest first)")
        order = fif_catalogue.release_order(list(templates))
    return time_incremental(concepts, order, args.seed)


def _frequency(args, concepts, templates, bench) -> list[Concept]:
    if args.frequency_table:
        counts = read_table(args.frequency_table, concepts, "frequency")
    elif args.pool:
        from fomo_ray.data.format import open_benchmark

        pool = open_benchmark(args.pool)
        counts = caption_counts((c for caps in pool.captions("pool") for c in caps), concepts)
    else:
        raise StreamError("--ordering frequency needs --frequency-table or --pool")
    return frequency_order(concepts, counts, args.seed)


def _similarity(args, concepts, templates, bench) -> list[Concept]:
    return similarity_order(concepts, prompt_embeddings(_backbone(args), concepts, templates), args.seed)


def _difficulty(args, concepts, templates, bench) -> list[Concept]:
    if args.accuracy_table:
        acc = read_table(args.accuracy_table, concepts, "accuracy")
    elif bench is not None:
        acc = zero_shot_accuracy_table(bench, _backbone(args), split=args.split,
                                       max_per_class=args.max_per_class, seed=args.seed, backend=args.loader)
    else:
        raise StreamError("--ordering difficulty needs --accuracy-table, or --bench plus --backbone")
    return difficulty_order(concepts, acc, args.seed)


# ordering name -> builder(args, concepts, templates, bench); 'reverse' (of a file) is handled in main
BUILDERS: dict[str, Callable[..., list[Concept]]] = {
    "random": _random,
    "dataset_incremental": _dataset_incremental,
    "time_incremental": _time_incremental,
    "frequency": _frequency,
    "similarity": _similarity,
    "difficulty": _difficulty,
}


def _check(args) -> int:
    """Validate a stream file (e.g. one of the authors') the way a run will read it; --out writes it normalised.

    Against a benchmark the check is ``stream.validate_entries``, i.e. exactly what a run does. Module handles and
    aliases (``dtd``, ``FGVCAIRCRAFT``) are mapped to download NAMEs first, as the authors' loader does; runs read
    names exactly, so a file that needed this mapping is reported and can be written normalised with ``--out``.
    """
    if not (args.input and (args.bench or args.info_dir)):
        raise StreamError("--check needs --input FILE and --bench ROOT (or --info-dir DIR)")
    raw = parse_entries(read_stream(args.input), args.input)
    entries = normalise(raw)
    concepts, _, bench = _load_concepts(args)
    if bench is not None:
        from fomo_ray.data.stream import validate_entries

        validate_entries(entries, bench, args.input)
    else:
        known: dict[str, list[str]] = {}
        for d, c in concepts:
            known.setdefault(d, []).append(c)
        validate_stream(entries, known, args.input)
    mapped = sum(a != b for a, b in zip(raw, entries))
    print(f"{args.input}: {len(entries)} entries over {len({d for d, _ in entries})} datasets, all valid"
          + (f"; {mapped} handle/alias token(s) mapped to download names" if mapped else ""))
    if args.out:
        write_stream(args.out, to_entries(entries))
        print(f"wrote {args.out} (download names, loads unchanged in runs)")
    elif mapped:
        print("note: runs read dataset names exactly; pass --out FILE to write the normalised stream")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.check:
            return _check(args)
        if not args.ordering or not args.out:
            raise StreamError("give --ordering and --out (or --check --input FILE --bench ROOT)")
        if args.ordering == "reverse":
            if not args.input:
                raise StreamError("--ordering reverse needs --input FILE")
            entries = list(reversed(read_stream(args.input)))
        else:
            concepts, templates, bench = _load_concepts(args)
            if not concepts:
                raise StreamError("no adaptation concepts found (no adaptation dataset with a class list)")
            ordered = BUILDERS[args.ordering](args, concepts, templates, bench)
            entries = to_entries(ordered[::-1] if args.reverse else ordered)
        write_stream(args.out, entries)
        print(f"wrote {args.out}: {len(entries)} entries ({args.ordering}{', reversed' if args.reverse else ''})")
        return 0
    except (StreamError, fif_catalogue.CatalogueError, ValueError) as e:  # DataError is a ValueError
        print(f"fomo-ray prepare stream: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
