"""Verifiable reasoning tasks from reasoning-gym, with oracle plans where one can be derived.

Every row of a task table holds: ``id``, ``task``, ``split``, ``question`` (reasoning-gym's
original question text, or a compact rendering for the small embedded models), ``answer`` (the
gold answer string reasoning-gym's verifier expects), ``metadata`` (reasoning-gym's metadata as
JSON), ``oracle_plan`` (empty for a task with no plan derivation: a teacher writes its plans),
``extract`` (how an answer is read out of a reply, :func:`pilot.answers.extract_answer`) and
``solution`` (the reply a model is trained and teacher-forced on: the bare answer, or for a
pretrained model reading the original question, the answer worked out from the plan's last step,
e.g. ``-19 + 6 = -13``, or with ``reply: worked`` every step, the plan then giving only what the
student must know; see :func:`reply_targets` and :data:`REPLY_FORMATS`).

An oracle plan is derived from the metadata and states strategy -- which steps, in which order,
which branch -- never the final answer string. Rows whose plan would contain the answer as a
whole phrase are skipped at generation time (and counted), so the guarantee holds on every row.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import logging
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import reasoning_gym
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from pilot.answers import check_extraction_rule, check_scorable
from pilot.config import NonNegativeInt, Params, PositiveInt

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "test_ood")
TEST_SPLITS = ("test", "test_ood")  # in-distribution, and the same generators with harder settings
TASK_COLUMNS = ("id", "task", "split", "question", "answer", "metadata", "oracle_plan", "extract", "solution")
Prompt = str  # "compact": the renderer's short question (embedded models) | "original": reasoning-gym's text
# How a pretrained model reading the original question replies (``data.tasks[i].reply``):
# "last_step": the plan's last step worked out (the plan gives every intermediate result);
# "worked": the student works every step itself and the plan carries only what it must know
# (:data:`WORKED_RENDERERS`, e.g. each animal's legs), not intermediate results.
REPLY_FORMATS = ("last_step", "worked")


@dataclass(frozen=True)
class Rendered:
    question: str
    plan: str
    solution: str | None = None   # the last step worked out, ending in the answer (None: the bare answer)


def reply_targets(rows: Any) -> list[str]:
    """What a model is trained and teacher-forced to reply to each row: its ``solution`` (the bare
    answer for the embedded models), or the answer itself for a table without that column."""
    column = "solution" if "solution" in rows else "answer"
    return [str(v) for v in (rows[column].tolist() if hasattr(rows[column], "tolist") else rows[column])]


def _render_path_star(entry: dict[str, Any]) -> Rendered:
    # reasoning-gym's last line is the task itself: "|u v|u v|.../start goal = ".
    task_line = entry["question"].strip().splitlines()[-1]
    edges, ends = task_line.rstrip(" =").split("/")
    edge_text = " | ".join(edge.strip() for edge in edges.split("|") if edge.strip())
    question = f"| {edge_text} / {ends.strip()} ="
    path = entry["metadata"]["goal_path"]
    # The strategy: walk back from the goal to find which branch of the centre leads there.
    back = " , ".join(f"{path[i]} from {path[i - 1]}" for i in range(len(path) - 1, 1, -1))
    return Rendered(question, f"back from goal: {back} ; branch {path[1]}")


def _render_chain_sum(entry: dict[str, Any]) -> Rendered:
    terms = entry["metadata"]["expression"].split()
    total, steps = int(terms[0]), []
    for i in range(1, len(terms) - 2, 2):
        op, operand = terms[i], int(terms[i + 1])
        new_total = total + operand if op == "+" else total - operand
        steps.append(f"{total} {op} {operand} = {new_total}")
        total = new_total
    order = " , ".join(steps + [f"then {total} {terms[-2]} {terms[-1]}"])
    return Rendered(f"{entry['metadata']['expression']} =", f"left to right: {order}",
                    f"{total} {terms[-2]} {terms[-1]} = {entry['answer']}")


class UnrenderableRow(ValueError):
    """One generated row the compact renderer cannot state truthfully; it is skipped and counted."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _exact_division(a: int, b: int) -> int:
    # reasoning-gym floors an inexact division (7 / 2 -> 3); a plan saying "7 / 2 = 3" would teach
    # wrong arithmetic, so such rows are skipped (counted as ``inexact_division``).
    if b == 0 or a % b:
        raise UnrenderableRow("inexact_division", f"{a} / {b} is not an exact integer division")
    return a // b


_OPERATORS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
              ast.Div: ("/", _exact_division)}


