"""Runs that end cleanly: SIGTERM and SIGINT stop a ``kedro run`` the way an error does.

Without this hook SIGTERM (what ``timeout``, schedulers and containers send) ends the process on the
spot: no ``finally`` runs, and the MLflow run stays ``RUNNING`` forever with no end time. While a
pipeline runs, :class:`InterruptHooks` turns SIGTERM and SIGINT into a :class:`RunInterrupted`
error raised where the main thread is, so Kedro's error path runs (every hook's
``on_pipeline_error``, the training loops' ``finally``), then marks the MLflow run ``KILLED`` with an
end time and logs one line saying how to resume. Checkpoints are never deleted on the way out: the
same command resumes stage 1 and stage 2 from their last ones (``resume: true``, the default) and
recomputes every other node's outputs from the same seeds, so it ends with the uninterrupted run's
predictions. ``kedro run`` exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). A second signal while
this unwinds ends the process at once (the default handlers are back by then).
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """The run was stopped by a signal (SIGTERM, SIGINT); an ``Exception`` so Kedro's error hooks run."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")


def interruption(error: BaseException | None) -> RunInterrupted | None:
    """The :class:`RunInterrupted` behind ``error``: itself, or the one a wrapper was raised from (Kedro
    wraps an error raised while a dataset loads or saves in its own ``DatasetError``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, RunInterrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that started this process, as a user would type it again."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


class InterruptHooks:
    """Turns SIGTERM/SIGINT during a pipeline run into :class:`RunInterrupted`, then marks the run KILLED."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.run_id: str | None = None
        self.started_at_ms = 0

    def _raise(self, signum: int, frame) -> None:
        self._restore()   # a second signal ends the process at once
        raise RunInterrupted(signum)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    @hook_impl(trylast=True)  # after kedro-mlflow has opened the run
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        run = mlflow.active_run()
        self.run_id = run.info.run_id if run else None
        self.started_at_ms = int(time.time() * 1000)
        if threading.current_thread() is not threading.main_thread():
            return   # signal handlers can only be set from the main thread (a notebook's worker, say)
        self.previous = {signum: signal.getsignal(signum) for signum in HANDLED}
        for signum in HANDLED:
            signal.signal(signum, self._raise)

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._restore()

    @hook_impl(trylast=True)  # after kedro-mlflow's own hook has closed the runs as FAILED
    def on_pipeline_error(self, error: Exception) -> None:
        self._restore()
        error = interruption(error)
        if error is None:
            return
        if self.run_id is not None:
            mark_run_killed(self.run_id, since_ms=self.started_at_ms)
        logger.error("Run %s by %s. Checkpoints are kept: rerun `%s` to resume from the last ones "
                     "(stage1.resume and stage2.resume: true), with the same predictions as an uninterrupted run.",
                     f"(MLflow run {self.run_id}) interrupted" if self.run_id else "interrupted",
                     error.signal_name, resume_command())


def mark_run_killed(run_id: str, since_ms: int = 0) -> None:
    """Mark ``run_id`` and the child runs it opened since ``since_ms`` that ended with it ``KILLED``.

    Best effort: a tracking store that cannot be reached costs a warning, never the exit."""
    try:
        client = MlflowClient()
        run = client.get_run(run_id)
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        for child in children:
            if child.info.start_time >= since_ms and child.info.status in ("RUNNING", "FAILED"):
                client.set_terminated(child.info.run_id, status="KILLED")
        client.set_terminated(run_id, status="KILLED")
    except Exception as failure:  # noqa: BLE001 - the run is over either way
        logger.warning("Could not mark MLflow run %s KILLED: %s", run_id, failure)
