"""CAA, as a compared method: a static steering vector -- the mean difference of plan-conditioned
and plan-free states -- at the injection layer, at its chosen scale.

The vector comes from the latent cache (both states at the injection layer, per example), is
injected through the same energy-aligned injector as PILOT's guidance, and its scale is chosen
on the validation split. It is PILOT without the query: one vector for every question.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import torch
from pydantic import Field

from pilot.config import GenerationParams, GuidanceParams, Params, Positive
from pilot.evaluation import accuracy
from pilot.guidance import Guidance, GuidanceInjector
from pilot.latents import LatentCache
from pilot.methods.base import Attached, TrainingData
from pilot.methods.trained import Trained, TrainedBaseline, TrainedModule
from pilot.models import CausalLM
from pilot.training.protocol import TrainingProtocol

logger = logging.getLogger(__name__)


class CaaParams(Params):
    """``baselines.caa``: the scales CAA's vector is tried at on the validation split."""

    scales: list[Positive] = Field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 1.0], min_length=1,
                                   description="Relative energies (the injector's guidance_scale) to try; the best "
                                               "on the validation split is used.")


def steering_vector(cache: LatentCache) -> dict[str, torch.Tensor]:
    """The mean of ``plan-conditioned - plan-free`` states at the injection layer over the cache.

    Also returns ``reference_rms``, the mean RMS norm of the plan-free states there, so the
    vector can be injected through the same energy-aligned injector as PILOT's guidance.
    """
    total, rms_total, count = None, 0.0, 0
    for shard in cache.shards():
        difference = (shard["inject_plan_mean"].float() - shard["inject_free_mean"].float()).sum(0)
        total = difference if total is None else total + difference
        rms_total += float(shard["inject_free_rms"].sum())
        count += shard["inject_plan_mean"].shape[0]
    return {"vector": total / max(count, 1), "reference_rms": torch.tensor(rms_total / max(count, 1))}


def caa_guidance(steering: dict[str, torch.Tensor]) -> torch.Tensor:
    """The steering vector in the injector's units: the injector adds ``scale * rms(h) * g``,
    so ``g = vector / reference_rms`` adds about ``scale * vector`` to a typical state."""
    return steering["vector"] / steering["reference_rms"].clamp_min(1e-6)


@contextmanager
def steered(student: CausalLM, steering: dict[str, torch.Tensor], inject_layer: int, scale: float,
            num_prompts: int) -> Iterator[Guidance]:
    """Guidance adding the steering vector at ``scale`` to every prompt; removed on leaving."""
    with GuidanceInjector(student.model, inject_layer, scale, name="caa_steering") as injector:
        yield Guidance(injector, vectors=caa_guidance(steering).expand(num_prompts, -1))


def choose_caa_scale(student: CausalLM, val_rows: pd.DataFrame, steering: dict[str, torch.Tensor],
                     inject_layer: int, scales: Sequence[float],
                     generation: GenerationParams) -> tuple[float, pd.DataFrame]:
    """Pick the steering scale with the best validation accuracy (decoding with ``generation``, the
    run's settings); returns (scale, sweep table)."""
    sweep = []
    for scale in scales:
        with steered(student, steering, inject_layer, scale, len(val_rows)) as guidance:
            value = accuracy(student, val_rows, guidance=guidance, generation=generation)
        sweep.append({"scale": float(scale), "val_accuracy": value})
        logger.info("CAA scale %.3g: validation accuracy %.3f", scale, value)
    table = pd.DataFrame(sweep)
    best = float(table.loc[table["val_accuracy"].idxmax(), "scale"])
    return best, table


class CaaSteering(TrainedModule):
    """CAA's trained part: the steering vector, the plan-free states' mean RMS norm it is measured
    against, and the scale chosen for it on the validation split."""

    kind = "caa"

    def __init__(self, hidden_size: int, scale: float = 1.0) -> None:
        super().__init__()
        self.hidden_size, self.scale = int(hidden_size), float(scale)
        self.register_buffer("vector", torch.zeros(self.hidden_size))
        self.register_buffer("reference_rms", torch.zeros(()))

    @classmethod
    def of(cls, steering: dict[str, torch.Tensor], scale: float) -> CaaSteering:
        module = cls(steering["vector"].numel(), scale)
        module.load_state_dict(steering)
        return module

    @property
    def steering(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector, "reference_rms": self.reference_rms}

    @property
    def num_parameters(self) -> int:
        return self.vector.numel()

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "scale": self.scale}

    @classmethod
    def from_config(cls, config: dict) -> CaaSteering:
        return cls(config["hidden_size"], config["scale"])


@dataclass
class Caa(TrainedBaseline):
    """One steering vector for every question (PILOT without the query), scaled as chosen on validation."""

    name: ClassVar[str] = "caa"
    params: ClassVar[type[CaaParams]] = CaaParams
    artefact: ClassVar[str] = "caa_artefact"
    train_inputs: ClassVar[tuple[str, ...]] = ("latent_cache",)
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "caa_artefact", "params:guidance")
    caa_artefact: CaaSteering
    guidance: GuidanceParams

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: CaaParams, protocol: TrainingProtocol,
              latent_cache: LatentCache) -> Trained:
        """CAA's vector, the mean plan-conditioned minus plan-free state at the injection layer over the
        latent cache, and its scale: the configured one with the best validation accuracy.

        Returns:
            ``caa_artefact``, the validation sweep (one row per scale tried), and the chosen scale.
        """
        _, tasks_val, _, generation, _ = protocol.unpacked()
        steering = steering_vector(latent_cache)
        scale, sweep = choose_caa_scale(student, tasks_val, steering, guidance.inject_layer, params.scales, generation)
        history = [{"step": tried, **row} for tried, row in enumerate(sweep.to_dict("records"))]
        return CaaSteering.of(steering, scale), history, {"scale": scale,
                                                          "best_val_accuracy": float(sweep["val_accuracy"].max())}

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        # one vector, which generation gives every prompt
        with steered(student, self.caa_artefact.steering, self.guidance.inject_layer, self.caa_artefact.scale,
                     1) as steering:
            yield Attached(student, guidance=steering)

    @property
    def trainable_parameters(self) -> int:
        return self.caa_artefact.num_parameters

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {"guidance_inject_layer": self.guidance.inject_layer, "guidance_scale": self.caa_artefact.scale,
                "training_data_rows": data.cached_rows}
