"""Nodes of the ``stage1`` pipeline: teacher-guided imitation in latent space."""

from __future__ import annotations

import logging

import pandas as pd

from pilot.config import GenerationParams, GuidanceParams, LatentsParams, Stage1Params, validate
from pilot.guidance import HyperNetwork
from pilot.latents import LatentCache
from pilot.models import CausalLM
from pilot.training.stage1 import TrainingResult, run_stage1

logger = logging.getLogger(__name__)


def training_outputs(result: TrainingResult) -> tuple[HyperNetwork, pd.DataFrame, pd.DataFrame, dict]:
    """The four catalog outputs of a training stage: model, per-step history, validation, metrics."""
    metrics = {
        "best_val_accuracy": result.best_val_accuracy,
        "best_step": result.best_step,
        "train_seconds": result.seconds,
    }
    return (result.hypernet, pd.DataFrame(result.history), pd.DataFrame(result.validation),
            {k: {"value": float(v), "step": 0} for k, v in metrics.items()})


def train_stage1(latent_cache: LatentCache, teacher_plans: pd.DataFrame, tasks_train: pd.DataFrame,
                 tasks_val: pd.DataFrame, student: CausalLM, tuned_loss_weights: dict, guidance: dict,
                 latents: dict, params: dict, generation: dict,
                 seed: int) -> tuple[HyperNetwork, pd.DataFrame, pd.DataFrame, dict]:
    """Train the hyper-network on the cached plan-conditioned trajectories.

    With ``stage1.use_tuned_weights`` the contrastive/RL weights (and any tuned guidance scale)
    come from the ``tune`` pipeline's ``tuned_loss_weights``.

    Returns:
        ``hypernet_stage1`` (best validation checkpoint), the loss history, the validation curve
        and summary metrics.
    """
    config = validate(Stage1Params, params, "stage1")
    site = validate(GuidanceParams, guidance, "guidance")
    training = config.training.model_copy(update={"seed": config.training.seed + seed})
    if config.use_tuned_weights:
        if not tuned_loss_weights:
            raise ValueError("stage1.use_tuned_weights is true but no tuned weights exist; run "
                             "`kedro run --pipeline tune` first or set it to false.")
        training = training.model_copy(update={k: v for k, v in tuned_loss_weights.items()
                                               if k in ("contrastive_weight", "rl_weight")})
        site = site.model_copy(update={k: v for k, v in tuned_loss_weights.items()
                                       if k in ("guidance_scale", "inject_layer")})
        logger.info("Stage 1 uses the tuned weights %s", tuned_loss_weights)
    result = run_stage1(student, latent_cache, teacher_plans, pd.concat([tasks_train, tasks_val]), tasks_val, site,
                        validate(LatentsParams, latents, "latents"), training,
                        validate(GenerationParams, generation, "generation"), config.checkpoint_dir, config.resume)
    return training_outputs(result)
