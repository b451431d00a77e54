"""One run's life in MLflow, whoever runs it: a `fomo-ray run` on this machine, a Tune trial (its driver side), a
Ray Train run (its rank 0). Every write to a run goes through :class:`TrackedRun`; the Ray adapters only decide
*when* (the trial opens and closes the run, the Train worker's rank 0 attaches to it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from fomo_ray.tracking.writer import StepLogger, Tracker, eval_metrics


class TrackedRun:
    """One MLflow run from open to close: params, config and tags when it opens; the training signal every
    ``tracking.log_every_n_steps`` steps (written off the training thread, :class:`StepLogger`); the metrics of every
    evaluation point, each once; tags and artifacts; its end status.

    A run resumed from a checkpoint repeats the evaluation points and steps it trained after that checkpoint, with
    the same numbers: MLflow appends and never replaces, so those are not sent again (``logged``, ``logged_up_to``).
    """

    def __init__(self, tracker: Tracker, run_id: str, cfg: Any = None, steps: bool = False, resumed: bool = True):
        self.tracker, self.run_id = tracker, run_id
        self.logged, logged_up_to = tracker.logged_so_far(run_id) if resumed else (set(), -1)
        every = cfg.tracking.log_every_n_steps if cfg is not None and steps else 0
        self.steps = (StepLogger(tracker, run_id, every, cfg.mixture.batch_size, logged_up_to=logged_up_to)
                      if every > 0 else None)

    # ------------------------------------------------------------------------------------------------ open
    @classmethod
    def open_trial(cls, uri: str, cfg: Any, parent_run_id: str, trial_id: str, name: str,
                   params: Mapping[str, Any], config: Mapping[str, Any], tags: Mapping[str, str]) -> TrackedRun:
        """A sweep trial's child run under the sweep's parent: created, or reopened when the trial is relaunched."""
        tracker = Tracker(uri, cfg.tracking.experiment)
        run_id = tracker.start_child(parent_run_id, trial_id, params, run_name=name, config=config, tags=tags)
        return cls(tracker, run_id, resumed=False)

    @classmethod
    def open_run(cls, tracker: Tracker, cfg: Any, name: str, params: Mapping[str, Any], config: Mapping[str, Any],
                 tags: Mapping[str, str], run_id: str | None = None) -> TrackedRun:
        """A `fomo-ray run`'s own run, logging the training signal; ``run_id`` (kept in its run directory) reopens
        the run a resumed one started."""
        opened = tracker.start_run(name, params, tags=tags, config=config, run_id=run_id)
        return cls(tracker, opened, cfg, steps=True, resumed=run_id is not None)

    @classmethod
    def attach(cls, uri: str, cfg: Any, run_id: str) -> TrackedRun:
        """The run a trial's driver opened, from the process that trains it (a Train run's rank 0, or the function
        trial itself): it logs the training signal and the evaluation points."""
        return cls(Tracker(uri, cfg.tracking.experiment), run_id, cfg, steps=True)

    # ------------------------------------------------------------------------------------------------ write
    def on_step(self, task: int, step: int, loss: Any, lr: float, grad_norm: Any, global_step: int) -> None:
        if self.steps is not None:
            self.steps.step(task, step, loss, lr, grad_norm, global_step)

    def flush(self) -> None:
        """Send the buffered training steps (before an evaluation point, at a checkpoint, at the end)."""
        if self.steps is not None:
            self.steps.flush()

    def log_point(self, step: int, point: int, records: Iterable[Mapping[str, Any]], summary: Mapping[str, float],
                  full: Mapping[str, float]) -> None:
        """One evaluation point in percent at ``step`` on the stream's axis, unless this run logged it before."""
        self.flush()
        if step in self.logged:
            return
        self.tracker.log_metrics(self.run_id, eval_metrics(records, summary, full, point), step=step)
        self.logged.add(step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def delete_tag(self, tag: str) -> None:
        self.tracker.client.delete_tag(self.run_id, tag)

    def tags(self) -> dict[str, str]:
        return dict(self.tracker.client.get_run(self.run_id).data.tags)

    def artifact_uri(self) -> str:
        return self.tracker.client.get_run(self.run_id).info.artifact_uri

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifacts(self.run_id, local_dir, artifact_path=artifact_path)

    # ------------------------------------------------------------------------------------------------ close
    def close_steps(self) -> None:
        """The tail of the training signal out, and its writer thread ended (the process that trains is done)."""
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def finish(self, failure: str | None = None, status: str = "", stopped: str = "") -> None:
        """End the run: FINISHED, FAILED with the reason, ``status`` (KILLED: interrupted) or stopped by the sweep's
        rule (:meth:`Tracker.finish`)."""
        self.close_steps()
        self.tracker.finish(self.run_id, failure=failure, status=status, stopped=stopped)
