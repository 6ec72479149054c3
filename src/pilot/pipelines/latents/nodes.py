"""Nodes of the ``latents`` pipeline: the plan-conditioned latent cache stage 1 imitates."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from pilot.config import GuidanceParams, LatentsParams
from pilot.latents import CacheManifest, LatentCache, LatentShard, cache_chunks, plan_cache_build
from pilot.models import CausalLM, freeze
from pilot.tracking import metric_records


def build_latent_cache(teacher_plans: pd.DataFrame, tasks_train: pd.DataFrame, student: CausalLM,
                       cached_shards: dict[int, str | None], guidance: GuidanceParams,
                       params: LatentsParams) -> Iterator[LatentShard | CacheManifest]:
    """One frozen forward pass per kept example, yielded shard by shard (the catalog writes each).

    ``cached_shards`` says what is on disk already (each shard's fingerprint): shards of this
    build are skipped, so an interrupted build computes only what is missing.

    Yields:
        ``latent_cache`` chunks: each computed shard, then the manifest.
    """
    freeze(student.model)
    build = plan_cache_build(teacher_plans, tasks_train, student, guidance, params)
    yield from cache_chunks(build, cached_shards, params.on_stale)


def summarize_cache(latent_cache: LatentCache) -> dict:
    """The cache's size and build throughput.

    Returns:
        MLflow metrics.
    """
    manifest = latent_cache.manifest
    return metric_records({
        "cache_examples": manifest["num_examples"],
        "cache_mib": manifest["bytes"] / 2**20,
        "cache_examples_per_second": manifest["examples_per_second"] or 0.0,
        "cache_reused_shards": manifest["reused_shards"],
    })
