"""ReFT as a compared method: the LoReFT interventions hooked on the student's layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pilot.baselines.reft import Reft as ReftInterventions
from pilot.baselines.reft import reft_layers, train_reft
from pilot.config import GuidanceParams, ReftParams, adapter_loop
from pilot.methods.base import Attached, TrainingData
from pilot.methods.trained import StudentShapes, Trained, TrainedBaseline, budget_metrics, hypernet_budget
from pilot.models import CausalLM
from pilot.training.protocol import TrainingProtocol


@dataclass
class Reft(TrainedBaseline):
    """LoReFT at the injection layer and after, at the hyper-network's budget (capped)."""

    name: ClassVar[str] = "reft"
    params: ClassVar[type[ReftParams]] = ReftParams
    artefact: ClassVar[str] = "reft_interventions"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "reft_interventions")
    reft_interventions: ReftInterventions

    @classmethod
    def check_against(cls, params: ReftParams, shapes: StudentShapes) -> None:
        params.check_against(shapes.num_layers, shapes.hidden_size, shapes.budget)

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: ReftParams,
              protocol: TrainingProtocol) -> Trained:
        """LoReFT at the injection layer and every layer after it (or ``baselines.reft.layers``), its
        rank matched to the hyper-network's parameters (capped at the hidden size), on LoRA's protocol.

        Returns:
            ``reft_interventions``, its loss history, and its parameter count, budget ratio and selected step.
        """
        tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
        budget = hypernet_budget(student, guidance, seed)
        layers = reft_layers(params.layers, guidance.inject_layer, student.num_layers)
        reft, result = train_reft(student, tasks_train, budget, layers, params.match_tolerance,
                                  adapter_loop(params.training, stage1.training, seed), val_rows=tasks_val,
                                  generation=generation, eval_every=stage1.training.eval_every)
        return reft, result.history_with_validation(), budget_metrics(reft.num_parameters, budget, result)

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
