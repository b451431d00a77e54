"""The sweep driver's Tune callbacks: one line of progress per event, the restore drill, and the relay that lets a
restored experiment report to the driver that resumes it (``tune_sweep.py`` installs them; the only other ``ray.tune``
import)."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ray import tune

from fomo_ray import trial_report
from fomo_ray.results.sweep_results import infrastructure_reason
from fomo_ray.trial_report import ReportKind


class Progress(tune.Callback):
    """One line per evaluation point and per finished trial (Tune's own status tables are switched off)."""

    def __init__(self, total: int, points: int, out: Any = None, attempts: int = 0,
                 preempted: Preemptions | None = None) -> None:
        self.total, self.points, self.out, self.t0, self.attempts = total, points, out, time.time(), attempts
        self.preempted = preempted  # placed before this callback: it has classified a restart when we print it

    def _line(self, text: str) -> None:
        el = int(time.time() - self.t0)
        print(f"[{el // 60:02d}:{el % 60:02d}] {text}", file=self.out or sys.stdout, flush=True)

    def _count(self, trials: list, trial: Any) -> str:
        # from the trials' states, so a restored sweep counts the trials finished before the interrupt
        n = sum(1 for t in trials if t is trial or t.status in ("TERMINATED", "ERROR"))
        return f"({n}/{self.total} trials)"

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(f"start  {trial}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial_report.is_kind(result, ReportKind.EVAL):
            self._line(f"eval   {trial}  {trial_report.point_line(result['point'], self.points, result)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if trial_report.is_kind(last, ReportKind.FAILED):  # one line: the reason and where the trial's files are
            self._line(f"FAILED {trial}  {str(last.get('reason', ''))[:300]}  {self._count(trials, trial)}  "
                       f"(trial directory: {getattr(trial, 'path', '')})")
            return
        if trial_report.is_kind(last, ReportKind.STOPPED):  # by the sweep's early-stopping rule, with its numbers
            self._line(f"stop   {trial}  {str(last.get('reason', ''))[:300]}  {self._count(trials, trial)}")
            return
        self._line(f"done   {trial}  {self._count(trials, trial)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        reason, log = trial_error(trial)
        if trial.trial_id in (self.preempted.just if self.preempted else ()):
            self._line(f"preempt {trial}  its node was preempted: restarting from its latest checkpoint (not a "
                       f"failure; full log: {log})")
            return
        of = f" of {self.attempts}" if self.attempts else ""
        self._line(f"retry  {trial}  {reason}  (attempt {trial.num_failures + 1}{of}; full log: {log})")

    def on_trial_error(self, iteration, trials, trial, **info):
        reason, log = trial_error(trial)
        if infrastructure_reason(reason):  # the machine ended it, not its code: the sweep ends interrupted
            self._line(f"LOST   {trial}  {reason}  {self._count(trials, trial)}  (retries used up: interrupted, "
                       f"a resume retries it; full log: {log})")
            return
        self._line(f"FAILED {trial}  {reason}  {self._count(trials, trial)}  (full log: {log})")


def trial_error(trial: Any) -> tuple[str, str]:
    """(the last line of a trial's error, the path of its full log): what the sweep prints instead of Ray's
    traceback (switched off by :func:`ensure_ray`)."""
    log = f"{trial.path}/error.txt"  # in the sweep's storage (kept); Ray's session copy is temporary
    text = ""
    for path in (trial.error_file, log):  # the session copy exists first; storage receives it on the next sync
        with contextlib.suppress(OSError, TypeError):
            text = Path(path).read_text()
            break
    lost = infrastructure_reason(text)  # Ray's own text for those ends with its documentation links
    if lost:
        return lost[:300], log
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1][:300] if lines else "(no error message)"), log


class QuietTune(logging.Filter):
    """Drops Tune's closing "Trials did not complete" log line: the sweep's summary counts and names failed trials."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trials did not complete")


class QuietPending(logging.Filter):
    """Drops the lines of Tune's "Failed to fetch metrics" warning that name a trial which never started (no trial
    directory yet): a restored or interrupted sweep lists every pending trial there, and the sweep's own counts say
    which are pending. A started trial whose results are missing keeps its line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Failed to fetch metrics"):
            return True
        kept = [line for line in text.splitlines()[1:] if not _never_started(line)]
        if not kept:
            return False
        record.msg, record.args = f"Failed to fetch metrics for {len(kept)} started trial(s):\n" + "\n".join(kept), ()
        return True


def _never_started(line: str) -> bool:
    """``- <trial>: FileNotFoundError('... were not found at <dir>')`` naming a trial directory that does not exist in
    an experiment directory that does, or one with an ``error.txt`` (an errored trial: the sweep's trials table
    lists it with its reason). Remote storage is not judged here: its lines are kept."""
    where = line.rsplit(" were not found at ", 1)
    trial_dir = Path(where[-1].rstrip("')\""))
    return len(where) == 2 and trial_dir.parent.is_dir() and (not trial_dir.exists()
                                                              or (trial_dir / "error.txt").is_file())


class StopAfter(tune.Callback):
    """Interrupt the sweep, as Ctrl-C would, once ``n`` trials completed (a drill for Tuner.restore)."""

    def __init__(self, n: int) -> None:
        self.n, self.done = n, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done >= self.n:
            os.kill(os.getpid(), signal.SIGINT)  # Tune saves the experiment state and returns


_HOOKS = ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore", "on_trial_save",
          "on_trial_result", "on_trial_complete", "on_trial_recover", "on_trial_error", "on_checkpoint",
          "on_experiment_end")


