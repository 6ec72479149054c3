"""Soft-token methods: ``k`` trained embeddings around every prompt of the frozen student.

* :class:`PauseTokens` (its :class:`PauseTokenModule`; Goyal et al., 2024): the same ``k`` learned
  embeddings after every prompt -- extra computation in context instead of guidance. ``k x hidden`` parameters, far below the
  hyper-network's budget by design (matching it would take about a thousand tokens).
* :class:`SoftThoughts` (its :class:`SoftThoughtModule`; SoftCoT-style, Xu et al., 2025): an
  assistant model (the teacher) reads the prompt, and a trained projection maps its last-layer states at the prompt's last ``k``
  positions into ``k`` soft tokens prepended to the student's input. Plan information at run
  time, paid for with the assistant's forward pass on every query; it bounds what learned plan
  *tokens* can carry against PILOT's plan *vector*. The projection is sized to the hyper-network's
  budget; its output layer starts at zero, so an untrained one gives every question the same
  tokens (its learned ``slots``).

Both train on question -> answer through :func:`pilot.training.base_lm.answer_loss_terms` with the
soft tokens in their slots (:mod:`pilot.soft_tokens`), and answer through the one
generation path with ``soft_prompt=``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch
from pydantic import Field
from torch import nn

from pilot.config import (
    AdapterTrainingParams,
    GenerationParams,
    GuidanceParams,
    LMTrainConfig,
    ParameterError,
    Params,
    PositiveInt,
)
from pilot.evaluation import validator
from pilot.generation import left_pad
from pilot.interventions import capture_layers
from pilot.methods.base import Attached
from pilot.methods.trained import (
    StudentShapes,
    Trained,
    TrainedBaseline,
    TrainedModule,
    budget_metrics,
    hypernet_budget,
)
from pilot.models import CausalLM, freeze
from pilot.soft_tokens import SoftTokenSlots, placeholders
from pilot.training.base_lm import answer_examples, answer_loss_terms
from pilot.training.engine import Objective, TrainingResult, train
from pilot.training.protocol import TrainingProtocol

logger = logging.getLogger(__name__)


class SoftTokenParams(Params):
    """``baselines.<pause_tokens | soft_thoughts>``: how many soft tokens, and the loop that trains them."""

    num_tokens: PositiveInt = Field(8, description="Soft tokens around every prompt.")
    training: AdapterTrainingParams = Field(AdapterTrainingParams(), description="Its loop; steps and batch size "
                                            "left null are stage 1's.")


class PauseTokenParams(SoftTokenParams):
    """``baselines.pause_tokens``; its learning rate: the best validation accuracy at 500 steps over
    1e-3..3e-1 (benchmarks/baseline_learning_rates.py)."""

    training: AdapterTrainingParams = Field(AdapterTrainingParams(learning_rate=1e-1), description="Its loop; steps "
                                            "and batch size left null are stage 1's.")


class SoftThoughtParams(SoftTokenParams):
    """``baselines.soft_thoughts``: the teacher's states at the prompt's last ``num_tokens`` positions."""

    num_tokens: PositiveInt = Field(4, description="Soft tokens before every prompt, one per position read.")


def vocabulary_embeddings(student: CausalLM, count: int, seed: int) -> torch.Tensor:
    """``count`` rows of the student's input-embedding matrix, drawn at random (prompt tuning's init)."""
    table = student.model.get_input_embeddings().weight.detach()
    rows = torch.randint(0, table.shape[0], (count,), generator=torch.Generator().manual_seed(seed))
    return table[rows.to(table.device)].float().cpu().clone()


class PauseTokenModule(TrainedModule):
    """``num_tokens`` learned embeddings, the same for every prompt."""

    kind = "pause_tokens"
    position = "suffix"   # between the prompt and the reply: extra computation before answering
    reads_prompt = False

    def __init__(self, num_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.num_tokens, self.hidden_size = int(num_tokens), int(hidden_size)
        self.tokens = nn.Parameter(torch.zeros(num_tokens, hidden_size))

    def forward(self, reading: torch.Tensor | None = None) -> torch.Tensor:
        return self.tokens

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "num_tokens": self.num_tokens, "hidden_size": self.hidden_size}

    @classmethod
    def from_config(cls, config: dict) -> PauseTokenModule:
        return cls(config["num_tokens"], config["hidden_size"])


class SoftThoughtModule(TrainedModule):
    """Soft token ``j`` = ``slot_j + MLP(assistant state at the prompt's j-th of its last k positions)``."""

    kind = "soft_thoughts"
    position = "prefix"   # before the prompt, as SoftCoT places its thoughts
    reads_prompt = True

    def __init__(self, num_tokens: int, assistant_size: int, projection_hidden: int, hidden_size: int,
                 read_layer: int = -1) -> None:
        super().__init__()
        self.num_tokens, self.hidden_size, self.read_layer = int(num_tokens), int(hidden_size), int(read_layer)
        self.assistant_size, self.projection_hidden = int(assistant_size), int(projection_hidden)
        self.slots = nn.Parameter(torch.zeros(num_tokens, hidden_size))
        self.projection = nn.Sequential(nn.Linear(assistant_size, projection_hidden), nn.GELU(),
                                        nn.Linear(projection_hidden, hidden_size))
        nn.init.zeros_(self.projection[-1].weight)
        nn.init.zeros_(self.projection[-1].bias)

    def forward(self, reading: torch.Tensor) -> torch.Tensor:
        return self.slots + self.projection(reading.to(self.slots.dtype))

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "num_tokens": self.num_tokens, "assistant_size": self.assistant_size,
                "projection_hidden": self.projection_hidden, "hidden_size": self.hidden_size,
                "read_layer": self.read_layer}

    @classmethod
    def from_config(cls, config: dict) -> SoftThoughtModule:
        return cls(config["num_tokens"], config["assistant_size"], config["projection_hidden"],
                   config["hidden_size"], config.get("read_layer", -1))


