"""Nodes of the ``latents`` pipeline: the plan-conditioned latent cache and the CAA vector."""

from __future__ import annotations

import pandas as pd
import torch

from pilot.config import GuidanceParams, LatentsParams, validate
from pilot.latents import LatentCache, LatentCacheBuild, plan_cache_build, steering_vector
from pilot.models import CausalLM, freeze


def build_latent_cache(teacher_plans: pd.DataFrame, tasks_train: pd.DataFrame, tasks_val: pd.DataFrame,
                       student: CausalLM, guidance: dict, params: dict) -> LatentCacheBuild:
    """One frozen forward pass per kept example, written shard by shard by the catalog.

    Returns:
        The lazy ``latent_cache`` build; saving it computes only shards not already on disk.
    """
    freeze(student.model)
    return plan_cache_build(teacher_plans, pd.concat([tasks_train, tasks_val]), student,
                            validate(GuidanceParams, guidance, "guidance"), validate(LatentsParams, params, "latents"))


def summarize_cache(cache: LatentCache) -> tuple[dict[str, torch.Tensor], dict]:
    """The CAA steering vector from the cache, and the cache's size and build throughput.

    Returns:
        ``steering_vector`` (safetensors) and MLflow metrics.
    """
    manifest = cache.manifest
    metrics = {
        "cache_examples": manifest["num_examples"],
        "cache_mib": manifest["bytes"] / 2**20,
        "cache_examples_per_second": manifest["examples_per_second"] or 0.0,
        "cache_reused_shards": manifest["reused_shards"],
    }
    return steering_vector(cache), {k: {"value": float(v), "step": 0} for k, v in metrics.items()}