def _render_basic_arithmetic(entry: dict[str, Any]) -> Rendered:
    # Walk the expression tree (never eval) in evaluation order: precedence and brackets
    # decide which operation comes first, which is the strategy the plan spells out.
    expression = entry["metadata"]["expression"]
    steps: list[tuple[int, str, int, int]] = []

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            symbol, apply = _OPERATORS[type(node.op)]
            steps.append((left, symbol, right, apply(left, right)))
            return steps[-1][3]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(
            f"basic_arithmetic plans support + - * / on integers, not '{expression}'; restrict the task's "
            "generator kwargs (e.g. operators: ['+', '-'])."
        )

    walk(ast.parse(expression, mode="eval").body)
    *done, (left, symbol, right, value) = steps
    order = " , ".join([f"{a} {s} {b} = {v}" for a, s, b, v in done] + [f"then {left} {symbol} {right}"])
    return Rendered(f"{expression} =", f"order: {order}", f"{left} {symbol} {right} = {value}")


def _render_leg_counting(entry: dict[str, Any]) -> Rendered:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    animals = entry["metadata"]["animals"]
    question = "legs: " + " , ".join(f"{n} {name}" for name, n in animals.items()) + " ="
    each = " , ".join(f"{name} {ANIMALS[name]}" for name in animals)
    products = " , ".join(f"{n} x {ANIMALS[name]} = {n * ANIMALS[name]}" for name, n in animals.items())
    total = " + ".join(str(n * ANIMALS[name]) for name, n in animals.items())
    return Rendered(question, f"legs each: {each} ; {products} ; then add the products",
                    f"{total} = {entry['answer']}")


def _render_count_bits(entry: dict[str, Any]) -> Rendered:
    number = entry["metadata"]["number"]
    bits = " ".join(bin(number)[2:])
    return Rendered(f"ones in {number} =", f"binary {bits} ; count the 1s")


def _render_leg_counting_worked(entry: dict[str, Any]) -> Rendered:
    # The plan gives the knowledge (legs per animal, which a 135M model mostly lacks) and the
    # strategy; the reply multiplies and adds itself: "9 x 6 + 7 x 4 = 54 + 28 = 82".
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    animals = entry["metadata"]["animals"]
    compact = _render_leg_counting(entry)
    each = " , ".join(f"{name} {ANIMALS[name]}" for name in animals)
    products = " + ".join(f"{n} x {ANIMALS[name]}" for name, n in animals.items())
    values = " + ".join(str(n * ANIMALS[name]) for name, n in animals.items())
    worked = f"{products} = {entry['answer']}" if len(animals) == 1 else f"{products} = {values} = {entry['answer']}"
    return Rendered(compact.question, f"legs each: {each} ; multiply each count by its legs, then add", worked)


RENDERERS: dict[str, Callable[[dict[str, Any]], Rendered]] = {
    "path_star": _render_path_star,
    "chain_sum": _render_chain_sum,
    "basic_arithmetic": _render_basic_arithmetic,
    "leg_counting": _render_leg_counting,
    "count_bits": _render_count_bits,
}


# Renderers of the "worked" reply format, by task (the others have only "last_step").
WORKED_RENDERERS: dict[str, Callable[[dict[str, Any]], Rendered]] = {
    "leg_counting": _render_leg_counting_worked,
}


def check_reply_format(name: str, reply: str, prompt: Prompt = "compact") -> None:
    """A reply format the task can be rendered in; "worked" needs the original prompt and a worked renderer."""
    if reply not in REPLY_FORMATS:
        raise ValueError(f"reply '{reply}' is not a reply format; use one of {list(REPLY_FORMATS)}")
    if reply == "worked" and (prompt != "original" or name not in WORKED_RENDERERS):
        raise ValueError(f"reply: worked needs prompt: original and a task with a worked renderer "
                         f"({sorted(WORKED_RENDERERS)}), not '{name}' with prompt: {prompt}; use reply: last_step")


# Generator settings a renderer cannot follow, found before any row is generated: each check gets
# the task's kwargs and returns (key, message) for the first problem, or None.
def _basic_arithmetic_preconditions(kwargs: dict[str, Any]) -> tuple[str, str] | None:
    operators = list(kwargs.get("operators", ("+", "-", "*", "/")))
    unsupported = [op for op in operators if op not in ("+", "-", "*", "/")]
    if unsupported:
        return "operators", f"the basic_arithmetic renderer supports only '+', '-', '*', '/', not {unsupported}"
    if not kwargs.get("allow_parentheses", True) and {"*", "/"} & set(operators):
        # reasoning-gym's flat generator (allow_parentheses: false) computes '*' and '/' left to right,
        # ignoring precedence, so its gold answers disagree with the expression the plan walks.
        return "operators", ("with allow_parentheses: false reasoning-gym evaluates '*' and '/' left to right, so "
                             "its answers contradict the expression; use operators ['+', '-'] or allow_parentheses: true")
    return None