def soft_thoughts_hidden_for_budget(num_tokens: int, assistant_size: int, hidden_size: int, budget: int) -> int:
    """The projection's hidden width whose parameter count is closest to ``budget``."""
    fixed = num_tokens * hidden_size + hidden_size
    width = round((budget - fixed) / (assistant_size + hidden_size + 1))
    if width < 1:
        raise ValueError(f"Soft thoughts need {fixed + assistant_size + hidden_size + 1} parameters at the least, more "
                         f"than the hyper-network's {budget}; lower baselines.soft_thoughts.num_tokens.")
    return width


@torch.no_grad()
def assistant_reading(assistant: CausalLM, prompts: Sequence[str], num_tokens: int, read_layer: int = -1,
                      batch_size: int = 64) -> torch.Tensor:
    """(B, k, d_assistant): the assistant's states at ``read_layer`` over each prompt's last ``k`` tokens."""
    readings = []
    for start in range(0, len(prompts), batch_size):
        input_ids, mask = (t.to(assistant.device) for t in left_pad(assistant.tokenizer, prompts[start:start + batch_size]))
        if input_ids.shape[1] < num_tokens or int(mask.sum(1).min()) < num_tokens:
            raise ValueError(f"Soft thoughts read each prompt's last {num_tokens} tokens, but a prompt is shorter; "
                             "lower baselines.soft_thoughts.num_tokens.")
        layer = read_layer % assistant.num_layers
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with capture_layers(assistant.model, [layer]) as captured:
            assistant.model(input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        readings.append(captured[layer][:, -num_tokens:].float())
    return torch.cat(readings)


class AttachedSoftPrompt:
    """A soft-token module in its slots on the student (the :class:`~pilot.soft_tokens.SoftPrompt`
    that generation takes); soft thoughts also hold the assistant that reads each prompt."""

    def __init__(self, module: PauseTokenModule | SoftThoughtModule, student: CausalLM, assistant: CausalLM | None = None) -> None:
        if module.reads_prompt and assistant is None:
            raise ValueError("Soft thoughts need the assistant model that reads each prompt (the teacher).")
        if module.hidden_size != student.hidden_size:
            raise ValueError(f"These {module.kind} were trained for hidden size {module.hidden_size}, the student has "
                             f"{student.hidden_size}; retrain them (`kedro run --pipelines baselines`).")
        if module.reads_prompt and (assistant.hidden_size != module.assistant_size
                                    or not -assistant.num_layers <= module.read_layer < assistant.num_layers):
            raise ValueError(f"These soft thoughts read layer {module.read_layer} of an assistant of width "
                             f"{module.assistant_size}; the assistant given has width {assistant.hidden_size} and "
                             f"{assistant.num_layers} layers. Retrain them (`kedro run --pipelines baselines`).")
        self.module, self.assistant, self.student = module, assistant, student
        self.num_tokens, self.position = module.num_tokens, module.position
        self.slots = SoftTokenSlots(student.model, name=module.kind)

    def embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.module.parameters()).device
        if not self.module.reads_prompt:
            return self.module()
        reading = assistant_reading(self.assistant, prompts, self.num_tokens, self.module.read_layer)
        return self.module(reading.to(device))

    def remove(self) -> None:
        self.slots.remove()

    def __enter__(self) -> AttachedSoftPrompt:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def make_soft_prompt(kind: str, student: CausalLM, num_tokens: int, budget: int, seed: int,
                     assistant: CausalLM | None = None) -> PauseTokenModule | SoftThoughtModule:
    """A fresh module of ``kind``; its token embeddings start at random rows of the student's vocabulary."""
    if kind == PauseTokenModule.kind:
        module = PauseTokenModule(num_tokens, student.hidden_size)
        init = module.tokens
    elif kind == SoftThoughtModule.kind:
        if assistant is None:
            raise ValueError("Soft thoughts need the assistant model that reads each prompt (the teacher).")
        hidden = soft_thoughts_hidden_for_budget(num_tokens, assistant.hidden_size, student.hidden_size, budget)
        torch.manual_seed(seed)
        module = SoftThoughtModule(num_tokens, assistant.hidden_size, hidden, student.hidden_size)
        init = module.slots
    else:
        raise ValueError(f"Unknown soft-token method {kind!r}; use pause_tokens or soft_thoughts.")
    with torch.no_grad():
        init.copy_(vocabulary_embeddings(student, num_tokens, seed))
    return module.to(student.device)


