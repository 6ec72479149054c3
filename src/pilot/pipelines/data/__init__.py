"""``data``: verifiable reasoning tasks from reasoning-gym, split into train/val/test."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
