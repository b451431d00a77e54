"""FiF-mini: the embedded benchmark, drawn procedurally (plus real scikit-learn digits and font glyphs).

It mirrors the structure of FoMo-in-Flux (Roth, Udandarao et al., "A Practitioner's Guide to Continual Multimodal
Pretraining", arXiv 2408.14471) at a scale a 2-core CPU handles:

- a pretraining **pool P** (default 20,000 images, 3 captions each) of compositional scenes - one object, a
  count of equal objects, or a pair with a spatial relation - varying shape (circle, square, triangle, diamond),
  colour (8 basic colours), size, position and background, with varied alt-text-like captions;
- **adaptation datasets** (the stream's concepts), each a concept family P never shows: novel shapes, rare colour
  words, textures, arrow directions, real handwritten digits (``sklearn.datasets.load_digits``), letters, Greek
  letters and pictogram icons (glyphs of the DejaVu fonts that ship inside matplotlib);
- **evaluation-only datasets** on concepts P teaches (shape, colour, size, position, count), for zero-shot
  retention, and a **retrieval set** of held-out pool-style scenes;
- FiF stream files ``streams/random.json`` and ``streams/dataset_incremental.json``.

Everything is a deterministic function of ``inputs.fifmini_generator_info(seed, image_size, scale)`` (which
includes the generator version): each dataset and split draws from its own seeded generators, so adding a dataset
never changes another. No network is used.
``scale`` shrinks every dataset (tests build ``scale=0.05`` in seconds); the default ``scale=1`` is the product.
"""
from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fomo_ray.data.format import MANIFEST, SEP, Benchmark, DataError, DatasetInfo, open_benchmark
from fomo_ray.data.tokens import root_lock
from fomo_ray.data.writer import BenchmarkWriter
from fomo_ray.core.inputs import FIFMINI_NAME, fifmini_generator_info
from fomo_ray.prep import fifmini_scenes as scenes
from fomo_ray.prep import fifmini_text as text
from fomo_ray.prep.workers import worker_pool

POOL_SIZE = 20_000
POOL_CHUNK = 2_500      # the pool is drawn in fixed chunks (own seeds) so workers can share the work
RETRIEVAL_SIZE = 500
TRAIN_PER_DATASET = 480  # ~ train images per adaptation dataset at scale 1 (split evenly over its classes)
TEST_PER_DATASET = 240
EVAL_PER_DATASET = 300
SPLIT_IDS = {"pool": 0, "train": 1, "test": 2}

GREEK = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "theta": "θ", "lambda": "λ",
         "mu": "μ", "pi": "π", "sigma": "σ", "phi": "φ", "omega": "ω"}
ICONS = {"sun": "☀", "cloud": "☁", "umbrella": "☂", "snowman": "☃", "telephone": "☎", "airplane": "✈",
         "anchor": "⚓", "scissors": "✂", "snowflake": "❄", "music note": "♪", "flag": "⚑", "envelope": "✉"}
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")

_LETTER_WORDS = ["the letter {w}.", "{ac} letter {w} {bg}.", "a capital {w} in a {f} font.", "an uppercase letter {w}.",
                 "the character {w}, printed in {c}.", "a photo of the letter {w}.", "a {f} {w}."]
_GREEK_WORDS = ["the greek letter {w}.", "{ac} {w} symbol.", "the lowercase greek letter {w} {bg}.",
                "a photo of the greek letter {w}.", "a {w} sign in a {f} font.", "the symbol {w}, in {c}."]
_ICON_WORDS = ["an icon of {a} {w}.", "{ac} {w} icon.", "the {w} symbol {bg}.", "a photo of the {w} icon.",
               "a small pictogram of {a} {w}.", "{a} {w} emoji in {c}.", "a simple {w} sign."]


@dataclass(frozen=True)
class Spec:
    """One dataset of the catalogue: its manifest entry and how to draw ``labels`` (class indices) of a split."""

    name: str
    role: str
    task: str
    classnames: tuple[str, ...]
    template: str
    draw: Callable[["Ctx", np.ndarray], tuple[np.ndarray, list[list[str]]]]

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, self.role, self.task, self.classnames, self.template)


@dataclass(frozen=True)
class Ctx:
    """Seeded randomness for one (dataset, split, chunk): ``rng`` for pixels/attributes, ``rnd`` for wording."""

    rng: np.random.Generator
    rnd: random.Random
    size: int
    split: str
    seed: int
    scale: float
    chunk: int

    @staticmethod
    def make(seed: int, dataset: str, split: str, size: int, scale: float, chunk: int = 0) -> "Ctx":
        key = [seed, zlib.crc32(dataset.encode()), SPLIT_IDS[split], chunk % (1 << 32)]
        words_seed = int(np.random.SeedSequence(key + [1]).generate_state(1)[0])
        return Ctx(np.random.default_rng(key), random.Random(words_seed), size, split, seed, scale, chunk)


