"""Nodes of the ``baselines`` pipeline: LoRA at PILOT's parameter budget and the CAA vector's scale."""

from __future__ import annotations

import pandas as pd
import torch

from pilot.config import BaselinesParams, GenerationParams, GuidanceParams, LMTrainConfig, Stage1Params, validate
from pilot.models import CausalLM, count_parameters
from pilot.training.baselines import LoraAdapter, choose_caa_scale, train_lora
from pilot.training.stage1 import make_hypernet


def train_lora_baseline(student: CausalLM, tasks_train: pd.DataFrame, guidance: dict, params: dict,
                        stage1: dict, seed: int) -> tuple[LoraAdapter, pd.DataFrame, dict]:
    """LoRA on question -> answer: trainable parameters matched to the hyper-network's, and (by
    default) the same number of optimizer steps and batch size as PILOT's stage 1.

    Returns:
        ``lora_adapter``, its loss history and the two parameter counts for MLflow.
    """
    config = validate(BaselinesParams, params, "baselines").lora
    pilot = validate(Stage1Params, stage1, "stage1").training
    budget = count_parameters(make_hypernet(validate(GuidanceParams, guidance, "guidance"), student, seed))
    loop = config.training
    training = LMTrainConfig(steps=loop.steps or pilot.steps, batch_size=loop.batch_size or pilot.batch_size,
                             learning_rate=loop.learning_rate, warmup_steps=loop.warmup_steps,
                             weight_decay=loop.weight_decay, length_buckets=loop.length_buckets,
                             seed=loop.seed + seed)
    adapter, history = train_lora(student, tasks_train, budget, config.target_modules, config.match_tolerance,
                                  config.lora_alpha_ratio, training)
    metrics = {"hypernet_parameters": budget, "lora_parameters": adapter.num_parameters}
    return adapter, pd.DataFrame(history), {k: {"value": float(v), "step": 0} for k, v in metrics.items()}


def tune_caa_scale(steering_vector: dict[str, torch.Tensor], student: CausalLM, tasks_val: pd.DataFrame,
                   guidance: dict, params: dict, generation: dict) -> tuple[dict, pd.DataFrame]:
    """Choose the static steering vector's scale on the validation split.

    Returns:
        ``caa_config`` (``{"scale": ...}``) and the validation sweep.
    """
    config = validate(BaselinesParams, params, "baselines").caa
    decoding = validate(GenerationParams, generation, "generation")
    scale, sweep = choose_caa_scale(student, tasks_val, steering_vector,
                                    validate(GuidanceParams, guidance, "guidance").inject_layer,
                                    config.scales, decoding.max_new_tokens, decoding.batch_size)
    return {"scale": scale}, sweep
