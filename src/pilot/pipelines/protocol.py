"""PILOT's training protocol, one input for every node that trains or tunes a method.

Stage 1, the trained baselines and both studies learn from the same training rows, are selected on
the same validation rows with the same decoding settings, follow stage 1's loop (steps, batch size,
validation cadence) where theirs is left unset, and draw from the run's seed. The node is part of
every pipeline that needs it, so each of them runs on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from kedro.pipeline import Node

from pilot.config import GenerationParams, Stage1Params


@dataclass(frozen=True)
class TrainingProtocol:
    """The rows, stage 1's settings, the decoding settings and the seed a trained method shares."""

    tasks_train: pd.DataFrame
    tasks_val: pd.DataFrame
    stage1: Stage1Params
    generation: GenerationParams
    seed: int

    def unpacked(self) -> tuple[pd.DataFrame, pd.DataFrame, Stage1Params, GenerationParams, int]:
        """``(tasks_train, tasks_val, stage1, generation, seed)``."""
        return self.tasks_train, self.tasks_val, self.stage1, self.generation, self.seed


def training_protocol(tasks_train: pd.DataFrame, tasks_val: pd.DataFrame, stage1: Stage1Params,
                      generation: GenerationParams, seed: int) -> TrainingProtocol:
    """The training and validation splits with stage 1's, the decoding and the seed settings.

    Returns:
        ``training_protocol``.
    """
    return TrainingProtocol(tasks_train, tasks_val, stage1, generation, seed)


def protocol_node() -> Node:
    return Node(training_protocol, inputs=["tasks_train", "tasks_val", "params:stage1", "params:generation",
                                           "params:seed"],
                outputs="training_protocol", name="training_protocol_node")
