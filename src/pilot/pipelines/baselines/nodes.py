"""Nodes of the ``baselines`` pipeline: LoRA at PILOT's parameter budget, and the CAA vector and scale."""

from __future__ import annotations

import pandas as pd
import torch

from pilot.baselines.caa import choose_caa_scale, steering_vector
from pilot.baselines.lora import LoraAdapter, lora_settings, train_lora
from pilot.config import BaselinesParams, GenerationParams, GuidanceParams, Stage1Params
from pilot.guidance import make_hypernet
from pilot.latents import LatentCache
from pilot.models import CausalLM, count_parameters
from pilot.tracking import metric_records


def train_lora_baseline(student: CausalLM, tasks_train: pd.DataFrame, tasks_val: pd.DataFrame, tuned_lora: dict,
                        guidance: GuidanceParams, params: BaselinesParams, stage1: Stage1Params,
                        generation: GenerationParams, seed: int) -> tuple[LoraAdapter, pd.DataFrame, dict]:
    """LoRA on question -> answer: trainable parameters matched to the hyper-network's, (by
    default) the same number of optimizer steps and batch size as PILOT's stage 1, and selected
    by the same rule: the best validation step, validated as often as stage 1. With
    ``baselines.lora.use_tuned`` its learning rate and alpha ratio come from ``tune_lora``.

    Returns:
        ``lora_adapter``, its loss history, and the parameter counts and selected step for MLflow.
    """
    config, pilot = params.lora, stage1.training
    budget = count_parameters(make_hypernet(guidance, student.hidden_size, student.num_layers, seed))
    training, alpha_ratio = lora_settings(config, pilot, seed, tuned_lora if config.use_tuned else None)
    adapter, result = train_lora(student, tasks_train, budget, config.target_modules, config.match_tolerance,
                                 alpha_ratio, training, val_rows=tasks_val, generation=generation,
                                 eval_every=pilot.eval_every)
    metrics = {"hypernet_parameters": budget, "lora_parameters": adapter.num_parameters,
               "best_step": result.best_step, "best_val_accuracy": result.best_val_accuracy}
    return adapter, pd.DataFrame(result.history), metric_records(metrics)


def compute_steering_vector(latent_cache: LatentCache) -> dict[str, torch.Tensor]:
    """CAA's vector: the mean plan-conditioned minus plan-free state at the injection layer, over the cache.

    Returns:
        ``steering_vector`` (safetensors).
    """
    return steering_vector(latent_cache)


def tune_caa_scale(steering_vector: dict[str, torch.Tensor], student: CausalLM, tasks_val: pd.DataFrame,
                   guidance: GuidanceParams, params: BaselinesParams,
                   generation: GenerationParams) -> tuple[dict, pd.DataFrame]:
    """Choose the static steering vector's scale on the validation split.

    Returns:
        ``caa_config`` (``{"scale": ...}``) and the validation sweep.
    """
    scale, sweep = choose_caa_scale(student, tasks_val, steering_vector, guidance.inject_layer, params.caa.scales,
                                    generation.max_new_tokens, generation.batch_size, generation.stop)
    return {"scale": scale}, sweep
