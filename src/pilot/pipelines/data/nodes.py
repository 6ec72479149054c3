"""Nodes of the ``data`` pipeline."""

from __future__ import annotations

import pandas as pd

from pilot.config import with_run_seed
from pilot.tasks import TEST_SPLITS, DataParams, build_task_table, validate_task_table


def generate_tasks(params: DataParams, seed: int) -> pd.DataFrame:
    """Draw every configured task from reasoning-gym's offline generators.

    Args:
        params: the ``data`` parameters (tasks with sizes and generator kwargs, split sizes, seed).
        seed: the run's seed, which ``data.seed`` is an offset from.
    Returns:
        One table of all rows with a ``split`` column; questions are unique across splits.
    """
    config = with_run_seed(params, seed)
    table = build_task_table([t.model_dump() for t in config.tasks], config.val_per_task,
                             config.test_per_task, config.seed, config.ood_per_task)
    return validate_task_table(table)


def split_tasks(tasks: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Separate the splits and count rows per split and task.

    Returns:
        ``tasks_train``, ``tasks_val``, ``tasks_test`` (the in-distribution ``test`` rows, then any
        out-of-distribution ``test_ood`` rows: every method is evaluated on both) and row counts for MLflow.
    """
    validate_task_table(tasks)
    splits = tuple(tasks[tasks["split"].isin(s)].reset_index(drop=True)
                   for s in (["train"], ["val"], list(TEST_SPLITS)))
    counts = {f"rows_{split}_{task}": {"value": float(n), "step": 0}
              for (split, task), n in tasks.groupby(["split", "task"]).size().items()}
    return (*splits, counts)
