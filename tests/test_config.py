import ast
from pathlib import Path

import pytest

from pilot.config import (
    PARAMETER_MODELS,
    DataParams,
    GuidanceParams,
    ParameterError,
    Stage1Params,
    validate,
)

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pilot"
KEDRO_GLUE = {"settings.py", "pipeline_registry.py", "__main__.py"}


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


@pytest.mark.parametrize("model, value, message", [
    (Stage1Params, {"training": {"contrastive_weight": -1.0}},
     "Parameter 'stage1.training.contrastive_weight' = -1.0 is invalid: input should be greater than or equal to 0."),
    (Stage1Params, {"training": {"steps": "many"}},
     "Parameter 'stage1.training.steps' = 'many' is invalid: input should be a valid integer"),
    (Stage1Params, {"training": {"contrastive_wieght": 0.1}},
     "Parameter 'stage1.training.contrastive_wieght' is not a known setting; remove it or fix its spelling."),
    (DataParams, {"tasks": [{"name": "not_a_task", "size": 10}]},
     "Parameter 'data.tasks.0.name' = 'not_a_task' is invalid: task 'not_a_task' is not a reasoning-gym task"),
    (GuidanceParams, {"reader": "lstm"}, "Parameter 'guidance.reader' = 'lstm' is invalid: input should be 'mean' or 'attention'"),
])
def test_bad_parameters_are_one_clear_sentence(model, value, message):
    prefix = {Stage1Params: "stage1", DataParams: "data", GuidanceParams: "guidance"}[model]
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
