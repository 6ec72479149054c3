"""What a compared method is: one object that says how it answers and what it is.

A method is a dataclass built from the artefacts and parameter blocks it names in
:attr:`Method.inputs` (catalog entries, ``params:<block>``), in the order of its fields. It
answers through the one generation path: :meth:`Method.attach` puts it on the student for as long
as a ``with`` block lasts and yields an :class:`Attached` (the model that answers, and the guidance
or soft prompt generation takes); :meth:`Method.row_inputs` gives what it adds per question (a plan
in context, time paid outside the student). :attr:`Method.trainable_parameters` and
:meth:`Method.settings` say what it is, under the same keys for every method
(:data:`METHOD_SETTINGS`), so MLflow's compare view lines the methods up.

Evaluation, latency, the MLflow child runs, the results table and the served model loop over
methods; which methods are compared is :mod:`pilot.methods.registry` (imported on its own: it loads
every method's dependencies).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

# At run time: Kedro reads a method's type hints (its fields, and :attr:`Method.params`) to type its inputs.
from pilot.config import BaselinesParams, Params, validate
from pilot.evaluation import answer_and_score

if TYPE_CHECKING:
    import pandas as pd

    from pilot.config import GenerationParams
    from pilot.guidance import Guidance
    from pilot.models import CausalLM
    from pilot.soft_tokens import SoftPrompt

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


@dataclass(frozen=True)
class TrainingData:
    """What the methods' settings refer to: the run's seed and the rows the methods learn from."""

    seed: int
    training_rows: int   # the training split: LoRA, ReFT, pause tokens, soft thoughts, PILOT stage 2
    cached_rows: int     # the kept teacher plans in the latent cache: PILOT stage 1, CAA


@dataclass
class Attached:
    """A method on the student: the model that answers (an adapted copy for LoRA), and the guidance
    or soft prompt that :func:`pilot.generation.generate` takes."""

    student: CausalLM
    guidance: Guidance | None = None
    soft_prompt: SoftPrompt | None = None


class Method:
    """One compared method. Subclasses are dataclasses whose fields are built from :attr:`inputs`."""

    name: ClassVar[str]
    # The method whose answers the results table compares its own with, question by question (the paired
    # difference, its bootstrap interval and McNemar's p on its rows); None: no such comparison.
    paired_with: ClassVar[str | None] = None
    # Its settings' class, validating its block ``baselines.<name>``; None: a method without settings.
    params: ClassVar[type[Params] | None] = None
    # The catalog entries and ``params:<block>`` it is built from, in the order of its fields.
    inputs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def own_params(cls, baselines: BaselinesParams) -> Params:
        """Its block, ``baselines.<name>``, validated by :attr:`params` (its defaults where the block is absent)."""
        if cls.params is None:
            raise TypeError(f"Method '{cls.name}' has no settings (its `params` class is None).")
        block = getattr(baselines, cls.name, None)
        return block if isinstance(block, cls.params) else validate(cls.params, block or {}, f"baselines.{cls.name}")

    def prepare(self, student: CausalLM) -> None:
        """One-time work before answering, not part of any question's time (moving trained parts to
        the student's device, building an adapted copy). Idempotent."""

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        """The method on ``student`` while inside (hooks removed however the block ends)."""
        self.prepare(student)
        yield Attached(student)

    def answer(self, student: CausalLM, rows: pd.DataFrame, generation: GenerationParams) -> pd.DataFrame:
        """Its scored answers to ``rows`` (:func:`pilot.evaluation.answer_and_score`): attached to ``student``
        for the whole table, with what it adds per row (plans, time paid outside the student) and the run's
        decoding. Data-parallel processes share the generation (each answers its batches; every one gets the
        table)."""
        inputs = self.row_inputs(rows)
        with self.attach(student) as attached:
            return answer_and_score(attached.student, rows, guidance=attached.guidance,
                                    soft_prompt=attached.soft_prompt, generation=generation, method=self.name,
                                    progress=self.name, spread=True, **inputs)

    def row_inputs(self, rows: pd.DataFrame) -> dict[str, list]:
        """What the method adds to each of ``rows`` (``plans``, ``extra_seconds``), in their order."""
        return {}

    @property
    def trainable_parameters(self) -> int:
        return 0

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        """Its values of :data:`METHOD_SETTINGS` besides the name, parameter count and seed."""
        return {}

    def settings(self, data: TrainingData) -> dict[str, str]:
        """Its row of :data:`METHOD_SETTINGS`, as MLflow records it."""
        return method_settings(self.name, trainable_parameters=self.trainable_parameters, seed=data.seed,
                               **self.comparable_settings(data))

