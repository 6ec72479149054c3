"""PILOT's trained static controls: guidance that does not depend on the query.

PILOT claims that guidance computed from each query beats a static edit of the same frozen model.
Both controls here are PILOT's own hyper-network with the query taken out (``reader: none``: it reads
nothing, and its output is one learned vector, zero at the start, so the untrained control is the
plain student), injected by the same :class:`~pilot.guidance.GuidedStudent` and trained by PILOT's
own stages, so that the query is the one thing that differs:

- :class:`StaticGuidance` (``static_guidance``): everything else is PILOT's -- the guidance site
  (``guidance.inject_layer``, ``extra_inject_layers``), modulation, prior and scale; stage 1 on the
  latent cache and the teacher's plans (:func:`~pilot.training.stage1.run_stage1`), then stage 2
  (:func:`~pilot.training.stage2.run_stage2`), with ``stage1.training`` and ``stage2.training``.
  Its parameters are the output size (one learned vector; with ``prior`` the prior and the (m, a)
  pair it would have emitted) and ``log_std``. With ``stage1.use_tuned_weights`` PILOT's stage 1
  takes the tuned loss weights; this control keeps the configured ones (its node reads at most eight
  inputs, and the tuned file would be a ninth).
- :class:`BiasSteering` (``bias_steering``): bias-only steering after arXiv 2505.18706 (one trained
  vector per decoder layer of a frozen model, trained by RL): one vector per layer (``layers``; every
  layer by default), added to the residual stream after that layer as a plain ``h + b_l``
  (``scaling: none``; ``rms`` sizes it by ``rms(h)`` as PILOT's injector does), trained from zero by
  stage 2's policy gradient alone: no teacher, no stage 1; the zero start is stage 2's reference (its
  KL term is to the plain student, its anchor the bias vectors' squared size). As everywhere in this
  code base the vectors act at the answer positions (generation: from the prompt's last token on),
  not over the prompt as in the paper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
from pydantic import Field

from pilot.config import (
    GuidanceParams,
    LatentsParams,
    NonNegativeInt,
    ParameterError,
    Params,
    Positive,
    Stage2Params,
    validate,
    with_run_seed,
)
from pilot.guidance import HyperNetConfig, HyperNetwork
from pilot.latents import LatentCache
from pilot.methods.base import TrainingData
from pilot.methods.pilot import HypernetGuided
from pilot.methods.trained import StudentShapes, Trained, TrainedBaseline, budget_metrics, hypernet_budget
from pilot.models import CausalLM, count_parameters
from pilot.training.engine import TrainingResult
from pilot.training.protocol import TrainingProtocol
from pilot.training.stage1 import run_stage1
from pilot.training.stage2 import run_stage2

logger = logging.getLogger(__name__)


def staged_history(stages: dict[str, TrainingResult]) -> list[dict[str, float]]:
    """The stages' per-step rows (``val_accuracy`` on the validated steps) in one table, each column
    named ``<stage>/<column>`` so that the MLflow histories of the stages do not collide."""
    rows: dict[int, dict[str, float]] = {}
    for stage, result in stages.items():
        for row in result.history_with_validation():
            step = int(row["step"])
            rows.setdefault(step, {"step": step}).update(
                {f"{stage}/{column}": value for column, value in row.items() if column != "step"})
    return [rows[step] for step in sorted(rows)]


def checkpoint_folder(root: str | None, stage: str) -> str | None:
    return None if root is None else str(Path(root) / stage)


@dataclass
class GuidedControl(HypernetGuided, TrainedBaseline):
    """A query-free hyper-network on the student through PILOT's :class:`GuidedStudent`; saved and loaded
    as PILOT's hyper-networks are (``hypernet.safetensors`` + ``hypernet_config.json``, checksums)."""

    hypernet: HyperNetwork
    stage2: Stage2Params

    @classmethod
    def load_artefact(cls, path: Path, rebuild: str) -> HyperNetwork:
        return HyperNetwork.load(path, rebuild=rebuild)

    def guidance_settings(self) -> dict[str, Any]:
        site = self.hypernet.config
        return {"guidance_reader": site.reader, "guidance_scale": site.guidance_scale,
                "guidance_inject_layer": ",".join(map(str, site.inject_layers))}


