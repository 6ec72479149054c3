"""Project hooks: everything that must hold before the first node computes anything.

- Every parameter block is validated (``pilot.config``) as soon as the configuration is read,
  and the guidance layers are checked against the student's layer count; a bad value stops the
  run with one sentence before any compute. Nodes receive the validated, typed objects: their
  signatures say ``params: Stage1Params``, which Kedro instantiates from the same configuration
  (its typed-parameter support), so a node never parses a raw dict.
- The MLflow store is checked: if it is unreachable or locked the run stops now, with a clear
  message, instead of after an hour of training -- or, with ``tracking.on_unavailable: disable``,
  runs on with tracking switched off. A tune run's study storage on a database server
  (``tune.storage``) must accept a connection too.
- Each tracked run records its fully resolved parameters as one YAML artifact
  (``resolved_parameters.yml``), enough to re-create the run.
- The process's peak memory is logged after each node that raised it, so a run says which step
  needs the memory; a tracked run records it as the ``peak_memory_gib`` metric and
  ``peak_memory_by_node.json``.
- In a data-parallel launch (``torchrun ... -m pilot.framework.launch``) only rank 0's session is the
  run: every other rank tracks nothing and keeps its outputs in memory (no file, no MLflow run).
- Parallel tune workers in one checkout write the same report files (``tune*``) and upload each
  to MLflow; every such save holds one exclusive file lock, so no worker uploads a file another is
  rewriting (that sends a torn request, which the tracking server answers with a 400).
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.io import MemoryDataset
from kedro.pipeline import Pipeline

from pilot.config import (
    PARAMETER_MODELS,
    AblationsParams,
    BaselinesParams,
    BaseParams,
    GuidanceParams,
    ParameterError,
    Params,
    TrackingParams,
    TuneParams,
    check_top_level,
    check_writable,
    output_folders,
    validate,
)
from pilot.baselines.lora import lora_rank_for_budget
from pilot.baselines.soft_prompts import soft_thoughts_hidden_for_budget
from pilot.guidance import HyperNetConfig, make_hypernet
from pilot import distributed, tracking
from pilot.models import build_causal_lm, count_parameters, resolve_source, source_num_layers
from pilot.runtime import configure_threads, peak_memory_gib
from pilot.tracking import TrackingUnavailableError, check_tracking_store
from pilot.tuning import check_storage

logger = logging.getLogger(__name__)


def _config_json(catalog, dataset_name: str, filename: str) -> dict | None:
    """A JSON file inside a folder dataset, read without loading the dataset (None if absent)."""
    try:
        path = Path(catalog.get(dataset_name)._describe()["path"]) / filename
    except Exception:  # no such entry in this catalog, or not a folder dataset
        return None
    return json.loads(path.read_text()) if path.is_file() else None


LAYER_KEYS, WIDTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers"), ("hidden_size", "n_embd", "d_model")


def _source_hidden_size(source: str) -> int | None:
    """The hidden size of a model source, from its config.json or its GGUF header (no weights loaded)."""
    path = resolve_source(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        return next((int(config[key]) for key in WIDTH_KEYS if key in config), None)
    from gguf import GGUFReader

    reader = GGUFReader(path)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    field = reader.fields.get(f"{architecture}.embedding_length")
    return int(field.parts[-1][0]) if field is not None else None


def _student_shape(catalog, params: dict[str, Any], role: str = "student") -> tuple[int, int | None] | None:
    """The (decoder-layer count, hidden size) of the student (or ``role``): from its config.json if it
    exists, else from ``base`` (the configured size, or the source model's header); None when neither says."""
    config = _config_json(catalog, f"{role}_model", "config.json")
    if config is not None:
        layers = next((int(config[key]) for key in LAYER_KEYS if key in config), None)
        if layers is not None:
            return layers, next((int(config[key]) for key in WIDTH_KEYS if key in config), None)
    if "base" in params:
        student = getattr(validate(BaseParams, params["base"], "base"), role)
        if student.source:
            return source_num_layers(student.source), _source_hidden_size(student.source)
        return student.num_layers, student.hidden_size
    return None


class _VocabularyOfSize(list):
    """Stands in for a tokenizer where only the model's shape matters (:func:`_student_on_meta`)."""

    pad_token_id = eos_token_id = 0


def _student_on_meta(catalog, params: dict[str, Any]) -> torch.nn.Module | None:
    """The student's architecture without weights (on the meta device: no memory, no compute), from its
    folder's config.json or, for one trained here, from ``base``; None for a source not imported yet."""
    config = _config_json(catalog, "student_model", "config.json")
    with torch.device("meta"):
        if config is not None:
            from transformers import AutoConfig, AutoModelForCausalLM

            folder = Path(catalog.get("student_model")._describe()["path"])
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        student = validate(BaseParams, params["base"], "base").student if "base" in params else None
        if student is None or not student.trained_here:
            return None
        vocabulary = _VocabularyOfSize(range(validate(BaseParams, params["base"], "base").tokenizer.vocab_size))
        return build_causal_lm(vocabulary, family=student.family, hidden_size=student.hidden_size,
                               num_layers=student.num_layers, num_heads=student.num_heads,
                               intermediate_size=student.intermediate_size, max_positions=student.max_positions).model


def _unmergeable_override(base: Any, override: Any, path: tuple[str, ...] = ()) -> str | None:
    """Where a ``--params`` override meets a container of the other kind (OmegaConf cannot merge a
    mapping into a list or a list into a mapping): one sentence naming the key and the fix."""
    key = ".".join(path)
    if isinstance(override, dict) and isinstance(base, list):
        item = ".".join((*path, *_first_leaf(override)))
        file = f"parameters_{path[0]}.yml" if len(path) > 1 else "parameters.yml"
        return (f"Parameter override '{item}' cannot be applied: '{key}' is a list, which `--params` cannot change "
                f"item by item; write the whole list under '{key}' in conf/local/{file} (a list there replaces "
                "the base one whole; or in conf/<env>/ for `--env <env>`) and run again.")
    if isinstance(override, list) and isinstance(base, dict):
        return (f"Parameter override '{key}' = {override!r} cannot be applied: '{key}' is a mapping (keys: "
                f"{', '.join(map(str, base))}), not a list; set its keys one by one (`--params {key}.<key>=<value>`).")
    if isinstance(override, dict) and isinstance(base, dict):
        for name, value in override.items():
            if name in base and (found := _unmergeable_override(base[name], value, (*path, str(name)))):
                return found
    return None


def _first_leaf(override: dict) -> tuple[str, ...]:
    name, value = next(iter(override.items()))
    return (str(name), *(_first_leaf(value) if isinstance(value, dict) and value else ()))


def _load_parameters(config_loader) -> dict[str, Any]:
    """``config_loader["parameters"]``, with a ``--params`` override Kedro cannot merge reported as one
    sentence naming its key (instead of OmegaConf's "Cannot merge incompatible container types")."""
    try:
        return config_loader["parameters"]
    except TypeError as error:
        overrides = getattr(config_loader, "runtime_params", None) or {}
        if "incompatible container" not in str(error) or not overrides:
            raise
        config_loader.runtime_params = {}
        try:
            base = config_loader["parameters"]
        finally:
            config_loader.runtime_params = overrides
        message = _unmergeable_override(base, overrides)
        if message is None:
            raise
        raise ParameterError(message) from error


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


def _forget_previous_mlflow_run() -> None:
    """kedro-mlflow's hook is one object per process and keeps the last run's id; with tracking
    disabled it would try to reopen that run (from another session, in a notebook or a test)
    before every node. An untracked pipeline has no run."""
    try:
        from kedro_mlflow.framework.hooks import mlflow_hook
    except ImportError:  # kedro-mlflow not installed: nothing to forget
        return
    mlflow_hook.run_id = None


def validate_parameters(params: dict[str, Any]) -> dict[str, Params]:
    """Every known parameter block present in ``params``, validated: one sentence on the first error."""
    return {key: validate(model, params[key], key) for key, model in PARAMETER_MODELS.items() if key in params}


def as_plain(value: Any) -> Any:
    """Typed parameters as the plain dicts and lists they were configured as (for YAML and MLflow)."""
    if isinstance(value, Params):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {key: as_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(item) for item in value]
    return value


class PreflightHooks:
    def __init__(self) -> None:
        self._context = None
        self._tracking_disabled = False

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        """Validate the parameters and check the MLflow store before anything else reads them."""
        self._context = context
        self._tracking_disabled = False
        raw = _load_parameters(context.config_loader)
        check_top_level(raw)  # a misspelt top-level block (`--params stage_1.x=5`) is an error, not a no-op
        validated = validate_parameters(raw)
        configure_threads(raw.get("threads"))
        uri = _tracking_uri(context)
        if uri is None:
            return
        if not distributed.is_main_process():   # rank 0's session is the run; the others track nothing
            self._disable_tracking(context)
            return
        tracking_params = validated.get("tracking", TrackingParams())
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

    def _disable_tracking(self, context) -> None:
        """kedro-mlflow still sets itself up at start; point it at a throwaway store and switch
        tracking off for the pipeline in before_pipeline_run."""
        scratch = Path(tempfile.mkdtemp(prefix="pilot-no-tracking-"))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'unused.db'}"
        context.config_loader.config_patterns["mlflow"] = ["__tracking_disabled__"]
        self._tracking_disabled = True

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
        if self._tracking_disabled and self._context is not None and hasattr(self._context, "mlflow"):
            names = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
            self._context.mlflow.tracking.disable_tracking.pipelines = list(names)
            _forget_previous_mlflow_run()
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
        outputs = {name: dataset._describe() for name in pipeline.all_outputs()
                   if (dataset := catalog.get(name)) is not None}
        if not distributed.is_main_process():   # only rank 0 writes: the other ranks' outputs stay in memory
            for name in pipeline.all_outputs():
                catalog[name] = MemoryDataset(copy_mode="assign")
            return
        check_writable(output_folders(outputs, as_plain(params), wanted))

    @hook_impl(tryfirst=True)
    def before_node_run(self, inputs: dict[str, Any]) -> None:
        """Show kedro-mlflow (whose hook runs next, on this same dict) typed parameters as plain
        dicts, so it logs them flattened (``stage1.training.steps``), not as one repr string.

        Only this hooks-only copy of the inputs changes: the node itself still gets the typed objects.
        """
        for name, value in inputs.items():
            if name.startswith("params:") and isinstance(value, Params):
                inputs[name] = as_plain(value)

    @staticmethod
    def _check_against_student(wanted: list[str], params: dict[str, Any], catalog) -> None:
        """The cross-field rules that need the student's shape, for every block this pipeline reads:
        the guidance site (and each ablation variant's and tuned injection layer's), and ReFT's layers
        and parameter budget, so none of them fails after other nodes have trained."""
        shape = _student_shape(catalog, params)
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
            baselines.reft.check_against(num_layers, hidden_size, budget)
            if (skeleton := _student_on_meta(catalog, params)) is not None:
                lora = baselines.lora
                try:
                    lora_rank_for_budget(skeleton, lora.target_modules, budget, lora.match_tolerance)
                except ValueError as error:
                    raise ParameterError(f"Parameter 'baselines.lora.target_modules' = {lora.target_modules} does "
                                         f"not fit: {str(error)[0].lower()}{str(error)[1:]}") from None
            teacher = _student_shape(catalog, params, "teacher")   # soft thoughts read the teacher's states
            tokens = baselines.soft_thoughts.num_tokens
            if teacher is not None and teacher[1] is not None:
                try:
                    soft_thoughts_hidden_for_budget(tokens, teacher[1], hidden_size, budget)
                except ValueError as error:
                    raise ParameterError(f"Parameter 'baselines.soft_thoughts.num_tokens' = {tokens} does not fit "
                                         f"the parameter budget: {str(error)[0].lower()}{str(error)[1:]}") from None

    @staticmethod
    def _check_hypernets_fit(pipeline: Pipeline, catalog) -> None:
        """A saved hyper-network the pipeline reads must match the student's hidden size and depth."""
        student = _config_json(catalog, "student_model", "config.json")
        if student is None:
            return
        hidden = student.get("hidden_size", student.get("n_embd"))
        layers = next((student[k] for k in ("num_hidden_layers", "n_layer") if k in student), None)
        for name in sorted(pipeline.inputs() & {"hypernet_stage1", "hypernet_stage2"}):
            saved = _config_json(catalog, name, "hypernet_config.json")
            if saved is not None:
                try:
                    HyperNetConfig(**saved).check_fits(hidden, layers, where=f"'{name}'")
                except ValueError as error:
                    raise StaleInputError(str(error)) from None


