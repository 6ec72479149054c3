"""Pause tokens and soft thoughts as compared methods: their trained soft tokens in their slots."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from pilot.baselines.modules import TrainedModule
from pilot.baselines.soft_prompts import (
    AttachedSoftPrompt,
    make_soft_prompt,
    soft_thoughts_hidden_for_budget,
    train_soft_prompt,
)
from pilot.config import GuidanceParams, ParameterError, SoftTokenParams, adapter_loop
from pilot.methods.base import Attached
from pilot.methods.trained import StudentShapes, Trained, TrainedBaseline, budget_metrics, hypernet_budget
from pilot.models import CausalLM
from pilot.training.protocol import TrainingProtocol


class SoftPromptMethod(TrainedBaseline):
    """A soft-token module (:mod:`pilot.baselines.soft_prompts`) around every prompt."""

    params: ClassVar[type[SoftTokenParams]] = SoftTokenParams
    module: TrainedModule
    assistant: CausalLM | None = None

    @classmethod
    def train_module(cls, student: CausalLM, guidance: GuidanceParams, params: SoftTokenParams,
                     protocol: TrainingProtocol, assistant: CausalLM | None = None) -> Trained:
        """``params.num_tokens`` soft tokens of kind :attr:`name`, on LoRA's protocol."""
        tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
        budget = hypernet_budget(student, guidance, seed)
        module = make_soft_prompt(cls.name, student, params.num_tokens, budget, seed, assistant=assistant)
        module, result = train_soft_prompt(student, module, tasks_train, adapter_loop(params.training, stage1.training, seed),
                                           assistant=assistant, val_rows=tasks_val, generation=generation,
                                           eval_every=stage1.training.eval_every)
        return module, result.history_with_validation(), budget_metrics(module.num_parameters, budget, result)

    def prepare(self, student: CausalLM) -> None:
        self.module.to(student.device)

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        self.prepare(student)
        with AttachedSoftPrompt(self.module, student, self.assistant) as soft:
            yield Attached(student, soft_prompt=soft)

    @property
    def trainable_parameters(self) -> int:
        return self.module.num_parameters


@dataclass
class PauseTokens(SoftPromptMethod):
    """The same learned pause tokens after every prompt."""

    name: ClassVar[str] = "pause_tokens"
    artefact: ClassVar[str] = "pause_tokens"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "pause_tokens")
    module: TrainedModule

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: SoftTokenParams,
              protocol: TrainingProtocol) -> Trained:
        """``baselines.pause_tokens.num_tokens`` learned embeddings after every prompt, on LoRA's protocol
        (their ``num_tokens x hidden`` parameters are reported beside the hyper-network's).

        Returns:
            ``pause_tokens``, its loss history, and its parameter count, budget ratio and selected step.
        """
        return cls.train_module(student, guidance, params, protocol)


@dataclass
class SoftThoughts(SoftPromptMethod):
    """Soft thoughts: the teacher reads each prompt at run time (its time is in the latency)."""

    name: ClassVar[str] = "soft_thoughts"
    artefact: ClassVar[str] = "soft_thoughts"
    train_inputs: ClassVar[tuple[str, ...]] = ("teacher_model",)
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "soft_thoughts", "teacher_model")
    module: TrainedModule
    assistant: CausalLM

    @classmethod
    def check_against(cls, params: SoftTokenParams, shapes: StudentShapes) -> None:
        """The projection from the teacher's states to ``num_tokens`` soft tokens fits the budget."""
        if (teacher_hidden := shapes.teacher_hidden_size()) is None:
            return
        try:
            soft_thoughts_hidden_for_budget(params.num_tokens, teacher_hidden, shapes.hidden_size, shapes.budget)
        except ValueError as error:
            raise ParameterError(f"Parameter 'baselines.soft_thoughts.num_tokens' = {params.num_tokens} does not fit "
                                 f"the parameter budget: {str(error)[0].lower()}{str(error)[1:]}") from None

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: SoftTokenParams,
              protocol: TrainingProtocol, teacher_model: CausalLM) -> Trained:
        """Soft thoughts: the teacher reads each prompt and a projection sized to the hyper-network's
        budget maps its states into ``baselines.soft_thoughts.num_tokens`` soft tokens, on LoRA's protocol.

        Returns:
            ``soft_thoughts``, its loss history, and its parameter count, budget ratio and selected step.
        """
        return cls.train_module(student, guidance, params, protocol, assistant=teacher_model)
