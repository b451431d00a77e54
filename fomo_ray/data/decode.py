"""The compiled image stage: decode a beton's images and crop-resize them to ``uint8 [n, S, S, 3]`` in one pass.

This is FFCV's decoder stage (``ffcv.fields.rgb_image.ResizedCropRGBImageDecoder``) with one change that matters
here: the crop boxes are an *input*. FFCV draws its crops from numpy's global RNG inside numba threads, so its
crops cannot be reproduced and a resumed run would see other pixels. Here the boxes come from the seeded plan
(:func:`fomo_ray.data.augment.rrc_boxes`), and the stage is a pure function of (file, rows, boxes, size).

Like FFCV's stage it is compiled with numba (``parallel=True``, ``nogil=True``, one image per ``prange``
iteration), reads the file through a memory map, and decodes JPEG rows with FFCV's libjpeg-turbo ``imdecode``.
The resampling is our own separable triangle filter (bilinear, antialiased when shrinking, like PIL's BILINEAR and
torchvision's ``antialias=True``), done in float32 and rounded once, so it needs neither OpenCV nor FFCV: the
"memory" backend on a machine without FFCV (raw files) runs the same code and gets the same bytes. Without numba
the same functions run as plain Python (slow; only for the GPU check's tiny images).

The images never leave uint8 on the host: conversion to the model's dtype and CLIP normalisation happen on the
device (:func:`fomo_ray.data.augment.model_input`), which moves 4x fewer bytes and does the float work where it is
cheap.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ffcv_import import cache_typed_dict
from .format import _MODE_JPG, _MODE_RAW, DataError, _alloc_sizes, _decode_jpeg, read_row_meta

try:  # numba is a dependency wherever FFCV is; the GPU check's machine may lack both
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - exercised only on machines without numba
    numba = None
    prange = range


def _jit(parallel: bool):
    if numba is None:
        return lambda f: f
    return numba.njit(parallel=parallel, nogil=True, cache=False, error_model="numpy")


def _ffcv_imdecode():
    try:
        cache_typed_dict()
        from ffcv.libffcv import imdecode
    except Exception:  # noqa: BLE001 - any failure means "no FFCV JPEG decoder here"
        return None
    return imdecode


# --------------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class ImageSource:
    """Where every row's pixels are: a flat uint8 buffer (a beton's memory map, or decoded images in RAM) and per-row
    ``ptr``/``nbytes``/``height``/``width``/``mode`` (FFCV's metadata layout: mode 0 JPEG, 1 raw RGB)."""

    data: np.ndarray
    ptr: np.ndarray
    nbytes: np.ndarray
    height: np.ndarray
    width: np.ndarray
    mode: np.ndarray
    where: str

    @property
    def has_jpeg(self) -> bool:
        return bool((self.mode == _MODE_JPG).any())

    def __len__(self) -> int:
        return len(self.ptr)


def beton_source(path: str | os.PathLike) -> ImageSource:
    """The images of a beton, memory-mapped (nothing is read until decoded)."""
    path = Path(path)
    img = read_row_meta(path)["image"]
    mode = img["mode"].astype(np.uint8)
    height, width = img["height"].astype(np.int64), img["width"].astype(np.int64)
    ptr = img["data_ptr"].astype(np.int64)
    nbytes = height * width * 3
    if (mode == _MODE_JPG).any():
        sizes = _alloc_sizes(path, img)
        nbytes = np.where(mode == _MODE_JPG, [sizes.get(int(p), 0) for p in ptr.tolist()], nbytes).astype(np.int64)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return ImageSource(np.asarray(data), ptr, nbytes, height, width, mode, str(path))


def array_source(images: list[np.ndarray] | np.ndarray, where: str = "memory") -> ImageSource:
    """Decoded ``uint8 HxWx3`` images (sizes may differ) as a raw in-memory source."""
    shapes = np.array([im.shape[:2] for im in images], dtype=np.int64).reshape(-1, 2)
    nbytes = shapes[:, 0] * shapes[:, 1] * 3
    ptr = np.zeros(len(images), dtype=np.int64)
    np.cumsum(nbytes[:-1], out=ptr[1:]) if len(images) > 1 else None
    data = (np.concatenate([np.ascontiguousarray(im).reshape(-1) for im in images]) if len(images)
            else np.zeros(0, np.uint8))
    data.setflags(write=False)  # like a beton's memory map: one array type, so the kernel compiles once
    return ImageSource(data, ptr, nbytes, shapes[:, 0].copy(), shapes[:, 1].copy(),
                       np.full(len(images), _MODE_RAW, np.uint8), where)


def decode_all(source: ImageSource) -> ImageSource:
    """Every image of ``source`` decoded into RAM (the "memory" backend's cache), as a raw source."""
    rows = np.arange(len(source))
    if not source.has_jpeg:
        images = [source.data[p:p + n].reshape(h, w, 3) for p, n, h, w in
                  zip(source.ptr.tolist(), source.nbytes.tolist(), source.height.tolist(), source.width.tolist())]
        return array_source([np.array(im) for im in images], source.where)
    return array_source(decode_rows(source, rows), source.where)


# --------------------------------------------------------------------------------------------------- boxes
def full_boxes(source: ImageSource, rows: np.ndarray) -> np.ndarray:
    """``int64 [n, 4] = (top, left, h, w)`` covering each whole image (no crop)."""
    rows = np.asarray(rows, dtype=np.int64)
    z = np.zeros(len(rows), np.int64)
    return np.stack([z, z, source.height[rows], source.width[rows]], 1)


# --------------------------------------------------------------------------------------------------- the stage
def crop_resize(source: ImageSource, rows: np.ndarray, boxes: np.ndarray, size: int,
                out: np.ndarray | None = None, num_threads: int = 1) -> np.ndarray:
    """``uint8 [n, size, size, 3]``: row ``rows[i]`` decoded, cropped to ``boxes[i] = (top, left, h, w)`` and
    resized to ``size`` (see module docstring). ``out`` (e.g. a pinned buffer) is filled in place when given."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    boxes = np.ascontiguousarray(boxes, dtype=np.int64).reshape(-1, 4)
    if len(rows) != len(boxes):
        raise DataError(f"{source.where}: {len(rows)} rows but {len(boxes)} crop boxes")
    _check_rows(source, rows)
    bad = ((boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] < 1) | (boxes[:, 3] < 1)
           | (boxes[:, 0] + boxes[:, 2] > source.height[rows]) | (boxes[:, 1] + boxes[:, 3] > source.width[rows]))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source.where}: crop box {boxes[i].tolist()} lies outside row {int(rows[i])}'s "
                        f"{int(source.height[rows[i]])}x{int(source.width[rows[i]])} image")
    if out is None:
        out = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    elif out.shape != (len(rows), size, size, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise DataError(f"crop_resize: out must be contiguous uint8 {(len(rows), size, size, 3)}, got "
                        f"{out.dtype} {out.shape}")
    if len(rows) == 0:
        return out
    _run(_crop_resize_kernel(source), source, rows, boxes, out, num_threads)
    return out


def decode_rows(source: ImageSource, rows: np.ndarray) -> list[np.ndarray]:
    """The stored pixels of ``rows`` (no crop, no resize), one ``uint8 HxWx3`` array each: raw rows are copied,
    JPEG rows decoded by FFCV's libjpeg-turbo ``imdecode`` (by PIL without FFCV, whose pixels may differ a little)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    _check_rows(source, rows)
    imdecode = _ffcv_imdecode() if source.has_jpeg else None
    out = []
    for r in rows.tolist():
        h, w, p, n = (int(source.height[r]), int(source.width[r]), int(source.ptr[r]), int(source.nbytes[r]))
        if source.mode[r] == _MODE_RAW:
            out.append(np.array(source.data[p:p + n].reshape(h, w, 3)))
        elif imdecode is None:
            out.append(_decode_jpeg(bytes(source.data[p:p + n])))
        else:
            dst = np.empty((h, w, 3), np.uint8)
            imdecode(source.data[p:p + n], dst, h, w, h, w, 0, 0, 1, 1, False, False)
            out.append(dst)
    return out


def _check_rows(source: ImageSource, rows: np.ndarray) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= len(source)):
        raise DataError(f"{source.where}: row ids out of range [0, {len(source)})")


