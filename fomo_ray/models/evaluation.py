"""Zero-shot classification and image<->text retrieval of a CLIP model on a benchmark's test split.

Zero-shot classification as in CLIP (Radford et al. 2021): one primer prompt per class (the dataset's template, e.g.
"A photo of a {}."), L2-normalised image and text embeddings, top-1 over the dataset's *full* class set. With
``evaluation.prompts`` set to one of open_clip's template ensembles (``openai_imagenet``: CLIP's 80 ImageNet
templates, ``simple_imagenet``: a 7-template subset of them) a class's embedding is instead the mean of the
normalised embeddings of all its templates, re-normalised, exactly as ``open_clip.build_zero_shot_classifier``: the
setting of open_clip's published zero-shot numbers. Every record names the texts it used (``prompts``: the setting
for classification, ``captions`` for retrieval). Retrieval: recall@k in both directions, averaged (image->text: a hit
if any of the image's captions is among the top k; text->image: for every caption, a hit if its image is among the
top k). FoMo-in-Flux (Roth, Udandarao et al. 2024, arXiv 2408.14471) evaluates on class-balanced subsets during the
stream and on the full test sets at its ends; unlike the reference code, the subsets here are index sets drawn once
at construction -- the data are never mutated, so every in-stream evaluation sees the same samples and the final full
evaluation really is full (docs/BENCHMARK.md §Evaluation, §Reference faults).

Decoded images are kept: the first evaluation of a mode (subsets, or full test sets) keeps the images its loader gave
(``uint8``, this rank's share only) when they fit in ``evaluation.cache_mb`` per process, the subsets first and the
full test sets in what they leave, and every later evaluation of that mode reads them instead of decoding again.
The model input is computed from the same bytes either way, so the numbers do not change. A mode over the budget is
decoded at every evaluation, as is everything with the "memory" loader (it holds the decoded split already).
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fomo_ray.models.backbones import autocast_context, resolve_precision
from fomo_ray.config import EvalConfig
from fomo_ray.data.augment import model_input


class EvaluationError(ValueError):
    """An evaluation dataset cannot be evaluated (no classes, no test rows, ...); the message names it."""


#: ``evaluation.prompts``: each dataset's one primer template (the reference), or a template ensemble of open_clip
#: (the only two it ships, in ``open_clip.zero_shot_metadata``)
PRIMER = "primer"
ENSEMBLES = {"openai_imagenet": "OPENAI_IMAGENET_TEMPLATES", "simple_imagenet": "SIMPLE_IMAGENET_TEMPLATES"}
PROMPT_SETS = (PRIMER, *ENSEMBLES)
CAPTIONS = "captions"  # the prompts of a retrieval record: each image's own captions, whatever evaluation.prompts


def prompt_templates(prompts: str) -> tuple[Callable[[str], str], ...] | None:
    """The templates (``classname -> text``) of a template ensemble, in open_clip's order; None for the primer."""
    if prompts == PRIMER:
        return None
    if prompts not in ENSEMBLES:
        raise EvaluationError(f"unknown zero-shot prompts '{prompts}' (config key 'evaluation.prompts'); "
                              f"choose one of {list(PROMPT_SETS)}")
    from open_clip import zero_shot_metadata

    return tuple(getattr(zero_shot_metadata, ENSEMBLES[prompts]))


def ensemble_class_embeddings(text_features: torch.Tensor, num_templates: int) -> torch.Tensor:
    """``[C*T, D]`` L2-normalised embeddings of every (class, template) text, class-major, to ``[C, D]`` class
    embeddings: per class the mean over its T templates, re-normalised (open_clip's ``build_zero_shot_classifier``)."""
    return F.normalize(text_features.reshape(-1, num_templates, text_features.shape[-1]).mean(dim=1), dim=-1)


# --------------------------------------------------------------------------------------------------- pure math
def subset_size(num_samples: int, num_classes: int, fraction: float, minimum: int) -> int:
    """docs/BENCHMARK.md §Evaluation: ``n = min(len, max(2*C, minimum, floor(f*len)))``."""
    return min(num_samples, max(2 * num_classes, minimum, int(np.floor(fraction * num_samples))))


