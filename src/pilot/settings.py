"""Kedro project settings."""

import os
import warnings

# OpenMP threads with no work sleep instead of spinning. The OpenMP runtime reads this once, when torch
# loads it (first imported just below, by the hooks), so it is set here, before. On the project's
# 2-core machine beside other busy processes, spinning threads made `threads: null` (every core) train
# 5-24x slower than sleeping ones (BENCHMARKS.md, "Threads: idle and under load"). A value already
# in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pilot.framework.hooks import MemoryHooks, PreflightHooks, RunRecordHooks, SharedReportHooks  # noqa: E402

# Deprecation noise from Kedro's and kedro-mlflow's use of OmegaConf, not actionable here.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")

# kedro-mlflow registers its own hook through its entry point. Ours: parameter validation and the
# tracking-store check before any node, the run record, peak memory, and one lock for the tune
# reports that parallel workers share (see pilot.framework.hooks).
HOOKS = (PreflightHooks(), RunRecordHooks(), MemoryHooks(), SharedReportHooks())

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
