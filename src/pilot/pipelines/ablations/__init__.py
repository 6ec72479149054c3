"""``ablations`` pipeline: PILOT retrained once per configured variant, side by side (not part of the default run)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
