"""Have batch t + 1 ready before step t ends: a bounded background producer, pinned host buffers, async copies.

``Prefetcher(make, steps, device, depth)`` yields ``make(step)`` for each step, with its tensors on ``device``.
With ``depth > 0`` a thread builds up to ``depth`` batches ahead (decoding releases the GIL, so it overlaps the
training step). On CUDA the host images live in pinned buffers and are copied with ``non_blocking=True`` on a
side stream; the training stream waits on the copy's event, never on the whole device. ``depth = 0`` builds each
batch when it is asked for, on the calling thread.

Prefetching never changes what is trained on: a batch is a pure function of its step, and the caller's cursor
counts the batches it *consumed* (a checkpoint taken at step k resumes at step k, whatever had been prefetched).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import torch

Batch = dict[str, Any]
_POLL_S = 0.2  # how often a blocked producer checks whether it was closed


class Prefetcher:
    """Iterator of ``make(step, out)`` for ``step in steps``, tensors moved to ``device``; use as a context manager
    (or call :meth:`close`) so the producer thread stops when the consumer leaves early."""

    def __init__(self, make: Callable[[int, torch.Tensor | None], Batch], steps: range, device: torch.device | str,
                 depth: int = 2, image_shape: tuple[int, ...] | None = None):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.make, self.steps, self.device, self.depth = make, steps, torch.device(device), int(depth)
        self._cuda = self.device.type == "cuda"
        self._next = iter(steps)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.depth))
        self._stop = threading.Event()
        # pinned host buffers, reused round-robin: depth queued + 1 being built + 1 being consumed
        self._pinned = ([torch.empty(image_shape, dtype=torch.uint8).pin_memory() for _ in range(self.depth + 2)]
                        if self._cuda and image_shape and self.depth else [])
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._pinned)
        self._stream = torch.cuda.Stream(self.device) if self._cuda and self.depth else None
        self._thread = None
        if self.depth and len(steps):
            self._thread = threading.Thread(target=self._produce, name="fomo-prefetch", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------- consumer side
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            return self._build(next(self._next), 0)[0]
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        batch, event = value
        if event is not None:  # the training stream waits for this batch's copy only
            torch.cuda.current_stream(self.device).wait_event(event)
            for v in batch.values():
                if isinstance(v, torch.Tensor) and v.is_cuda:
                    v.record_stream(torch.cuda.current_stream(self.device))
        return batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # ------------------------------------------------------------------------------------------- producer side
    def _produce(self) -> None:
        try:
            for k, step in enumerate(self.steps):
                if self._stop.is_set():
                    return
                if not self._put(("batch", self._build(step, k))):
                    return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(("error", e))

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _build(self, step: int, k: int) -> tuple[Batch, torch.cuda.Event | None]:
        slot = k % len(self._pinned) if self._pinned else None
        if slot is not None and self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the copy that last read this pinned buffer has finished
        batch = self.make(step, self._pinned[slot] if slot is not None else None)
        if self.device.type == "cpu":
            return batch, None
        if self._stream is None:
            return _to(batch, self.device), None
        with torch.cuda.stream(self._stream):
            moved = _to(batch, self.device)
            event = torch.cuda.Event()
            event.record(self._stream)
        if slot is not None:
            self._copied[slot] = event
        return moved, event


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