def class_balanced_quota(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many samples to take per class so that ``n`` are taken as evenly as the class sizes allow.

    Water-filling: every class with samples left gets an equal share; classes that run out hand their share to the
    others; the last few (n mod open classes) go to randomly chosen open classes.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if n > counts.sum():
        raise ValueError(f"cannot draw {n} samples from {counts.sum()}")
    quota = np.zeros_like(counts)
    remaining = n
    while remaining > 0:
        open_ = np.flatnonzero(counts - quota > 0)
        share = remaining // len(open_)
        if share == 0:
            quota[rng.permutation(open_)[:remaining]] += 1
            break
        add = np.minimum(counts[open_] - quota[open_], share)
        quota[open_] += add
        remaining -= int(add.sum())
    return quota


def class_balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions (into ``labels``) of a class-balanced random subset of size ``n``.

    Labels < 0 (retrieval rows, no class) are treated as one class, i.e. a uniform draw.
    """
    labels = np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    quota = class_balanced_quota(counts, n, rng)
    picked = [rng.choice(np.flatnonzero(inverse == c), size=q, replace=False) for c, q in enumerate(quota) if q]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def top1_accuracy(similarity: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max column equals the label."""
    return float((similarity.argmax(dim=1) == labels).float().mean())


def image_to_text_recall(similarity: torch.Tensor, text_owner: torch.Tensor, k: int) -> float:
    """R@k image->text. ``similarity``: [images, texts]; ``text_owner[j]``: the image index caption j belongs to.
    An image scores a hit if any of its captions is among its k most similar texts."""
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices                      # [images, k] text indices
    own = torch.arange(similarity.shape[0], device=similarity.device)[:, None]
    return float((text_owner[top] == own).any(dim=1).float().mean())


def text_to_image_recall(similarity: torch.Tensor, text_owner: torch.Tensor, k: int) -> float:
    """R@k text->image: for every caption, a hit if its own image is among its k most similar images."""
    k = min(k, similarity.shape[0])
    top = similarity.T.topk(k, dim=1).indices                    # [texts, k] image indices
    return float((top == text_owner[:, None]).any(dim=1).float().mean())


def retrieval_recalls(similarity: torch.Tensor, text_owner: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """``{"R@k": mean of image->text and text->image R@k}`` for every k."""
    return {f"R@{k}": 0.5 * (image_to_text_recall(similarity, text_owner, k)
                             + text_to_image_recall(similarity, text_owner, k)) for k in ks}


def chance_level(metric: str, num_classes: int, num_images: int) -> float:
    """What a random model scores: 1/C for top-1; k/N for R@k over N images (one image per query; for
    image->text with several captions per image it is the same to first order)."""
    if metric == "top1":
        return 1.0 / num_classes if num_classes else float("nan")
    if metric.startswith("R@"):
        return min(1.0, int(metric[2:]) / max(num_images, 1))
    raise ValueError(f"no chance level for metric '{metric}'")


def _dataset_seed(seed: int, name: str) -> list[int]:
    """Per-dataset RNG seed: stable across runs and independent of which other datasets exist."""
    return [int(seed), zlib.crc32(name.encode())]


# --------------------------------------------------------------------------------------------------- evaluator
class Evaluator:
    """Evaluates a CLIP model on every adaptation and evaluation-only dataset of ``bench`` (pool rows are skipped).

    Subsets for in-stream evaluation are drawn once here (from ``seed``) and reused at every call; class-text
    (and caption) embeddings are cached per ``(weights_version, dataset)`` and recomputed only when the version
    changes; decoded images are kept within ``evaluation.cache_mb`` (module docstring). ``backend`` selects the
    loader (``"ffcv"`` or ``"memory"``, see ``fomo_ray.data.loaders``); ``num_workers`` its decode threads (0: the
    process's CPUs, ``fomo_ray.data.loaders.decode_threads``).

    Data parallel: with ``ranks = (rank, world size)`` each rank encodes every W-th batch of images and of texts and
    ``gather`` (every rank's rows concatenated in rank order; ``fomo_ray.core.distributed.gather_rows``) collects the
    features, which are then put back in one-process order. Each batch is the one a single process would encode, so
    the results equal a single process's.
    """

    def __init__(self, bench: Any, eval_cfg: Any, seed: int, image_size: int, mean: Sequence[float],
                 std: Sequence[float], backend: str = "ffcv", *, num_workers: int = 0, precision: str = "auto",
                 datasets: Sequence[str] | None = None, ranks: tuple[int, int] = (0, 1),
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if ranks[1] > 1 and gather is None:
            raise ValueError(f"an evaluator shared by {ranks[1]} ranks needs a gather function")
        self.ranks, self.gather = ranks, gather or (lambda t: t)
        self.bench, self.cfg, self.seed = bench, eval_cfg, int(seed)
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.backend, self.num_workers, self.precision = backend, num_workers, precision
        self.prompts = getattr(eval_cfg, "prompts", PRIMER)  # the class texts; an unknown name is refused here
        prompt_templates(self.prompts)
        cache_mb = getattr(eval_cfg, "cache_mb", EvalConfig.cache_mb)  # (the default for a bare namespace)
        if cache_mb < 0:
            raise EvaluationError(f"config key 'evaluation.cache_mb' must be >= 0 (0 = no cache), got {cache_mb}")
        self.cache_bytes = int(cache_mb * 2 ** 20)
        names = list(datasets) if datasets is not None else [
            n for n, d in bench.datasets.items() if d.role in ("adapt", "eval")]
        if not names:
            raise EvaluationError(f"benchmark {getattr(bench, 'root', bench)} has no adapt/eval dataset to evaluate")
        unknown = [n for n in names if n not in bench.datasets]
        if unknown:
            raise EvaluationError(f"unknown evaluation dataset(s) {unknown}; benchmark has {list(bench.datasets)}")
        self.infos = {n: bench.datasets[n] for n in names}
        _, labels = bench.meta("test")
        self._captions: list[list[str]] | None = None
        self.full_rows: dict[str, np.ndarray] = {}
        self.subset_rows: dict[str, np.ndarray] = {}
        for name, info in self.infos.items():
            rows = np.asarray(bench.rows(name, "test"), dtype=np.int64)
            if len(rows) == 0:
                raise EvaluationError(f"evaluation dataset '{name}' has no test rows")
            if info.task == "classification" and len(info.classnames) == 0:
                raise EvaluationError(f"evaluation dataset '{name}' has no classes: zero-shot classification "
                                      f"needs at least one class name")
            n_cls = len(info.classnames) if info.task == "classification" else 0
            n = subset_size(len(rows), n_cls, eval_cfg.subset_fraction, eval_cfg.subset_min)
            rng = np.random.default_rng(_dataset_seed(self.seed, name))
            pos = class_balanced_subset(labels[rows], n, rng)
            self.full_rows[name] = rows
            self.subset_rows[name] = rows[pos]
            self.full_rows[name].setflags(write=False)   # index sets are shared; nobody may edit them
            self.subset_rows[name].setflags(write=False)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._text_cache_version: str | None = None
        self._loaders: dict[bool, Any] = {}
        self._images: dict[bool, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # kept decoded batches per mode
        self._keep: dict[bool, bool] | None = None  # which modes fit in cache_bytes (decided once)

    # ------------------------------------------------------------------------------------------- public
    def rows(self, full: bool) -> dict[str, np.ndarray]:
        """The test rows each dataset is evaluated on (read-only arrays)."""
        return self.full_rows if full else self.subset_rows

    def workload(self, full: bool) -> tuple[int, int]:
        """(images, texts) one evaluation encodes: every needed test image once, and the class prompts and captions
        (the text cache holds them for one weights version, i.e. one evaluation point)."""
        rows = self.rows(full)
        images = len(np.unique(np.concatenate(list(rows.values()))))
        texts = 0
        for name, info in self.infos.items():
            if info.task == "classification":
                texts += len(info.classnames) * len(prompt_templates(self.prompts) or (None,))
            else:
                if self._captions is None:
                    self._captions = self.bench.captions("test")
                texts += sum(len(self._captions[int(r)]) for r in rows[name])
        return images, texts

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], *, full: bool,
                 weights_version: str) -> list[dict[str, Any]]:
        """Records ``{dataset, role, metric, value, n, prompts}``: ``top1`` per classification set (``prompts``: the
        class texts, ``evaluation.prompts``), ``R@k`` per retrieval set (``prompts``: ``captions``).

        ``weights_version`` names the weights (e.g. ``"task3-deployed"``); text embeddings computed for one version
        are reused until a different version is passed. An empty version disables the cache.
        """
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            amp = autocast_context(device, resolve_precision(self.precision, device))
            if weights_version != self._text_cache_version or not weights_version:
                self._text_cache, self._text_cache_version = {}, weights_version
            row_ids, image_feats = self._image_features(model, full, device, amp)
            records = []
            for name, info in self.infos.items():
                rows = self.rows(full)[name]
                pos = np.searchsorted(row_ids, rows)
                if len(rows) and (pos.max() >= len(row_ids) or (row_ids[pos] != rows).any()):
                    raise EvaluationError(f"loader did not return every test row of '{name}'")
                img = image_feats[torch.as_tensor(pos)]
                if info.task == "classification":
                    records += self._classification(model, tokenizer, name, info, rows, img, device, amp)
                else:
                    records += self._retrieval(model, tokenizer, name, info, rows, img, device, amp)
            return records
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------------------------------- internals
    def _my_batches(self, n: int, bs: int | None = None) -> list[tuple[int, int]]:
        """``[lo, hi)`` of every W-th batch (of ``bs`` items, default the eval batch size) of ``n`` items, starting at
        this rank's (all of them on one process)."""
        rank, world = self.ranks
        bs = bs or self.cfg.batch_size
        return [(k * bs, min(n, (k + 1) * bs)) for k in range(rank, -(-n // bs), world)]

    def _in_order(self, keys: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (keys, features) gathered and sorted by key: the one-process result on every rank."""
        keys, feats = self.gather(keys), self.gather(feats)
        order = torch.argsort(keys, stable=True)
        return keys[order], feats[order]

    def _my_rows(self, full: bool) -> np.ndarray:
        """This rank's rows of a mode: its batches of the sorted union of every dataset's rows."""
        union = np.unique(np.concatenate(list(self.rows(full).values())))
        return np.concatenate([union[lo:hi] for lo, hi in self._my_batches(len(union))] or [union[:0]])

    def cache_plan(self) -> dict[bool, bool]:
        """``{full: keep the decoded images?}``, decided once from the bytes of this rank's share of each mode:
        the subsets (read at every point) if they fit in ``cache_bytes``, the full test sets if they fit in what the
        kept subsets leave. Nothing with the "memory" backend, which holds the decoded split anyway."""
        if self._keep is None:
            from fomo_ray.data.loaders import decode_size, decoded_nbytes

            if self.backend == "memory" or self.cache_bytes <= 0:
                self._keep = {False: False, True: False}
            else:
                path = self.bench.split_path("test")
                size = decode_size(path, self.image_size)
                need = {full: decoded_nbytes(path, self._my_rows(full), size) for full in (False, True)}
                subset = need[False] <= self.cache_bytes
                self._keep = {False: subset,
                              True: need[True] <= self.cache_bytes - (need[False] if subset else 0)}
        return self._keep

    def _decoded_images(self, full: bool):
        """This rank's ``(uint8 images, rows)`` batches of a mode: the kept ones, or from the mode's loader (built
        once: an FFCV loader's first epoch pays the numba compilation), kept when :meth:`cache_plan` says so."""
        if full in self._images:
            yield from self._images[full]
            return
        if full not in self._loaders:
            from fomo_ray.data.loaders import make_loader

            mine = self._my_rows(full)
            self._loaders[full] = None if len(mine) == 0 else make_loader(
                self.bench, "test", mine, self.cfg.batch_size, train=False, seed=self.seed,
                image_size=self.image_size, backend=self.backend, num_workers=self.num_workers)
        keep = [] if self.cache_plan()[full] else None
        for images, rows in self._loaders[full] or ():
            if keep is not None:
                keep.append((images, rows))
            yield images, rows
        if keep is not None:  # only a complete pass is kept
            self._images[full] = keep

    def _image_features(self, model, full: bool, device, amp) -> tuple[np.ndarray, torch.Tensor]:
        """Normalised image embeddings of every needed test row, as (sorted row ids, [rows, D] features), from this
        rank's batches of the union of rows (:meth:`_decoded_images`)."""
        all_rows, feats = [], []
        for images, rows in self._decoded_images(full):  # uint8 on the host; resized and normalised on the device
            x = model_input(images.to(device, non_blocking=True), self.image_size, self.mean, self.std)
            with amp:
                f = model.encode_image(x)
            feats.append(F.normalize(f.float(), dim=-1).cpu())
            all_rows.append(torch.as_tensor(np.asarray(rows, dtype=np.int64)))
        row_ids, feats = self._in_order(*self._mine(all_rows, feats, model))
        return row_ids.numpy(), feats

    def _text_features(self, model, tokenizer, key: str, texts: list[str], device, amp) -> torch.Tensor:
        if key in self._text_cache:
            return self._text_cache[key]
        positions, out = [], []
        for lo, hi in self._my_batches(len(texts)):
            with amp:
                f = model.encode_text(tokenizer(texts[lo:hi]).to(device))
            out.append(F.normalize(f.float(), dim=-1).cpu())
            positions.append(torch.arange(lo, hi))
        _, feats = self._in_order(*self._mine(positions, out, model))
        if self._text_cache_version:
            self._text_cache[key] = feats
        return feats

    @staticmethod
    def _mine(keys: list[torch.Tensor], feats: list[torch.Tensor], model) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's keys and features as two tensors (empty, of the embedding width, when it had no batch)."""
        if keys:
            return torch.cat(keys), torch.cat(feats)
        # the embedding width: open_clip's own towers say it as output_dim; a timm image tower does not, its text does
        width = getattr(model.visual, "output_dim", None) or model.text.output_dim
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, int(width))

    def _ensemble_features(self, model, tokenizer, key: str, classnames: Sequence[str],
                           templates: Sequence[Callable[[str], str]], device, amp) -> torch.Tensor:
        """``[C, D]`` class embeddings from the template ensemble (:func:`ensemble_class_embeddings`). Classes go in
        groups of whole classes, ``batch_size // T`` a group (at least one), each encoded in batches of at most
        ``batch_size`` texts and reduced to its classes' embeddings at once, so at most ``max(batch_size, T)`` text
        embeddings are held at a time; each rank takes every W-th group (computed as one process would) and the
        class embeddings are gathered in class order."""
        if key in self._text_cache:
            return self._text_cache[key]
        bs = self.cfg.batch_size
        classes, out = [], []
        for lo, hi in self._my_batches(len(classnames), max(1, bs // len(templates))):
            texts = [template(c) for c in classnames[lo:hi] for template in templates]
            feats = []
            for a in range(0, len(texts), bs):
                with amp:
                    f = model.encode_text(tokenizer(texts[a:a + bs]).to(device))
                feats.append(F.normalize(f.float(), dim=-1))
            out.append(ensemble_class_embeddings(torch.cat(feats), len(templates)).cpu())
            classes.append(torch.arange(lo, hi))
        _, feats = self._in_order(*self._mine(classes, out, model))
        if self._text_cache_version:
            self._text_cache[key] = feats
        return feats

    def _classification(self, model, tokenizer, name, info, rows, img, device, amp) -> list[dict[str, Any]]:
        key = f"classes:{self.prompts}:{name}"  # primer and ensemble embeddings never share an entry
        templates = prompt_templates(self.prompts)
        if templates is None:
            cls = self._text_features(model, tokenizer, key, list(info.prompts()), device, amp)
        else:
            cls = self._ensemble_features(model, tokenizer, key, list(info.classnames), templates, device, amp)
        _, labels = self.bench.meta("test")
        y = torch.as_tensor(labels[rows].astype(np.int64))
        return [dict(dataset=name, role=info.role, metric="top1", value=top1_accuracy(img @ cls.T, y), n=len(rows),
                     prompts=self.prompts)]

    def _retrieval(self, model, tokenizer, name, info, rows, img, device, amp) -> list[dict[str, Any]]:
        if self._captions is None:
            self._captions = self.bench.captions("test")
        caps = [self._captions[int(r)] for r in rows]
        empty = [int(r) for r, c in zip(rows, caps) if not c]
        if empty:
            raise EvaluationError(f"retrieval dataset '{name}': test row(s) {empty[:5]} have no captions")
        texts = [c for cs in caps for c in cs]
        owner = torch.as_tensor([i for i, cs in enumerate(caps) for _ in cs])
        # the caption set depends on the rows, so full and subset embeddings are cached separately
        key = f"captions:{name}:{'full' if len(rows) == len(self.full_rows[name]) else 'subset'}"
        txt = self._text_features(model, tokenizer, key, texts, device, amp)
        recalls = retrieval_recalls(img @ txt.T, owner, self.cfg.retrieval_k)
        return [dict(dataset=name, role=info.role, metric=m, value=v, n=len(rows), prompts=CAPTIONS)
                for m, v in recalls.items()]
