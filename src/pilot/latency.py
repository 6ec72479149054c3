"""Latency that can be compared across methods: shared warm-up, interleaved passes, medians.

Timing each method once, in the order it was evaluated, charges the first method for the
warm-up (allocator, kernels, caches) and lets a busy moment of the machine land on one method
only. Here every method answers the same questions one at a time (batch of 1: what a user of
the model waits for), all methods are warmed up first, and the passes go round-robin over the
methods, question by question, so drift in the machine's load is shared. The reported figure
is the median over passes and questions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
from tqdm.auto import tqdm

from pilot.config import GenerationParams
from pilot.generation import generate
from pilot.methods.base import Method
from pilot.models import CausalLM
from pilot.prompts import prompt_format

# A method answers one question (with its plan, if it uses one); returns seconds paid outside
# the student (the teacher writing the plan), 0.0 otherwise.
Answerer = Callable[[int], float]


def answerer(method: Method, student: CausalLM, rows: pd.DataFrame, generation: GenerationParams) -> Answerer:
    """Answer question ``i`` of ``rows`` alone with ``method``, through the shared generation path
    (:func:`pilot.generation.generate`), with the run's decoding settings ``generation`` (one question a batch).

    The method's one-time preparation and what it adds per row (plans, time paid outside the
    student, added to the time) come first, untimed; it is attached and removed on each call, so
    methods sharing an injection site never stack.
    """
    method.prepare(student)
    inputs = method.row_inputs(rows)
    unknown = set(inputs) - {"plans", "extra_seconds"}
    if unknown:
        raise ValueError(f"Latency knows no row input {sorted(unknown)} of method '{method.name}'.")
    questions, plans, extra_seconds = rows["question"].tolist(), inputs.get("plans"), inputs.get("extra_seconds")
    fmt = prompt_format(student.tokenizer)
    one_at_a_time = generation.model_copy(update={"batch_size": 1})

    def answer(i: int) -> float:
        prompt = fmt.answer_prompt(questions[i], plans[i] if plans is not None else None)
        with method.attach(student) as attached:
            generate(attached.student, [prompt], generation=one_at_a_time, guidance=attached.guidance,
                     soft_prompt=attached.soft_prompt)
        return float(extra_seconds[i]) if extra_seconds is not None else 0.0

    return answer


def measure_latency(answerers: Mapping[str, Answerer], num_questions: int, passes: int = 3,
                    warmup_questions: int = 2, clock: Callable[[], float] = time.perf_counter,
                    progress: bool = False) -> pd.DataFrame:
    """Time every method on questions ``0..num_questions-1``: all warmed up, then interleaved.

    Returns one row per (method, question): ``seconds`` is the median over ``passes`` of that
    question's wall time (plus any time paid outside the student).
    """
    if num_questions < 1 or passes < 1:
        raise ValueError("Latency needs at least one question and one pass.")
    for i in range(min(warmup_questions, num_questions)):
        for answer in answerers.values():
            answer(i)
    times: dict[tuple[str, int], list[float]] = {(m, i): [] for m in answerers for i in range(num_questions)}
    methods = list(answerers)
    bar = tqdm(total=passes * num_questions * len(methods), desc="latency", unit="q", disable=not progress, leave=False)
    for p in range(passes):
        order = methods if p % 2 == 0 else methods[::-1]  # no method always goes first
        for i in range(num_questions):
            for method in order:
                began = clock()
                extra = answerers[method](i)
                times[(method, i)].append(clock() - began + extra)
                bar.update()
    bar.close()
    return pd.DataFrame([{"method": m, "question": i, "seconds": statistics.median(t), "passes": len(t)}
                         for (m, i), t in times.items()])


def latency_table(timings: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Median ms per query per (method, task) and per method (``task == "overall"``).

    ``tasks[i]`` is the task of question ``i``.
    """
    frame = timings.assign(task=[tasks[i] for i in timings["question"]], ms=1000 * timings["seconds"])
    frame = pd.concat([frame, frame.assign(task="overall")], ignore_index=True)
    return frame.groupby(["method", "task"], as_index=False).agg(median_ms_per_query=("ms", "median"),
                                                                 timed_queries=("ms", "size"))
