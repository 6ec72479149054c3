"""PILOT's training protocol (:class:`pilot.training.protocol.TrainingProtocol`), one input for every
node that trains or tunes a method. The node is part of every pipeline that needs it, so each of them
runs on its own.
"""

from __future__ import annotations

import pandas as pd
from kedro.pipeline import Node

from pilot.config import GenerationParams, Stage1Params
from pilot.training.protocol import TrainingProtocol


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