# ------------------------------------------------------------------ PILOT without the query
class StaticGuidanceParams(Params):
    """``baselines.static_guidance``: PILOT's guidance, stages and steps, with the hyper-network's reader ``none``."""

    checkpoint_dir: str | None = Field("data/06_models/checkpoints/static_guidance",
                                       description="Its checkpoints, stage1/ and stage2/ under this folder, one "
                                                   "subfolder per run (resumed as stage1.resume and stage2.resume "
                                                   "say); null: none.")


@dataclass
class StaticGuidance(GuidedControl):
    """PILOT with the query taken out: one learned guidance vector for every question, trained by both stages."""

    name: ClassVar[str] = "static_guidance"
    paired_with: ClassVar[str | None] = "pilot_stage2"   # what the query adds: PILOT against it, question by question
    params: ClassVar[type[StaticGuidanceParams]] = StaticGuidanceParams
    artefact: ClassVar[str] = "static_guidance_artefact"
    train_inputs: ClassVar[tuple[str, ...]] = ("latent_cache", "teacher_plans", "params:latents", "params:stage2")
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "static_guidance_artefact",
                                         "params:stage2")

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: StaticGuidanceParams,
              protocol: TrainingProtocol, latent_cache: LatentCache, teacher_plans: pd.DataFrame,
              latents: LatentsParams, stage2: Stage2Params) -> Trained:
        """PILOT's stage 1 (latent cache, teacher plans) and stage 2 on the run's guidance site with the reader
        ``none``: the same losses, steps and selection, the query the one thing taken out.

        Returns:
            ``static_guidance_artefact`` (the hyper-network after stage 2), both stages' per-step rows
            (``stage1/<column>``, ``stage2/<column>``) and each stage's selected step and validation accuracy.
        """
        tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
        # extra parameter blocks arrive as dicts where no other node of the run types them (a baselines-only run)
        latents, stage2 = validate(LatentsParams, latents, "latents"), validate(Stage2Params, stage2, "stage2")
        if stage1.use_tuned_weights:
            logger.warning("static_guidance trains stage 1 with the configured loss weights, not the tuned ones "
                           "(stage1.use_tuned_weights); set them in stage1.training to compare like for like.")
        site = guidance.model_copy(update={"reader": "none"})
        first = run_stage1(student, latent_cache, teacher_plans, tasks_train, tasks_val, site, latents,
                           with_run_seed(stage1.training, seed), generation,
                           checkpoint_folder(params.checkpoint_dir, "stage1"), stage1.resume)
        second = run_stage2(student, first.model, tasks_train, tasks_val, with_run_seed(stage2.training, seed),
                            generation, checkpoint_folder(params.checkpoint_dir, "stage2"), stage2.resume)
        metrics = {**budget_metrics(count_parameters(second.model), hypernet_budget(student, guidance, seed), second),
                   "stage1_best_step": first.best_step, "stage1_best_val_accuracy": first.best_val_accuracy,
                   "train_seconds": first.seconds + second.seconds}
        return second.model, staged_history({"stage1": first, "stage2": second}), metrics

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {**self.guidance_settings(), "guidance_inject_layer": self.hypernet.config.inject_layer,
                "training_data_rows": data.training_rows,
                "training_steps": self.stage1.training.steps + self.stage2.training.steps}


