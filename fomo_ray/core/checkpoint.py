"""The loop's resume state: what a checkpoint holds, how it is written and read, and how a run continues from it.

A :class:`LoopState` holds everything an exact resume needs (model incl. adapters, optimizer mid-task, method,
buffer, all RNG states, the (task, step) cursor, results so far). ``run_stream(cfg, resume=state)`` continues from it
and ends with metrics bitwise identical to the uninterrupted run on CPU (the reference code lost its merge history,
adapters, RNG state and stream position on resume: docs/BENCHMARK.md §Reference faults). Files are read with
``torch.load(weights_only=True)``: numpy arrays travel wrapped as tensors, never pickled.

Off the critical path: under data parallelism only rank 0 takes a snapshot (:func:`take_snapshot`; the weights and
method state are replicated, so rank 0's state is every rank's), the others get a :class:`CheckpointMarker` (the
cursor, no tensors). Writing a state happens in a background thread (:func:`save_state_in_background`, or a writer
registered with :func:`register_write`, e.g. Ray Train's checkpoint upload thread), and the run's next snapshot waits
for it first (:func:`wait_for_write`): at most one host copy of a run's state is in flight, and a write never
overlaps the next snapshot.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from fomo_ray.atomic import torch_save
from fomo_ray.models.metrics import with_point_key
from fomo_ray.seeding import rng_state, set_rng_state

LOOP_STATE_FILE = "loop_state.pt"
STATE_FORMAT = "fomo_ray.loop_state/v1"


@dataclass
class LoopState:
    """Everything needed to continue a run exactly: the cursor says the next (task, step) to run."""

    run: str
    task: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # AdamW state mid-task; None at a task boundary (the next task starts fresh)
    method: dict[str, Any]
    buffer: dict[str, Any]
    rng: dict[str, Any]
    results: list[dict[str, Any]]
    config_hash: str = ""
    scaler: dict[str, Any] | None = None  # fp16 loss-scaler state mid-task (bf16/fp32 need none)

    @property
    def mid_task(self) -> bool:
        """True when the cursor is inside a task (its optimizer, scaler and RNG continue where they stopped)."""
        return self.step > 0


@dataclass
class Resumed:
    """Where :func:`restore` leaves a run: the cursor, the results so far and, mid-task, the live optimizer and
    loss scaler of the interrupted task (``None`` at a task boundary: the next task starts fresh)."""

    task: int
    step: int
    results: list[dict[str, Any]]
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None


def _plain(obj: Any, copy_tensors: bool = True) -> Any:
    """``obj`` with numpy arrays wrapped as tensors, so ``torch.load(weights_only=True)`` reads it: a detached CPU
    deep copy (a snapshot, safe to keep while training goes on), or with ``copy_tensors=False`` the same structure
    around the very tensors (writing a snapshot, which is already a private copy: a second one would double a large
    model's host RAM for the length of the write)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=copy_tensors)
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        return {"__ndarray__": torch.from_numpy(array.copy() if copy_tensors else array)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _plain(v, copy_tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, copy_tensors) for v in obj)
    return copy.deepcopy(obj) if copy_tensors else obj


def _unplain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _unplain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unplain(v) for v in obj)
    return obj


