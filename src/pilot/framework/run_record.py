"""The run record: each tracked run keeps its fully resolved parameters as one YAML artifact
(``resolved_parameters.yml``), enough to re-create it, and how many data-parallel processes trained it
(the ``distributed.processes`` parameter; each held ceil(batch_size / processes) of every batch), and
the machine its numbers depend on (``machine.*`` tags: torch's version and the CPU kernels it used;
a run repeats bit for bit on the same kind of CPU, :func:`pilot.runtime.machine_record`)."""

from __future__ import annotations

from typing import Any

import mlflow
import yaml
from kedro.framework.hooks import hook_impl

from pilot import distributed, tracking
from pilot.framework.parameters import as_plain
from pilot.runtime import machine_record, thread_policy


class RunRecordHooks:
    """Records what a tracked run was: its fully resolved parameters, as one YAML artifact."""

    @hook_impl(trylast=True)  # after kedro-mlflow has opened the run
    def before_pipeline_run(self, run_params: dict[str, Any], catalog) -> None:
        if mlflow.active_run() is None:
            return
        tracking.mark_model_training()  # experiments created before conf/base/mlflow.yml set the tag, too
        header = {key: run_params.get(key) for key in ("env", "pipeline_names", "runtime_params", "session_id")}
        header["processes"] = distributed.world().size
        header["machine"] = machine_record()
        mlflow.log_param("distributed.processes", header["processes"])
        mlflow.set_tags({f"machine.{key}": value for key, value in header["machine"].items()})
        mlflow.set_tag("threads", thread_policy())   # the speed, never the results (pilot.runtime)
        document = {"run": header, "parameters": as_plain(catalog.load("parameters"))}
        mlflow.log_text(yaml.safe_dump(document, sort_keys=False, default_flow_style=False),
                        "resolved_parameters.yml")
