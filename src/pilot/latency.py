"""Latency that can be compared across methods: shared warm-up, interleaved passes, medians.

Timing each method once, in the order it was evaluated, charges the first method for the
warm-up (allocator, kernels, caches) and lets a busy moment of the machine land on one method
only. Here every method answers the same questions one at a time (batch of 1: what a user of
the model waits for), all methods are warmed up first, and the passes go round-robin over the
methods, question by question, so drift in the machine's load is shared. The reported figure
is the median over passes and questions.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import pandas as pd
import torch
from tqdm.auto import tqdm

from pilot.baselines.caa import steered
from pilot.baselines.lora import LoraAdapter
from pilot.baselines.modules import TrainedModule
from pilot.baselines.reft import Reft
from pilot.baselines.soft_prompts import AttachedSoftPrompt
from pilot.generation import Guidance, generate
from pilot.guidance import GuidedStudent, HyperNetwork
from pilot.guidance.soft_tokens import SoftPrompt
from pilot.models import CausalLM
from pilot.prompts import prompt_format

# A method answers one question (with its plan, if it uses one); returns seconds paid outside
# the student (the teacher writing the plan), 0.0 otherwise.
Answerer = Callable[[int], float]


def answerer(student: CausalLM, questions: Sequence[str], max_new_tokens: int, *,
             guidance: Callable[[], AbstractContextManager[Guidance | None]] | None = None,
             plans: Sequence[str] | None = None, extra_seconds: Sequence[float] | None = None,
             stop_strings: Sequence[str] = (),
             attach: Callable[[], AbstractContextManager[SoftPrompt | None]] | None = None) -> Answerer:
    """Answer question ``i`` alone through the shared generation path (:func:`pilot.generation.generate`).

    ``guidance`` opens the method's guidance for the call (attached and removed each time, so
    methods sharing an injection site never stack); ``attach`` likewise opens an intervention
    (ReFT's hooks, yielding None, or a soft prompt's slots); ``extra_seconds[i]`` is added to the time.
    """
    fmt = prompt_format(student.tokenizer)

    def answer(i: int) -> float:
        prompt = fmt.answer_prompt(questions[i], plans[i] if plans is not None else None)
        with (guidance() if guidance is not None else nullcontext()) as attached, \
                (attach() if attach is not None else nullcontext()) as soft_prompt:
            generate(student, [prompt], max_new_tokens=max_new_tokens, batch_size=1, guidance=attached,
                     stop_strings=stop_strings, soft_prompt=soft_prompt)
        return float(extra_seconds[i]) if extra_seconds is not None else 0.0

    return answer


def method_answerers(student: CausalLM, questions: Sequence[str], max_new_tokens: int, *,
                     plans: Sequence[str], teacher_seconds: Sequence[float], lora_adapter: LoraAdapter,
                     steering_vector: dict[str, torch.Tensor], caa_scale: float, inject_layer: int,
                     hypernets: Mapping[str, HyperNetwork], reft: Reft | None = None,
                     soft_prompts: Mapping[str, TrainedModule] | None = None, assistant: CausalLM | None = None,
                     stop_strings: Sequence[str] = ()) -> dict[str, Answerer]:
    """The evaluated methods as answerers: zero-shot, plan-in-context (plus the teacher's recorded
    plan-writing time), LoRA, ReFT, CAA, each soft-token method in ``soft_prompts`` (soft thoughts
    with ``assistant`` reading each prompt, inside the timed call) and each PILOT hyper-network in
    ``hypernets`` (by method name)."""
    lora = lora_adapter.attach(student)
    caa = functools.partial(steered, student, steering_vector, inject_layer, caa_scale, 1)  # one prompt per call

    def pilot(hypernet: HyperNetwork):
        @contextmanager
        def guided() -> Iterator[Guidance]:
            with GuidedStudent(student, hypernet.eval().to(student.device)) as attached:
                yield attached.guidance()
        return guided

    ask = functools.partial(answerer, questions=questions, max_new_tokens=max_new_tokens, stop_strings=stop_strings)
    answerers = {
        "zero_shot": ask(student),
        "plan_in_context": ask(student, plans=plans, extra_seconds=teacher_seconds),
        "lora": ask(lora),
        "caa": ask(student, guidance=caa),
    }
    if reft is not None:
        reft = reft.to(student.device).fix_rotations()   # once, like loading it: not part of a query's time

        @contextmanager
        def reft_attached() -> Iterator[None]:
            with reft.attached(student):
                yield None
        answerers["reft"] = ask(student, attach=reft_attached)
    for method, module in (soft_prompts or {}).items():
        answerers[method] = ask(student, attach=functools.partial(AttachedSoftPrompt, module.to(student.device),
                                                                  student, assistant))
    for method, hypernet in hypernets.items():
        answerers[method] = ask(student, guidance=pilot(hypernet))
    return answerers


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