def save_state(state: LoopState, directory: str | Path) -> Path:
    """Write ``state`` to ``directory/loop_state.pt`` atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}  # asdict would deep-copy tensors
    payload = {"format": STATE_FORMAT, **_plain(fields, copy_tensors=False)}
    return torch_save(payload, directory / LOOP_STATE_FILE)


def load_state(directory: str | Path) -> LoopState:
    """Read what :func:`save_state` wrote (tensors only: ``weights_only=True``). The results rows of a state written
    before the evaluation point's key was named ``point`` (it was ``task``) are read with it renamed
    (:func:`fomo_ray.models.metrics.with_point_key`), so ``fomo-ray run --resume`` of an older run still works."""
    path = Path(directory) / LOOP_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no loop state at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, garbage or foreign pickles all mean: not a loop state
        first = (str(e).strip().splitlines() or [""])[0][:160]  # torch's unpickler explains over several lines
        raise ValueError(f"{path} is not a readable {STATE_FORMAT} file ({type(e).__name__}: {first})") from e
    if not isinstance(payload, dict) or payload.pop("format", None) != STATE_FORMAT:
        raise ValueError(f"{path} is not a {STATE_FORMAT} file")
    state = LoopState(**_unplain(payload))
    state.results = with_point_key(state.results)
    return state


@dataclass(frozen=True)
class CheckpointMarker:
    """What a data-parallel rank other than 0 gets instead of a :class:`LoopState`: where the checkpoint was taken
    (the same cursor as rank 0's state), no tensors. Every rank still reports the checkpoint (Ray Train V2's report
    is a barrier); rank 0 alone writes the state."""

    run: str
    task: int
    step: int
    optimizer: None = None  # like a task-boundary LoopState's, for code that reads the cursor only

    @property
    def mid_task(self) -> bool:
        return self.step > 0


def snapshots_here() -> bool:
    """Whether this process takes checkpoint snapshots: rank 0 of a data-parallel run, and a single process."""
    from fomo_ray.core import distributed

    return distributed.is_rank_zero()


def take_snapshot(run: Any, task: int, step: int, optimizer: torch.optim.Optimizer | None,
                  scaler: torch.amp.GradScaler | None, results: list[dict[str, Any]]) -> LoopState | CheckpointMarker:
    """:func:`snapshot` on the rank that writes checkpoints (:func:`snapshots_here`), a :class:`CheckpointMarker`
    elsewhere (no host copy of the state on ranks that would only drop it)."""
    if not snapshots_here():
        return CheckpointMarker(run.name, task, step)
    return snapshot(run, task, step, optimizer, scaler, results)


def snapshot(run: Any, task: int, step: int, optimizer: torch.optim.Optimizer | None,
             scaler: torch.amp.GradScaler | None, results: list[dict[str, Any]]) -> LoopState:
    """A detached CPU copy of everything an exact resume of ``run`` (an ``assembly.Run``) needs; safe to keep while
    training continues. Waits first for the background write of this run's previous snapshot (and raises its
    error), so a run never holds two snapshots in flight."""
    wait_for_write(run.name)
    return LoopState(run=run.name, task=task, step=step, model=_plain(run.model.state_dict()),
                     optimizer=_plain(optimizer.state_dict()) if optimizer is not None else None,
                     method=_plain(run.method.state_dict()), buffer=_plain(run.buffer.state_dict()),
                     rng=_plain(rng_state()), results=copy.deepcopy(results), config_hash=run.cfg.config_hash(),
                     scaler=_plain(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None)


def restore(run: Any, state: LoopState) -> Resumed:
    """Put ``run`` back where ``state`` was taken: model (adapters included), method and buffer always; mid-task also
    the task's optimizer, loss scaler and every RNG, so the next step is the one the interrupted run would have taken.

    Raises ValueError when the state belongs to another run or config (a silent mix would corrupt the results).
    """
    from fomo_ray.maths.optim import make_optimizer

    if state.run != run.name or (state.config_hash and state.config_hash != run.cfg.config_hash()):
        raise ValueError(f"resume state belongs to run '{state.run}', not to '{run.name}' (config changed?)")
    run.model.load_state_dict(state.model)
    run.method.load_state_dict(state.method)
    run.buffer.load_state_dict(state.buffer)
    resumed = Resumed(state.task, state.step, list(state.results))
    if state.mid_task:
        run.model.train()
        resumed.optimizer = make_optimizer(run.model, run.cfg)
        resumed.optimizer.load_state_dict(state.optimizer)
        resumed.scaler = run.new_scaler()
        if state.scaler:
            resumed.scaler.load_state_dict(state.scaler)
        set_rng_state(state.rng)
    return resumed


# --------------------------------------------------------------------------------------------------- background writes
_WRITES: dict[str, Future] = {}  # run name -> the write of its newest snapshot (done or not)
_WRITES_LOCK = threading.Lock()
_WRITER: list[ThreadPoolExecutor] = []  # one thread: writes leave in the order they were taken


def register_write(run: str, future: Future) -> None:
    """Record ``future`` as the write of run ``run``'s newest snapshot (whatever thread performs it): the run's next
    :func:`snapshot` (and :func:`wait_for_write`) waits for it. The previous one must have been waited for."""
    with _WRITES_LOCK:
        _WRITES[run] = future


def wait_for_write(run: str) -> None:
    """Wait for the background write of run ``run``'s newest snapshot, if any, and raise its error here (on the
    training thread: a checkpoint that failed to be written fails the run, as a synchronous write would)."""
    with _WRITES_LOCK:
        future = _WRITES.pop(run, None)
    if future is not None:
        future.result()


def write_in_background(run: str, job: Callable[[], Any]) -> Future:
    """Run ``job`` (writing a snapshot of run ``run``) on the checkpoint writer thread, after the run's previous write
    finished; returns its future (also registered: :func:`register_write`)."""
    wait_for_write(run)
    with _WRITES_LOCK:
        if not _WRITER:
            _WRITER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="fomo_ray-checkpoint"))
        future = _WRITER[0].submit(job)
        _WRITES[run] = future
    return future


def save_state_in_background(state: LoopState, directory: str | Path,
                             then: Callable[[], Any] | None = None) -> Future:
    """:func:`save_state` on the writer thread (``then`` after it, e.g. an upload of the written files)."""
    def job() -> None:
        save_state(state, directory)
        if then is not None:
            then()

    return write_in_background(state.run, job)