class RunRecordHooks:
    """Records what a tracked run was: its fully resolved parameters, as one YAML artifact."""

    @hook_impl(trylast=True)  # after kedro-mlflow has opened the run
    def before_pipeline_run(self, run_params: dict[str, Any], catalog) -> None:
        if mlflow.active_run() is None:
            return
        tracking.mark_model_training()  # experiments created before conf/base/mlflow.yml set the tag, too
        header = {key: run_params.get(key) for key in ("env", "pipeline_names", "runtime_params", "session_id")}
        document = {"run": header, "parameters": as_plain(catalog.load("parameters"))}
        mlflow.log_text(yaml.safe_dump(document, sort_keys=False, default_flow_style=False),
                        "resolved_parameters.yml")


class MemoryHooks:
    """Logs the process's peak memory after each node that raised it by more than ``step`` GiB.

    The peak is the process's (``measure``): in a process that already used more memory than the
    run needs (a notebook, a test session) no node raises it and only the starting peak is listed.
    """

    def __init__(self, step: float = 0.05, measure: Callable[[], float] = peak_memory_gib) -> None:
        self.step = step
        self.measure = measure
        self.raised_by: dict[str, float] = {}

    @hook_impl
    def before_pipeline_run(self) -> None:
        self.raised_by = {"(before the first node)": round(self.measure(), 3)}

    @hook_impl
    def after_node_run(self, node) -> None:
        peak = self.measure()
        if peak > max(self.raised_by.values(), default=0.0) + self.step:
            self.raised_by[node.name] = round(peak, 3)
            logger.info("Peak memory %.2f GiB, reached in node '%s'.", peak, node.name)

    @hook_impl(tryfirst=True)  # before kedro-mlflow closes the run
    def after_pipeline_run(self) -> None:
        peak = self.measure()
        logger.info("Peak memory of the run: %.2f GiB.", peak)
        if mlflow.active_run() is not None:
            mlflow.log_metric("peak_memory_gib", round(peak, 3))
            mlflow.log_dict(self.raised_by, "peak_memory_by_node.json")


class SharedReportHooks:
    """One exclusive lock around each save of a ``tune*`` dataset, shared by every process of the checkout.

    A thread lock in front of the file lock serialises this process's own saves too (``kedro run
    --async`` saves a node's outputs in threads), so each save holds the file lock alone.
    """

    LOCK_NAME = ".tune-reports.lock"

    def __init__(self) -> None:
        self._lock_path: Path | None = None
        self._in_process = threading.Lock()
        self._held: dict[str, Any] = {}

    @hook_impl
    def after_context_created(self, context) -> None:
        data_root = context.config_loader["globals"].get("data_root", "data")
        self._lock_path = Path(context.project_path) / data_root / "08_reporting" / self.LOCK_NAME

    @hook_impl
    def before_dataset_saved(self, dataset_name: str) -> None:
        if self._lock_path is None or not dataset_name.startswith("tune"):
            return
        self._in_process.acquire()
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        held = open(self._lock_path, "a")  # closed in after_dataset_saved, or when the process ends
        fcntl.flock(held, fcntl.LOCK_EX)
        self._held[dataset_name] = held

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        held = self._held.pop(dataset_name, None)
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()
            self._in_process.release()
