"""Pause tokens and soft thoughts as compared methods: their trained soft tokens in their slots."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from pilot.baselines.modules import TrainedModule
from pilot.baselines.soft_prompts import AttachedSoftPrompt
from pilot.config import BaselinesParams, Stage1Params
from pilot.methods.base import Attached, Method, TrainingData, adapter_settings
from pilot.models import CausalLM


class SoftPromptMethod(Method):
    """A soft-token module (:mod:`pilot.baselines.soft_prompts`) around every prompt."""

    module: TrainedModule
    baselines: BaselinesParams
    stage1: Stage1Params
    assistant: CausalLM | None = None

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

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return adapter_settings(getattr(self.baselines, self.name).training, self.stage1, data)


@dataclass
class PauseTokens(SoftPromptMethod):
    """The same learned pause tokens after every prompt."""

    name: ClassVar[str] = "pause_tokens"
    inputs: ClassVar[tuple[str, ...]] = ("pause_tokens", "params:baselines", "params:stage1")
    module: TrainedModule
    baselines: BaselinesParams
    stage1: Stage1Params


@dataclass
class SoftThoughts(SoftPromptMethod):
    """Soft thoughts: the teacher reads each prompt at run time (its time is in the latency)."""

    name: ClassVar[str] = "soft_thoughts"
    inputs: ClassVar[tuple[str, ...]] = ("soft_thoughts", "params:baselines", "params:stage1", "teacher_model")
    module: TrainedModule
    baselines: BaselinesParams
    stage1: Stage1Params
    assistant: CausalLM
