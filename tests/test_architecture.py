"""The library's rooms and floors (docs/architecture.md): no import runs upward, none runs in a circle,
and each compared method lives in its own files.

Imports are read from the source (``ast``), those made inside functions and under ``TYPE_CHECKING``
included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "pilot"

# The floors, lowest first (docs/architecture.md draws them). A module may import from its own floor or
# below, never from above. Each entry is a top-level module or subpackage of `pilot`.
FLOORS = [
    ("ground", ["pilot", "artifacts", "invariant", "runtime", "distributed", "answers", "prompts", "sequences",
                "statistics", "tracking", "fingerprint", "checkpoint", "config"]),
    ("domain", ["tasks", "verifier", "verifier_worker", "models"]),
    ("edits on the student", ["interventions", "soft_tokens"]),
    ("PILOT's guidance", ["guidance"]),
    ("answering and the latent cache", ["generation", "evaluation", "plans", "latents"]),
    ("training", ["training"]),
    ("methods", ["methods"]),
    ("studies and serving", ["tuning", "ablations", "latency", "plots", "serving", "pyfunc_entry", "reproduce"]),
    ("Kedro", ["pipelines", "pipeline_registry", "framework", "cli", "settings", "__main__"]),
]
FLOOR = {room: level for level, (_, rooms) in enumerate(FLOORS) for room in rooms}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of pilot it imports}``, lazy imports included."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.split(".")[0] == "pilot" else None
                if found and found != name:
                    edges[name].add(found)
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pilot"


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def test_every_room_is_on_a_floor():
    rooms = {room(module) for module in modules()}
    unplaced = sorted(rooms - set(FLOOR))
    assert not unplaced, f"modules or packages on no floor: {unplaced}; place them in FLOORS and docs/architecture.md"
    stale = sorted(set(FLOOR) - rooms)
    assert not stale, f"FLOORS names rooms that no longer exist: {stale}"


def test_no_import_runs_upward():
    upward = sorted(f"{module} (floor '{FLOORS[FLOOR[room(module)]][0]}') imports {target} "
                    f"(floor '{FLOORS[FLOOR[room(target)]][0]}')"
                    for module, targets in import_graph().items() for target in targets
                    if FLOOR.get(room(target), -1) > FLOOR.get(room(module), -1))
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_circle_between_modules_or_rooms():
    edges = import_graph()
    assert circles(edges) == []
    between_rooms: dict[str, set[str]] = defaultdict(set)
    for module, targets in edges.items():
        between_rooms[room(module)] |= {room(target) for target in targets} - {room(module)}
    assert circles(between_rooms) == []


def test_the_checks_find_an_upward_import_and_a_circle():
    """The checks themselves, on a made-up graph: they must be able to fail."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert FLOOR[room("pilot.methods.reft")] > FLOOR[room("pilot.training.engine")]


# Each in-tree method by the word that names it, and the files allowed to say it: its module, its line in
# the registry and its block in parameters_baselines.yml (and, for CAA, the baselines pipeline's nodes
# that build its vector from the latent cache).
OWN_FILES = {
    "reft": {"src/pilot/methods/reft.py"},
    "pause_tokens": {"src/pilot/methods/soft_prompts.py"},
    "soft_thoughts": {"src/pilot/methods/soft_prompts.py"},
    "caa": {"src/pilot/methods/caa.py"},
    "static_guidance": {"src/pilot/methods/static_guidance.py"},
    "bias_steering": {"src/pilot/methods/static_guidance.py"},
}
SHARED_FILES = {"src/pilot/methods/registry.py", "conf/base/parameters_baselines.yml"}


@pytest.mark.parametrize("name", sorted(OWN_FILES))
def test_each_method_is_named_only_in_its_own_files(name):
    word = re.compile(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])")
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "conf" / "base").glob("*.yml")]
    naming = {str(path.relative_to(ROOT)) for path in files if word.search(path.read_text())}
    assert naming <= OWN_FILES[name] | SHARED_FILES, f"'{name}' is named outside its files: " \
                                                     f"{sorted(naming - OWN_FILES[name] - SHARED_FILES)}"
    assert len(naming) <= 4


def _conf_base_parameters() -> dict:
    from kedro.config import OmegaConfigLoader

    from pilot.settings import CONFIG_LOADER_ARGS

    return OmegaConfigLoader(str(ROOT / "conf"), env="base", **CONFIG_LOADER_ARGS)["parameters"]


@pytest.mark.parametrize("name", ["lora", "reft", "caa", "pause_tokens", "soft_thoughts", "static_guidance",
                                  "bias_steering"])
def test_each_in_tree_baseline_is_its_module_its_block_and_one_registration(name, monkeypatch):
    """An in-tree baseline is added as docs/own_models.md adds yours: its module, its block in
    parameters_baselines.yml and its line in the registry. Taken out of the registry, no node names it
    and its block names no method; registered again, its nodes are back and its block validates."""
    from pilot.framework.parameters import validate_parameters
    from pilot.methods import registry
    from pilot.pipelines import baselines, evaluation

    method = registry.compared_methods()[name]
    monkeypatch.setattr(registry, "COMPARED", [other for other in registry.COMPARED if other is not method])

    def nodes() -> set[str]:
        return {node.name for pipeline in (baselines, evaluation) for node in pipeline.create_pipeline().nodes}

    without = nodes()
    assert not any(re.search(rf"_{name}_node$", node) for node in without)
    parameters = _conf_base_parameters()
    with pytest.raises(Exception, match=rf"'baselines.{name}' is not a known setting"):
        validate_parameters(parameters)
    with registry.registered(method):
        added = {node for node in nodes() - without if not node.startswith("gather_")}   # gathers regroup
        assert added == {f"train_{name}_node", f"method_{name}_node", f"evaluate_{name}_node"}
        validate_parameters(parameters)
