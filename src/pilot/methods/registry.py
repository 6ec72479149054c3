"""The compared methods, in the order the results table and the plots show them.

The evaluation pipeline is built from this list: one node per method builds it from its inputs,
one answers the test split with it, and latency, the MLflow child runs, the results table and the
plots take every method in it. A new method is a :class:`~pilot.methods.base.Method` in a module
of its own and one line in :data:`COMPARED` (docs/own_models.md, "Your own method").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields

from pilot.methods.base import Method
from pilot.methods.caa import Caa
from pilot.methods.lora import Lora
from pilot.methods.pilot import PilotStage1, PilotStage2
from pilot.methods.references import PlanInContext, ZeroShot
from pilot.methods.reft import Reft
from pilot.methods.soft_prompts import PauseTokens, SoftThoughts

COMPARED: list[type[Method]] = [
    ZeroShot, PlanInContext, Lora, Reft, Caa, PauseTokens, SoftThoughts, PilotStage1, PilotStage2,
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
    return methods


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
