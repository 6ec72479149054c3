"""Nodes of the ``stage1`` pipeline: teacher-guided imitation in latent space."""

from __future__ import annotations

import logging

import pandas as pd

from pilot.config import GuidanceParams, LatentsParams, with_run_seed
from pilot.guidance import HyperNetwork
from pilot.latents import LatentCache
from pilot.models import CausalLM
from pilot.pipelines.protocol import TrainingProtocol
from pilot.training.stage1 import apply_tuned, run_stage1

logger = logging.getLogger(__name__)


def train_stage1(latent_cache: LatentCache, teacher_plans: pd.DataFrame, student: CausalLM, tuned_loss_weights: dict,
                 guidance: GuidanceParams, latents: LatentsParams,
                 protocol: TrainingProtocol) -> tuple[HyperNetwork, pd.DataFrame, pd.DataFrame, dict]:
    """Train the hyper-network on the cached plan-conditioned trajectories.

    With ``stage1.use_tuned_weights`` the contrastive/RL weights (and any tuned guidance scale)
    come from the ``tune`` pipeline's ``tuned_loss_weights``.

    Returns:
        ``hypernet_stage1`` (best validation checkpoint), the loss history, the validation curve
        and summary metrics.
    """
    params, tasks_train, tasks_val = protocol.stage1, protocol.tasks_train, protocol.tasks_val
    training = with_run_seed(params.training, protocol.seed)
    if params.use_tuned_weights:
        training, guidance = apply_tuned(tuned_loss_weights, training, guidance)
        logger.info("Stage 1 uses the tuned weights %s", tuned_loss_weights)
    result = run_stage1(student, latent_cache, teacher_plans, tasks_train, tasks_val, guidance,
                        latents, training, protocol.generation, params.checkpoint_dir, params.resume)
    return result.model, *result.tables()
