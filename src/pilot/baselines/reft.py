"""ReFT: LoReFT interventions on the frozen student's hidden states (Wu et al., 2024).

At each chosen decoder layer the output ``h`` becomes ``h + R^T (W h + b - R h)``: ``R`` (rank x
hidden, orthonormal rows) picks a low-rank subspace and the edit replaces ``h``'s coordinates
there with the learned ``W h + b``. Instance-agnostic except through the states themselves -- the
contrast with PILOT's query-conditioned vector. The formula is pyreft's ``LoreftIntervention``;
pyreft 0.1.0 itself pins ``transformers==4.45.1`` (and wandb, jupyter, ...), which cannot sit
beside this project's transformers 5, so the intervention lives here, on the project's own sites.

``W`` starts equal to ``R`` and ``b`` at zero, so an untrained ReFT is exactly the plain student.
The rank matches the hyper-network's parameter budget (``2 * rank * hidden + rank`` per layer),
capped at the hidden size; the interventions act at every position, prompt and reply alike, so
training (teacher forced) and generation (prefill and decoding) see the same edit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrizations

from pilot.baselines.modules import TrainedModule
from pilot.config import GenerationParams, LMTrainConfig
from pilot.evaluation import validator
from pilot.guidance.injection import Intervention, layer_hidden, with_hidden
from pilot.models import CausalLM, decoder_layers, freeze
from pilot.runtime import one_thread
from pilot.training.base_lm import answer_examples, answer_loss_terms, lm_loop
from pilot.training.engine import Objective, TrainingResult, train

logger = logging.getLogger(__name__)


class LoReftIntervention(nn.Module):
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


class Reft(TrainedModule):
    """LoReFT interventions at ``layers`` of a student with hidden size ``hidden_size``."""

    kind = "reft"

    def __init__(self, hidden_size: int, rank: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.hidden_size, self.rank, self.layers = int(hidden_size), int(rank), [int(layer) for layer in layers]
        self.interventions = nn.ModuleList(LoReftIntervention(hidden_size, rank) for _ in self.layers)

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "rank": self.rank, "layers": self.layers}

    @contextmanager
    def attached(self, student: CausalLM, name: str = "reft") -> Iterator[Reft]:
        """The interventions hooked on ``student``'s decoder layers while inside (removed however the block ends)."""
        blocks = decoder_layers(student.model)
        if student.hidden_size != self.hidden_size or max(self.layers) >= len(blocks) or min(self.layers) < -len(blocks):
            raise ValueError(f"This ReFT was trained for hidden size {self.hidden_size} at layers {self.layers}; the "
                             f"student has hidden size {student.hidden_size} and {len(blocks)} layers. Retrain it "
                             "(`kedro run --pipelines baselines`).")
        sites = [layer % len(blocks) for layer in self.layers]
        with Intervention(student.model, name, sites) as site:
            for layer, intervention in zip(sites, self.interventions):
                site.hook(blocks[layer].register_forward_hook(
                    lambda module, args, output, edit=intervention: with_hidden(output, edit(layer_hidden(output)))))
            yield self

    def fix_rotations(self) -> Reft:
        """Compute each rotation once (the Cayley map solves a hidden x hidden system) and use it for
        every later forward pass, instead of once per pass; for inference. Returns ``self``."""
        with torch.no_grad():
            for intervention in self.interventions:
                intervention.fixed_rotation = intervention.rotation.weight.detach().clone()
        return self

    @contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """No gradients and each rotation computed once while inside (validation during training)."""
        self.fix_rotations()
        try:
            with torch.no_grad():
                yield
        finally:
            for intervention in self.interventions:
                intervention.fixed_rotation = None

    @classmethod
    def from_config(cls, config: dict) -> Reft:
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
               generation: GenerationParams | None = None, eval_every: int = 0,
               on_validation: Callable[[int, float], None] | None = None) -> tuple[Reft, TrainingResult]:
    """Train LoReFT interventions on question -> answer with the student frozen; with ``val_rows``
    the interventions of the best validation step (step 0: the plain student) are kept."""
    rank, count = reft_rank_for_budget(student.hidden_size, len(layers), budget, tolerance)
    freeze(student.model)
    torch.manual_seed(config.seed)
    reft = Reft(student.hidden_size, rank, layers).to(student.device)
    logger.info("ReFT rank %d at layers %s: %d trainable parameters (hyper-network: %d)", rank, list(layers),
                reft.num_parameters, budget)
    terms = answer_loss_terms(student, answer_examples(student.tokenizer, rows), config)
    with reft.attached(student):
        result = train(reft, Objective(terms, weights={"lm": 1.0}), lm_loop(config, eval_every), name="train reft",
                       validate=validator(student, val_rows, generation, around=reft.frozen_weights),
                       on_validation=on_validation)
    return result.model, result
