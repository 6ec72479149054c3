"""PILOT's training protocol: what stage 1, every trained baseline and both studies share.

They learn from the same training rows, are selected on the same validation rows with the same
decoding settings, follow stage 1's loop (steps, batch size, validation cadence) where theirs is
left unset, and draw from the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

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
