"""LoRA at a trainable-parameter budget matched to the hyper-network's (peft), as a compared method.

Trained by the shared engine (:func:`pilot.training.base_lm.train_causal_lm`) on question ->
answer and, given validation rows, selected by the rule PILOT's stages follow (the best
validation step, step 0 included); saved in peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``). It answers as an adapted copy of the student (the student stays
frozen).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import pandas as pd
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import Field
from safetensors.torch import load_file, save_file

from pilot.artifacts import atomic_folder, verify_folder
from pilot.config import (
    AdapterTrainingParams,
    GenerationParams,
    GuidanceParams,
    LMTrainConfig,
    ParameterError,
    Params,
    Positive,
    Stage1Config,
)
from pilot.evaluation import validator
from pilot.methods.base import Attached
from pilot.methods.trained import StudentShapes, Trained, TrainedBaseline, hypernet_budget
from pilot.models import CausalLM
from pilot.training.base_lm import answer_examples, train_causal_lm
from pilot.training.engine import TrainingResult
from pilot.training.protocol import TrainingProtocol

logger = logging.getLogger(__name__)


class LoraParams(Params):
    """``baselines.lora``: LoRA whose rank brings its trainable parameters to the hyper-network's."""

    use_tuned: bool = Field(False, description="Take the learning rate and alpha ratio that `kedro run --pipelines "
                                               "tune_lora` found (tuned_lora.json) instead of the ones below.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="The student's Linear layers (by the last part of their name) that get an adapter.")
    match_tolerance: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.1, description="How far the adapter's parameter count may fall from the hyper-network's, as a fraction.")
    lora_alpha_ratio: Positive = Field(2.0, description="LoRA's alpha over its rank (the scale of the update).")
    training: AdapterTrainingParams = Field(AdapterTrainingParams(), description="Its loop; steps and batch size "
                                            "left null are stage 1's.")


def lora_targets(model: torch.nn.Module, target_modules: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The Linear layers whose name ends with one of ``target_modules``."""
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules}
    if not found:
        raise ValueError(f"No Linear layer of the student is named any of {list(target_modules)}; "
                         "set baselines.lora.target_modules to the student's projection names.")
    return found


def lora_rank_for_budget(model: torch.nn.Module, target_modules: Sequence[str], budget: int,
                         tolerance: float) -> tuple[int, int]:
    """The LoRA rank whose trainable-parameter count is closest to ``budget``; (rank, count).

    A rank-r adapter on a Linear(in, out) trains r * (in + out) parameters.
    """
    per_rank = sum(m.in_features + m.out_features for m in lora_targets(model, target_modules).values())
    rank = max(1, round(budget / per_rank))
    count = rank * per_rank
    if abs(count - budget) > tolerance * budget:
        raise ValueError(
            f"No LoRA rank on {list(target_modules)} comes within {tolerance:.0%} of the hyper-network's "
            f"{budget} parameters (rank {rank} gives {count}); change baselines.lora.target_modules."
        )
    return rank, count


@dataclass
class LoraAdapter:
    """A trained LoRA adapter in peft's format, attachable to a fresh copy of the student."""

    config: dict
    state: dict[str, torch.Tensor]

    def adapted(self, student: CausalLM) -> CausalLM:
        """A LoRA-adapted copy of ``student`` (the student itself is left untouched)."""
        fields = {k: v for k, v in self.config.items() if k in LoraConfig.__dataclass_fields__}
        model = get_peft_model(copy.deepcopy(student.model), LoraConfig(**fields))
        set_peft_model_state_dict(model, self.state)
        model.eval()
        return CausalLM(model=model, tokenizer=student.tokenizer)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())

    def save(self, path: str | Path) -> None:
        """peft's files, written atomically with their checksums."""
        with atomic_folder(path) as folder:
            (folder / "adapter_config.json").write_text(json.dumps(self.config, indent=2, default=list))
            save_file({k: v.contiguous() for k, v in self.state.items()}, folder / "adapter_model.safetensors")

    @classmethod
    def load(cls, path: str | Path, rebuild: str = "kedro run --pipelines baselines") -> LoraAdapter:
        path = Path(path)
        verify_folder(path, rebuild)
        return cls(json.loads((path / "adapter_config.json").read_text()),
                   load_file(path / "adapter_model.safetensors"))


