"""Teacher-plan extraction: a teacher writes a plan per query; plans are verified and kept.

Two teacher backends share one interface: :class:`HFTeacher`, any local Hugging Face causal
LM (by default the teacher trained by the ``base`` pipeline) generating plans in batches, and
:class:`OracleTeacher`, the metadata-derived plan, for ablations. Construct-and-verify keeps a
plan when the student, with that plan in context, reaches a verified-correct answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import pandas as pd

from pilot.config import GenerationParams
from pilot.evaluation import answer_and_score
from pilot.generation import generate
from pilot.models import CausalLM
from pilot.prompts import prompt_format

logger = logging.getLogger(__name__)

PLAN_COLUMNS = ("id", "task", "split", "plan", "teacher", "teacher_seconds", "student_answer",
                "verified", "kept", "matches_oracle")


@dataclass
class PlanBatch:
    plans: list[str]
    seconds_per_plan: list[float]


class TeacherBackend(Protocol):
    name: str

    def plans(self, questions: list[str], oracle_plans: list[str]) -> PlanBatch: ...


@dataclass
class HFTeacher:
    """A causal LM asked for a plan in its own format (:mod:`pilot.prompts`): the ``P:`` line after
    ``Q: <question>`` for the embedded teacher, a user turn asking for the strategy (never the
    answer) for a chat model. ``generation``: its decoding settings (the run's, with the plan length
    ``plans.max_plan_tokens`` as ``max_new_tokens``)."""

    lm: CausalLM
    generation: GenerationParams
    name: str = "hf"

    def plans(self, questions: list[str], oracle_plans: list[str]) -> PlanBatch:
        fmt = prompt_format(self.lm.tokenizer)
        result = generate(self.lm, [fmt.plan_prompt(q) for q in questions], generation=self.generation,
                          progress="teacher plans", spread=True)   # data-parallel processes share the batches
        return PlanBatch([fmt.read_plan(t) for t in result.texts], result.seconds_per_query)


@dataclass
class OracleTeacher:
    """The metadata-derived plan, at no cost: the ceiling a perfect teacher would reach."""

    name: str = "oracle"

    def plans(self, questions: list[str], oracle_plans: list[str]) -> PlanBatch:
        missing = sum(not plan for plan in oracle_plans)
        if missing:
            raise ValueError(f"{missing} of {len(oracle_plans)} questions have no oracle plan (their task has no plan "
                             "derivation in pilot.tasks.RENDERERS, or their local file no plan column); use "
                             "plans.teacher: hf so the teacher writes them.")
        return PlanBatch(list(oracle_plans), [0.0] * len(oracle_plans))


def construct_and_verify(tasks: pd.DataFrame, teacher: TeacherBackend, student: CausalLM,
                         generation: GenerationParams, keep: str = "verified") -> pd.DataFrame:
    """Plans for every row of ``tasks``, each verified by the student answering with it (decoding
    with ``generation``, the run's settings).

    ``keep="verified"`` keeps a plan only when the student reached a verified-correct answer
    with it (construct-and-verify); ``keep="all"`` keeps every plan (an ablation, and the toy
    test environment whose barely trained student verifies none). Data-parallel processes share the
    teacher's and the student's generation (:func:`pilot.generation.generate`); every one gets the table.
    """
    batch = teacher.plans(tasks["question"].tolist(), tasks["oracle_plan"].tolist())
    scored = answer_and_score(student, tasks, plans=batch.plans, generation=generation, progress="verify plans",
                              spread=True)
    verified = scored["correct"].tolist()
    frame = pd.DataFrame({
        "id": tasks["id"].to_numpy(),
        "task": tasks["task"].to_numpy(),
        "split": tasks["split"].to_numpy(),
        "plan": batch.plans,
        "teacher": teacher.name,
        "teacher_seconds": batch.seconds_per_plan,
        "student_answer": scored["prediction"].to_numpy(),
        "verified": verified,
        "kept": [ok or keep == "all" for ok in verified],
        "matches_oracle": [p.strip() == o.strip() for p, o in zip(batch.plans, tasks["oracle_plan"])],
    })
    return frame[list(PLAN_COLUMNS)]


def plan_report(plans: pd.DataFrame) -> pd.DataFrame:
    """Per task and split: plans generated, kept, agreement with the oracle, teacher latency."""
    grouped = plans.groupby(["split", "task"])
    report = grouped.agg(
        generated=("id", "size"),
        kept=("kept", "sum"),
        kept_fraction=("kept", "mean"),
        verified_fraction=("verified", "mean"),
        oracle_agreement=("matches_oracle", "mean"),
        teacher_ms_per_plan=("teacher_seconds", lambda s: 1000 * s.mean()),
    ).reset_index()
    for split, part in plans.groupby("split"):
        logger.info("Plans %s: %d generated, %d kept (%.0f %%), oracle agreement %.0f %%",
                    split, len(part), int(part["kept"].sum()), 100 * part["kept"].mean(),
                    100 * part["matches_oracle"].mean())
    return report
