"""ReFT, as a compared method: LoReFT edits of the frozen student's hidden states (Wu et al., 2024).

At each chosen decoder layer the output ``h`` becomes ``h + R^T (W h + b - R h)``: ``R`` (rank x
hidden, orthonormal rows) picks a low-rank subspace and the edit replaces ``h``'s coordinates
there with the learned ``W h + b``. Instance-agnostic except through the states themselves -- the
contrast with PILOT's query-conditioned vector. The formula is pyreft's ``LoreftIntervention``;
pyreft 0.1.0 itself pins ``transformers==4.45.1`` (and wandb, jupyter, ...), which cannot sit
beside this project's transformers 5, so the edit lives here, hooked on the student as an
intervention (:mod:`pilot.interventions`).

``W`` starts equal to ``R`` and ``b`` at zero, so an untrained ReFT is exactly the plain student.
The rank matches the hyper-network's parameter budget (``2 * rank * hidden + rank`` per layer),
capped at the hidden size; the edits act at every position, prompt and reply alike, so
training (teacher forced) and generation (prefill and decoding) see the same edit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import pandas as pd
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrizations

from pilot.config import AdapterTrainingParams, GenerationParams, GuidanceParams, LMTrainConfig, ParameterError, Params
from pilot.evaluation import validator
from pilot.interventions import Intervention, layer_hidden, with_hidden
from pilot.methods.base import Attached, TrainingData
from pilot.methods.trained import (
    StudentShapes,
    Trained,
    TrainedBaseline,
    TrainedModule,
    budget_metrics,
    hypernet_budget,
)
from pilot.models import CausalLM, decoder_layers, freeze
from pilot.runtime import one_thread
from pilot.training.base_lm import answer_examples, answer_loss_terms
from pilot.training.engine import Objective, TrainingResult, train
from pilot.training.protocol import TrainingProtocol

logger = logging.getLogger(__name__)


class ReftParams(Params):
    """``baselines.reft``: LoReFT edits whose rank matches the hyper-network's budget (capped at the hidden size)."""

    layers: list[int] | None = Field(None, description="The decoder layers edited; null: the guidance's "
                                                       "inject_layer and every layer after it.")
    match_tolerance: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.1, description="How far the edits' parameter count may fall from the hyper-network's, as a fraction.")
    training: AdapterTrainingParams = Field(AdapterTrainingParams(learning_rate=3e-3), description="Its loop; "
                                            "steps and batch size left null are stage 1's.")

    def check_against(self, num_layers: int, hidden_size: int, budget: int) -> None:
        """The configured ``layers`` must exist in a student with ``num_layers`` decoder layers, each
        once, and fit the hyper-network's parameter ``budget`` at rank 1 (the rank only grows from there:
        ``2 * rank * hidden_size + rank`` parameters a layer)."""
        if not self.layers:
            return
        allowed = f"0..{num_layers - 1}, or -{num_layers}..-1 counting from the end"
        for layer in self.layers:
            if not -num_layers <= layer < num_layers:
                raise ParameterError(f"Parameter 'baselines.reft.layers' = {self.layers} names layer {layer}, outside "
                                     f"the student's layers: allowed {allowed}.")
        if len({layer % num_layers for layer in self.layers}) != len(self.layers):
            raise ParameterError(f"Parameter 'baselines.reft.layers' = {self.layers} names a layer twice (negative "
                                 f"indices count from the end of {num_layers}); list each once.")
        smallest = len(self.layers) * (2 * hidden_size + 1)
        if smallest > (1 + self.match_tolerance) * budget:
            raise ParameterError(
                f"Parameter 'baselines.reft.layers' = {self.layers} needs {smallest} parameters even at rank 1, over "
                f"the hyper-network's budget of {budget} (baselines.reft.match_tolerance: {self.match_tolerance}); "
                "list fewer layers.")


