"""Pretrain a tiny base CLIP from scratch on a benchmark's pool P: the zero-shot weights theta_0 of CPU runs.

FoMo-in-Flux (Roth, Udandarao et al. 2024, arXiv 2408.14471) starts every stream from a web-pretrained CLIP. The
embedded FiF-mini benchmark has no web-scale model, so we make one: CLIP training (Radford et al. 2021, symmetric
InfoNCE with a learnable temperature) of a ``fomo-tiny-*`` architecture on FiF-mini's pool of captioned scenes. The
pool teaches some concepts (the eval-only datasets' shapes, colours, ...) and never shows others (the adaptation
datasets' digits, glyphs, novel shapes), so the base has zero-shot ability to retain and knowledge to gain.

The checkpoint is cached beside the data as ``<root>/base_models/<arch>-<hash>.pt`` where the hash covers the
architecture, the pretraining recipe and the benchmark's content hash: changing any of them trains a new base,
reruns reuse it. Training is deterministic (seeded init, seeded batch/caption order, deterministic kernels, and the
recipe's pinned CPU thread count, since matmul reductions split differently across threads). There is no augmentation: the pool's
20,000 drawn scenes are each seen ~8 times, and flips or crops would contradict their position captions.

The recipes (:class:`~fomo_ray.core.inputs.PretrainConfig`, ``RECIPES``) and the cache path
(``inputs.base_checkpoint_path``) live in :mod:`fomo_ray.core.inputs`, where the runtime core finds the base without
importing this module. Command line: ``fomo-ray pretrain`` (:mod:`fomo_ray.cli.pretrain`) or
``python data_prep/pretrain_base.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fomo_ray.atomic import file_lock
from fomo_ray.models.backbones import TINY_ARCHS, base_meta, create_backbone, save_checkpoint
from fomo_ray.core.inputs import RECIPES, PretrainConfig, base_checkpoint_path
from fomo_ray.maths.losses import clamp_logit_scale_, clip_loss
from fomo_ray.maths.optim import adamw_groups, trainable_named
from fomo_ray.provenance import platform
from fomo_ray.maths.schedules import cosine_lr, warmup_steps


class PretrainError(ValueError):
    """Pretraining cannot run (unknown architecture, empty pool, ...); the message names the culprit."""


# --------------------------------------------------------------------------------------------------- pure helpers
def batch_order(num_rows: int, steps: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``[steps, batch_size]`` row positions: consecutive epochs of fresh permutations (no row twice per batch
    unless the pool is smaller than a batch)."""
    need = steps * batch_size
    epochs = -(-need // num_rows)
    return np.concatenate([rng.permutation(num_rows) for _ in range(epochs)])[:need].reshape(steps, batch_size)


@contextlib.contextmanager
def deterministic(threads: int | None = None) -> Iterator[None]:
    """Deterministic kernels (and, on CPU, a pinned torch thread count) for the block, then restore.

    ``fill_uninitialized_memory`` is switched off: it only matters for code that reads ``torch.empty`` memory
    (ours does not) and filling every fresh buffer halved the CPU step rate in measurement.
    """
    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory)
    threads_before = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory = before[2]
        torch.set_num_threads(threads_before)


# --------------------------------------------------------------------------------------------------- data
def load_pool(bench: Any, image_size: int, mean: Sequence[float], std: Sequence[float],
              backend: str = "memory") -> tuple[torch.Tensor, list[list[str]]]:
    """The whole pool in memory, decoded once: normalised images ``[N, 3, H, W]`` and each row's captions."""
    from fomo_ray.data.loaders import make_loader

    rows = np.arange(len(bench.meta("pool")[0]), dtype=np.int64)
    if len(rows) == 0:
        raise PretrainError(f"benchmark {bench.root} has an empty pool: nothing to pretrain on")
    from fomo_ray.data.augment import model_input

    loader = make_loader(bench, "pool", rows, 1024, train=False, seed=0, image_size=image_size, backend=backend)
    images = torch.empty(len(rows), 3, image_size, image_size)
    for batch, ids in loader:
        images[torch.as_tensor(np.asarray(ids, dtype=np.int64))] = model_input(batch, image_size, mean, std)
    captions = bench.captions("pool")
    empty = [r for r, c in enumerate(captions) if not c]
    if empty:
        raise PretrainError(f"pool rows {empty[:5]} of {bench.root} have no caption")
    return images, captions