def _names(classes: tuple[str, ...], labels: np.ndarray) -> np.ndarray:
    return np.asarray(classes, dtype=object)[labels]


def _singles(field: str, classes: tuple[str, ...], **kw) -> Callable:
    return lambda ctx, y: scenes.random_singles(ctx.rng, ctx.rnd, ctx.size, len(y), **{field: _names(classes, y)}, **kw)


def _glyph_draw(chars: dict[str, str] | tuple[str, ...], fonts: tuple[str, ...], templates: list[str],
                scale: tuple[float, float] = (0.55, 0.8)) -> Callable:
    keys = tuple(chars)
    glyph_of = chars if isinstance(chars, dict) else {c: c for c in chars}

    def run(ctx: Ctx, y: np.ndarray):
        words = [keys[i] for i in y]
        return scenes.glyphs(ctx.rng, ctx.rnd, ctx.size, [glyph_of[w] for w in words], fonts, words, templates, scale)
    return run


TEXTURE_CLASSES = ("striped", "dotted", "checkered", "zigzag", "grid", "wavy", "speckled", "concentric")
POSITION_CLASSES = ("top left", "top right", "bottom left", "bottom right", "center")

ADAPT: tuple[Spec, ...] = (
    Spec("NOVEL_SHAPES", "adapt", "classification", text.NOVEL_SHAPES, "a photo of a {}.",
         lambda ctx, y: scenes.random_singles(ctx.rng, ctx.rnd, ctx.size, len(y), shapes=_names(text.NOVEL_SHAPES, y),
                                              sizes=_names(("medium", "large"), ctx.rng.integers(0, 2, len(y))),
                                              angles=ctx.rng.uniform(-0.35, 0.35, len(y)))),
    Spec("RARE_COLOURS", "adapt", "classification", tuple(text.RARE_COLOURS), "a photo of something {}.",
         _singles("colours", tuple(text.RARE_COLOURS), palette=text.RARE_COLOURS)),
    Spec("TEXTURES", "adapt", "classification", TEXTURE_CLASSES, "a photo of a {} pattern.",
         lambda ctx, y: scenes.textures(ctx.rng, ctx.rnd, ctx.size, _names(TEXTURE_CLASSES, y))),
    Spec("ARROWS", "adapt", "classification", text.DIRECTIONS, "a photo of an arrow pointing {}.",
         lambda ctx, y: scenes.arrows(ctx.rng, ctx.rnd, ctx.size, _names(text.DIRECTIONS, y))),
    Spec("DIGITS", "adapt", "classification", text.NUMBER_WORDS, "a photo of the number {}.",
         lambda ctx, y: _draw_digits(ctx, y)),
    Spec("LETTERS", "adapt", "classification", LETTERS, "a photo of the letter {}.",
         _glyph_draw(LETTERS, scenes.LETTER_FONTS, _LETTER_WORDS)),
    Spec("GREEK", "adapt", "classification", tuple(GREEK), "a photo of the greek letter {}.",
         _glyph_draw(GREEK, scenes.LETTER_FONTS, _GREEK_WORDS)),
    Spec("ICONS", "adapt", "classification", tuple(ICONS), "a photo of the {} icon.",
         _glyph_draw(ICONS, scenes.ICON_FONTS, _ICON_WORDS, scale=(0.75, 1.0))),
)

EVAL: tuple[Spec, ...] = (
    Spec("SHAPES", "eval", "classification", text.POOL_SHAPES, "a photo of a {}.",
         _singles("shapes", text.POOL_SHAPES)),
    Spec("COLOURS", "eval", "classification", tuple(text.POOL_COLOURS), "a photo of something {}.",
         _singles("colours", tuple(text.POOL_COLOURS))),
    Spec("SIZES", "eval", "classification", text.SIZES, "a photo of a {} object.",
         lambda ctx, y: scenes.random_singles(ctx.rng, ctx.rnd, ctx.size, len(y), sizes=_names(text.SIZES, y),
                                              positions=np.full(len(y), "center", dtype=object))),
    Spec("POSITIONS", "eval", "classification", POSITION_CLASSES, "a photo of an object in the {}.",
         lambda ctx, y: scenes.random_singles(ctx.rng, ctx.rnd, ctx.size, len(y), positions=_names(POSITION_CLASSES, y),
                                              sizes=_names(("small", "medium"), ctx.rng.integers(0, 2, len(y))))),
    Spec("COUNTS", "eval", "classification", text.COUNTS, "a photo of {} objects.",
         lambda ctx, y: scenes.count_scenes(ctx.rng, ctx.rnd, ctx.size, _names(text.COUNTS, y))),
    Spec("SCENES", "eval", "retrieval", (), "",
         lambda ctx, y: scenes.pool_scenes(ctx.rng, ctx.rnd, ctx.size, len(y))),
)
POOL = Spec("POOL", "pool", "retrieval", (), "", lambda ctx, y: scenes.pool_scenes(ctx.rng, ctx.rnd, ctx.size, len(y)))
CATALOGUE: tuple[Spec, ...] = (POOL, *ADAPT, *EVAL)


