"""The parameter and preflight hooks: everything that must hold before the first node computes anything.

- :class:`ParameterHooks`: every parameter block is validated (:mod:`.parameters`) as soon as the
  configuration is read; a bad value stops the run with one sentence before any compute. Nodes
  receive the validated, typed objects: their signatures say ``params: Stage1Params``, which Kedro
  instantiates from the same configuration (its typed-parameter support), so a node never parses a
  raw dict; kedro-mlflow is shown them as plain dicts, so it logs them flattened.
- :class:`PreflightHooks`, before the pipeline runs: the blocks it reads are present, every
  cross-field rule that needs the student's shape holds (the guidance site, each method's
  settings), its inputs exist and fit the student, a tune run's study storage answers, and every
  folder it writes to takes files. In a data-parallel launch (``torchrun ... -m
  pilot.framework.launch``) only rank 0's session writes: every other rank keeps its outputs in
  memory (no file, no MLflow run).

The project's other hooks, one job each: :mod:`.tracking_store` (the MLflow store checked before
any node), :mod:`.run_record` (the resolved parameters of a tracked
run), :mod:`.memory` (peak memory per node), :mod:`.report_locks` (one lock per shared tune report),
:mod:`.mlflow_session` (kedro-mlflow's hook, started afresh by every session), :mod:`.interrupt` (SIGTERM and
SIGINT end a run as KILLED, with its checkpoints kept for the rerun).
The parameters as read and validated are :mod:`.parameters`; the student's shape before it is
loaded, :mod:`.student_shape`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import MemoryDataset
from kedro.pipeline import Pipeline

from pilot import distributed
from pilot.config import (
    AblationsParams,
    BaselinesParams,
    GuidanceParams,
    ParameterError,
    Params,
    TuneParams,
    validate,
)
from pilot.framework.outputs import check_writable, dataset_config, output_folders
from pilot.framework.parameters import PARAMETER_MODELS, as_plain, check_top_level, load_parameters, validate_parameters
from pilot.framework.student_shape import config_json, student_on_meta, student_shape
from pilot.guidance import HyperNetConfig, make_hypernet
from pilot.methods.registry import trained_baselines
from pilot.methods.trained import StudentShapes
from pilot.models import count_parameters
from pilot.runtime import configure_threads
from pilot.tuning import check_storage

logger = logging.getLogger(__name__)


class MissingInputError(FileNotFoundError):
    """An input of the pipeline has not been produced yet."""


class StaleInputError(ValueError):
    """An input of the pipeline was made for another configuration (e.g. a hyper-network for another student)."""


def _producer(name: str) -> str | None:
    """The pipeline that writes dataset ``name`` (imported directly: a `--pipeline X` run
    registers only X)."""
    from pilot.pipeline_registry import DEFAULT_ORDER

    for pipeline_name in (*DEFAULT_ORDER, "tune"):
        module = importlib.import_module(f"pilot.pipelines.{pipeline_name}")
        if name in module.create_pipeline().all_outputs():
            return pipeline_name
    return None


class ParameterHooks:
    """The run's parameters: validated as soon as the configuration is read, and shown to kedro-mlflow
    as plain dicts."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        """Validate the parameters before anything else reads them, and set torch's threads."""
        raw = load_parameters(context.config_loader)
        check_top_level(raw)  # a misspelt top-level block (`--params stage_1.x=5`) is an error, not a no-op
        validate_parameters(raw)
        configure_threads(raw.get("threads"))

    @hook_impl(tryfirst=True)
    def before_node_run(self, inputs: dict[str, Any]) -> None:
        """Show kedro-mlflow (whose hook runs next, on this same dict) typed parameters as plain
        dicts, so it logs them flattened (``stage1.training.steps``), not as one repr string.

        Only this hooks-only copy of the inputs changes: the node itself still gets the typed objects.
        """
        for name, value in inputs.items():
            if name.startswith("params:") and isinstance(value, Params):
                inputs[name] = as_plain(value)