def caption_table(captions: list[list[str]], tokenizer) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Tokenize each distinct caption once. Returns (tokens ``[U, ctx]``, ``starts`` ``[N+1]``, ``flat``): row r's
    captions are ``tokens[flat[starts[r]:starts[r+1]]]``."""
    distinct: dict[str, int] = {}
    flat = np.fromiter((distinct.setdefault(c, len(distinct)) for cs in captions for c in cs), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum([len(cs) for cs in captions])]).astype(np.int64)
    tokens = torch.cat([tokenizer(list(distinct)[i:i + 4096]) for i in range(0, len(distinct), 4096)])
    return tokens, starts, flat


# --------------------------------------------------------------------------------------------------- training
def train_base(bb: Any, images: torch.Tensor, captions: list[list[str]], recipe: PretrainConfig,
               progress: bool = True) -> dict[str, Any]:
    """Train the (freshly initialised) backbone ``bb`` in place with the CLIP loss on (images, captions); returns
    training stats."""
    from tqdm.auto import tqdm

    arch, model = bb.name, bb.model.train()
    tokens, starts, flat = caption_table(captions, bb.tokenizer)
    counts = np.diff(starts)
    named = trainable_named(model)
    # the loop's decay groups (optim.decays: matrices only); fused: one kernel per step, not one per tensor
    opt = torch.optim.AdamW(adamw_groups(named, recipe.weight_decay), lr=recipe.lr, betas=recipe.betas,
                            eps=recipe.eps, fused=True)
    rng = np.random.default_rng([recipe.seed, 1])
    order = batch_order(len(images), recipe.steps, recipe.batch_size, rng)
    # one random caption per sampled image and step, drawn up front so the run is a pure function of the seed
    pick = (rng.random(order.shape) * counts[order]).astype(np.int64)
    warm = warmup_steps(recipe.steps, recipe.warmup_frac)
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(recipe.steps), desc=f"pretrain {arch}", disable=not progress, mininterval=1.0)
    with deterministic(recipe.threads if not next(model.parameters()).is_cuda else None):
        for step in bar:
            lr = cosine_lr(step, recipe.steps, recipe.lr, warmup=warm, floor=recipe.lr * recipe.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[step]
            text = tokens[torch.as_tensor(flat[starts[idx] + pick[step]])]
            img_f, txt_f, scale = model(images[torch.as_tensor(idx)], text)
            loss = clip_loss(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            clamp_logit_scale_(model)
            losses.append(loss.item())
            if step % 20 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{lr:.1e}")
    bar.close()
    model.eval()
    stats = {"train_seconds": round(time.perf_counter() - t0, 1), "final_loss": float(np.mean(losses[-50:])),
             "first_loss": float(losses[0]), "logit_scale": model.logit_scale.exp().item()}
    return stats


# --------------------------------------------------------------------------------------------------- zero-shot table
def zero_shot_table(bench: Any, model: torch.nn.Module, bb: Any, backend: str = "memory",
                    seed: int = 0) -> list[dict[str, Any]]:
    """Full-test-set zero-shot records of every adapt/eval dataset, each with its chance level."""
    from fomo_ray.config import EvalConfig
    from fomo_ray.models.evaluation import Evaluator, chance_level

    ev = Evaluator(bench, EvalConfig(), seed, bb.image_size, bb.mean, bb.std, backend=backend)
    records = ev.evaluate(model, bb.tokenizer, full=True, weights_version="")
    for r in records:
        info = bench.datasets[r["dataset"]]
        r["chance"] = chance_level(r["metric"], len(info.classnames), r["n"])
    return records


def format_zero_shot(records: list[dict[str, Any]]) -> str:
    lines = [f"{'dataset':<22} {'role':<6} {'metric':<6} {'chance':>7} {'zero-shot':>9} {'n':>6}"]
    for r in records:
        lines.append(f"{r['dataset']:<22} {r['role']:<6} {r['metric']:<6} {100 * r['chance']:6.1f}% "
                     f"{100 * r['value']:8.1f}% {r['n']:>6}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- cache
def ensure_base_checkpoint(arch: str, bench: Any, *, recipe: PretrainConfig | None = None, force: bool = False,
                           progress: bool = True, backend: str = "memory", report: bool = True) -> Path:
    """The cached base checkpoint of ``arch`` for ``bench``; trains (and caches) it first if missing.

    The file is ``{"state_dict", "meta"}`` with meta holding the recipe, data hash, wall time, the zero-shot table
    and the platform it was trained on; it is written atomically, so a half-written checkpoint never looks complete.
    """
    if arch not in RECIPES:
        raise PretrainError(f"no pretraining recipe for '{arch}': base models are trained for {list(TINY_ARCHS)}; "
                            f"real architectures take an open_clip tag or a checkpoint file instead")
    recipe = recipe or RECIPES[arch]
    path = base_checkpoint_path(bench.root, arch, recipe, bench.manifest["content_hash"])
    if path.is_file() and not force:
        return path
    with _lock(path):  # concurrent trials train it once; the others wait and reuse it
        if path.is_file() and not force:
            return path
        return _train_and_save(arch, bench, recipe, path, progress, backend, report)


def _lock(path: Path):
    return file_lock(path.parent / f".{path.stem}.lock")


def _train_and_save(arch: str, bench: Any, recipe: PretrainConfig, path: Path, progress: bool, backend: str,
                    report: bool) -> Path:
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)  # open_clip initialises from the global generator
    bb = create_backbone(arch, pretrained="", device="cpu")
    images, captions = load_pool(bench, bb.image_size, bb.mean, bb.std, backend)
    stats = train_base(bb, images, captions, recipe, progress)
    model = bb.model
    table = zero_shot_table(bench, model, bb, backend=backend, seed=recipe.seed)
    stats["wall_seconds"] = round(time.perf_counter() - t0, 1)
    # the platform too: the recipe fixes the base only on one CPU kernel path (provenance.platform)
    meta = {**base_meta(bb), "recipe": dataclasses.asdict(recipe), "content_hash": bench.manifest["content_hash"],
            "stats": stats, "zero_shot": table, "platform": platform()}
    save_checkpoint(model, path, meta=json.loads(json.dumps(meta)))  # plain data only (weights_only loadable)
    if report:
        print(f"base model {arch}: {recipe.steps} steps x {recipe.batch_size} in {stats['train_seconds']} s "
              f"(total {stats['wall_seconds']} s), loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}\n"
              f"{format_zero_shot(table)}\ncheckpoint: {path}")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` of a base checkpoint (recipe, stats, zero-shot table)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("meta", {}) if isinstance(obj, dict) else {}
