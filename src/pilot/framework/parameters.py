"""The run's parameters as the hooks read them: loaded (an override Kedro cannot merge named in one
sentence), every block validated by its class (:data:`PARAMETER_MODELS`: the schema in
:mod:`pilot.config`, the data block beside its tasks, each method's settings beside the method), and
typed blocks turned back into plain dicts for YAML and MLflow."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pilot.config import (
    AblationsParams,
    BaselinesParams,
    BaseParams,
    EvaluationParams,
    GenerationParams,
    GuidanceParams,
    LatentsParams,
    ParameterError,
    Params,
    PlansParams,
    Stage1Params,
    Stage2Params,
    TrackingParams,
    TuneParams,
    validate,
)
from pilot.methods.registry import check_baseline_blocks
from pilot.tasks import DataParams

PARAMETER_MODELS: dict[str, type[Params]] = {
    "tracking": TrackingParams,
    "data": DataParams,
    "base": BaseParams,
    "guidance": GuidanceParams,
    "generation": GenerationParams,
    "plans": PlansParams,
    "latents": LatentsParams,
    "stage1": Stage1Params,
    "stage2": Stage2Params,
    "baselines": BaselinesParams,
    "tune": TuneParams,
    "evaluation": EvaluationParams,
    "ablations": AblationsParams,
}


# Top-level keys that are not a block above. `seed` is the run's base seed (conf/base/parameters.yml).
OTHER_TOP_LEVEL_KEYS = ("seed", "threads")


def check_top_level(params: Mapping[str, Any]) -> None:
    """Every top-level parameter key must be a known block (``--params stage_1.x=5`` is a typo, not a no-op)."""
    known = sorted((*PARAMETER_MODELS, *OTHER_TOP_LEVEL_KEYS))
    for key in params:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"the closest known block is '{close[0]}'" if close else "remove it or fix its spelling"
        raise ParameterError(f"Parameter '{key}' is not a known parameter block; {hint} (known: {', '.join(known)}).")
    seed = params.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ParameterError(f"Parameter 'seed' = {seed!r} is invalid: it must be an integer.")
    threads = params.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ParameterError(f"Parameter 'threads' = {threads!r} is invalid: it must be a positive integer, or null "
                             "for the CPU cores this process may use.")


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


def load_parameters(config_loader) -> dict[str, Any]:
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


def validate_parameters(params: dict[str, Any]) -> dict[str, Params]:
    """Every known parameter block present in ``params``, validated (each trained baseline's block by its
    method's class): one sentence on the first error."""
    validated = {key: validate(model, params[key], key) for key, model in PARAMETER_MODELS.items() if key in params}
    if "baselines" in validated:
        check_baseline_blocks(validated["baselines"])
    return validated


def as_plain(value: Any) -> Any:
    """Typed parameters as the plain dicts and lists they were configured as (for YAML and MLflow)."""
    if isinstance(value, Params):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {key: as_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(item) for item in value]
    return value
