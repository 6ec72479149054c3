"""The compared methods: one object per method (:mod:`pilot.methods.base`), one module per family,
and the list of what is compared (:mod:`pilot.methods.registry`, imported on its own: it loads every
baseline's dependencies)."""

from pilot.methods.base import METHOD_SETTINGS, Attached, Method, TrainingData, method_settings

__all__ = ["METHOD_SETTINGS", "Attached", "Method", "TrainingData", "method_settings"]
