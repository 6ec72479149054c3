"""Which errors a user fixes from their one sentence (:mod:`pilot.cli` prints that sentence instead of
the traceback), and whether the traceback is asked for."""

from __future__ import annotations

import os

TRACEBACK_VARIABLE = "PILOT_TRACEBACK"


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a user causes and fixes from the message (imported here: the CLI starts fast)."""
    from pilot.artifacts import ArtifactChecksumError
    from pilot.checkpoint import CorruptCheckpointError
    from pilot.config import ParameterError
    from pilot.framework.hooks import MissingInputError, StaleInputError
    from pilot.framework.outputs import OutputNotWritableError
    from pilot.latents import CorruptCacheError, StaleCacheError
    from pilot.tracking import TrackingUnavailableError
    from pilot.tuning import StorageUnavailableError

    return (ParameterError, MissingInputError, StaleInputError, OutputNotWritableError, TrackingUnavailableError,
            StorageUnavailableError, StaleCacheError, CorruptCacheError, ArtifactChecksumError, CorruptCheckpointError)


def show_traceback(verbose: bool) -> bool:
    return verbose or os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def user_error(error: BaseException) -> BaseException | None:
    """The user error behind ``error``: itself, or the one a wrapper was raised from (Kedro wraps an
    error raised while loading a dataset, a corrupt cache say, in its own ``DatasetError``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, user_errors()):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
