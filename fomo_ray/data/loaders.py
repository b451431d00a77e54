"""Loaders over a benchmark split: batches of ``(images uint8 [B, H, W, 3], rows int64 [B])``.

Images stay uint8 on the host; the consumer moves them to its device and normalises them there
(:func:`fomo_ray.data.augment.model_input`).

Two backends give bit-identical batches:

- ``"ffcv"``: evaluation (``train=False``) runs an ``ffcv.loader.Loader`` over the split's beton with
  ``indices=`` (index sets over one file, never copies) and ``OrderOption.SEQUENTIAL``; images are decoded
  deterministically (``SimpleRGBImageDecoder`` for constant-size files, ``CenterCropRGBImageDecoder`` otherwise).
  Training order (``train=True``) is FFCV's RANDOM order from the seed; its images go through the compiled
  decode + RandomResizedCrop stage (:mod:`fomo_ray.data.decode`) with crop boxes seeded from ``(seed, epoch,
  batch)``, reading the beton through a memory map.
- ``"memory"``: the split is decoded once into RAM (cached per process; plain numpy for raw files, so it runs
  without FFCV) and batches are gathered from it in the same order, through the same compiled crop stage. A split
  whose decoded images (plus the splits this process already holds decoded) would take more than
  :data:`MEMORY_LOADER_RAM_SHARE` of the machine's RAM is refused (:class:`MemoryLoaderTooLarge`): the real FiF test
  sets decode to 100+ GB per process; ``data.loader=ffcv`` decodes each batch as it is read instead.

Decode threads (``num_workers``, the config's ``data.num_workers``): a positive value is used as given; 0 follows the
CPUs the process runs with (:func:`decode_threads`).

An FFCV ``Loader`` compiles its pipeline with numba on its first epoch (~2 s); compiled loaders are cached per
(file, batch size, order, decoder) and re-pointed at new index sets, so building another evaluation subset costs
nothing. Each batch's row ids are checked against the order computed here, so a change in FFCV's ordering would
fail loudly instead of silently breaking backend equality or exact resume.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .augment import RRC_RATIO, RRC_SCALE, generator_for, rrc_boxes
from .decode import ImageSource, beton_source, crop_resize, decode_all
from .ffcv_import import cache_typed_dict
from .format import Benchmark, DataError, beton_num_rows, read_images, read_row_meta

BACKENDS = ("ffcv", "memory")
_FFCV_LOADERS: "OrderedDict[tuple, object]" = OrderedDict()
_FFCV_CACHE_SIZE = 16
# Loaders dropped from the cache stay referenced: garbage-collecting a loader whose JPEG decoder was compiled
# trips a numba finalizer bug (KeyError in Dispatcher finalizer, printed as "Exception ignored").
_RETIRED: list = []
_DECODED: dict[tuple, torch.Tensor] = {}
_SOURCES: dict[tuple, ImageSource] = {}
_DECODE_SIZES: dict[tuple, int | None] = {}
_HELD: dict[tuple, int] = {}  # bytes of every split the "memory" backend holds decoded in this process

#: The "memory" backend refuses to decode a split when this process would then hold more than this share of the
#: machine's RAM (:func:`machine_ram_bytes`) in decoded splits. Per process: W data-parallel ranks on one node hold
#: W copies, so 25% already allows a 4-rank node to fill its RAM.
MEMORY_LOADER_RAM_SHARE = 0.25


class MemoryLoaderTooLarge(DataError):
    """``data.loader=memory`` would decode a split larger than :data:`MEMORY_LOADER_RAM_SHARE` of the machine's RAM
    into this process; the message names the split, its decoded size, the limit and ``data.loader=ffcv``."""


def decode_threads(num_workers: int) -> int:
    """Threads of the decode/crop stage (and of FFCV's evaluation loaders) for ``data.num_workers``: a positive
    value as given; 0 follows the CPUs the process runs with, i.e. torch's intra-op thread count, which a Ray trial
    pins to ``ray.cpus_per_worker`` (at least 1; ``fomo_ray.engine.ray_train.set_threads``) and a local ``fomo-ray run``
    leaves at torch's default (the machine's cores, or ``OMP_NUM_THREADS``). Always at least 1."""
    n = int(num_workers)
    if n < 0:
        raise DataError(f"data.num_workers must be >= 0 (0 = follow the process's CPUs), got {n}")
    return n if n > 0 else max(1, torch.get_num_threads())


def ffcv_available() -> bool:
    try:
        cache_typed_dict()
        import ffcv.loader  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def clear_caches() -> None:
    """Forget decoded splits and compiled FFCV loaders (tests, or after rebuilding a benchmark in-process)."""
    _RETIRED.extend(_FFCV_LOADERS.values())
    _FFCV_LOADERS.clear()
    release_decoded()


def release_decoded() -> None:
    """Forget the decoded splits (the RAM the "memory" backend holds, and counts against its guard), keeping the
    compiled loaders: what a trial that ends hands to the next one in its process is the code, not the data."""
    _DECODED.clear()
    _DECODE_SIZES.clear()
    _SOURCES.clear()
    _HELD.clear()


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise DataError(f"unknown loader backend {backend!r}; valid: {list(BACKENDS)}")
    if backend == "ffcv" and not ffcv_available():
        raise DataError("loader backend 'ffcv' needs the ffcv package; install it or use data.loader=memory")


def image_source(path: Path, backend: str) -> ImageSource:
    """What the compiled crop stage reads for ``backend``: the beton itself (memory-mapped), or, for the "memory"
    backend and JPEG files, every image decoded once into RAM (cached per process)."""
    key = (*_file_key(Path(path)), backend)
    if key not in _SOURCES:
        source = beton_source(path)
        if backend == "memory" and source.has_jpeg:
            nbytes = decoded_nbytes(Path(path))
            check_memory_split(path, len(source), nbytes)
            source = decode_all(source)
            _HELD[key] = nbytes
        _SOURCES[key] = source
    return _SOURCES[key]


# --------------------------------------------------------------------------------------------------- RAM guard
def machine_ram_bytes() -> int:
    """The RAM this process's machine has: physical memory, or a smaller cgroup (container) limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return int(total)