def train_soft_prompt(student: CausalLM, module: PauseTokenModule | SoftThoughtModule, rows: pd.DataFrame,
                      config: LMTrainConfig, assistant: CausalLM | None = None, val_rows: pd.DataFrame | None = None,
                      generation: GenerationParams | None = None,
                      on_validation: Callable[[int, float], None] | None = None,
                      ) -> tuple[PauseTokenModule | SoftThoughtModule, TrainingResult]:
    """Train ``module``'s soft tokens on question -> answer with the student (and assistant) frozen;
    with ``val_rows`` the weights of the best validation step are kept, step 0 included."""
    freeze(student.model)
    if assistant is not None:
        freeze(assistant.model)
    examples = answer_examples(student.tokenizer, rows)
    prompts = [prompt for prompt, _ in examples]
    with AttachedSoftPrompt(module, student, assistant) as soft:
        readings = None
        if module.reads_prompt:   # the frozen assistant reads each training prompt once
            readings = assistant_reading(assistant, prompts, module.num_tokens, module.read_layer).to(student.device)

        @contextmanager
        def filled(members: list[int]) -> Iterator[None]:
            with soft.slots.fill(module(readings[members]) if readings is not None else module()):
                yield

        terms = answer_loss_terms(student, examples, config, placeholders=placeholders(soft), around=filled)
        logger.info("%s: %d soft tokens, %d trainable parameters", module.kind, module.num_tokens, module.num_parameters)
        result = train(module, Objective(terms, weights={"lm": 1.0}), config,
                       name=f"train {module.kind}", validate=validator(student, val_rows, generation, soft_prompt=soft),
                       on_validation=on_validation)
    return result.model, result


