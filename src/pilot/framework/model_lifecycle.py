"""The trained models' life in MLflow 3, and system metrics for every run.

* **Checkpoints as logged models.** After each training stage (stage 1, stage 2) the validated
  checkpoints it keeps on disk (its newest ``keep``, weights as validated) and the weights it selected
  are logged as MLflow 3 logged models of the run (``hypernet_stage1-step-8``: a hyper-network
  folder, ``HyperNetwork.load`` reads it), each the run's output at its step with that step's validation
  metrics (``stage1.val_accuracy``) linked to it, so the run's and the experiment's model tables list and
  rank them. The selected one is tagged ``pilot.selected``.
* **The served model.** :func:`pilot.serving.log_pilot_model` registers the trained PILOT and points the
  alias ``champion`` at it; here it gets the selected stage-2 step's validation metrics and its test
  accuracy (the ``eval-pilot_stage2`` run's ``accuracy``, ``ci_low``, ``ci_high``) linked to it.
* **System metrics.** MLflow's own system-metrics logging (CPU, memory, disk, network; ``system/...``) for
  every run a session starts, sampled every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (10).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl
from safetensors.torch import load_file

from pilot import tracking
from pilot.checkpoint import CheckpointManager, CorruptCheckpointError
from pilot.guidance import HyperNetwork

logger = logging.getLogger(__name__)

STAGES = ("stage1", "stage2")
HYPERNET_MODEL_TYPE = "pilot-hypernet"
SERVED_METHOD = "pilot_stage2"   # the evaluated method whose trained artefact is served


def _checkpoint_dir(catalog, stage: str) -> Path | None:
    try:
        params = catalog.load(f"params:{stage}")
    except Exception:  # noqa: BLE001 - no such block: nothing on disk to log
        return None
    folder = getattr(params, "checkpoint_dir", None) or (params.get("checkpoint_dir") if isinstance(params, dict) else None)
    return Path(folder) if folder else None


def validated_checkpoints(checkpoint_dir: Path, validation: pd.DataFrame) -> list[tuple[int, dict[str, Any]]]:
    """This run's checkpoints on disk that were validated, oldest first, as ``(step, weights)``: the weights
    validation saw (the moving average when the run kept one). This run's folder under ``checkpoint_dir``
    is the one whose newest checkpoint holds the same validation curve as ``validation``."""
    wanted = [(int(step), float(value)) for step, value in zip(validation["step"], validation["val_accuracy"])]
    runs = [p for p in checkpoint_dir.iterdir() if p.is_dir()] if checkpoint_dir.is_dir() else []
    verifier = CheckpointManager(None, 0)
    for run in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True):
        steps = sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("step-"))
        if not steps:
            continue
        try:
            newest = verifier.verify(steps[-1])
        except CorruptCheckpointError:
            continue
        curve = [(int(row["step"]), float(row["val_accuracy"])) for row in newest.get("extra", {}).get("validation", [])]
        if curve != wanted:
            continue
        validated = {step for step, _ in wanted}
        found = []
        for path in steps:
            state = verifier.verify(path)
            if state["step"] not in validated:
                continue
            weights = load_file(path / "weights.safetensors")
            prefix = "average." if any(k.startswith("average.") for k in weights) else "model."
            found.append((state["step"], {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}))
        return found
    return []


def selected_step(validation: pd.DataFrame, metrics: dict | None) -> int:
    """The step whose weights a stage selected: its ``best_step`` metric, else the first best validation."""
    best = (metrics or {}).get("best_step", {}).get("value")
    return int(best) if best is not None else int(validation.loc[validation["val_accuracy"].idxmax(), "step"])


def step_metrics(stage: str, validation: pd.DataFrame, step: int) -> dict[str, float]:
    """The validation metrics of ``step``, under the names the run logs them (``stage1.val_accuracy``)."""
    row = validation.drop_duplicates("step", keep="last").set_index("step").loc[step]
    return {f"{stage}.{column}": float(value) for column, value in row.items()
            if pd.api.types.is_number(value) and pd.notna(value)}


def log_stage_models(stage: str, selected: HyperNetwork, validation: pd.DataFrame, metrics: dict | None,
                     checkpoint_dir: Path | None) -> tuple[str, int] | None:
    """Log ``stage``'s validated checkpoints on disk and its ``selected`` weights as logged models of the
    active run (see the module docstring); returns the selected one's model id and step."""
    if validation.empty:
        return None
    best_step = selected_step(validation, metrics)
    on_disk = validated_checkpoints(checkpoint_dir, validation) if checkpoint_dir is not None else []
    models = sorted([(step, weights) for step, weights in on_disk if step != best_step] + [(best_step, None)],
                    key=lambda item: item[0])
    selected_id = None
    for step, weights in models:
        network = selected if weights is None else copy.deepcopy(selected)
        if weights is not None:
            network.load_state_dict(weights)
        with tempfile.TemporaryDirectory(prefix=f"pilot-{stage}-") as folder:
            network.save(Path(folder) / "hypernet")
            model_id = tracking.log_checkpoint_model(
                Path(folder) / "hypernet", name=f"hypernet_{stage}-step-{step}", step=step,
                metrics=step_metrics(stage, validation, step), params={"stage": stage, "step": step},
                model_type=HYPERNET_MODEL_TYPE, tags={"pilot.stage": stage, "pilot.selected": str(step == best_step).lower()})
        if step == best_step:
            selected_id = model_id
    logger.info("%s: %d checkpoint(s) logged as MLflow models (selected: step %d)", stage, len(models), best_step)
    return (selected_id, best_step) if selected_id else None