class LoReft(nn.Module):
    """``h + R^T (W h + b - R h)`` with ``R`` orthonormal (rank x hidden); a no-op at initialisation."""

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= hidden_size:
            raise ValueError(f"A LoReFT rank must be between 1 and the hidden size {hidden_size}; got {rank}.")
        # Cayley map: torch's default for a non-square weight (Householder) was measured 16x slower at
        # 576 x 141, and collapses R to zero after one AdamW step with weight decay.
        # Its start is a QR factorization, whose bits depend on the thread count: one thread, at any load.
        with one_thread():
            self.rotation = parametrizations.orthogonal(nn.Linear(hidden_size, rank, bias=False),
                                                        orthogonal_map="cayley")
        self.source = nn.Linear(hidden_size, rank)
        with torch.no_grad():   # W = R, b = 0: W h + b - R h is exactly zero
            self.source.weight.copy_(self.rotation.weight)
            self.source.bias.zero_()
        self.fixed_rotation: torch.Tensor | None = None   # R computed once, for inference (not saved)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rotation = (self.fixed_rotation if self.fixed_rotation is not None else self.rotation.weight).to(hidden.dtype)
        # (W - R) h + b computed as one product, so the untrained edit is exactly zero, not rounding noise
        edit = nn.functional.linear(hidden, self.source.weight.to(hidden.dtype) - rotation,
                                    self.source.bias.to(hidden.dtype))
        return hidden + edit @ rotation


class ReftModule(TrainedModule):
    """LoReFT edits at ``layers`` of a student with hidden size ``hidden_size``."""

    kind = "reft"

    def __init__(self, hidden_size: int, rank: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.hidden_size, self.rank, self.layers = int(hidden_size), int(rank), [int(layer) for layer in layers]
        self.edits = nn.ModuleList(LoReft(hidden_size, rank) for _ in self.layers)

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "rank": self.rank, "layers": self.layers}

    @contextmanager
    def attached(self, student: CausalLM, name: str = "reft") -> Iterator[ReftModule]:
        """The edits hooked on ``student``'s decoder layers, as one intervention, while inside (removed
        however the block ends)."""
        blocks = decoder_layers(student.model)
        if student.hidden_size != self.hidden_size or max(self.layers) >= len(blocks) or min(self.layers) < -len(blocks):
            raise ValueError(f"This ReFT was trained for hidden size {self.hidden_size} at layers {self.layers}; the "
                             f"student has hidden size {student.hidden_size} and {len(blocks)} layers. Retrain it "
                             "(`kedro run --pipelines baselines`).")
        sites = [layer % len(blocks) for layer in self.layers]
        with Intervention(student.model, name, sites) as site:
            for layer, edit in zip(sites, self.edits):
                site.hook(blocks[layer].register_forward_hook(
                    lambda module, args, output, edit=edit: with_hidden(output, edit(layer_hidden(output)))))
            yield self

    def fix_rotations(self) -> ReftModule:
        """Compute each rotation once (the Cayley map solves a hidden x hidden system) and use it for
        every later forward pass, instead of once per pass; for inference. Returns ``self``."""
        with torch.no_grad():
            for edit in self.edits:
                edit.fixed_rotation = edit.rotation.weight.detach().clone()
        return self

    @contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """No gradients and each rotation computed once while inside (validation during training)."""
        self.fix_rotations()
        try:
            with torch.no_grad():
                yield
        finally:
            for edit in self.edits:
                edit.fixed_rotation = None

    @classmethod
    def from_config(cls, config: dict) -> ReftModule:
        return cls(config["hidden_size"], config["rank"], config["layers"])


def reft_layers(configured: Sequence[int] | None, inject_layer: int, num_layers: int) -> list[int]:
    """The configured layers, or by default PILOT's injection layer and every layer after it."""
    return list(configured) if configured else list(range(inject_layer % num_layers, num_layers))


