"""CAA as a compared method: the static steering vector at the injection layer, at its chosen scale."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pilot.baselines.caa import steered
from pilot.config import GuidanceParams
from pilot.methods.base import Attached, Method, TrainingData
from pilot.models import CausalLM


@dataclass
class Caa(Method):
    """One steering vector for every question (PILOT without the query), scaled as chosen on validation."""

    name: ClassVar[str] = "caa"
    inputs: ClassVar[tuple[str, ...]] = ("steering_vector", "caa_config", "params:guidance")
    steering_vector: dict[str, torch.Tensor]
    caa_config: dict
    guidance: GuidanceParams

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        # one vector, which generation gives every prompt
        with steered(student, self.steering_vector, self.guidance.inject_layer, self.caa_config["scale"], 1) as steering:
            yield Attached(student, guidance=steering)

    @property
    def trainable_parameters(self) -> int:
        return int(self.steering_vector["vector"].numel())

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {"guidance_inject_layer": self.guidance.inject_layer, "guidance_scale": self.caa_config["scale"],
                "training_data_rows": data.cached_rows}
