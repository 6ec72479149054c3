"""`kedro run` for this project: Kedro's own command, with a user's error shown as its one sentence.

A bad parameter, an input not produced yet, a folder that cannot be written or a tracking store that
cannot be reached is fixed from its message alone (it names the key or file and what to run or
change); the ~200 lines of traceback through Kedro, pluggy and click under it only hide that
sentence. So those errors print the sentence and exit with status 1; a run stopped by SIGTERM or
SIGINT (:mod:`pilot.framework.interrupt`) exits with 128 + the signal's number, as the shell reports it. ``kedro run --verbose`` (or
``PILOT_TRACEBACK=1`` in the environment) shows the full traceback. Any other exception is a bug
and is raised as usual, with its traceback.

Kedro uses the ``run`` of a project's ``cli.py`` in place of its own (for ``kedro run``, ``pilot``
and ``python -m pilot``); this one wraps Kedro's command and keeps all of its options.
"""

from __future__ import annotations

import copy
import sys

import click
from kedro.framework.cli.project import run as kedro_run

from pilot.framework.errors import TRACEBACK_VARIABLE, show_traceback, user_error


@click.group(name="pilot")
def cli() -> None:
    """Commands of the pilot project."""


def _run(verbose: bool, **options) -> dict:
    from pilot.framework.interrupt import interruption

    try:
        return kedro_run.callback(**options)
    except Exception as error:
        if (stopped := interruption(error)) is not None:   # the hook has logged how to resume
            click.secho(f"Stopped: {stopped}.", fg="red", err=True)
            sys.exit(128 + stopped.signum)
        cause = user_error(error)
        if show_traceback(verbose) or cause is None:
            raise
        click.secho(f"Error: {cause}", fg="red", err=True)
        click.echo(f"(`kedro run --verbose` or {TRACEBACK_VARIABLE}=1 shows the traceback.)", err=True)
        sys.exit(1)


# Kedro's own command and options, plus --verbose.
run = copy.copy(kedro_run)
run.params = [*kedro_run.params, click.Option(
    ["--verbose", "-v"], is_flag=True, help=f"Show the full traceback of any error (or set {TRACEBACK_VARIABLE}=1).")]
run.callback = _run
run.help = (kedro_run.help or "Run the pipeline.") + (
    f" A user error (a bad parameter, a missing input) prints one sentence; --verbose or {TRACEBACK_VARIABLE}=1 "
    "shows its traceback.")
cli.add_command(run)
