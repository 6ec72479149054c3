"""Nodes of the ``baselines`` pipeline: every trained baseline (LoRA, ReFT, CAA, pause tokens, soft
thoughts, yours) on PILOT's protocol (the same training rows, validation rows, steps, batch size, seed
and selection rule; a parameter budget matched to the hyper-network's where the method's design allows
it), through its method's train hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from pilot.config import BaselinesParams, GuidanceParams
from pilot.methods.trained import TrainedBaseline
from pilot.models import CausalLM
from pilot.tracking import metric_records
from pilot.training.protocol import TrainingProtocol


def train_baseline(method: type[TrainedBaseline], student: CausalLM, guidance: GuidanceParams,
                   baselines: BaselinesParams, protocol: TrainingProtocol, *inputs: Any) -> tuple[Any, pd.DataFrame, dict]:
    """``method`` trained on the shared protocol with its own block, ``baselines.<name>``, and the
    inputs it lists in ``train_inputs`` (:meth:`~pilot.methods.trained.TrainedBaseline.train`).

    Returns:
        its artefact, its loss history and its summary metrics (MLflow records).
    """
    artefact, history, metrics = method.train(student, guidance, method.own_params(baselines), protocol, *inputs)
    return artefact, pd.DataFrame(history), metric_records(metrics)


def trainer(method: type[TrainedBaseline]) -> Callable[..., tuple[Any, pd.DataFrame, dict]]:
    """:func:`train_baseline` for ``method``, as a node function named ``train_<name>`` (its typed
    signature lets Kedro hand it the validated parameter blocks)."""
    def train(student: CausalLM, guidance: GuidanceParams, baselines: BaselinesParams, protocol: TrainingProtocol,
              *inputs: Any) -> tuple[Any, pd.DataFrame, dict]:
        return train_baseline(method, student, guidance, baselines, protocol, *inputs)

    train.__name__ = train.__qualname__ = f"train_{method.name}"
    train.__doc__ = method.train.__doc__
    return train
