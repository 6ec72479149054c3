"""LoRA as a compared method: the trained adapter on a copy of the student (the student stays frozen)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

from pilot.baselines.lora import LoraAdapter
from pilot.methods.base import Attached, TrainedBaseline
from pilot.models import CausalLM


@dataclass
class Lora(TrainedBaseline):
    """LoRA at the hyper-network's parameter budget (peft)."""

    name: ClassVar[str] = "lora"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "lora_adapter")
    lora_adapter: LoraAdapter
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