# ------------------------------------------------------------------ one bias vector per layer
class BiasSteeringParams(Params):
    """``baselines.bias_steering``: one vector per decoder layer, trained from zero by stage 2's policy gradient."""

    layers: list[NonNegativeInt] | None = Field(None, description="The decoder layers given a vector, each "
                                                                  "after that block's output; null: every layer.")
    scaling: Literal["none", "rms"] = Field("none", description="none: h + b, a plain bias as in arXiv 2505.18706; "
                                                                "rms: h + rms(h) * b, energy-aligned as PILOT's "
                                                                "guidance.")
    learning_rate: Positive | None = Field(3e-2, description="Its peak learning rate, chosen on the validation "
                                                             "split (BENCHMARKS.md); null: stage 2's "
                                                             "(stage2.training.learning_rate).")
    checkpoint_dir: str | None = Field("data/06_models/checkpoints/bias_steering",
                                       description="Its checkpoints, one subfolder per run (resumed as stage2.resume "
                                                   "says); null: none.")

    def resolved_layers(self, num_layers: int) -> list[int]:
        return list(self.layers) if self.layers else list(range(num_layers))

    def check_against(self, num_layers: int) -> None:
        """The configured ``layers`` must exist in a student with ``num_layers`` decoder layers, each once."""
        layers = self.resolved_layers(num_layers)
        if max(layers) >= num_layers:
            raise ParameterError(f"Parameter 'baselines.bias_steering.layers' = {self.layers} names a layer outside "
                                 f"the student's layers: allowed 0..{num_layers - 1}.")
        if len(set(layers)) != len(layers):
            raise ParameterError(f"Parameter 'baselines.bias_steering.layers' = {self.layers} names a layer twice; "
                                 "list each once.")


def bias_vectors(params: BiasSteeringParams, guidance: GuidanceParams, hidden_size: int,
                 num_layers: int) -> HyperNetwork:
    """The untrained bias vectors (all zero: the plain student), as a query-free hyper-network adding one
    hidden-size slice of its output at each layer."""
    first, *others = params.resolved_layers(num_layers)
    config = HyperNetConfig(hidden_size, num_layers, read_layer=guidance.read_layer % num_layers,
                            inject_layer=first, extra_inject_layers=others, reader="none", modulation="add",
                            prior=False, guidance_scale=1.0, init_log_std=guidance.init_log_std,
                            scaling=params.scaling)
    return HyperNetwork(config)


@dataclass
class BiasSteering(GuidedControl):
    """One trained bias vector per decoder layer (arXiv 2505.18706), learned by stage 2's policy gradient alone."""

    name: ClassVar[str] = "bias_steering"
    paired_with: ClassVar[str | None] = "pilot_stage2"
    params: ClassVar[type[BiasSteeringParams]] = BiasSteeringParams
    artefact: ClassVar[str] = "bias_steering_artefact"
    train_inputs: ClassVar[tuple[str, ...]] = ("params:stage2",)
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "bias_steering_artefact",
                                         "params:stage2")

    @classmethod
    def check_against(cls, params: BiasSteeringParams, shapes: StudentShapes) -> None:
        params.check_against(shapes.num_layers)

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: BiasSteeringParams,
              protocol: TrainingProtocol, stage2: Stage2Params) -> Trained:
        """Stage 2 (its steps, batch, groups and losses) on zero-initialised bias vectors at ``layers``: no
        teacher, no stage 1; the zero start is its reference.

        Returns:
            ``bias_steering_artefact``, its per-step rows, its parameters beside the hyper-network's and
            the selected step and validation accuracy.
        """
        tasks_train, tasks_val, _, generation, seed = protocol.unpacked()
        stage2 = validate(Stage2Params, stage2, "stage2")   # a dict where no other node types it
        start = bias_vectors(params, guidance, student.hidden_size, student.num_layers)
        config = with_run_seed(stage2.training, seed)
        if params.learning_rate is not None:
            config = config.model_copy(update={"learning_rate": params.learning_rate})
        result = run_stage2(student, start, tasks_train, tasks_val, config, generation, params.checkpoint_dir,
                            stage2.resume)
        metrics = budget_metrics(count_parameters(result.model), hypernet_budget(student, guidance, seed), result)
        return result.model, result.history_with_validation(), metrics

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {**self.guidance_settings(), "training_data_rows": data.training_rows,
                "training_steps": self.stage2.training.steps}