def decoded_nbytes(path: Path, rows: np.ndarray | None = None, size: int | None = None) -> int:
    """Bytes of ``rows`` (default: all) of a beton decoded to ``uint8``: stored height x width x 3 each, or
    ``size`` x ``size`` x 3 when decoding crops and resizes them (:func:`decode_size`)."""
    if size is not None:
        n = beton_num_rows(path) if rows is None else len(rows)
        return int(n) * int(size) * int(size) * 3
    img = read_row_meta(path)["image"]
    h, w = img["height"].astype(np.int64), img["width"].astype(np.int64)
    if rows is not None:
        h, w = h[rows], w[rows]
    return int((h * w).sum()) * 3


def check_memory_split(path: Path, rows: int, nbytes: int) -> None:
    """Refuse (:class:`MemoryLoaderTooLarge`) to decode a whole split of ``nbytes`` into this process when it would
    then hold more than :data:`MEMORY_LOADER_RAM_SHARE` of the machine's RAM in decoded splits."""
    held = sum(_HELD.values())
    ram = machine_ram_bytes()
    limit = int(MEMORY_LOADER_RAM_SHARE * ram)
    if held + nbytes <= limit:
        return
    path = Path(path)
    gb = 1e9
    already = f" (this process already holds {held / gb:.1f} GB of decoded splits)" if held else ""
    raise MemoryLoaderTooLarge(
        f"data.loader=memory refuses to decode split '{path.stem}' of {path.parent} ({rows:,} images): it would take "
        f"{nbytes / gb:.1f} GB of RAM in this process{already}, over the limit of {limit / gb:.1f} GB "
        f"({MEMORY_LOADER_RAM_SHARE:.0%} of this machine's {ram / gb:.1f} GB, per process; "
        f"fomo_ray.data.loaders.MEMORY_LOADER_RAM_SHARE); use data.loader=ffcv, which decodes each batch as it is "
        f"read")


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def decode_size(path: Path, image_size: int) -> int | None:
    """``None`` when every image of the file has one size (decoded as stored, resized in torch), else
    ``image_size`` (centre-crop-resized while decoding, the only way to batch differently sized images)."""
    key = (*_file_key(path), image_size)
    if key not in _DECODE_SIZES:
        img = read_row_meta(path)["image"]
        constant = len(img) == 0 or (np.all(img["height"] == img["height"][0]) and
                                     np.all(img["width"] == img["width"][0]))
        _DECODE_SIZES[key] = None if constant else int(image_size)
    return _DECODE_SIZES[key]


