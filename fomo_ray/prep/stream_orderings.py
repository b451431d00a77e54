"""The stream orderings that need a model, a pool or a converted benchmark (the ``fomo-ray prepare stream`` work).

Roth, Udandarao et al., "A Practitioner's Guide to Continual Multimodal Pretraining" (arXiv 2408.14471, §3) order a
stream by concept similarity (text embeddings of the class prompts) and by zero-shot difficulty, besides the
model-free orderings. The orderings themselves are pure functions in :mod:`fomo_ray.data.orderings`; this module
computes their tables (prompt embeddings, per-class zero-shot accuracy, caption counts of a pool) and turns a
:class:`StreamRequest` (the options of ``fomo-ray prepare stream``, :mod:`fomo_ray.cli.prepare`) into stream entries.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from fomo_ray.data import fif_catalogue
from fomo_ray.data.orderings import (Concept, StreamError, caption_counts, concepts_from_benchmark,
                                     concepts_from_info_dir, dataset_incremental, difficulty_order, frequency_order,
                                     normalise, random_order, read_stream, read_table, similarity_order,
                                     time_incremental, to_entries, validate_stream)
from fomo_ray.data.stream import parse_entries


@dataclass(frozen=True)
class StreamRequest:
    """What to order and how: one field per option of ``fomo-ray prepare stream`` ("" / 0 = not given)."""

    ordering: str = ""         # a key of BUILDERS, or "reverse" (of the stream file ``input``)
    bench: str = ""            # converted benchmark root: its adaptation datasets give the concepts
    info_dir: str = ""         # or the authors' data_lib/00_info folder (concepts without converting)
    datasets: str = ""         # comma-separated subset of adaptation datasets
    seed: int = 0
    reverse: bool = False      # the reverse of the ordering
    input: str = ""            # reverse: the stream file to reverse; check: the file to validate
    release_order: str = ""    # time_incremental: JSON list of dataset names, oldest first
    dataset_order: str = ""    # dataset_incremental: JSON list of dataset names (default: seeded)
    frequency_table: str = ""  # frequency: JSON/CSV concept -> count
    pool: str = ""             # frequency: converted pool root; counts classname mentions in its captions
    accuracy_table: str = ""   # difficulty: JSON/CSV concept -> zero-shot accuracy
    backbone: str = ""         # similarity/difficulty: open_clip architecture
    pretrained: str = ""       # similarity/difficulty: pretrained tag or checkpoint file
    device: str = "cpu"
    split: str = "train"       # difficulty: split whose images are scored
    max_per_class: int = 20    # difficulty: images scored per class
    loader: str = "ffcv"       # difficulty: image loader backend


# --------------------------------------------------------------------------------------------------- model tables
def prompt_embeddings(backbone, concepts: Sequence[Concept], templates: Mapping[str, str],
                      batch_size: int = 256) -> np.ndarray:
    """L2-normalised text embeddings of ``template.format(classname)`` for every concept (the similarity ordering of
    docs/BENCHMARK.md §Streams and tasks)."""
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

    from fomo_ray.data.augment import model_input
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
                                 image_size=backbone.image_size, backend=backend)
            with torch.no_grad():
                for images, batch_rows in loader:
                    x = model_input(images, backbone.image_size, backbone.mean, backbone.std)
                    img = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).numpy()
                    preds.append((img @ text.T).argmax(1))
                    labs.append(labels[np.asarray(batch_rows)])
            acc = np.nan_to_num(per_class_accuracy(np.concatenate(preds), np.concatenate(labs), len(acc)))
        table.update({(name, c): float(a) for c, a in zip(info.classnames, acc)})
    return table


# --------------------------------------------------------------------------------------------------- requests
def load_concepts(req: StreamRequest) -> tuple[list[Concept], dict[str, str], object | None]:
    """Concepts (and templates) of the adaptation datasets of ``req.bench`` or ``req.info_dir``, cut to
    ``req.datasets``; also the opened benchmark (None with an info folder)."""
    wanted = [d.strip() for d in req.datasets.split(",") if d.strip()]
    bench = None
    if req.bench:
        from fomo_ray.data.format import open_benchmark

        bench = open_benchmark(req.bench)
        concepts, templates = concepts_from_benchmark(bench)
    elif req.info_dir:
        names = [fif_catalogue.resolve(d) for d in wanted] if wanted else fif_catalogue.ADAPT_NAMES
        concepts, templates = concepts_from_info_dir(req.info_dir, names)
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


def _backbone(req: StreamRequest):
    if not req.backbone:
        raise StreamError(f"--ordering {req.ordering} needs --backbone (and usually --pretrained)")
    from fomo_ray.models.backbones import create_backbone

    return create_backbone(req.backbone, req.pretrained, device=req.device)


def _random(req: StreamRequest, concepts, templates, bench) -> list[Concept]:
    return random_order(concepts, req.seed)


def _dataset_incremental(req: StreamRequest, concepts, templates, bench) -> list[Concept]:
    order = _read_name_list(req.dataset_order, "--dataset-order") if req.dataset_order else None
    return dataset_incremental(concepts, req.seed, order)


def _time_incremental(req: StreamRequest, concepts, templates, bench) -> list[Concept]:
    if req.release_order:
        order = _read_name_list(req.release_order, "--release-order")
    else:
        unknown = [d for d in templates if d not in fif_catalogue.CATALOGUE]
        if unknown:
            raise StreamError(f"no release year known for {', '.join(unknown)} (not FiF datasets): "
                              "pass --release-order FILE (a JSON list of dataset names, oldest first)")
        order = fif_catalogue.release_order(list(templates))
    return time_incremental(concepts, order, req.seed)


def _frequency(req: StreamRequest, concepts, templates, bench) -> list[Concept]:
    if req.frequency_table:
        counts = read_table(req.frequency_table, concepts, "frequency")
    elif req.pool:
        from fomo_ray.data.format import open_benchmark

        pool = open_benchmark(req.pool)
        counts = caption_counts((c for caps in pool.captions("pool") for c in caps), concepts)
    else:
        raise StreamError("--ordering frequency needs --frequency-table or --pool")
    return frequency_order(concepts, counts, req.seed)


def _similarity(req: StreamRequest, concepts, templates, bench) -> list[Concept]:
    return similarity_order(concepts, prompt_embeddings(_backbone(req), concepts, templates), req.seed)


def _difficulty(req: StreamRequest, concepts, templates, bench) -> list[Concept]:
    if req.accuracy_table:
        acc = read_table(req.accuracy_table, concepts, "accuracy")
    elif bench is not None:
        acc = zero_shot_accuracy_table(bench, _backbone(req), split=req.split,
                                       max_per_class=req.max_per_class, seed=req.seed, backend=req.loader)
    else:
        raise StreamError("--ordering difficulty needs --accuracy-table, or --bench plus --backbone")
    return difficulty_order(concepts, acc, req.seed)


# ordering name -> builder(request, concepts, templates, bench); 'reverse' (of a file) is handled in build_stream
BUILDERS: dict[str, Callable[..., list[Concept]]] = {
    "random": _random,
    "dataset_incremental": _dataset_incremental,
    "time_incremental": _time_incremental,
    "frequency": _frequency,
    "similarity": _similarity,
    "difficulty": _difficulty,
}


def build_stream(req: StreamRequest) -> list[str]:
    """The entries ``DATASET+++classname`` of ``req.ordering`` (reversed with ``req.reverse``)."""
    if req.ordering == "reverse":
        if not req.input:
            raise StreamError("--ordering reverse needs --input FILE")
        return list(reversed(read_stream(req.input)))
    concepts, templates, bench = load_concepts(req)
    if not concepts:
        raise StreamError("no adaptation concepts found (no adaptation dataset with a class list)")
    ordered = BUILDERS[req.ordering](req, concepts, templates, bench)
    return to_entries(ordered[::-1] if req.reverse else ordered)


def check_stream(req: StreamRequest) -> tuple[list[Concept], int]:
    """Validate the stream file ``req.input`` (e.g. one of the authors') the way a run will read it.

    Against a benchmark the check is ``stream.validate_entries``, i.e. exactly what a run does. Module handles and
    aliases (``dtd``, ``FGVCAIRCRAFT``) are mapped to download NAMEs first, as the authors' loader does; runs read
    names exactly. Returns the normalised entries and how many of them needed that mapping.
    """
    if not (req.input and (req.bench or req.info_dir)):
        raise StreamError("--check needs --input FILE and --bench ROOT (or --info-dir DIR)")
    raw = parse_entries(read_stream(req.input), req.input)
    entries = normalise(raw)
    if req.info_dir and not req.datasets:
        # a partial 00_info (only some datasets downloaded) checks the datasets the stream names, not every one
        req = replace(req, datasets=",".join(dict.fromkeys(fif_catalogue.resolve(d) for d, _ in entries)))
    concepts, _, bench = load_concepts(req)
    if bench is not None:
        from fomo_ray.data.stream import validate_entries

        validate_entries(entries, bench, req.input)
    else:
        known: dict[str, list[str]] = {}
        for d, c in concepts:
            known.setdefault(d, []).append(c)
        validate_stream(entries, known, req.input)
    return entries, sum(a != b for a, b in zip(raw, entries))
