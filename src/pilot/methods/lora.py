"""LoRA as a compared method: the trained adapter on a copy of the student (the student stays frozen)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pilot.baselines.lora import LoraAdapter, lora_rank_for_budget, lora_settings, train_lora
from pilot.config import GuidanceParams, LoraParams, ParameterError
from pilot.methods.base import Attached
from pilot.methods.trained import StudentShapes, Trained, TrainedBaseline, hypernet_budget
from pilot.models import CausalLM
from pilot.training.protocol import TrainingProtocol


@dataclass
class Lora(TrainedBaseline):
    """LoRA at the hyper-network's parameter budget (peft)."""

    name: ClassVar[str] = "lora"
    params: ClassVar[type[LoraParams]] = LoraParams
    artefact: ClassVar[str] = "lora_adapter"
    train_inputs: ClassVar[tuple[str, ...]] = ("tuned_lora",)
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "lora_adapter")
    lora_adapter: LoraAdapter
    _adapted: tuple[CausalLM, CausalLM] | None = field(default=None, init=False, repr=False)

    @classmethod
    def check_against(cls, params: LoraParams, shapes: StudentShapes) -> None:
        """The target modules exist in the student and admit a rank within the budget's tolerance."""
        if (skeleton := shapes.student_on_meta()) is None:
            return
        try:
            lora_rank_for_budget(skeleton, params.target_modules, shapes.budget, params.match_tolerance)
        except ValueError as error:
            raise ParameterError(f"Parameter 'baselines.lora.target_modules' = {params.target_modules} does not "
                                 f"fit: {str(error)[0].lower()}{str(error)[1:]}") from None

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: LoraParams, protocol: TrainingProtocol,
              tuned_lora: dict) -> Trained:
        """LoRA on question -> answer: trainable parameters matched to the hyper-network's, (by
        default) the same number of optimizer steps and batch size as PILOT's stage 1, and selected
        by the same rule: the best validation step, validated as often as stage 1. With
        ``baselines.lora.use_tuned`` its learning rate and alpha ratio come from ``tune_lora``.

        Returns:
            ``lora_adapter``, its loss history, and the parameter counts and selected step.
        """
        tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
        budget = hypernet_budget(student, guidance, seed)
        training, alpha_ratio = lora_settings(params, stage1.training, seed, tuned_lora if params.use_tuned else None)
        adapter, result = train_lora(student, tasks_train, budget, params.target_modules, params.match_tolerance,
                                     alpha_ratio, training, val_rows=tasks_val, generation=generation,
                                     eval_every=stage1.training.eval_every)
        metrics = {"hypernet_parameters": budget, "lora_parameters": adapter.num_parameters,
                   "best_step": result.best_step, "best_val_accuracy": result.best_val_accuracy}
        return adapter, result.history_with_validation(), metrics

    @classmethod
    def load_artefact(cls, path: Path, rebuild: str) -> LoraAdapter:
        return LoraAdapter.load(path, rebuild=rebuild)   # peft's own files

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