LORA_TUNED_KEYS = ("learning_rate", "lora_alpha_ratio")   # what `tune_lora` searches


def lora_settings(params: LoraParams, stage1: Stage1Config, seed: int,
                  tuned: dict | None = None) -> tuple[LMTrainConfig, float]:
    """LoRA's loop (by default stage 1's steps and batch size) and alpha ratio, with the tuned
    learning rate and alpha ratio in place of the configured ones when ``tuned`` is given."""
    if tuned is not None and not tuned:
        raise ValueError("baselines.lora.use_tuned is true but no tuned LoRA settings exist; run "
                         "`kedro run --pipelines tune_lora` first or set it to false.")
    config = params.training.for_run(stage1, seed)
    if tuned:
        config = config.model_copy(update={"learning_rate": tuned.get("learning_rate", config.learning_rate)})
    return config, (tuned or {}).get("lora_alpha_ratio", params.lora_alpha_ratio)


def train_lora(student: CausalLM, rows: pd.DataFrame, budget: int, target_modules: Sequence[str],
               tolerance: float, alpha_ratio: float, config: LMTrainConfig, val_rows: pd.DataFrame | None = None,
               generation: GenerationParams | None = None,
               on_validation: Callable[[int, float], None] | None = None) -> tuple[LoraAdapter, TrainingResult]:
    """Fine-tune LoRA adapters on question -> answer with a trainable budget matched to ``budget``.

    With ``val_rows`` the adapter of the best validation step (every ``config.eval_every`` steps; step 0
    is the untrained adapter, i.e. the plain student) is kept; otherwise the last.
    """
    rank, count = lora_rank_for_budget(student.model, target_modules, budget, tolerance)
    present = sorted({name.rsplit(".", 1)[-1] for name in lora_targets(student.model, target_modules)})
    lora_config = LoraConfig(r=rank, lora_alpha=alpha_ratio * rank, lora_dropout=0.0, bias="none",
                             target_modules=present, task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # the adapter's initialisation, not whatever state earlier work left
    model = get_peft_model(copy.deepcopy(student.model), lora_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d on %s: %d trainable parameters (hyper-network: %d)", rank, present, trainable, budget)
    lm = CausalLM(model=model, tokenizer=student.tokenizer)
    result = train_causal_lm(lm, answer_examples(lm.tokenizer, rows), config, "lora",
                             validate=validator(lm, val_rows, generation),
                             on_validation=on_validation)
    config_dict = json.loads(json.dumps(lora_config.to_dict(), default=list))
    return LoraAdapter(config=config_dict, state=get_peft_model_state_dict(result.model)), result


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
                                     alpha_ratio, training, val_rows=tasks_val, generation=generation)
        metrics = {"hypernet_parameters": budget, "lora_parameters": adapter.num_parameters,
                   "best_step": result.best_step, "best_val_accuracy": result.best_val_accuracy}
        return adapter, result.history_with_validation(), metrics

    @classmethod
    def load_artefact(cls, path: Path, rebuild: str) -> LoraAdapter:
        return LoraAdapter.load(path, rebuild=rebuild)   # peft's own files

    def prepare(self, student: CausalLM) -> None:
        if self._adapted is None or self._adapted[0] is not student:   # the copy is made once per student
            self._adapted = (student, self.lora_adapter.adapted(student))

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        self.prepare(student)
        yield Attached(self._adapted[1])

    @property
    def trainable_parameters(self) -> int:
        return self.lora_adapter.num_parameters