def ffcv_random_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The row order of ``OrderOption.RANDOM`` in epoch ``epoch`` (ffcv 1.0.2 ``traversal_order.Random``,
    non-distributed): ``default_rng(seed + epoch).permutation(indices)``."""
    return np.random.default_rng(seed + epoch).permutation(indices)


@contextlib.contextmanager
def _keep_torch_threads():
    # FFCV's Compiler.set_num_threads also calls torch.set_num_threads(num_workers); keep the caller's setting.
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------- FFCV backend
def _ffcv_loader(path: Path, indices: np.ndarray, batch_size: int, order: str, seed: int, drop_last: bool,
                 size: int | None, num_workers: int):
    """A cached, compiled ``ffcv.loader.Loader`` re-pointed at ``indices`` and ``seed``."""
    cache_typed_dict()
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.loader import ORDER_MAP
    from ffcv.transforms import ToTensor

    option = OrderOption.RANDOM if order == "random" else OrderOption.SEQUENTIAL
    key = (*_file_key(path), batch_size, order, drop_last, size, num_workers)
    loader = _FFCV_LOADERS.get(key)
    if loader is None:
        decoder = SimpleRGBImageDecoder() if size is None else CenterCropRGBImageDecoder((size, size), ratio=1.0)
        pipelines = {"image": [decoder, ToTensor()], "row": [IntDecoder(), ToTensor()], "dataset": None,
                     "label": None}
        with _keep_torch_threads():
            loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, order=option, seed=seed,
                            indices=indices, pipelines=pipelines, drop_last=drop_last)
        _FFCV_LOADERS[key] = loader
        while len(_FFCV_LOADERS) > _FFCV_CACHE_SIZE:
            _RETIRED.append(_FFCV_LOADERS.popitem(last=False)[1])
    else:
        # Re-point the compiled loader: the traversal order reads indices and seed from the loader when built.
        _FFCV_LOADERS.move_to_end(key)
        loader.indices, loader.seed = indices, seed
        loader.traversal_order = ORDER_MAP[option](loader)
        loader.first_traversal_order = loader.traversal_order.sample_order(0)  # what len(loader) measures
    return loader


def ffcv_batches(path: Path, indices: np.ndarray, batch_size: int, *, order: str, seed: int = 0, epoch: int = 0,
                 drop_last: bool = False, size: int | None = None, num_workers: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One FFCV epoch over ``indices``: ``(uint8 [b,H,W,3], rows int64 [b])`` per batch, copied out of FFCV's
    reused buffers. ``num_workers``: :func:`decode_threads`."""
    indices = np.asarray(indices, dtype=np.uint64)
    num_workers = decode_threads(num_workers)
    with _keep_torch_threads():
        loader = _ffcv_loader(path, indices, batch_size, order, seed, drop_last, size, num_workers)
        loader.next_epoch = epoch
        it = iter(loader)
    try:
        while True:
            with _keep_torch_threads():
                try:
                    images, rows = next(it)
                except StopIteration:
                    return
            yield images.clone(), rows.reshape(-1).to(torch.int64).clone()
    finally:
        it.close()


# --------------------------------------------------------------------------------------------------- memory backend
def decoded_split(path: Path, size: int | None = None, num_workers: int = 0) -> torch.Tensor:
    """All images of a beton as one ``uint8 [N, H, W, 3]`` tensor, decoded once per process.

    Raw constant-size files are read with numpy (bit-exact, no FFCV needed). Other files are decoded by FFCV
    when it is installed (so pixels equal the ffcv backend's), else by PIL (JPEG decoders may differ slightly).
    A split larger than :data:`MEMORY_LOADER_RAM_SHARE` of the RAM is refused (:func:`check_memory_split`).
    """
    path = Path(path)
    key = (*_file_key(path), size)
    if key not in _DECODED:
        meta = read_row_meta(path)
        nbytes = decoded_nbytes(path, size=size)
        check_memory_split(path, len(meta), nbytes)
        raw = bool(np.all(meta["image"]["mode"] == 1))
        if (raw and size is None) or not ffcv_available():
            images = torch.from_numpy(read_images(path, size=size))
        else:
            rows = np.arange(len(meta))
            batches = ffcv_batches(path, rows, 1024, order="sequential", size=size, num_workers=num_workers)
            images = torch.cat([im for im, _ in batches])
        _DECODED[key] = images
        _HELD[("decoded", *key)] = images.numel()
    return _DECODED[key]