class DriverCallbacks(tune.Callback):
    """The one callback a sweep's Tuner holds: it forwards every hook to the callbacks of the sweep this process is
    driving now (:meth:`installed`).

    Tune pickles its ``RunConfig`` (callbacks included) with the experiment, and ``Tuner.restore`` brings back the
    pickled callbacks, not the ones of the resuming driver (Ray documents that only stateless callbacks are supported
    for resumed runs). This one is stateless: the pickled copy forwards to the live callbacks of whichever driver
    runs the experiment, so a restored sweep reports progress with a fresh clock and no drill of the interrupted run
    (:class:`StopAfter`) is carried over. ``Tuner.fit`` blocks, so a process drives one sweep at a time.
    """
    _live: list[Any] = []  # the callbacks of the sweep this process is running now

    @classmethod
    @contextlib.contextmanager
    def installed(cls, callbacks: Sequence[Any]) -> Iterator[DriverCallbacks]:
        before, cls._live = cls._live, list(callbacks)
        try:
            yield cls()
        finally:
            cls._live = before


def _forward(hook: str) -> Any:
    def forward(self: DriverCallbacks, *args: Any, **info: Any) -> None:
        for cb in DriverCallbacks._live:
            getattr(cb, hook)(*args, **info)
    forward.__name__ = hook
    return forward


for _hook in _HOOKS:
    setattr(DriverCallbacks, _hook, _forward(_hook))


class Preemptions(tune.Callback):
    """Counts a trial's restarts that Tune did not charge to ``max_failures``: its actor died because its node was
    preempted or drained (Ray marks such a death ``preempted``, and Tune retries it for free). Each adds one to the
    trial's count under the sweep's storage (``preemptions.add``)."""

    def __init__(self, storage: str) -> None:
        self.storage = storage
        self.failures: dict[str, int] = {}  # trial id -> the failures Tune charged, as last seen
        self.just: set[str] = set()  # trials whose newest restart was a preemption

    def on_trial_start(self, iteration, trials, trial, **info):
        self.failures.setdefault(trial.trial_id, trial.run_metadata.num_failures)

    def on_trial_recover(self, iteration, trials, trial, **info):
        charged = trial.run_metadata.num_failures
        self.just.discard(trial.trial_id)
        if charged == self.failures.get(trial.trial_id, charged - 1):  # not charged: a preemption
            from fomo_ray.engine import preemptions

            preemptions.add(self.storage, trial.trial_id, "trial actor lost to a preempted node")
            self.just.add(trial.trial_id)
        self.failures[trial.trial_id] = charged


def restoring(fit: Callable[[bool], Any], resume: bool, tries: int, name: str) -> Any:
    """``fit(resume)``; when Ray's own machinery fails (a worker killed by the memory monitor while Tune started it,
    a dead node: ``infrastructure_reason``), one line, then ``fit(True)`` restores the experiment, up to ``tries``
    times in all; after that, an empty grid: the sweep ends interrupted and prints its resume command."""
    for attempt in range(1, tries + 1):
        try:
            return fit(resume)
        except Exception as e:  # noqa: BLE001 - anything but Ray's infrastructure errors is re-raised
            lost = infrastructure_reason(e)
            if not lost:
                raise
            resume = True
            print(f"sweep {name}: Ray failed ({lost}); " + (f"restoring the sweep (try {attempt + 1} of {tries})"
                  if attempt < tries else f"gave up after {tries} tries"), flush=True)
    return []
