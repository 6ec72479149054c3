"""Nodes of the ``tune`` pipeline."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from pilot import tracking
from pilot.config import GuidanceParams, LatentsParams, Stage2Params, TuneParams
from pilot.latents import LatentCache
from pilot.models import CausalLM
from pilot.pipelines.protocol import TrainingProtocol
from pilot.tuning import best_weights, make_objective, study_plots, trials_table, tune


def tune_loss_balance(latent_cache: LatentCache, teacher_plans: pd.DataFrame, student: CausalLM,
                      guidance: GuidanceParams, latents: LatentsParams, stage2: Stage2Params, params: TuneParams,
                      protocol: TrainingProtocol) -> tuple[dict, pd.DataFrame, plt.Figure, plt.Figure]:
    """An Optuna study of short stage-1 trainings scored by validation accuracy.

    Every trial is also a nested MLflow run of this `kedro run` (when tracking is on).

    Returns:
        ``tuned_loss_weights`` (read by stage 1 with ``stage1.use_tuned_weights: true``), the trials
        table, and the optimization-history and parameter-importance plots.
    """
    tasks_train, tasks_val, stage1, generation, _ = protocol.unpacked()
    objective = make_objective(student, latent_cache, teacher_plans, tasks_train,
                               tasks_val, guidance, latents, stage1.training, stage2.training, generation, params)
    baseline = {"contrastive_weight": stage1.training.contrastive_weight, "rl_weight": stage1.training.rl_weight}
    if params.guidance_scale is not None:
        baseline["guidance_scale"] = guidance.guidance_scale
    if params.inject_layers and guidance.inject_layer in params.inject_layers:
        baseline["inject_layer"] = guidance.inject_layer
    study = tune(objective, params, callbacks=tracking.optuna_callbacks(metric_name="val_accuracy"),
                 baseline=baseline if params.enqueue_baseline else None)
    history, importances = study_plots(study)
    return best_weights(study), trials_table(study), history, importances
