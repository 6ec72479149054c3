"""Nodes of the ``baselines`` pipeline: LoRA, ReFT, pause tokens and soft thoughts on PILOT's protocol
(the same training rows, steps, batch size, seed and selection rule; a parameter budget matched to the
hyper-network's where the method's design allows it), and the CAA vector and scale."""

from __future__ import annotations

import pandas as pd
import torch

from pilot.baselines.caa import choose_caa_scale, steering_vector
from pilot.baselines.lora import LoraAdapter, lora_settings, train_lora
from pilot.baselines.modules import TrainedModule
from pilot.baselines.reft import reft_layers, train_reft
from pilot.baselines.soft_prompts import make_soft_prompt, train_soft_prompt
from pilot.config import BaselinesParams, GenerationParams, GuidanceParams, adapter_loop
from pilot.guidance import make_hypernet
from pilot.latents import LatentCache
from pilot.models import CausalLM, count_parameters
from pilot.pipelines.protocol import TrainingProtocol
from pilot.tracking import metric_records


def train_lora_baseline(student: CausalLM, tuned_lora: dict, guidance: GuidanceParams, params: BaselinesParams,
                        protocol: TrainingProtocol) -> tuple[LoraAdapter, pd.DataFrame, dict]:
    """LoRA on question -> answer: trainable parameters matched to the hyper-network's, (by
    default) the same number of optimizer steps and batch size as PILOT's stage 1, and selected
    by the same rule: the best validation step, validated as often as stage 1. With
    ``baselines.lora.use_tuned`` its learning rate and alpha ratio come from ``tune_lora``.

    Returns:
        ``lora_adapter``, its loss history, and the parameter counts and selected step for MLflow.
    """
    tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
    config, pilot = params.lora, stage1.training
    budget = _hypernet_budget(student, guidance, seed)
    training, alpha_ratio = lora_settings(config, pilot, seed, tuned_lora if config.use_tuned else None)
    adapter, result = train_lora(student, tasks_train, budget, config.target_modules, config.match_tolerance,
                                 alpha_ratio, training, val_rows=tasks_val, generation=generation,
                                 eval_every=pilot.eval_every)
    metrics = {"hypernet_parameters": budget, "lora_parameters": adapter.num_parameters,
               "best_step": result.best_step, "best_val_accuracy": result.best_val_accuracy}
    return adapter, pd.DataFrame(result.history), metric_records(metrics)


def _hypernet_budget(student: CausalLM, guidance: GuidanceParams, seed: int) -> int:
    return count_parameters(make_hypernet(guidance, student.hidden_size, student.num_layers, seed))


def _outputs(module: TrainedModule, result, budget: int) -> tuple[TrainedModule, pd.DataFrame, dict]:
    metrics = {"hypernet_parameters": budget, "parameters": module.num_parameters,
               "budget_ratio": module.num_parameters / budget, "best_step": result.best_step,
               "best_val_accuracy": result.best_val_accuracy, "train_seconds": result.seconds}
    return module, pd.DataFrame(result.history), metric_records(metrics)


def train_reft_baseline(student: CausalLM, guidance: GuidanceParams, params: BaselinesParams,
                        protocol: TrainingProtocol) -> tuple[TrainedModule, pd.DataFrame, dict]:
    """LoReFT at the injection layer and every layer after it (or ``baselines.reft.layers``), its
    rank matched to the hyper-network's parameters (capped at the hidden size), on LoRA's protocol.

    Returns:
        ``reft_interventions``, its loss history, and its parameter count, budget ratio and selected step.
    """
    tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
    budget = _hypernet_budget(student, guidance, seed)
    layers = reft_layers(params.reft.layers, guidance.inject_layer, student.num_layers)
    reft, result = train_reft(student, tasks_train, budget, layers, params.reft.match_tolerance,
                              adapter_loop(params.reft.training, stage1.training, seed), val_rows=tasks_val,
                              generation=generation, eval_every=stage1.training.eval_every)
    return _outputs(reft, result, budget)


def train_pause_tokens(student: CausalLM, guidance: GuidanceParams, params: BaselinesParams,
                       protocol: TrainingProtocol) -> tuple[TrainedModule, pd.DataFrame, dict]:
    """``baselines.pause_tokens.num_tokens`` learned embeddings after every prompt, on LoRA's protocol
    (their ``num_tokens x hidden`` parameters are reported beside the hyper-network's).

    Returns:
        ``pause_tokens``, its loss history, and its parameter count, budget ratio and selected step.
    """
    tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
    budget = _hypernet_budget(student, guidance, seed)
    config = params.pause_tokens
    module = make_soft_prompt("pause_tokens", student, config.num_tokens, budget, seed)
    module, result = train_soft_prompt(student, module, tasks_train, adapter_loop(config.training, stage1.training, seed),
                                       val_rows=tasks_val, generation=generation, eval_every=stage1.training.eval_every)
    return _outputs(module, result, budget)


def train_soft_thoughts(student: CausalLM, teacher_model: CausalLM, guidance: GuidanceParams, params: BaselinesParams,
                        protocol: TrainingProtocol) -> tuple[TrainedModule, pd.DataFrame, dict]:
    """Soft thoughts: the teacher reads each prompt and a projection sized to the hyper-network's
    budget maps its states into ``baselines.soft_thoughts.num_tokens`` soft tokens, on LoRA's protocol.

    Returns:
        ``soft_thoughts``, its loss history, and its parameter count, budget ratio and selected step.
    """
    tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
    budget = _hypernet_budget(student, guidance, seed)
    config = params.soft_thoughts
    module = make_soft_prompt("soft_thoughts", student, config.num_tokens, budget, seed, assistant=teacher_model)
    module, result = train_soft_prompt(student, module, tasks_train, adapter_loop(config.training, stage1.training, seed),
                                       assistant=teacher_model, val_rows=tasks_val, generation=generation,
                                       eval_every=stage1.training.eval_every)
    return _outputs(module, result, budget)


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
                                    generation)
    return {"scale": scale}, sweep