_LOCK = threading.Lock()
_KERNELS: dict[bool, object] = {}


def _crop_resize_kernel(source: ImageSource):
    """The compiled kernel, with FFCV's JPEG decoder when the source has JPEG rows (compiled once per process)."""
    jpeg = source.has_jpeg
    with _LOCK:
        if jpeg not in _KERNELS:
            imdecode = _ffcv_imdecode() if jpeg else None
            if jpeg and imdecode is None:
                raise DataError(f"{source.where} holds JPEG images: decoding them in the compiled stage needs FFCV "
                                f"(data.loader=memory decodes them once with PIL instead)")
            _KERNELS[jpeg] = _make_kernel(_jpeg_loader(imdecode) if jpeg else _raw_loader())
        return _KERNELS[jpeg]


def _run(kernel, source: ImageSource, rows, boxes, out, num_threads: int) -> None:
    threads = max(1, min(num_threads, numba.config.NUMBA_NUM_THREADS if numba else 1))
    side = int(out.shape[1])
    pixels = int((source.height[rows] * source.width[rows]).max()) * 3 if source.has_jpeg else 0
    scratch = np.empty((threads, max(pixels, 1)), np.uint8)  # one decoded image per thread
    tmp = np.empty((threads, int(boxes[:, 3].max()) * side * 3), np.float32)
    args = (source.data, source.ptr, source.nbytes, source.height, source.width, source.mode, rows, boxes, out,
            scratch, tmp)
    if numba is None:
        kernel(*args)
        return
    before = numba.get_num_threads()
    numba.set_num_threads(threads)  # thread-local in numba: the training thread's setting is not touched
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(before)


