"""The MLflow store, checked before any node: an unreachable or locked store stops the run now, with a
clear message, instead of after an hour of training -- or, with ``tracking.on_unavailable: disable``,
the run goes on with tracking switched off. In a data-parallel launch only rank 0 tracks."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import mlflow
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

from pilot import distributed, tracking
from pilot.config import TrackingParams, validate
from pilot.framework.parameters import load_parameters
from pilot.tracking import TrackingUnavailableError, check_tracking_store

logger = logging.getLogger(__name__)


def _tracking_uri(context) -> str | None:
    try:
        config = context.config_loader["mlflow"]
    except MissingConfigException:
        config = {}
    return (config.get("server") or {}).get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")


def _export_tracking_credentials(context) -> None:
    """Export the credentials entry that mlflow.yml's ``server.credentials`` names (e.g. the
    tracking server's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). kedro-mlflow does the
    same, but only after this hook has already called the server to create the experiment."""
    try:
        name = (context.config_loader["mlflow"].get("server") or {}).get("credentials")
        entries = context.config_loader["credentials"] if name else {}
    except MissingConfigException:
        return
    for key, value in (entries.get(name) or {}).items():
        os.environ[key] = str(value)


class TrackingStoreHooks:
    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        """Check the MLflow store before any node: unreachable or locked, the run stops now (or, with
        ``tracking.on_unavailable: disable``, runs untracked); create the experiment if it is new."""
        uri = _tracking_uri(context)
        if uri is None:
            return
        if not distributed.is_main_process():   # rank 0's session is the run; the others track nothing
            self._disable_tracking(context)
            return
        tracking_params = validate(TrackingParams, load_parameters(context.config_loader).get("tracking") or {},
                                   "tracking")
        _export_tracking_credentials(context)
        try:
            check_tracking_store(uri)
        except TrackingUnavailableError as error:
            if tracking_params.on_unavailable == "fail":
                raise
            logger.warning("%s Tracking is disabled for this run (tracking.on_unavailable: disable).", error)
            self._disable_tracking(context)
            return
        # kedro-mlflow creates the experiment racily; parallel tune workers on a new server must not fail
        try:
            experiment = (context.config_loader["mlflow"].get("tracking") or {}).get("experiment") or {}
        except MissingConfigException:
            experiment = {}
        if experiment.get("name"):
            create = experiment.get("create_experiment_kwargs") or {}
            try:
                tracking.ensure_experiment(uri, experiment["name"], create.get("tags"), create.get("artifact_location"))
            except mlflow.exceptions.MlflowException as error:
                if error.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                    raise
                raise TrackingUnavailableError(
                    f"MLflow server '{uri}' refused this run's credentials ({error.error_code}): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (`scripts/services.sh env` on the "
                    "tracking host prints them; docs/shared_services.md).") from None

    @staticmethod
    def _disable_tracking(context) -> None:
        """Switch kedro-mlflow off for this session through its own configuration, before its
        ``after_context_created`` reads it: every registered pipeline in
        ``tracking.disable_tracking.pipelines`` (it then opens no run and its catalog datasets log
        nothing), and a throwaway store in place of the configured one, which it still sets up at
        start. A key set on Kedro's config loader is returned as set instead of read from conf/."""
        from kedro.framework.project import pipelines

        try:
            config = context.config_loader["mlflow"]
        except MissingConfigException:
            config = {}
        scratch = Path(tempfile.mkdtemp(prefix="pilot-no-tracking-"))
        tracking_config = config.get("tracking") or {}
        context.config_loader["mlflow"] = {
            **config,
            "server": {**(config.get("server") or {}), "mlflow_tracking_uri": f"sqlite:///{scratch / 'unused.db'}"},
            "tracking": {**tracking_config, "disable_tracking": {**(tracking_config.get("disable_tracking") or {}),
                                                                 "pipelines": sorted(pipelines)}},
        }
