"""Every default in ``pilot.config`` equals ``conf/base``: one source of every default.

A class built from its code defaults (a test, a benchmark, a notebook, an ablation variant's
unchanged fields) must be the configured default run, not an older or a toy one. The comparison
walks every field of every parameter block, recursively, and names each key whose code default
differs from what ``conf/base`` sets. A required field (no code default) is the configuration's
to give; the blocks inside it are still compared field by field with their classes' defaults.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pilot.config import GuidanceParams, Params, Stage1Config, Stage1Params
from pilot.framework.parameters import PARAMETER_MODELS

ROOT = Path(__file__).resolve().parents[1]

# Keys whose conf/base value no code default can match, each with the reason. Every entry must
# still disagree (a stale exception fails the test too).
EXCEPTIONS = {
    "base.student.path": "globals.yml puts the model under ${data_root}; the code cannot know the data folder",
    "base.teacher.path": "globals.yml puts the model under ${data_root}; the code cannot know the data folder",
    "base.teacher.num_layers": "the teacher is deeper than the student by design; ModelParams' defaults are the student's",
    "base.teacher.training.steps": "the teacher trains its own number of steps; LMTrainConfig's default is the student's",
}


def disagreements(configured: Params, default: Params | None, prefix: str) -> list[str]:
    """``key: code <default>, conf/base <value>`` for every field of ``configured`` that differs from
    its code default: the field of ``default`` (a default instance, e.g. ``SoftTokenParams(num_tokens=4)``)
    or else its class's declared default. Nested blocks are compared field by field."""
    found = []
    for name, field in type(configured).model_fields.items():
        key = f"{prefix}.{name}"
        value = getattr(configured, name)
        if default is not None:
            code = getattr(default, name)
        elif field.is_required():
            if isinstance(value, Params):  # e.g. base.student: required, but its own fields have defaults
                found += disagreements(value, None, key)
            continue
        else:
            code = field.get_default(call_default_factory=True)
        if isinstance(value, Params) and type(code) is type(value):
            found += disagreements(value, code, key)
        elif value != code:
            found.append(f"{key}: code {code!r}, conf/base {value!r}")
    return found


@pytest.fixture(scope="module")
def base_parameters() -> dict[str, Params]:
    """conf/base alone, read by the project's own loader and validated as a run validates it."""
    from kedro.config import OmegaConfigLoader

    from pilot.framework.hooks import validate_parameters
    from pilot.settings import CONFIG_LOADER_ARGS

    return validate_parameters(OmegaConfigLoader(str(ROOT / "conf"), env="base", **CONFIG_LOADER_ARGS)["parameters"])


def test_conf_base_configures_every_block(base_parameters):
    assert set(base_parameters) == set(PARAMETER_MODELS)


def test_code_defaults_equal_conf_base(base_parameters):
    found = [line for block, params in base_parameters.items() for line in disagreements(params, None, block)]
    unexplained = [line for line in found if line.split(":")[0] not in EXCEPTIONS]
    assert unexplained == [], "code defaults that differ from conf/base (change the default in pilot.config, " \
                              "or list the key in EXCEPTIONS with the reason):\n" + "\n".join(unexplained)
    stale = sorted(set(EXCEPTIONS) - {line.split(":")[0] for line in found})
    assert stale == [], f"EXCEPTIONS lists keys that now agree with conf/base; remove them: {stale}"


def test_each_methods_settings_default_to_its_conf_base_block(base_parameters):
    """A method's settings live beside it (:attr:`pilot.methods.base.Method.params`); their code defaults
    are its ``baselines.<name>`` block in conf/base, which names every such method."""
    from pilot.methods.registry import compared_methods

    configurable = {name: method for name, method in compared_methods().items() if method.params is not None}
    assert set(base_parameters["baselines"].model_extra) == set(configurable)
    found = [line for name, method in configurable.items()
             for line in disagreements(method.own_params(base_parameters["baselines"]), method.params(),
                                       f"baselines.{name}")]
    assert found == [], "code defaults that differ from conf/base (change the default beside the method):\n" + \
                        "\n".join(found)


def test_a_disagreement_is_named_with_its_full_key():
    """The comparison itself: a changed nested field, a changed field of a default instance, a changed list."""
    configured = Stage1Params(training=Stage1Config(steps=7))
    assert disagreements(configured, None, "stage1") == [
        f"stage1.training.steps: code {Stage1Config().steps!r}, conf/base 7"]
    assert disagreements(GuidanceParams(align_layers=[0, -1]), GuidanceParams(), "guidance") == [
        "guidance.align_layers: code [-1], conf/base [0, -1]"]
    assert disagreements(Stage1Params(), None, "stage1") == []


def test_decoding_settings_have_one_default_the_generation_block():
    """Reply length, batch size and stop strings are GenerationParams' alone: every function that
    decodes takes the whole block from its caller, with no default and no loose copy of a field."""
    import inspect

    from pilot.evaluation import answer_and_score
    from pilot.generation import generate
    from pilot.latency import answerer
    from pilot.methods.caa import choose_caa_scale
    from pilot.plans import HFTeacher, construct_and_verify
    from pilot.serving import PilotModel, log_pilot_model

    for function in (generate, answer_and_score, answerer, choose_caa_scale, construct_and_verify, HFTeacher,
                     PilotModel.set_up, log_pilot_model):
        parameters = inspect.signature(function).parameters
        assert parameters["generation"].default is inspect.Parameter.empty, f"{function.__name__} has its own default"
        loose = set(parameters) & {"max_new_tokens", "batch_size", "stop", "stop_strings"}
        assert not loose, f"{function.__name__} takes {sorted(loose)} beside the generation block"
    with pytest.raises(TypeError, match="generation"):
        generate(None, ["Q: 1+1"])


def test_the_hyper_network_is_built_from_the_guidance_parameters_and_shares_their_defaults():
    from dataclasses import fields

    from pilot.guidance.hypernet import HyperNetConfig

    # `scaling` is no guidance parameter: PILOT always scales by rms(h); only the bias-steering control sets it
    # (left out of the config's saved form and fingerprint at its default, so PILOT's hashes are unchanged).
    site = {f.name for f in fields(HyperNetConfig)} - {"hidden_size", "num_layers", "scaling"}
    assert site <= set(GuidanceParams.model_fields), site - set(GuidanceParams.model_fields)
    assert HyperNetConfig.from_site(GuidanceParams(), 32, 4) == HyperNetConfig(32, 4, read_layer=GuidanceParams().read_layer % 4)
    chosen = GuidanceParams(read_layer=-1, reader="mean", modulation="add", extra_inject_layers=[2], prior=True)
    config = HyperNetConfig.from_site(chosen, 32, 4)
    assert (config.read_layer, config.reader, config.modulation, config.extra_inject_layers, config.prior) == \
        (3, "mean", "add", [2], True)
