"""Answering and scoring, shared by every method: :func:`answer_and_score` (one prediction row per
question) and the training loops' :func:`validator`. The results table's statistics are
:mod:`pilot.statistics`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pandas as pd

from pilot.answers import extract_answer
from pilot.config import GenerationParams
from pilot.generation import Guidance, generate
from pilot.models import CausalLM
from pilot.prompts import prompt_format
from pilot.soft_tokens import SoftPrompt
from pilot.verifier import score_answers

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("method", "id", "task", "split", "prediction", "reply", "correct", "new_tokens",
                      "seconds_per_query")


def answer_and_score(
    student: CausalLM,
    rows: pd.DataFrame,
    *,
    plans: Sequence[str] | None = None,
    guidance: Guidance | None = None,
    generation: GenerationParams,   # no default here: the run's decoding settings (conf/base generation)
    method: str = "",
    progress: str | None = None,
    extra_seconds: Sequence[float] | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    soft_prompt: SoftPrompt | None = None,
    spread: bool = False,
) -> pd.DataFrame:
    """Answer every row (optionally with plans in context or guidance) and verify the answers.

    ``generation`` holds the decoding settings (reply length, batch size, stop strings). Prompts
    come from the student's format (:func:`pilot.prompts.prompt_format`); each reply is
    read by its row's ``extract`` rule (:func:`pilot.answers.extract_answer`; ``first_line`` when
    the table has no such column) before the verifier sees it. ``extra_seconds`` adds a per-row
    cost paid outside the student, e.g. the teacher writing the plan at run time for plan-in-context.
    Replies are greedy unless ``temperature > 0`` (sampled from ``seed``). ``soft_prompt`` puts
    a soft-token method's tokens around every prompt (:mod:`pilot.soft_tokens`). ``spread``
    shares the generation among data-parallel processes (:func:`pilot.generation.generate`); every
    process gets the whole table.
    """
    questions = rows["question"].tolist()
    fmt = prompt_format(student.tokenizer)
    prompts = [fmt.answer_prompt(q, plans[i] if plans is not None else None) for i, q in enumerate(questions)]
    result = generate(student, prompts, generation=generation, guidance=guidance, progress=progress,
                      temperature=temperature, seed=seed, soft_prompt=soft_prompt, spread=spread)
    rules = rows["extract"].tolist() if "extract" in rows else ["first_line"] * len(rows)
    answers = [extract_answer(text, rule) for text, rule in zip(result.answers, rules)]
    rewards = score_answers(rows["task"].tolist(), answers, rows["answer"].tolist(),
                            rows["metadata"].tolist(), questions)
    seconds = np.asarray(result.seconds_per_query)
    if extra_seconds is not None:
        seconds = seconds + np.asarray(extra_seconds, dtype=float)
    frame = pd.DataFrame({
        "method": method,
        "id": rows["id"].to_numpy(),
        "task": rows["task"].to_numpy(),
        "split": rows["split"].to_numpy() if "split" in rows else "test",
        "prediction": answers,
        "reply": result.answers,
        "correct": np.asarray(rewards) == 1.0,
        "new_tokens": result.new_tokens,
        "seconds_per_query": seconds,
    })
    return frame[list(PREDICTION_COLUMNS)]


def accuracy(student: CausalLM, rows: pd.DataFrame, **kwargs) -> float:
    return float(answer_and_score(student, rows, **kwargs)["correct"].mean())


def validator(student: CausalLM, val_rows: pd.DataFrame | None, generation: GenerationParams | None = None,
              around: Callable[[], AbstractContextManager] | None = None, **kwargs) -> Callable[[], float] | None:
    """The engine's ``validate``: accuracy on ``val_rows`` with the run's decoding settings, inside
    ``around()`` when given (an intervention's eval-time context); None without rows."""
    if val_rows is None:
        return None
    generation = generation or GenerationParams()

    def validate() -> float:
        with around() if around is not None else nullcontext():
            return accuracy(student, val_rows, generation=generation, **kwargs)

    return validate