class ModelLifecycleHooks:
    """Checkpoints and the served model as MLflow 3 logged models, and system metrics (module docstring)."""

    def __init__(self) -> None:
        self._selected: dict[str, tuple[str, int]] = {}   # stage -> its selected logged model and step
        self._served: dict[str, str] = {}
        self._test_metrics: dict[str, Any] | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self.__init__()   # a new session: nothing of an earlier one
        mlflow.enable_system_metrics_logging()   # every run started from now on (MLflow's own sampler)

    @hook_impl
    def after_node_run(self, node, catalog, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        if mlflow.active_run() is None:
            return
        for stage in STAGES:
            if f"hypernet_{stage}" in outputs and f"{stage}_validation" in outputs:
                logged = log_stage_models(stage, outputs[f"hypernet_{stage}"], outputs[f"{stage}_validation"],
                                          outputs.get(f"{stage}_metrics"), _checkpoint_dir(catalog, stage))
                if logged is not None:
                    self._selected[stage] = logged
        if outputs.get("trained_model", {}).get("model_id"):
            self._served = outputs["trained_model"]
            self._link_served(catalog)
        if "method_runs" in outputs and "results_table" in inputs:
            table = inputs["results_table"]
            rows = table[(table["method"] == SERVED_METHOD) & (table["task"] == "overall") & (table["split"] == "test")]
            run_id = outputs["method_runs"].get(SERVED_METHOD)
            if len(rows) and run_id:
                row = rows.iloc[0]
                self._test_metrics = {"run_id": run_id, "metrics": {k: float(row[k]) for k in ("accuracy", "ci_low", "ci_high")}}
        if self._served and self._test_metrics:
            tracking.link_metrics(self._served["model_id"], self._test_metrics["metrics"], run_id=self._test_metrics["run_id"])
            self._test_metrics = None

    def _link_served(self, catalog) -> None:
        """The served model: the selected stage-2 step's validation metrics, and which logged model it is."""
        model_id = self._served["model_id"]
        try:
            validation = catalog.load("stage2_validation")   # saved by now, in this session or an earlier one
        except Exception:  # noqa: BLE001 - no curve to link
            return
        if "stage2" in self._selected:
            hypernet_id, step = self._selected["stage2"]
            mlflow.set_logged_model_tags(model_id, {"pilot.hypernet_model_id": hypernet_id})
        else:
            step = selected_step(validation, None)
        values = step_metrics("stage2", validation, step)
        mlflow.set_logged_model_tags(model_id, {"pilot.stage2_step": str(step)})
        tracking.link_metrics(model_id, values, step=step)
        logger.info("Served model %s: stage-2 step %d (%s)", model_id, step, json.dumps(values))
