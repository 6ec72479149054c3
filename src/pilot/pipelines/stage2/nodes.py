"""Nodes of the ``stage2`` pipeline: teacher-free refinement."""

from __future__ import annotations

import pandas as pd

from pilot.config import GenerationParams, Stage2Params, with_run_seed
from pilot.guidance import HyperNetwork
from pilot.models import CausalLM
from pilot.training.stage2 import run_stage2


def train_stage2(hypernet_stage1: HyperNetwork, tasks_train: pd.DataFrame, tasks_val: pd.DataFrame,
                 student: CausalLM, params: Stage2Params, generation: GenerationParams,
                 seed: int) -> tuple[HyperNetwork, pd.DataFrame, pd.DataFrame, dict]:
    """Refine the stage-1 hyper-network from verifier feedback, without plans or teacher.

    Returns:
        ``hypernet_stage2`` (best validation checkpoint), the reward/loss history, the validation
        curve and summary metrics.
    """
    result = run_stage2(student, hypernet_stage1, tasks_train, tasks_val, with_run_seed(params.training, seed),
                        generation, params.checkpoint_dir, params.resume)
    return result.model, *result.tables()
