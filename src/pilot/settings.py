"""Kedro project settings."""

import os
import warnings

from pilot.framework.hooks import ParameterHooks, PreflightHooks
from pilot.framework.interrupt import InterruptHooks
from pilot.framework.memory import MemoryHooks
from pilot.framework.mlflow_session import KEDRO_MLFLOW, MlflowSessionHook
from pilot.framework.model_lifecycle import ModelLifecycleHooks
from pilot.framework.report_locks import SharedReportHooks
from pilot.framework.run_record import RunRecordHooks
from pilot.framework.tracking_store import TrackingStoreHooks

# Deprecation noise from Kedro's and kedro-mlflow's use of OmegaConf, not actionable here.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")

# Ours: parameter validation and the tracking-store check before any node, the run record, peak
# memory, one lock for the tune reports that parallel workers share, SIGTERM/SIGINT ending a run
# as KILLED, and the trained models' life in MLflow 3 with system metrics for every run (pilot.framework:
# hooks, run_record, memory, report_locks, interrupt, model_lifecycle). kedro-mlflow's hook is registered here, started afresh by every
# session (pilot.framework.mlflow_session), in place of the one process-wide object its entry point
# registers; last, so that it runs where the entry point's did: before ours.
# Hooks of one stage run last-registered first: the parameters are checked before the tracking store.
HOOKS = (TrackingStoreHooks(), ParameterHooks(), PreflightHooks(), RunRecordHooks(), MemoryHooks(), SharedReportHooks(), InterruptHooks(),
         ModelLifecycleHooks(), MlflowSessionHook())
DISABLE_HOOKS_FOR_PLUGINS = KEDRO_MLFLOW

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Declared here (kedro-mlflow would add the same) so our preflight hook can read mlflow.yml.
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
    # conf/<env> overrides individual keys of conf/base instead of whole top-level blocks.
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
    # ${env:NAME,default} in any configuration file (conf/shared reads the services' addresses so).
    # Not Kedro's `oc.env`, which it reserves for credentials and clears after reading them.
    "custom_resolvers": {"env": lambda name, default=None: os.environ.get(name, default)},
}