def memory_batches(images: torch.Tensor, order: np.ndarray, batch_size: int, start: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for k in range(start, -(-len(order) // batch_size)):
        rows = torch.from_numpy(np.asarray(order[k * batch_size:(k + 1) * batch_size], dtype=np.int64))
        yield images[rows], rows


# --------------------------------------------------------------------------------------------------- loader
def check_rows(bench: Benchmark, split: str, indices: Sequence[int] | np.ndarray, what: str = "indices") -> np.ndarray:
    """``indices`` as a 1-D int64 array, checked to lie inside ``split``."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (len(idx) and not np.issubdtype(idx.dtype, np.integer)):
        raise DataError(f"{what} for split '{split}' must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64)
    n = bench.num_rows(split)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
        raise DataError(f"{what} {bad} out of range for split '{split}' of {bench.root} ({n} rows)")
    return idx


class BatchLoader:
    """Iterating gives one epoch of ``(images, rows)`` batches; each iteration starts the next epoch.

    ``train=True``: random order from ``(seed, epoch)`` exactly as FFCV's RANDOM order, CLIP RandomResizedCrop to
    ``image_size`` seeded from ``(seed, epoch, batch)``, incomplete last batch dropped. ``train=False``:
    ``indices`` in the given order, images as stored (centre-cropped to ``image_size`` for files of mixed sizes),
    every row once. Resume: ``set_epoch(e)`` or ``epoch_batches(e, start_batch=k)``.
    """

    def __init__(self, bench: Benchmark, split: str, indices: np.ndarray, batch_size: int, *, train: bool, seed: int,
                 image_size: int, backend: str, num_workers: int, drop_last: bool):
        self.bench, self.split, self.indices = bench, split, indices
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.image_size, self.backend, self.num_workers = int(image_size), backend, decode_threads(num_workers)
        self.drop_last = bool(drop_last)
        self.path = bench.split_path(split)
        self.size = decode_size(self.path, self.image_size)
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """Row ids of ``epoch`` in the order they are served (complete batches only when ``drop_last``)."""
        order = ffcv_random_order(self.indices, self.seed, epoch) if self.train else self.indices
        return order[:len(self) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self.epoch_batches(epoch)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        expected = self.order(epoch)
        if self.train:
            yield from self._train_batches(epoch, expected, start_batch)
            return
        for k, (images, rows) in enumerate(self._eval_batches(expected, start_batch), start=start_batch):
            want = expected[k * self.batch_size:(k + 1) * self.batch_size]
            if not np.array_equal(rows.numpy(), want):
                raise DataError(f"{self.backend} loader over {self.path} returned rows out of the expected order "
                                f"in epoch {epoch}, batch {k} (FFCV's order changed?)")
            yield images, rows

    def _train_batches(self, epoch: int, order: np.ndarray, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source = image_source(self.path, self.backend)
        for k in range(start, len(order) // self.batch_size):
            rows = order[k * self.batch_size:(k + 1) * self.batch_size].astype(np.int64)
            boxes = rrc_boxes(torch.from_numpy(source.height[rows]), torch.from_numpy(source.width[rows]),
                              generator_for(self.seed, epoch, k), RRC_SCALE, RRC_RATIO)
            images = crop_resize(source, rows, boxes.numpy(), self.image_size, num_threads=self.num_workers)
            yield torch.from_numpy(images), torch.from_numpy(rows)

    def _eval_batches(self, order: np.ndarray, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.backend == "memory":
            return memory_batches(decoded_split(self.path, self.size, self.num_workers), order, self.batch_size, start)
        batches = ffcv_batches(self.path, self.indices, self.batch_size, order="sequential", seed=self.seed,
                               drop_last=self.drop_last, size=self.size, num_workers=self.num_workers)
        # FFCV has no "start at batch k": skipping decodes those batches (cheap; only used when resuming)
        return (b for k, b in enumerate(batches) if k >= start)


def make_loader(bench: Benchmark, split: str, indices: Sequence[int] | np.ndarray, batch_size: int, *, train: bool,
                seed: int, image_size: int, backend: str = "ffcv", num_workers: int = 0,
                drop_last: bool | None = None) -> BatchLoader:
    """A loader over rows ``indices`` of ``split`` (docs/ARCHITECTURE.md "Data: loading"); ``drop_last`` defaults
    to ``train``; ``num_workers`` decode threads (:func:`decode_threads`: 0 follows the process's CPUs)."""
    check_backend(backend)
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if int(image_size) < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    idx = check_rows(bench, split, indices)
    if len(idx) == 0:
        raise DataError(f"loader over split '{split}' of {bench.root}: no rows selected")
    drop_last = train if drop_last is None else drop_last
    if drop_last and len(idx) < batch_size:
        raise DataError(f"loader over split '{split}': {len(idx)} rows give no complete batch of {batch_size} "
                        f"(pass drop_last=False or a smaller batch_size)")
    return BatchLoader(bench, split, idx, batch_size, train=train, seed=seed, image_size=image_size, backend=backend,
                       num_workers=num_workers, drop_last=drop_last)
