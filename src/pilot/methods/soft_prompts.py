"""Pause tokens and soft thoughts as compared methods: their trained soft tokens in their slots."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from pilot.baselines.modules import TrainedModule
from pilot.baselines.soft_prompts import AttachedSoftPrompt
from pilot.methods.base import Attached, TrainedBaseline
from pilot.models import CausalLM


class SoftPromptMethod(TrainedBaseline):
    """A soft-token module (:mod:`pilot.baselines.soft_prompts`) around every prompt."""

    module: TrainedModule
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


@dataclass
class PauseTokens(SoftPromptMethod):
    """The same learned pause tokens after every prompt."""

    name: ClassVar[str] = "pause_tokens"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "pause_tokens")
    module: TrainedModule


@dataclass
class SoftThoughts(SoftPromptMethod):
    """Soft thoughts: the teacher reads each prompt at run time (its time is in the latency)."""

    name: ClassVar[str] = "soft_thoughts"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "soft_thoughts", "teacher_model")
    module: TrainedModule
    assistant: CausalLM