class PreflightHooks:
    @staticmethod
    def _check_inputs_exist(pipeline: Pipeline, catalog) -> None:
        """Every dataset the pipeline reads but does not produce must already exist."""
        for name in sorted(pipeline.inputs()):
            if name.startswith("params:") or name == "parameters" or catalog.exists(name):
                continue
            producer = _producer(name)
            hint = f"run `kedro run --pipelines {producer}` first" if producer else "check conf/<env>/catalog.yml"
            raise MissingInputError(f"Input '{name}' does not exist yet: {hint} (or `kedro run` for everything).")

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog) -> None:
        """Validate parameters and every cross-field rule the pipeline's blocks use (the student's layers
        and width, ReFT's budget), then its inputs and output folders, before the first node runs."""
        params = catalog.load("parameters")
        wanted = sorted({name.split(":", 1)[1].split(".")[0] for name in pipeline.inputs()
                         if name.startswith("params:")})
        for key in wanted:
            if key in PARAMETER_MODELS and key not in params:
                raise ParameterError(f"Parameter block '{key}' is missing; add it to conf/base/parameters_{key}.yml.")
        if "guidance" in wanted:
            self._check_against_student(wanted, params, catalog)
        self._check_inputs_exist(pipeline, catalog)  # after the parameters: their error is the first to fix
        self._check_hypernets_fit(pipeline, catalog)
        if "tune" in wanted:  # a shared study's database server must answer before any compute
            check_storage(validate(TuneParams, params["tune"], "tune").storage)
        # Every folder the run writes to must take files before any compute, not at the last save.
        outputs = {name: dataset_config(catalog, name) for name in pipeline.all_outputs()}
        if not distributed.is_main_process():   # only rank 0 writes: the other ranks' outputs stay in memory,
            for name in pipeline.all_outputs():  # but for datasets that rank 0 writes for all (the latent cache)
                if not getattr(catalog.get(name), "main_rank_writes", False):
                    catalog[name] = MemoryDataset(copy_mode="assign")
            return
        check_writable(output_folders(outputs, as_plain(params), wanted))

    @staticmethod
    def _check_against_student(wanted: list[str], params: dict[str, Any], catalog) -> None:
        """The cross-field rules that need the student's shape, for every block this pipeline reads:
        the guidance site (and each ablation variant's and tuned injection layer's) and each trained
        baseline's own check (:meth:`~pilot.methods.trained.TrainedBaseline.check_against`: ReFT's
        layers, LoRA's modules, the soft thoughts' budget), so none of them fails after other nodes
        have trained."""
        shape = student_shape(catalog, params)
        if shape is None:
            return
        num_layers, hidden_size = shape
        guidance = validate(GuidanceParams, params["guidance"], "guidance")
        guidance.check_against(num_layers, hidden_size)
        if "ablations" in wanted and "ablations" in params:
            for variant in validate(AblationsParams, params["ablations"], "ablations").variants:
                try:
                    guidance.model_copy(update=variant.guidance).check_against(num_layers, hidden_size)
                except ParameterError as error:
                    raise ParameterError(f"{str(error).removesuffix('.')} (in ablations variant '{variant.name}', "
                                         "whose guidance settings are laid over these).") from None
        if "tune" in wanted and "tune" in params:
            tune = validate(TuneParams, params["tune"], "tune")
            for layer in tune.inject_layers or []:
                try:
                    guidance.model_copy(update={"inject_layer": layer}).check_against(num_layers, hidden_size)
                except ParameterError as error:
                    raise ParameterError(f"Parameter 'tune.inject_layers' = {tune.inject_layers}: layer {layer} does "
                                         f"not fit this student and guidance settings ({error})") from None
        if "baselines" in wanted and "baselines" in params and hidden_size is not None:
            baselines = validate(BaselinesParams, params["baselines"], "baselines")
            # the baselines' budget: the parameter count of the hyper-network these settings build
            budget = count_parameters(make_hypernet(guidance, hidden_size, num_layers, 0))
            shapes = StudentShapes(num_layers, hidden_size, budget, lambda: student_on_meta(catalog, params),
                                   lambda: (student_shape(catalog, params, "teacher") or (None, None))[1])
            for method in trained_baselines():   # each checks its own block
                method.check_against(method.own_params(baselines), shapes)

    @staticmethod
    def _check_hypernets_fit(pipeline: Pipeline, catalog) -> None:
        """A saved hyper-network the pipeline reads must match the student's hidden size and depth."""
        student = config_json(catalog, "student_model", "config.json")
        if student is None:
            return
        hidden = student.get("hidden_size", student.get("n_embd"))
        layers = next((student[k] for k in ("num_hidden_layers", "n_layer") if k in student), None)
        for name in sorted(pipeline.inputs() & {"hypernet_stage1", "hypernet_stage2"}):
            saved = config_json(catalog, name, "hypernet_config.json")
            if saved is not None:
                try:
                    HyperNetConfig(**saved).check_fits(hidden, layers, where=f"'{name}'")
                except ValueError as error:
                    raise StaleInputError(str(error)) from None