def reft_rank_for_budget(hidden_size: int, num_layers: int, budget: int, tolerance: float) -> tuple[int, int]:
    """The LoReFT rank whose parameter count over ``num_layers`` layers is closest to ``budget``,
    at most the hidden size; (rank, count). Warns when the cap keeps it outside ``tolerance``."""
    per_rank = num_layers * (2 * hidden_size + 1)
    rank = min(hidden_size, max(1, round(budget / per_rank)))
    count = rank * per_rank
    if abs(count - budget) > tolerance * budget:
        fix = "list more layers" if count < budget else "list fewer layers"
        logger.warning("ReFT at rank %d on %d layer(s) has %d parameters, %.0f%% of the hyper-network's %d; "
                       "%s in baselines.reft.layers to match the budget.", rank, num_layers, count,
                       100 * count / budget, budget, fix)
    return rank, count


def train_reft(student: CausalLM, rows: pd.DataFrame, budget: int, layers: Sequence[int], tolerance: float,
               config: LMTrainConfig, val_rows: pd.DataFrame | None = None,
               generation: GenerationParams | None = None,
               on_validation: Callable[[int, float], None] | None = None) -> tuple[ReftModule, TrainingResult]:
    """Train LoReFT edits on question -> answer with the student frozen; with ``val_rows``
    the edits of the best validation step (step 0: the plain student) are kept."""
    rank, count = reft_rank_for_budget(student.hidden_size, len(layers), budget, tolerance)
    freeze(student.model)
    torch.manual_seed(config.seed)
    reft = ReftModule(student.hidden_size, rank, layers).to(student.device)
    logger.info("ReFT rank %d at layers %s: %d trainable parameters (hyper-network: %d)", rank, list(layers),
                reft.num_parameters, budget)
    terms = answer_loss_terms(student, answer_examples(student.tokenizer, rows), config)
    with reft.attached(student):
        result = train(reft, Objective(terms, weights={"lm": 1.0}), config, name="train reft",
                       validate=validator(student, val_rows, generation, around=reft.frozen_weights),
                       on_validation=on_validation)
    return result.model, result


@dataclass
class Reft(TrainedBaseline):
    """LoReFT edits at the injection layer and after, at the hyper-network's budget (capped)."""

    name: ClassVar[str] = "reft"
    params: ClassVar[type[ReftParams]] = ReftParams
    artefact: ClassVar[str] = "reft_artefact"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "reft_artefact")
    reft_artefact: ReftModule

    @classmethod
    def check_against(cls, params: ReftParams, shapes: StudentShapes) -> None:
        params.check_against(shapes.num_layers, shapes.hidden_size, shapes.budget)

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: ReftParams,
              protocol: TrainingProtocol) -> Trained:
        """LoReFT at the injection layer and every layer after it (or ``baselines.reft.layers``), its
        rank matched to the hyper-network's parameters (capped at the hidden size), on LoRA's protocol.

        Returns:
            ``reft_artefact``, its loss history, and its parameter count, budget ratio and selected step.
        """
        tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
        budget = hypernet_budget(student, guidance, seed)
        layers = reft_layers(params.layers, guidance.inject_layer, student.num_layers)
        reft, result = train_reft(student, tasks_train, budget, layers, params.match_tolerance,
                                  params.training.for_run(stage1.training, seed), val_rows=tasks_val,
                                  generation=generation)
        return reft, result.history_with_validation(), budget_metrics(reft.num_parameters, budget, result)

    def prepare(self, student: CausalLM) -> None:
        # each rotation computed once, like loading it: not part of a question's time
        reft = self.reft_artefact.to(student.device)
        if any(edit.fixed_rotation is None for edit in reft.edits):
            reft.fix_rotations()

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        self.prepare(student)
        with self.reft_artefact.attached(student), torch.no_grad():
            yield Attached(student)

    @property
    def trainable_parameters(self) -> int:
        return self.reft_artefact.num_parameters

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {**super().comparable_settings(data),
                "guidance_inject_layer": ",".join(map(str, self.reft_artefact.layers))}
