"""PILOT: the frozen student guided by a trained hyper-network (after stage 1, after stage 2)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from pilot.config import Stage1Params, Stage2Params
from pilot.guidance import GuidedStudent, HyperNetwork
from pilot.methods.base import Attached, Method, TrainingData
from pilot.models import CausalLM, count_parameters


class HypernetGuided:
    """A method that answers with a hyper-network's guidance (its ``hypernet`` field) through PILOT's
    :class:`GuidedStudent`: PILOT itself, and any control built on its hyper-network."""

    name: ClassVar[str]
    hypernet: HyperNetwork

    def prepare(self, student: CausalLM) -> None:
        self.hypernet.config.check_fits(student.hidden_size, student.num_layers, where=f"for {self.name}")
        self.hypernet.eval().to(student.device)

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        self.prepare(student)
        with GuidedStudent(student, self.hypernet) as guided:
            yield Attached(student, guidance=guided.guidance())

    @property
    def trainable_parameters(self) -> int:
        return count_parameters(self.hypernet)


@dataclass
class Pilot(HypernetGuided, Method):
    """The hyper-network's guidance at its injection site: no plan, no teacher (what is served)."""

    name: ClassVar[str] = "pilot"
    inputs: ClassVar[tuple[str, ...]] = ("hypernet_stage2",)
    hypernet: HyperNetwork

    def guidance_settings(self) -> dict[str, Any]:
        site = self.hypernet.config
        return {"guidance_reader": site.reader, "guidance_read_layer": site.resolved_read_layer(),
                "guidance_inject_layer": site.inject_layer, "guidance_scale": site.guidance_scale}


@dataclass
class PilotStage1(Pilot):
    """PILOT after stage 1 (teacher-guided imitation of the cached trajectories)."""

    name: ClassVar[str] = "pilot_stage1"
    inputs: ClassVar[tuple[str, ...]] = ("hypernet_stage1", "params:stage1")
    hypernet: HyperNetwork
    stage1: Stage1Params

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {**self.guidance_settings(), "training_steps": self.stage1.training.steps,
                "training_data_rows": data.cached_rows}


@dataclass
class PilotStage2(Pilot):
    """PILOT after stage 2 (teacher-free refinement on the training split); its steps are both stages'."""

    name: ClassVar[str] = "pilot_stage2"
    paired_with: ClassVar[str | None] = "pilot_stage1"   # what stage 2 adds, question by question
    inputs: ClassVar[tuple[str, ...]] = ("hypernet_stage2", "params:stage1", "params:stage2")
    hypernet: HyperNetwork
    stage1: Stage1Params
    stage2: Stage2Params

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {**self.guidance_settings(), "training_data_rows": data.training_rows,
                "training_steps": self.stage1.training.steps + self.stage2.training.steps}
