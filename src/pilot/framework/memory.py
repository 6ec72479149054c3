"""Peak memory per node: logged after each node that raised it, so a run says which step needs the
memory; a tracked run records it as the ``peak_memory_gib`` metric and ``peak_memory_by_node.json``."""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlflow
from kedro.framework.hooks import hook_impl

from pilot.runtime import peak_memory_gib

logger = logging.getLogger(__name__)


class MemoryHooks:
    """Logs the process's peak memory after each node that raised it by more than ``step`` GiB.

    The peak is the process's (``measure``): in a process that already used more memory than the
    run needs (a notebook, a test session) no node raises it and only the starting peak is listed.
    """

    def __init__(self, step: float = 0.05, measure: Callable[[], float] = peak_memory_gib) -> None:
        self.step = step
        self.measure = measure
        self.raised_by: dict[str, float] = {}

    @hook_impl
    def before_pipeline_run(self) -> None:
        self.raised_by = {"(before the first node)": round(self.measure(), 3)}

    @hook_impl
    def after_node_run(self, node) -> None:
        peak = self.measure()
        if peak > max(self.raised_by.values(), default=0.0) + self.step:
            self.raised_by[node.name] = round(peak, 3)
            logger.info("Peak memory %.2f GiB, reached in node '%s'.", peak, node.name)

    @hook_impl(tryfirst=True)  # before kedro-mlflow closes the run
    def after_pipeline_run(self) -> None:
        peak = self.measure()
        logger.info("Peak memory of the run: %.2f GiB.", peak)
        if mlflow.active_run() is not None:
            mlflow.log_metric("peak_memory_gib", round(peak, 3))
            mlflow.log_dict(self.raised_by, "peak_memory_by_node.json")
