"""MLflow helpers that do not depend on Kedro: store checks, batched histories, nested runs.

Tracking is always the last step: callers save their outputs first, then log. Every helper
here is a no-op when no MLflow run is active, so the library works with tracking disabled.
"""

from __future__ import annotations

import logging
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)


class TrackingUnavailableError(RuntimeError):
    pass


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailableError` (one clear sentence) if ``uri`` cannot take writes now.

    SQLite stores must be in an existing, writable folder, not locked by another writer, and
    readable: ``PRAGMA quick_check`` reads every page (about 0.2 s for a 200 MB store), so a
    corrupt file with an intact header fails here rather than in SQLAlchemy mid-run. HTTP
    servers must answer their health endpoint within ``timeout_s``.
    """
    fix = "start it, fix the URI in conf/<env>/mlflow.yml, or set tracking.on_unavailable: disable"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise TrackingUnavailableError(f"MLflow store '{uri}' is unreachable: folder '{path.parent}' does not exist; {fix}.")
        corrupt = ("move the file aside (a new store is created) or restore it from a backup, "
                   "or set tracking.on_unavailable: disable")
        try:
            connection = sqlite3.connect(path, timeout=timeout_s)
            try:
                connection.execute("BEGIN IMMEDIATE")  # takes (and releases) the write lock
                connection.rollback()
                problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
                tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "experiments" in tables:  # an MLflow store: its first table must answer a query
                    connection.execute("SELECT experiment_id FROM experiments LIMIT 1").fetchall()
            finally:
                connection.close()
        except sqlite3.OperationalError as error:  # locked, read-only, cannot be opened
            raise TrackingUnavailableError(f"MLflow store '{uri}' is unavailable ({error}); {fix}.") from error
        except sqlite3.DatabaseError as error:  # "database disk image is malformed", "file is not a database"
            raise TrackingUnavailableError(f"MLflow store '{uri}' is corrupted or not an SQLite database "
                                           f"({error}); {corrupt}.") from error
        except sqlite3.Error as error:
            raise TrackingUnavailableError(f"MLflow store '{uri}' is unavailable ({error}); {fix}.") from error
        if problems != ["ok"]:
            raise TrackingUnavailableError(f"MLflow store '{uri}' is corrupted (integrity check: "
                                           f"{'; '.join(problems[:2])}); {corrupt}.")
    elif uri.startswith(("http://", "https://")):
        fix = ("start it (`make services` for this project's local server), fix the URI in conf/<env>/mlflow.yml "
               "or MLFLOW_TRACKING_URI, or set tracking.on_unavailable: disable")
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingUnavailableError(f"MLflow server '{uri}' answered {response.status}; {fix}.")
        except (urllib.error.URLError, OSError) as error:
            raise TrackingUnavailableError(f"MLflow server '{uri}' is unreachable ({error}); {fix}.") from error


def active() -> bool:
    return mlflow.active_run() is not None


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def mark_killed(run_id: str | None) -> None:
    """End another process's run as KILLED (its process died mid-run), if it is still RUNNING.

    Best effort: a tracking server that cannot be reached only costs a warning.
    """
    if not run_id:
        return
    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            logger.info("MLflow run %s of the dead worker marked KILLED", run_id)
    except Exception as error:  # noqa: BLE001 - the study goes on whatever the tracking store says
        logger.warning("Could not mark MLflow run %s KILLED: %s", run_id, error)


def log_history(history: pd.DataFrame, prefix: str = "", step_column: str = "step") -> None:
    """Log every numeric column of a per-step history as an MLflow metric history (batched)."""
    run = mlflow.active_run()
    if run is None or history.empty:
        return
    client = MlflowClient()
    timestamp = int(pd.Timestamp.now().timestamp() * 1000)
    metrics = [
        Metric(f"{prefix}{column}", float(value), timestamp, int(step))
        for column in history.columns if column != step_column and pd.api.types.is_numeric_dtype(history[column])
        for step, value in zip(history[step_column], history[column]) if pd.notna(value)
    ]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000], synchronous=True)


@contextmanager
def nested_run(name: str, tags: Mapping[str, str] | None = None) -> Iterator[str | None]:
    """A child run of the active run (yields its id), or nothing when tracking is off."""
    if not active():
        yield None
        return
    with mlflow.start_run(run_name=name, nested=True, tags=dict(tags or {})) as run:
        yield run.info.run_id


def set_tags(tags: Mapping[str, object]) -> None:
    if active():
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_params(params: Mapping[str, object]) -> None:
    if active():
        mlflow.log_params({k: str(v) for k, v in params.items()})


# How the MLflow 3 UI decides what an experiment is (tag read by its experiment page): without
# it, an experiment may open in the GenAI view (traces, prompts) instead of runs and models.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(uri: str, name: str, tags: Mapping[str, str] | None = None,
                      artifact_location: str | None = None) -> None:
    """Create the experiment ``name`` unless it exists, safe when several processes start at once.

    kedro-mlflow looks the experiment up, then creates it: two workers starting together on a new
    tracking server both see none and the second creation fails (RESOURCE_ALREADY_EXISTS). Creating
    first and taking "already exists" as success has no such window.
    """
    try:
        MlflowClient(tracking_uri=uri).create_experiment(name, artifact_location=artifact_location,
                                                         tags=dict(tags or {}))
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def mark_model_training(experiment_id: str | None = None) -> None:
    """Tag the active run's experiment (or ``experiment_id``) as model training, for the MLflow UI."""
    run = mlflow.active_run()
    experiment_id = experiment_id or (run.info.experiment_id if run else None)
    if experiment_id is None:
        return
    client = MlflowClient()
    if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if active():
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def optuna_callbacks(metric_name: str = "value") -> list:
    """An Optuna callback logging each trial as a nested run of the active run (none when off)."""
    if not active():
        return []
    from optuna_integration.mlflow import MLflowCallback

    return [MLflowCallback(tracking_uri=mlflow.get_tracking_uri(), metric_name=metric_name,
                           create_experiment=False, mlflow_kwargs={"nested": True})]


def log_folder(folder: Path, artifact_path: str | None = None) -> None:
    """Every file of ``folder`` as artifacts of the active run, under ``artifact_path`` (the
    folder's name by default), so a process with only the tracking URI can download it."""
    if active():
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path or Path(folder).name)


def metric_records(values: Mapping[str, float], step: int = 0) -> dict[str, dict[str, float]]:
    """Scalars in the form kedro-mlflow's metrics datasets save: ``{name: {"value": v, "step": s}}``."""
    return {name: {"value": float(value), "step": step} for name, value in values.items()}


# ------------------------------------------------------------------------------ MLflow 3 logged models
def log_checkpoint_model(folder: Path, *, name: str, step: int, metrics: Mapping[str, float],
                         params: Mapping[str, object] | None = None, tags: Mapping[str, object] | None = None,
                         model_type: str | None = None) -> str | None:
    """The saved model in ``folder`` as an MLflow 3 logged model of the active run: the run's output at
    ``step``, with ``metrics`` linked to it at that step (so the UI's model tables show and rank them).

    The metrics are logged under the run too, at ``step``: under a key the run already logs at that step
    (``stage1.val_accuracy``) they repeat its value. Returns the model's id (None when tracking is off).
    """
    run = mlflow.active_run()
    if run is None:
        return None
    client = MlflowClient()
    model = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id,
                                           experiment_id=run.info.experiment_id, model_type=model_type,
                                           params={k: str(v) for k, v in (params or {}).items()},
                                           tags={k: str(v) for k, v in (tags or {}).items()})
    try:
        client.log_model_artifacts(model.model_id, str(folder))
    except Exception:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run.info.run_id, models=[LoggedModelOutput(model.model_id, step=step)])
    link_metrics(model.model_id, metrics, step=step)
    return model.model_id


def link_metrics(model_id: str, metrics: Mapping[str, float], step: int = 0, run_id: str | None = None) -> None:
    """Log ``metrics`` for the logged model ``model_id``, under ``run_id`` (the active run's by default)."""
    run_id = run_id or active_run_id()
    if run_id is None or not metrics:
        return
    timestamp = int(pd.Timestamp.now().timestamp() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(key, float(value), timestamp, int(step), model_id=model_id)
                                              for key, value in metrics.items()], synchronous=True)
