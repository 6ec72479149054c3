"""ReFT as a compared method: the LoReFT interventions hooked on the student's layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pilot.baselines.reft import Reft as ReftInterventions
from pilot.methods.base import Attached, TrainedBaseline, TrainingData
from pilot.models import CausalLM


@dataclass
class Reft(TrainedBaseline):
    """LoReFT at the injection layer and after, at the hyper-network's budget (capped)."""

    name: ClassVar[str] = "reft"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "reft_interventions")
    reft_interventions: ReftInterventions

    def prepare(self, student: CausalLM) -> None:
        # each rotation computed once, like loading it: not part of a question's time
        reft = self.reft_interventions.to(student.device)
        if any(intervention.fixed_rotation is None for intervention in reft.interventions):
            reft.fix_rotations()

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        self.prepare(student)
        with self.reft_interventions.attached(student), torch.no_grad():
            yield Attached(student)

    @property
    def trainable_parameters(self) -> int:
        return self.reft_interventions.num_parameters

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {**super().comparable_settings(data),
                "guidance_inject_layer": ",".join(map(str, self.reft_interventions.layers))}
