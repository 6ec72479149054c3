"""Nodes of the ``tune_lora`` pipeline."""

from __future__ import annotations

import pandas as pd

from pilot import tracking
from pilot.config import BaselinesParams, GuidanceParams, TuneParams
from pilot.methods.lora import LORA_TUNED_KEYS, Lora
from pilot.methods.trained import hypernet_budget
from pilot.models import CausalLM
from pilot.training.protocol import TrainingProtocol
from pilot.tuning import best_weights, make_lora_objective, trials_table, tune


def tune_lora_baseline(student: CausalLM, guidance: GuidanceParams, baselines: BaselinesParams, params: TuneParams,
                       protocol: TrainingProtocol) -> tuple[dict, pd.DataFrame]:
    """LoRA's own Optuna study (``tune.lora_study_name``), with the trials, trial steps, validation
    cadence, pruner and storage of PILOT's: the same tuning budget for the baseline.

    Returns:
        ``tuned_lora`` (read by the baselines pipeline with ``baselines.lora.use_tuned: true``) and
        the trials table.
    """
    tasks_train, tasks_val, stage1, generation, seed = protocol.unpacked()
    lora = Lora.own_params(baselines)
    budget = hypernet_budget(student, guidance, seed)
    objective = make_lora_objective(student, tasks_train, tasks_val, budget, lora, stage1.training, generation,
                                    params, seed)
    config = params.model_copy(update={"study_name": params.lora_study_name})
    baseline = {"learning_rate": lora.training.learning_rate, "lora_alpha_ratio": lora.lora_alpha_ratio}
    study = tune(objective, config, callbacks=tracking.optuna_callbacks(metric_name="val_accuracy"),
                 baseline=baseline if params.enqueue_baseline else None)
    return best_weights(study, LORA_TUNED_KEYS), trials_table(study)
