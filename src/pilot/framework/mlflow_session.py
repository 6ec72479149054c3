"""kedro-mlflow's hook, started afresh by every session.

kedro-mlflow registers one ``MlflowHook`` for the whole process (its ``kedro.hooks`` entry point).
That object keeps the id of the last run it opened and, before every node of a later session,
reopens that run -- even when tracking is disabled for the later session (``tracking.on_unavailable:
disable``, a data-parallel rank other than 0), whose store does not hold it: a notebook or a test
that runs twice in one process would fail at its first node. ``settings.py`` turns the entry point's
registration off (Kedro's ``DISABLE_HOOKS_FOR_PLUGINS``) and registers :class:`MlflowSessionHook`
instead: kedro-mlflow's own hook, re-initialised by its constructor when a session's context is
created, so each session starts with no run of an earlier one.
"""

from __future__ import annotations

from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks import MlflowHook

# The distribution whose entry-point hook this one replaces (either spelling of its name).
KEDRO_MLFLOW = ("kedro_mlflow", "kedro-mlflow")


class MlflowSessionHook(MlflowHook):
    """:class:`kedro_mlflow.framework.hooks.MlflowHook`, with a fresh state for every session."""

    @hook_impl
    def after_context_created(self, context) -> None:
        MlflowHook.__init__(self)   # a new session: no run id, logging settings or config of an earlier one
        super().after_context_created(context)
