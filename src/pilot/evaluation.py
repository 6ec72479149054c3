"""Answering and scoring, shared by every method, and the metrics of the results table."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pandas as pd

from pilot.answers import extract_answer
from pilot.config import GenerationParams
from pilot.generation import Guidance, generate
from pilot.guidance.soft_tokens import SoftPrompt
from pilot.models import CausalLM
from pilot.prompts import prompt_format
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
    max_new_tokens: int = 24,
    batch_size: int = 64,
    method: str = "",
    progress: str | None = None,
    extra_seconds: Sequence[float] | None = None,
    stop_strings: Sequence[str] = (),
    temperature: float = 0.0,
    seed: int | None = None,
    soft_prompt: SoftPrompt | None = None,
) -> pd.DataFrame:
    """Answer every row (optionally with plans in context or guidance) and verify the answers.

    Prompts come from the student's format (:func:`pilot.prompts.prompt_format`); each reply is
    read by its row's ``extract`` rule (:func:`pilot.answers.extract_answer`; ``first_line`` when
    the table has no such column) before the verifier sees it. ``extra_seconds`` adds a per-row
    cost paid outside the student, e.g. the teacher writing the plan at run time for plan-in-context.
    Replies are greedy unless ``temperature > 0`` (sampled from ``seed``). ``soft_prompt`` puts
    a soft-token method's tokens around every prompt (:mod:`pilot.guidance.soft_tokens`).
    """
    questions = rows["question"].tolist()
    fmt = prompt_format(student.tokenizer)
    prompts = [fmt.answer_prompt(q, plans[i] if plans is not None else None) for i, q in enumerate(questions)]
    result = generate(student, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      guidance=guidance, progress=progress, stop_strings=stop_strings, temperature=temperature,
                      seed=seed, soft_prompt=soft_prompt)
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


METHODS = ("zero_shot", "plan_in_context", "lora", "reft", "caa", "pause_tokens", "soft_thoughts", "pilot_stage1",
           "pilot_stage2")

# What every method's MLflow run records, with the same keys for all (empty where a setting does
# not apply), so MLflow's compare view and parallel-coordinates plot line the methods up.
METHOD_SETTINGS = ("method", "trainable_parameters", "guidance_reader", "guidance_read_layer",
                   "guidance_inject_layer", "guidance_scale", "training_steps", "training_data_rows", "seed")


def method_settings(method: str, **settings: object) -> dict[str, str]:
    """``method``'s row of :data:`METHOD_SETTINGS` as strings; settings left out are ``""``."""
    unknown = sorted(set(settings) - set(METHOD_SETTINGS))
    if unknown:
        raise ValueError(f"Unknown method setting(s) {unknown}; the shared keys are {list(METHOD_SETTINGS)}.")
    values = {**settings, "method": method}
    return {key: "" if values.get(key) is None else str(values[key]) for key in METHOD_SETTINGS}


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
            return accuracy(student, val_rows, max_new_tokens=generation.max_new_tokens,
                            batch_size=generation.batch_size, stop_strings=generation.stop, **kwargs)

    return validate


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (well-behaved at 0 and 1)."""
    if total == 0:
        return (math.nan, math.nan)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def gap_recovered(acc: float, acc_zero_shot: float, acc_plan: float) -> float:
    """(acc - acc_zero_shot) / (acc_plan_in_context - acc_zero_shot); NaN without a positive plan
    gap: when the plan does not help, "how much of the gap" has no meaning (a negative gap would turn
    methods below zero-shot into positive recoveries)."""
    gap = acc_plan - acc_zero_shot
    return (acc - acc_zero_shot) / gap if gap > 1e-12 else math.nan


def summarize(predictions: pd.DataFrame, zero_shot: str = "zero_shot",
              plan_in_context: str = "plan_in_context", latency: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (split, method, task) plus an ``overall`` row per (split, method).

    Columns: accuracy with its 95 % interval, n, median latency per query (ms), mean generated
    tokens, and gap recovered against the zero-shot and plan-in-context rows of the same split
    and task. With ``latency`` (:func:`pilot.latency.latency_table`, timed on the in-distribution
    test split), the ``test`` rows' latency columns come from that interleaved, warmed-up
    measurement instead of the batched evaluation's wall time.
    """
    if "split" not in predictions:
        predictions = predictions.assign(split="test")
    records = []
    groups = list(predictions.groupby(["split", "method", "task"]))
    groups += [((split, method, "overall"), part) for (split, method), part in predictions.groupby(["split", "method"])]
    for (split, method, task), part in groups:
        hits, n = int(part["correct"].sum()), len(part)
        low, high = wilson_interval(hits, n)
        records.append({
            "split": split, "method": method, "task": task, "n": n, "accuracy": hits / n,
            "ci_low": low, "ci_high": high,
            "median_ms_per_query": 1000 * float(part["seconds_per_query"].median()),
            "mean_new_tokens": float(part["new_tokens"].mean()),
        })
    table = pd.DataFrame.from_records(records)
    if latency is not None:
        measured = latency.set_index(["method", "task"])
        timed = table["split"] == "test"
        keys = list(zip(table["method"], table["task"]))
        table["median_ms_per_query"] = [measured["median_ms_per_query"].get(k, math.nan) if t else math.nan
                                        for k, t in zip(keys, timed)]
        table["timed_queries"] = [int(measured["timed_queries"].get(k, 0)) if t else 0 for k, t in zip(keys, timed)]
    reference = table.set_index(["split", "method", "task"])["accuracy"]
    for split, task in table[["split", "task"]].drop_duplicates().itertuples(index=False):
        gap = reference.get((split, plan_in_context, task), math.nan) - reference.get((split, zero_shot, task), math.nan)
        if gap <= 1e-12:  # NaN (no rows to compare) stays silent
            logger.warning("Task %s (%s split): plan-in-context does not beat zero-shot (plan gap %+.3f), so "
                           "gap_recovered is undefined (NaN) there; PILOT has nothing to imitate on it.",
                           task, split, gap)
    table["gap_recovered"] = [
        gap_recovered(row.accuracy, reference.get((row.split, zero_shot, row.task), math.nan),
                      reference.get((row.split, plan_in_context, row.task), math.nan))
        for row in table.itertuples()
    ]
    return table.sort_values(["split", "task", "method"]).reset_index(drop=True)