class SoftPromptMethod(TrainedBaseline):
    """A soft-token module around every prompt."""

    params: ClassVar[type[SoftTokenParams]] = SoftTokenParams
    module: TrainedModule
    assistant: CausalLM | None = None

    @classmethod
    def train_module(cls, student: CausalLM, guidance: GuidanceParams, params: SoftTokenParams,
                     protocol: TrainingProtocol, assistant: CausalLM | None = None) -> Trained:
        """``params.num_tokens`` soft tokens of kind :attr:`name`, on LoRA's protocol."""
        tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
        budget = hypernet_budget(student, guidance, seed)
        module = make_soft_prompt(cls.name, student, params.num_tokens, budget, seed, assistant=assistant)
        module, result = train_soft_prompt(student, module, tasks_train, params.training.for_run(stage1.training, seed),
                                           assistant=assistant, val_rows=tasks_val, generation=generation)
        return module, result.history_with_validation(), budget_metrics(module.num_parameters, budget, result)

    def prepare(self, student: CausalLM) -> None:
        self.module.to(student.device)

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        self.prepare(student)
        with AttachedSoftPrompt(self.module, student, self.assistant) as soft:
            yield Attached(student, soft_prompt=soft)

    @property
    def trainable_parameters(self) -> int:
        return self.module.num_parameters


@dataclass
class PauseTokens(SoftPromptMethod):
    """The same learned pause tokens after every prompt."""

    name: ClassVar[str] = "pause_tokens"
    params: ClassVar[type[SoftTokenParams]] = PauseTokenParams
    artefact: ClassVar[str] = "pause_tokens_artefact"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "pause_tokens_artefact")
    module: TrainedModule

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: SoftTokenParams,
              protocol: TrainingProtocol) -> Trained:
        """``baselines.pause_tokens.num_tokens`` learned embeddings after every prompt, on LoRA's protocol
        (their ``num_tokens x hidden`` parameters are reported beside the hyper-network's).

        Returns:
            ``pause_tokens_artefact``, its loss history, and its parameter count, budget ratio and selected step.
        """
        return cls.train_module(student, guidance, params, protocol)


@dataclass
class SoftThoughts(SoftPromptMethod):
    """Soft thoughts: the teacher reads each prompt at run time (its time is in the latency)."""

    name: ClassVar[str] = "soft_thoughts"
    params: ClassVar[type[SoftTokenParams]] = SoftThoughtParams
    artefact: ClassVar[str] = "soft_thoughts_artefact"
    train_inputs: ClassVar[tuple[str, ...]] = ("teacher_model",)
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "soft_thoughts_artefact", "teacher_model")
    module: TrainedModule
    assistant: CausalLM

    @classmethod
    def check_against(cls, params: SoftTokenParams, shapes: StudentShapes) -> None:
        """The projection from the teacher's states to ``num_tokens`` soft tokens fits the budget."""
        if (teacher_hidden := shapes.teacher_hidden_size()) is None:
            return
        try:
            soft_thoughts_hidden_for_budget(params.num_tokens, teacher_hidden, shapes.hidden_size, shapes.budget)
        except ValueError as error:
            raise ParameterError(f"Parameter 'baselines.soft_thoughts.num_tokens' = {params.num_tokens} does not fit "
                                 f"the parameter budget: {str(error)[0].lower()}{str(error)[1:]}") from None

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: SoftTokenParams,
              protocol: TrainingProtocol, teacher_model: CausalLM) -> Trained:
        """Soft thoughts: the teacher reads each prompt and a projection sized to the hyper-network's
        budget maps its states into ``baselines.soft_thoughts.num_tokens`` soft tokens, on LoRA's protocol.

        Returns:
            ``soft_thoughts_artefact``, its loss history, and its parameter count, budget ratio and selected step.
        """
        return cls.train_module(student, guidance, params, protocol, assistant=teacher_model)
