"""``tune`` pipeline: Optuna search over the stage-1 loss balance (not part of the default run)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