PRECONDITIONS: dict[str, Callable[[dict[str, Any]], tuple[str, str] | None]] = {
    "basic_arithmetic": _basic_arithmetic_preconditions,
}

# Set by the project for every task (``data.seed`` and ``data.tasks[i].size``), never in kwargs.
_RESERVED_KWARGS = ("seed", "size")


class GeneratorSettingError(ValueError):
    """A task's generator ``kwargs`` are wrong; ``key`` is the offending setting (None: the combination)."""

    def __init__(self, message: str, key: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


def _type_problem(value: Any, default: Any) -> str | None:
    """A mismatch between a setting and the type of the generator's default (None when it fits)."""
    if default is None or isinstance(default, (dict, set)) or callable(default):
        return None
    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, wanted = isinstance(value, str), "a string"
    elif isinstance(default, (list, tuple)):
        ok, wanted = isinstance(value, (list, tuple)), "a list"
    else:
        return None
    return None if ok else f"it must be {wanted} (the generator's default is {default!r})"


def check_generator_kwargs(name: str, kwargs: dict[str, Any], prompt: Prompt = "compact") -> None:
    """Check a task's generator settings before any row is generated; raise :class:`GeneratorSettingError`.

    Every key must be a field of the reasoning-gym generator's config dataclass (``seed`` and
    ``size`` are the project's), of the default's type; the generator's own ``validate`` must
    accept the combination and draw a few rows; and the renderer's preconditions must hold.
    """
    check_task_name(name, prompt)
    config_cls = reasoning_gym.factory.DATASETS[name][1]
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    accepted = sorted(k for k in fields if k not in _RESERVED_KWARGS)
    for key, value in kwargs.items():
        if key in _RESERVED_KWARGS:
            raise GeneratorSettingError(f"'{key}' is set by the project (data.seed, data.tasks[i].size), not in "
                                        f"kwargs; accepted keys: {', '.join(accepted)}", key, value)
        if key not in fields:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise GeneratorSettingError(f"'{key}' is not a setting of reasoning-gym's {name} generator ({hint}"
                                        f"accepted keys: {', '.join(accepted)})", key, value)
        field = fields[key]
        default = field.default if field.default is not dataclasses.MISSING else None
        problem = _type_problem(value, default)
        if problem:
            raise GeneratorSettingError(problem, key, value)
    precondition = PRECONDITIONS.get(name)
    problem = precondition(kwargs) if precondition else None
    if problem:
        key, message = problem
        raise GeneratorSettingError(message, key, kwargs.get(key))
    try:  # a dry run: the generator's own checks, and a few rows through the renderer
        dataset = reasoning_gym.create_dataset(name, seed=0, size=8, **kwargs)
        for index in range(len(dataset)):
            try:
                if name in RENDERERS:
                    RENDERERS[name](dataset[index])
            except UnrenderableRow:
                pass  # skipped and counted at generation time
    except (AssertionError, ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as error:
        detail = str(error) or type(error).__name__
        raise GeneratorSettingError(f"reasoning-gym's {name} generator refuses these settings ({detail}); "
                                    f"accepted keys: {', '.join(accepted)}", None, kwargs) from error


def supported_tasks() -> list[str]:
    """Task names that have a compact renderer and an oracle-plan derivation."""
    return sorted(RENDERERS)


def check_task_name(name: str, prompt: Prompt = "compact") -> None:
    """A task the project can generate: scorable, and renderable when its prompt is compact."""
    check_scorable(name)  # answers of a task with no grammar must never reach its scorer
    if prompt == "compact" and name not in RENDERERS:
        known = "a reasoning-gym task" if name in reasoning_gym.factory.DATASETS else "not a reasoning-gym task"
        raise ValueError(
            f"Task '{name}' is {known} this project can render compactly with an oracle plan; use one of "
            f"{supported_tasks()}, or set its prompt: original (reasoning-gym's own question text; a teacher "
            "writes the plans where no oracle plan exists)."
        )


def _phrase_tokens(text: str) -> list[str]:
    return re.findall(r"[^\s,;:]+", text)


def plan_reveals_answer(plan: str, answer: str) -> bool:
    """True when the answer appears in the plan as a whole phrase (token-aligned)."""
    plan_tokens, answer_tokens = _phrase_tokens(plan), _phrase_tokens(answer)
    n = len(answer_tokens)
    if n == 0:
        return False
    return any(plan_tokens[i : i + n] == answer_tokens for i in range(len(plan_tokens) - n + 1))


def generate_task_rows(
    name: str,
    size: int,
    generator_kwargs: dict[str, Any],
    seed: int,
    exclude_questions: set[str],
    prompt: Prompt = "compact",
    extract: str = "first_line",
    reply: str = "last_step",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Draw ``size`` unique rows of one task from reasoning-gym's offline generator, its plan and
    solution in the ``reply`` format (:data:`REPLY_FORMATS`).

    Duplicate questions (also against ``exclude_questions``, the other tasks' questions), rows
    whose plan would reveal the answer and rows the renderer cannot state truthfully (an inexact
    division) are skipped; the returned counts say how many.
    """
    check_task_name(name, prompt)
    check_reply_format(name, reply, prompt)
    render = (WORKED_RENDERERS if reply == "worked" else RENDERERS).get(name)
    pool = size * 4 + 100
    dataset = reasoning_gym.create_dataset(name, size=pool, seed=seed, **generator_kwargs)
    rows: list[dict[str, Any]] = []
    counts = {"duplicates": 0, "plan_reveals_answer": 0}
    seen = set(exclude_questions)
    for index in range(pool):
        entry = dataset[index]
        try:
            rendered = render(entry) if render is not None else Rendered(entry["question"], "")
        except UnrenderableRow as skipped:
            counts[skipped.reason] = counts.get(skipped.reason, 0) + 1
            continue
        if prompt == "original":
            rendered = dataclasses.replace(rendered, question=entry["question"])
        if rendered.question in seen:
            counts["duplicates"] += 1
            continue
        if rendered.plan and plan_reveals_answer(rendered.plan, entry["answer"]):
            counts["plan_reveals_answer"] += 1
            continue
        seen.add(rendered.question)
        rows.append(
            {
                "task": name,
                "question": rendered.question,
                "answer": str(entry["answer"]),
                "metadata": json.dumps(entry["metadata"], sort_keys=True, default=str),
                "oracle_plan": rendered.plan,
                "extract": extract,
                # The embedded models reply with the bare answer; a pretrained one works out the last step.
                "solution": rendered.solution if prompt == "original" and rendered.solution else str(entry["answer"]),
            }
        )
        if len(rows) == size:
            return rows, counts
    raise ValueError(
        f"Task '{name}' with generator kwargs {generator_kwargs} yielded only {len(rows)} usable "
        f"unique questions of the {size} asked for ({counts}); lower its size or widen its kwargs."
    )


LOCAL_SUFFIXES = (".jsonl", ".parquet")


def _read_local(path: str) -> pd.DataFrame:
    if path.endswith(".jsonl"):
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


def check_local_dataset(path: str) -> None:
    """A local dataset file must exist, be JSONL or parquet, and have ``question`` and ``answer`` columns."""
    from pathlib import Path

    if not path.endswith(LOCAL_SUFFIXES):
        raise ValueError(f"'{path}' is not a .jsonl or .parquet file; convert the dataset to one of those")
    if not Path(path).is_file():
        raise ValueError(f"'{path}' does not exist; give the path of a local JSONL or parquet file "
                         "(relative to the project folder)")
    try:
        columns = set(_read_local(path).columns)
    except ValueError as error:
        raise ValueError(f"'{path}' cannot be read ({error})") from None
    missing = sorted({"question", "answer"} - columns)
    if missing:
        raise ValueError(f"'{path}' has no {' or '.join(missing)} column (it has {sorted(columns)}); rename the "
                         "columns to question and answer")


def local_task_rows(name: str, path: str, size: int, extract: str,
                    exclude_questions: set[str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The first ``size`` unique rows of a local dataset, with their gold answers read out
    (:func:`pilot.answers.gold_answer`); a ``plan`` column, when present, is the oracle plan."""
    from pilot.answers import gold_answer

    check_local_dataset(path)
    table = _read_local(path)
    rows, counts, seen = [], {"duplicates": 0, "plan_reveals_answer": 0}, set(exclude_questions)
    for index, record in enumerate(table.to_dict("records")):
        question, answer = str(record["question"]).strip(), gold_answer(record["answer"])
        plan = str(record.get("plan") or "")
        if question in seen:
            counts["duplicates"] += 1
            continue
        if plan and plan_reveals_answer(plan, answer):
            counts["plan_reveals_answer"] += 1
            continue
        seen.add(question)
        rows.append({"task": name, "question": question, "answer": answer, "oracle_plan": plan, "extract": extract,
                     "solution": str(record.get("solution") or answer),
                     "metadata": json.dumps({"source": "file", "file": path, "row": index}, sort_keys=True)})
        if len(rows) == size:
            return rows, counts
    raise ValueError(f"Local dataset '{path}' has only {len(rows)} unique questions of the {size} asked for "
                     f"({counts}); lower data.tasks size for '{name}'.")


def build_task_table(
    tasks: list[dict[str, Any]], val_per_task: int, test_per_task: int, seed: int, ood_per_task: int = 0
) -> pd.DataFrame:
    """Generate every configured task and assign disjoint train/val/test splits.

    A task with ``ood_kwargs`` also gets ``ood_per_task`` rows of a ``test_ood`` split: its
    generator with those settings laid over its own (harder questions, never trained on).
    Questions are unique across the whole table, so no question can appear in two splits.
    """
    frames = []
    seen: set[str] = set()
    for offset, spec in enumerate(tasks):
        if spec.get("file"):
            rows, counts = local_task_rows(spec["name"], spec["file"], spec["size"], spec.get("extract", "first_line"),
                                           seen)
        else:
            rows, counts = generate_task_rows(
                spec["name"], spec["size"], dict(spec.get("kwargs") or {}), seed + 1000 * offset, seen,
                spec.get("prompt", "compact"), spec.get("extract", "first_line"), spec.get("reply", "last_step"),
            )
        seen.update(row["question"] for row in rows)
        if val_per_task + test_per_task >= len(rows):
            raise ValueError(
                f"Task '{spec['name']}' has {len(rows)} rows but val_per_task + test_per_task = "
                f"{val_per_task + test_per_task}; raise its size or lower the split sizes."
            )
        order = list(range(len(rows)))
        random.Random(seed + offset).shuffle(order)
        for rank, index in enumerate(order):
            rows[index]["split"] = (
                "test" if rank < test_per_task else "val" if rank < test_per_task + val_per_task else "train"
            )
        logger.info(
            "Task %s: %d rows (skipped %d duplicates, %d whose plan would reveal the answer%s)",
            spec["name"], len(rows), counts["duplicates"], counts["plan_reveals_answer"],
            "".join(f", {n} {reason.replace('_', ' ')}" for reason, n in counts.items()
                    if reason not in ("duplicates", "plan_reveals_answer")),
        )
        frames.append(pd.DataFrame(rows))
    # Out-of-distribution rows after every in-distribution one: those (and their ids) are the same with or without.
    for offset, spec in enumerate(tasks):
        if spec.get("ood_kwargs") and ood_per_task:
            ood, _ = generate_task_rows(
                spec["name"], ood_per_task, {**(spec.get("kwargs") or {}), **spec["ood_kwargs"]},
                seed + 1000 * offset + 500, seen, spec.get("prompt", "compact"), spec.get("extract", "first_line"),
                spec.get("reply", "last_step"),
            )
            seen.update(row["question"] for row in ood)
            logger.info("Task %s: %d out-of-distribution test rows (%s)", spec["name"], len(ood), spec["ood_kwargs"])
            frames.append(pd.DataFrame(ood).assign(split="test_ood"))
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "id", [f"{task}-{i:06d}" for i, task in enumerate(table["task"])])
    return table[list(TASK_COLUMNS)]


def validate_task_table(table: pd.DataFrame) -> pd.DataFrame:
    """Check the schema and the invariants every downstream stage relies on."""
    missing = [c for c in TASK_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"Task table is missing columns {missing}; rerun `kedro run --pipelines data`.")
    for column in TASK_COLUMNS:
        if not all(isinstance(v, str) and (v or column == "oracle_plan") for v in table[column]):
            raise ValueError(f"Task table column '{column}' must hold non-empty strings.")
    if table["id"].duplicated().any():
        raise ValueError("Task table ids are not unique.")
    bad_splits = set(table["split"]) - set(SPLITS)
    if bad_splits:
        raise ValueError(f"Task table has unknown splits {sorted(bad_splits)}; expected {SPLITS}.")
    if table["question"].duplicated().any():
        raise ValueError("A question appears twice in the task table, so splits would not be disjoint.")
    return table


# ---------------------------------------------------------------------------------- the data block
def _check_generator_setting(name: str, kwargs: dict[str, Any], prompt: str) -> None:
    """:func:`check_generator_kwargs`, its error as the validation error that names the setting itself."""
    try:
        check_generator_kwargs(name, kwargs, prompt)
    except GeneratorSettingError as error:
        raise PydanticCustomError("generator_setting", "{message}",
                                  {"message": str(error), "key": error.key, "value": error.value}) from None


class TaskParams(Params):
    """One task: a reasoning-gym generator by ``name``, or a local dataset ``file``."""

    # Declared before ``name`` so that the checks of name and kwargs can see them.
    prompt: Literal["compact", "original"] = Field(
        "compact", description="compact: the renderer's short question, for the embedded models; original: "
                               "reasoning-gym's own question text (any task with an answer grammar).")
    extract: str = Field("first_line", description="How the answer is read out of a reply: first_line, last_number, "
                                                   "boxed or after:<marker>.")
    file: str | None = Field(None, description="A local JSONL or parquet file with question and answer columns "
                                               "(GSM8K's `#### n` and MATH's `\\boxed{}` answers understood), scored "
                                               "by numeric equivalence; null: reasoning-gym's generator `name`.")
    name: str = Field(description="The reasoning-gym task, or the label of a local `file`.")
    size: PositiveInt = Field(description="Unique rows drawn for the task, its validation and test rows included.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Settings of reasoning-gym's generator (checked "
                                                                     "by a dry run); none with a local file.")
    ood_kwargs: dict[str, Any] | None = Field(None, description="Generator settings laid over kwargs for an "
                                                                "out-of-distribution test split (test_ood: the same "
                                                                "generator, harder); null: no such split.")
    reply: Literal["last_step", "worked"] = Field(
        "last_step", description="With the original prompt: last_step (the plan gives every intermediate result, the "
                                 "reply works out the last step) or worked (the plan gives knowledge and strategy, "
                                 "the reply works every step).")

    @field_validator("reply")
    @classmethod
    def _renderable_reply(cls, reply: str, info: ValidationInfo) -> str:
        if reply != "last_step" and "name" in info.data:
            check_reply_format(info.data["name"], reply, info.data.get("prompt", "compact"))
        return reply

    @field_validator("extract")
    @classmethod
    def _known_rule(cls, rule: str) -> str:
        return check_extraction_rule(rule)

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str, info: ValidationInfo) -> str:
        if info.data.get("file") is None and "file" in info.data:  # a local file names its own task
            check_task_name(name, info.data.get("prompt", "compact"))
        return name

    @field_validator("kwargs")
    @classmethod
    def _generator_accepts(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """reasoning-gym's generator and the task's renderer must accept the settings (a dry run)."""
        if kwargs and info.data.get("file"):
            raise ValueError("a local dataset file has no generator settings; remove kwargs")
        if "name" in info.data and "file" in info.data and info.data["file"] is None:  # a bad name or file: reported on its own
            _check_generator_setting(info.data["name"], kwargs, info.data.get("prompt", "compact"))
        return kwargs

    @field_validator("ood_kwargs")
    @classmethod
    def _ood_generator_accepts(cls, ood: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if ood is None or "kwargs" not in info.data:  # the task's own settings failed: reported on their own
            return ood
        if info.data.get("file"):
            raise ValueError("a local dataset file has no generator for an out-of-distribution split; remove ood_kwargs")
        _check_generator_setting(info.data["name"], {**info.data["kwargs"], **ood}, info.data.get("prompt", "compact"))
        return ood

    @field_validator("file")
    @classmethod
    def _readable_file(cls, file: str | None) -> str | None:
        if file is not None:
            check_local_dataset(file)
        return file


class DataParams(Params):
    seed: int = Field(0, description="Added to the run's seed (parameters.yml) to draw the tasks' rows and splits.")
    val_per_task: PositiveInt = Field(150, description="Validation rows per task, out of its size.")
    test_per_task: PositiveInt = Field(600, description="Test rows per task, out of its size.")
    ood_per_task: NonNegativeInt = Field(300, description="Rows of each task's test_ood split (tasks with ood_kwargs), "
                                                          "drawn besides its size (0: no such split).")
    tasks: list[TaskParams] = Field(min_length=1, description="The task mixture; each is drawn, deduplicated and "
                                                              "split into train, val and test.")
