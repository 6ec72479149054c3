"""``tune_lora`` pipeline: LoRA's learning rate and scale searched like PILOT's loss balance (not in the default run)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
