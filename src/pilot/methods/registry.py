"""The compared methods, in the order the results table and the plots show them.

The evaluation pipeline is built from this list: one node per method builds it from its inputs,
one answers the test split with it, and latency, the MLflow child runs, the results table and the
plots take every method in it. A new method is a :class:`~pilot.methods.base.Method` in a module
of its own and one line in :data:`COMPARED` (docs/own_models.md, "Your own method"). The ``baselines`` pipeline is
built from it too: one training node per :class:`~pilot.methods.trained.TrainedBaseline`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields

from pilot.config import BaselinesParams, ParameterError
from pilot.methods.base import Method
from pilot.methods.caa import Caa
from pilot.methods.lora import Lora
from pilot.methods.pilot import PilotStage1, PilotStage2
from pilot.methods.references import PlanInContext, ZeroShot
from pilot.methods.reft import Reft
from pilot.methods.soft_prompts import PauseTokens, SoftThoughts
from pilot.methods.static_guidance import BiasSteering, StaticGuidance
from pilot.methods.trained import TrainedBaseline

COMPARED: list[type[Method]] = [
    ZeroShot, PlanInContext, Lora, Reft, Caa, PauseTokens, SoftThoughts, PilotStage1, PilotStage2,
    StaticGuidance, BiasSteering,
]


def compared_methods() -> dict[str, type[Method]]:
    """``{name: method class}`` of every compared method, in order."""
    methods = {method.name: method for method in COMPARED}
    if len(methods) != len(COMPARED):
        raise ValueError(f"Two compared methods share a name: {[method.name for method in COMPARED]}.")
    for method in COMPARED:
        built_from = [field.name for field in fields(method) if field.init]
        if len(built_from) != len(method.inputs):
            raise ValueError(f"Method '{method.name}' lists inputs {list(method.inputs)} for its fields {built_from}; "
                             "give one input per field, in order.")
        if issubclass(method, TrainedBaseline):
            _check_trained(method)
    return methods


def _check_trained(method: type[TrainedBaseline]) -> None:
    missing = [name for name in ("params", "artefact") if getattr(method, name, None) is None]
    if missing:
        raise ValueError(f"Trained baseline '{method.name}' does not set {missing}; set its parameter class and the "
                         "catalog entry it trains (docs/own_models.md, \"Your own method\").")
    if method.artefact not in method.inputs:
        raise ValueError(f"Trained baseline '{method.name}' trains '{method.artefact}' but is not built from it; "
                         f"list it in its inputs {list(method.inputs)}.")
    if len(method.train_inputs) > 4:   # beside the four shared inputs: no node reads more than eight
        raise ValueError(f"Trained baseline '{method.name}' lists {len(method.train_inputs)} train_inputs; at most 4.")


def trained_baselines() -> list[type[TrainedBaseline]]:
    """The compared methods that the ``baselines`` pipeline trains, in order."""
    return [method for method in compared_methods().values() if issubclass(method, TrainedBaseline)]


def check_baseline_blocks(baselines: BaselinesParams) -> None:
    """Every block of ``baselines`` names a compared method with settings (else a misspelt block would
    silently configure nothing), and each such method's block is valid for its parameter class."""
    configurable = {name: method for name, method in compared_methods().items() if method.params is not None}
    for name in baselines.model_extra or {}:
        if name not in configurable:
            raise ParameterError(f"Parameter 'baselines.{name}' is not a known setting; remove it or fix its spelling "
                                 f"(methods with settings: {', '.join(configurable)}).")
    for method in configurable.values():
        method.own_params(baselines)


def method_names() -> tuple[str, ...]:
    return tuple(compared_methods())


@contextmanager
def registered(method: type[Method]) -> Iterator[type[Method]]:
    """``method`` compared too while inside (a test's or a notebook's method; a lasting one goes in :data:`COMPARED`)."""
    COMPARED.append(method)
    try:
        yield method
    finally:
        COMPARED.remove(method)
