"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# The method's flow; `tune` is deliberately not part of the default run.
DEFAULT_ORDER = ("data", "base", "plans", "latents", "stage1", "stage2", "baselines", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects.
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum((pipelines[name] for name in DEFAULT_ORDER if name in pipelines), Pipeline([]))
    return pipelines
