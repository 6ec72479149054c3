"""LoRA as a compared method: the trained adapter on a copy of the student (the student stays frozen)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pilot.baselines.lora import LoraAdapter
from pilot.config import BaselinesParams, Stage1Params
from pilot.methods.base import Attached, Method, TrainingData, adapter_settings
from pilot.models import CausalLM


@dataclass
class Lora(Method):
    """LoRA at the hyper-network's parameter budget (peft)."""

    name: ClassVar[str] = "lora"
    inputs: ClassVar[tuple[str, ...]] = ("lora_adapter", "params:baselines", "params:stage1")
    lora_adapter: LoraAdapter
    baselines: BaselinesParams
    stage1: Stage1Params
    _adapted: tuple[CausalLM, CausalLM] | None = field(default=None, init=False, repr=False)

    def prepare(self, student: CausalLM) -> None:
        if self._adapted is None or self._adapted[0] is not student:   # the copy is made once per student
            self._adapted = (student, self.lora_adapter.attach(student))

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        self.prepare(student)
        yield Attached(self._adapted[1])

    @property
    def trainable_parameters(self) -> int:
        return self.lora_adapter.num_parameters

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return adapter_settings(self.baselines.lora.training, self.stage1, data)
