"""The two references every gap is measured between: the frozen student alone, and the student
reading the teacher's plan (the teacher called at run time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from pilot.methods.base import Method


@dataclass
class ZeroShot(Method):
    """The frozen student alone."""

    name: ClassVar[str] = "zero_shot"


def plans_for(rows: pd.DataFrame, teacher_plans: pd.DataFrame) -> pd.DataFrame:
    """The teacher's plan and plan-writing time for each of ``rows``, in their order."""
    plans = rows[["id"]].merge(teacher_plans[["id", "plan", "teacher_seconds"]], on="id", how="left")
    if plans["plan"].isna().any():
        raise ValueError("Some test queries have no teacher plan; rerun `kedro run --pipelines plans`.")
    return plans


@dataclass
class PlanInContext(Method):
    """The student with the teacher's plan for each question; its time includes the teacher's."""

    name: ClassVar[str] = "plan_in_context"
    inputs: ClassVar[tuple[str, ...]] = ("teacher_plans",)
    teacher_plans: pd.DataFrame

    def row_inputs(self, rows: pd.DataFrame) -> dict[str, list]:
        plans = plans_for(rows, self.teacher_plans)
        return {"plans": plans["plan"].tolist(), "extra_seconds": plans["teacher_seconds"].tolist()}
