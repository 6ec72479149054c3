"""Nodes of the ``plans`` pipeline: teacher-plan extraction with construct-and-verify."""

from __future__ import annotations

import pandas as pd

from pilot.config import GenerationParams, PlansParams
from pilot.models import CausalLM
from pilot.plans import HFTeacher, OracleTeacher, construct_and_verify, plan_report
from pilot.tracking import metric_records


def extract_plans(tasks_train: pd.DataFrame, tasks_val: pd.DataFrame, tasks_test: pd.DataFrame,
                  teacher: CausalLM, student: CausalLM, params: PlansParams,
                  generation: GenerationParams) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A plan per query from the configured teacher, kept when the student answers right with it.

    Returns:
        ``teacher_plans`` (every split), the per-task ``plan_report`` and MLflow metrics.
    """
    backend = (HFTeacher(teacher, generation.model_copy(update={"max_new_tokens": params.max_plan_tokens}))
               if params.teacher == "hf" else OracleTeacher())
    tasks = pd.concat([tasks_train, tasks_val, tasks_test], ignore_index=True)
    plans = construct_and_verify(tasks, backend, student, generation, params.keep)
    report = plan_report(plans)
    metrics = {f"{row.split}_{row.task}_{name}": getattr(row, name) for row in report.itertuples()
               for name in ("kept_fraction", "verified_fraction", "oracle_agreement", "teacher_ms_per_plan")}
    return plans, report, metric_records(metrics)
