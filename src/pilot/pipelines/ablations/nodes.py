"""Nodes of the ``ablations`` pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from pilot import tracking
from pilot.ablations import AblationResult, ablation_markdown, ablation_table, run_ablations, run_variant
from pilot.config import AblationsParams, GuidanceParams, LatentsParams, Stage2Params, TuneParams, with_run_seed
from pilot.latents import LatentCache
from pilot.models import CausalLM
from pilot.pipelines.protocol import TrainingProtocol


@dataclass(frozen=True)
class AblationSettings:
    """The configured PILOT each variant is laid over (its site, latent cache and stage 2), where the
    variants' own latent caches go (``tune.cache_dir``), and the variants."""

    guidance: GuidanceParams
    latents: LatentsParams
    stage2: Stage2Params
    tune: TuneParams
    ablations: AblationsParams


def ablation_settings(guidance: GuidanceParams, latents: LatentsParams, stage2: Stage2Params, tune: TuneParams,
                      ablations: AblationsParams) -> AblationSettings:
    """The settings the ablation study reads besides the training protocol.

    Returns:
        ``ablation_settings``.
    """
    return AblationSettings(guidance, latents, stage2, tune, ablations)


def run_ablation_study(latent_cache: LatentCache, teacher_plans: pd.DataFrame, tasks_test: pd.DataFrame,
                       predictions: pd.DataFrame, student: CausalLM, settings: AblationSettings,
                       protocol: TrainingProtocol) -> tuple[pd.DataFrame, str]:
    """Retrain and evaluate PILOT once per variant; each variant is also a nested MLflow run.

    Returns:
        ``ablation_table`` (parquet) and ``ablations_markdown`` (``data/08_reporting/ablations.md``).
    """
    tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
    guidance, latents, stage2, tune, params = (settings.guidance, settings.latents, settings.stage2, settings.tune,
                                               settings.ablations)
    training1, training2 = with_run_seed(stage1.training, seed), with_run_seed(stage2.training, seed)
    stage1_runs = {}

    def train(name, variant) -> AblationResult:
        return run_variant(name, variant, student, latent_cache, teacher_plans, tasks_train, tasks_val, tasks_test,
                           guidance, latents, training1, training2, generation, params, tune.cache_dir, stage1_runs)

    def record(result: AblationResult) -> None:
        row = ablation_table([result], predictions).iloc[-1]
        with tracking.nested_run(f"ablation-{result.name}", tags={"ablation": result.name}) as run_id:
            if run_id is None:
                return
            tracking.log_params({"ablation": result.name, "settings": result.describe(),
                                 **{f"guidance.{k}": v for k, v in result.variant.guidance.items()},
                                 **{f"stage1.{k}": v for k, v in result.variant.stage1.items()},
                                 "stage2": result.variant.stage2})
            tracking.log_metrics({k: float(row[k]) for k in ("val_accuracy", "accuracy", "ci_low", "ci_high",
                                                             "gap_recovered", "ood_accuracy", "ood_gap_recovered",
                                                             "hypernet_parameters", "train_seconds")
                                  if k in row and pd.notna(row[k])})

    results = run_ablations(params, train, on_result=record)
    table = ablation_table(results, predictions)
    return table, ablation_markdown(table)