if numba is not None:
    _thread_id = numba.njit(lambda: numba.get_thread_id())
else:  # pragma: no cover - plain Python runs one image at a time
    def _thread_id() -> int:
        return 0


def _raw_loader():
    @_jit(parallel=False)
    def load(data, p, n, h, w, mode, scratch):
        return data[p:p + h * w * 3]
    return load


def _jpeg_loader(imdecode):
    imdecode = _jit(parallel=False)(imdecode)  # FFCV's ctypes call into libjpeg-turbo, compiled as FFCV does

    @_jit(parallel=False)
    def load(data, p, n, h, w, mode, scratch):
        if mode == 1:
            return data[p:p + h * w * 3]
        img = scratch[:h * w * 3]
        imdecode(data[p:p + n], img, h, w, h, w, 0, 0, 1, 1, False, False)
        return img
    return load


def _make_kernel(load):
    taps = _jit(parallel=False)(axis_taps)

    @_jit(parallel=True)
    def kernel(data, ptr, nbytes, height, width, mode, rows, boxes, out, scratch, tmp):
        size = out.shape[1]
        for i in prange(len(rows)):
            r = rows[i]
            tid = _thread_id()
            w = width[r]
            img = load(data, ptr[r], nbytes[r], height[r], w, mode[r], scratch[tid])  # flat HxWx3 pixels
            top, left, bh, bw = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            dst = out[i].reshape(size * size * 3)
            if bh == size and bw == size:  # nothing to resample: copy the window
                for y in range(size):
                    a = ((top + y) * w + left) * 3
                    dst[y * size * 3:(y + 1) * size * 3] = img[a:a + size * 3]
                continue
            yi, yw = taps(top, bh, size)
            xi, xw = taps(left, bw, size)
            span = bw * 3
            cols = tmp[tid, :size * span]
            for y in range(size):  # vertical pass first: whole rows, contiguous slices (numba vectorises them)
                acc = cols[y * span:(y + 1) * span]
                acc[:] = 0.0
                for k in range(yi.shape[1]):
                    wk = yw[y, k]
                    a = (yi[y, k] * w + left) * 3
                    src = img[a:a + span]
                    for j in range(span):
                        acc[j] += wk * np.float32(src[j])
            xo = (xi - left) * 3
            for y in range(size):  # horizontal pass; +0.5 then truncation rounds once to uint8
                acc = cols[y * span:(y + 1) * span]
                row = dst[y * size * 3:(y + 1) * size * 3]
                for x in range(size):
                    a0 = np.float32(0.5)
                    a1 = np.float32(0.5)
                    a2 = np.float32(0.5)
                    for k in range(xo.shape[1]):
                        wk = xw[x, k]
                        j = xo[x, k]
                        a0 += wk * acc[j]
                        a1 += wk * acc[j + 1]
                        a2 += wk * acc[j + 2]
                    row[3 * x] = np.uint8(min(np.float32(255.0), max(np.float32(0.0), a0)))
                    row[3 * x + 1] = np.uint8(min(np.float32(255.0), max(np.float32(0.0), a1)))
                    row[3 * x + 2] = np.uint8(min(np.float32(255.0), max(np.float32(0.0), a2)))
    return kernel


def axis_taps(start: int, length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices ``[size, K]`` and float32 weights ``[size, K]`` resampling the window ``[start,
    start + length)`` of one axis to ``size`` pixels with a triangle filter (bilinear; its radius grows with the
    shrink factor, which antialiases). Pixel centres map as with ``align_corners=False``; taps outside the window
    get no weight (the rest is renormalised), as when cropping first and resizing the crop with PIL or torch's
    ``antialias=True``. K = ceil(2 * radius): the pixels whose centres lie strictly inside the filter."""
    scale = length / size
    support = max(scale, 1.0)
    k = int(math.ceil(2.0 * support))
    idx = np.empty((size, k), np.int64)
    wgt = np.empty((size, k), np.float32)
    for i in range(size):
        center = start + (i + 0.5) * scale
        lo = int(math.floor(center - support - 0.5)) + 1
        total = 0.0
        for j in range(k):
            x = (lo + j + 0.5 - center) / support
            inside = start <= lo + j < start + length
            wj = max(0.0, 1.0 - abs(x)) if inside else 0.0
            idx[i, j] = min(max(lo + j, start), start + length - 1)
            wgt[i, j] = wj
            total += wj
        for j in range(k):
            wgt[i, j] = wgt[i, j] / total
    return idx, wgt