# --------------------------------------------------------------------------------------------------- sizes
def per_class(total: int, classes: int, scale: float) -> int:
    """Images per class so a dataset has about ``total * scale`` images (at least 2 per class)."""
    return max(2, int(round(total * scale / classes)))


def split_labels(spec: Spec, split: str, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Class index of every row of ``spec`` in ``split`` (balanced, shuffled); -1 rows for retrieval sets."""
    if spec.task == "retrieval":
        total = POOL_SIZE if spec.role == "pool" else RETRIEVAL_SIZE
        return np.full(max(50, int(round(total * scale))), -1, dtype=np.int64)
    total = {"train": TRAIN_PER_DATASET, "test": EVAL_PER_DATASET if spec.role == "eval" else TEST_PER_DATASET}[split]
    k = len(spec.classnames)
    return rng.permutation(np.repeat(np.arange(k), per_class(total, k, scale)))


# --------------------------------------------------------------------------------------------------- drawing
def _draw_digits(ctx: Ctx, labels: np.ndarray) -> tuple[np.ndarray, list]:
    """Real digits: a seeded per-class split of scikit-learn's 1797 scans (train and test never share an image)."""
    if ctx.chunk != 0:
        raise DataError("DIGITS must be drawn in one chunk (its train/test split is computed per call)")
    images, targets = scenes.sklearn_digits()
    rng = np.random.default_rng([ctx.seed, zlib.crc32(b"DIGITS")])
    n_train = per_class(TRAIN_PER_DATASET, 10, ctx.scale)
    chosen = np.empty(len(labels), dtype=np.int64)
    for k in range(10):
        pool = rng.permutation(np.flatnonzero(targets == k))
        need = int((labels == k).sum())
        part = pool[:n_train] if ctx.split == "train" else pool[n_train:n_train + need]
        if len(part) < need:
            raise DataError(f"DIGITS: scale {ctx.scale} asks for more images of class {k} than scikit-learn ships")
        chosen[labels == k] = part[:need]
    return scenes.digits(ctx.rnd, ctx.size, images[chosen], targets[chosen])


def _draw_chunk(args: tuple) -> tuple[np.ndarray, list]:
    """Chunk ``c`` of a dataset split (its own seeds); a top-level function for worker pools."""
    name, split, seed, size, scale, labels, c = args
    spec = next(s for s in CATALOGUE if s.name == name)
    return spec.draw(Ctx.make(seed, name, split, size, scale, c), labels)


def draw_dataset(spec: Spec, split: str, seed: int, size: int, scale: float, workers: int = 1,
                 chunk: int = POOL_CHUNK) -> list[tuple]:
    """Samples ``(image, dataset, label, captions)`` of one dataset split. Large splits are drawn in chunks of
    ``chunk`` rows with their own seeds, in parallel when ``workers > 1`` (the result does not depend on
    ``workers``)."""
    labels = split_labels(spec, split, scale, Ctx.make(seed, spec.name, split, size, scale, chunk=-1).rng)
    jobs = [(spec.name, split, seed, size, scale, labels[c * chunk:(c + 1) * chunk], c)
            for c in range(-(-len(labels) // chunk))]
    if workers > 1 and len(jobs) > 1:
        with worker_pool(min(workers, len(jobs)), f"FiF-mini {spec.name} {split}", DataError) as pool:
            parts = list(pool.map(_draw_chunk, jobs))
    else:
        parts = [_draw_chunk(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    caps = [c for p in parts for c in p[1]]
    return [(images[i], spec.name, int(labels[i]), caps[i]) for i in range(len(labels))]


# --------------------------------------------------------------------------------------------------- streams
def stream_entries(seed: int) -> dict[str, list[str]]:
    """``random``: a seeded permutation of every adaptation class; ``dataset_incremental``: the datasets one
    after another in catalogue order, classes in their natural order."""
    ordered = [f"{s.name}{SEP}{c}" for s in ADAPT for c in s.classnames]
    perm = np.random.default_rng([seed, zlib.crc32(b"stream:random")]).permutation(len(ordered))
    return {"random": [ordered[i] for i in perm], "dataset_incremental": ordered}


# --------------------------------------------------------------------------------------------------- build / ensure
def build_fifmini(root: str | os.PathLike, seed: int = 0, image_size: int = 32, scale: float = 1.0,
                  workers: int | None = None, progress: bool = True, models: Sequence[str] = ()) -> Benchmark:
    """Draw and write FiF-mini into ``root`` (replacing whatever is there), with the caption token ids of ``models``
    (empty: the default model); returns the opened benchmark."""
    from tqdm import tqdm

    from fomo_ray.prep.tokenize import tokenizers_for

    if image_size < 8:
        raise DataError(f"FiF-mini image_size must be >= 8, got {image_size}")
    if not 0 < scale <= 2:
        raise DataError(f"FiF-mini scale must be in (0, 2], got {scale}")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    tokenizers = tokenizers_for(models)  # an unknown model fails before anything is drawn
    writer = BenchmarkWriter(root, FIFMINI_NAME, image_size,
                             extra={"generator": fifmini_generator_info(seed, image_size, scale)})
    try:
        for spec in CATALOGUE:
            writer.add_dataset(spec.info())
        jobs = [("pool", [POOL])] + [("train", list(ADAPT)), ("test", list(ADAPT) + list(EVAL))]
        bar = tqdm(total=len(CATALOGUE) + len(ADAPT), desc="FiF-mini", unit="dataset", disable=not progress)
        for split, specs in jobs:
            samples: list[tuple] = []
            for spec in specs:
                bar.set_postfix_str(f"{split}:{spec.name}")
                samples += draw_dataset(spec, split, seed, image_size, scale, workers)
                bar.update()
            writer.write_split(split, samples)
        bar.close()
        for name, entries in stream_entries(seed).items():
            writer.add_stream(name, entries)
        return writer.finish(tokenizers)
    except BaseException:
        writer.abort()
        raise


def _reusable(root: Path, want: dict) -> Benchmark | None:
    """The existing build if complete and generated with ``want``; ``None`` if it must be (re)built."""
    if not (root / MANIFEST).is_file():
        return None  # missing or partial: rebuild
    try:
        bench = open_benchmark(root)
    except DataError:
        return None  # corrupt: rebuild
    if bench.name != FIFMINI_NAME:
        raise DataError(f"{root} holds benchmark '{bench.name}', not FiF-mini; refusing to overwrite it")
    have = dict(bench.manifest.get("generator") or {})
    if have == want:
        return bench
    asked = {k: want[k] for k in ("seed", "image_size", "scale")}
    built = {k: have.get(k) for k in asked}
    if built != asked:  # another study's data: rebuilding would silently change what its runs read
        raise DataError(f"{root} holds FiF-mini generated with {_params(built)}, not {_params(asked)}: "
                        f"set data.root to another directory, or replace it with `fomo-ray prepare fifmini --root "
                        f"{root} --seed {asked['seed']} --image-size {asked['image_size']} --scale {asked['scale']} "
                        f"--force`")
    return None  # same parameters, older generator version: stale, rebuild


def _params(gen: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {gen[k]}" for k in gen)


def ensure_fifmini(root: str | os.PathLike, seed: int = 0, image_size: int = 32, force: bool = False,
                   scale: float = 1.0, workers: int | None = None, progress: bool = True,
                   models: Sequence[str] = ()) -> Benchmark:
    """FiF-mini at ``root``: reused if its manifest matches ``(seed, image_size, scale, version)``, else built.

    A missing, partial (no manifest) or corrupt directory is rebuilt, and so is one of an older generator version;
    ``force`` always rebuilds. A build with another seed, image size or scale is refused (``DataError`` naming both):
    other runs read it. A reused build gets
    the caption token ids of ``models`` (empty: the default model) it lacks, e.g. one written by an older fomo_ray;
    its content hash stays the same (token files are derived data, see :mod:`fomo_ray.data.tokens`).
    """
    from fomo_ray.prep.tokenize import upgrade

    root = Path(root)
    want = fifmini_generator_info(seed, image_size, scale)
    with root_lock(root):  # concurrent runs (e.g. Ray trials) build it once
        bench = None if force else _reusable(root, want)
        if bench is None:
            return build_fifmini(root, seed, image_size, scale, workers, progress, models)
    return upgrade(root, models)[0]  # takes the root's lock itself (flock is not re-entrant)


# --------------------------------------------------------------------------------------------------- summary
def describe(bench: Benchmark) -> list[dict]:
    """One row per dataset: name, role, task, #classes, pool, train and test sizes (print with
    ``tables.format_table``)."""
    out = []
    for name, info in bench.datasets.items():
        rows = {s: info.rows.get(s, (0, 0)) for s in ("pool", "train", "test")}
        out.append({"name": name, "role": info.role, "task": info.task, "classes": len(info.classnames),
                    **{s: e - b for s, (b, e) in rows.items()}})
    return out
