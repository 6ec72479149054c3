"""Nodes of the ``tune`` pipeline."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from pilot import tracking
from pilot.config import (
    GenerationParams,
    GuidanceParams,
    LatentsParams,
    Stage1Params,
    Stage2Params,
    TuneParams,
    validate,
)
from pilot.latents import LatentCache
from pilot.models import CausalLM
from pilot.tuning import best_weights, make_objective, study_plots, trials_table, tune


def tune_loss_balance(latent_cache: LatentCache, teacher_plans: pd.DataFrame, tasks_train: pd.DataFrame,
                      tasks_val: pd.DataFrame, student: CausalLM, guidance: dict, latents: dict, stage1: dict,
                      stage2: dict, generation: dict, params: dict) -> tuple[dict, pd.DataFrame, plt.Figure, plt.Figure]:
    """An Optuna study of short stage-1 trainings scored by validation accuracy.

    Every trial is also a nested MLflow run of this `kedro run` (when tracking is on).

    Returns:
        ``tuned_loss_weights`` (read by stage 1 with ``stage1.use_tuned_weights: true``), the trials
        table, and the optimization-history and parameter-importance plots.
    """
    config = validate(TuneParams, params, "tune")
    site, training = validate(GuidanceParams, guidance, "guidance"), validate(Stage1Params, stage1, "stage1").training
    objective = make_objective(
        student, latent_cache, teacher_plans, pd.concat([tasks_train, tasks_val]), tasks_train, tasks_val,
        site, validate(LatentsParams, latents, "latents"), training,
        validate(Stage2Params, stage2, "stage2").training, validate(GenerationParams, generation, "generation"), config,
    )
    baseline = {"contrastive_weight": training.contrastive_weight, "rl_weight": training.rl_weight}
    if config.guidance_scale is not None:
        baseline["guidance_scale"] = site.guidance_scale
    study = tune(objective, config, callbacks=tracking.optuna_callbacks(metric_name="val_accuracy"),
                 baseline=baseline if config.enqueue_baseline else None)
    history, importances = study_plots(study)
    return best_weights(study), trials_table(study), history, importances
