"""Reply formats of a pretrained student's tasks (``data.tasks[i].reply``) and plan-only adaptation."""

import json
import re

import pandas as pd
import pytest
from pydantic import ValidationError
from reasoning_gym.arithmetic.leg_counting import ANIMALS

from pilot.config import AdaptParams
from pilot.prompts import TOY
from pilot.tasks import (
    TaskParams,
    build_task_table,
    generate_task_rows,
    plan_reveals_answer,
)
from pilot.training.base_lm import student_examples

LEGS = {"name": "leg_counting", "size": 60, "prompt": "original", "extract": "last_number",
        "kwargs": {"min_animals": 2, "max_animals": 4}}


def test_a_worked_leg_counting_reply_multiplies_and_adds_what_its_plan_only_names():
    rows, counts = generate_task_rows("leg_counting", 60, LEGS["kwargs"], seed=0, exclude_questions=set(),
                                      prompt="original", extract="last_number", reply="worked")
    assert len(rows) == 60
    for row in rows:
        counts_by_name = json.loads(row["metadata"])["animals"]   # stored with sorted keys: order as asked
        order = sorted(counts_by_name, key=lambda a: row["question"].index(f" {counts_by_name[a]} {a}"))
        animals = {a: counts_by_name[a] for a in order}
        # The plan: each animal's legs (knowledge), no product, no sum, never the answer.
        assert row["oracle_plan"].startswith("legs each: " + " , ".join(f"{a} {ANIMALS[a]}" for a in animals))
        assert " x " not in row["oracle_plan"] and "=" not in row["oracle_plan"]
        assert not plan_reveals_answer(row["oracle_plan"], row["answer"])
        # The reply: every product written out, then their values, then the total (read by the last number).
        factors, values, total = row["solution"].split(" = ")
        pairs = [tuple(map(int, term.split(" x "))) for term in factors.split(" + ")]
        assert pairs == [(n, ANIMALS[a]) for a, n in animals.items()]
        assert [int(v) for v in values.split(" + ")] == [n * legs for n, legs in pairs]
        assert int(total) == sum(n * legs for n, legs in pairs) == int(row["answer"])
        assert re.findall(r"-?\d+", row["solution"])[-1] == row["answer"]


def test_a_worked_reply_about_one_animal_is_its_one_product():
    rows, _ = generate_task_rows("leg_counting", 20, {"min_animals": 1, "max_animals": 1, "max_instances": 9}, seed=0,
                                 exclude_questions=set(), prompt="original", extract="last_number", reply="worked")
    for row in rows:
        (animal, count), = json.loads(row["metadata"])["animals"].items()
        assert row["oracle_plan"].startswith(f"legs each: {animal} {ANIMALS[animal]} ;")
        assert row["solution"] == f"{count} x {ANIMALS[animal]} = {count * ANIMALS[animal]}" == \
            f"{count} x {ANIMALS[animal]} = {row['answer']}"


def test_last_step_stays_the_default_and_worked_changes_only_plans_and_replies():
    default = build_task_table([LEGS], 10, 10, seed=0)
    pd.testing.assert_frame_equal(default, build_task_table([{**LEGS, "reply": "last_step"}], 10, 10, seed=0))
    assert default["solution"].str.match(r"^\d+( \+ \d+)* = \d+$").all()   # today's: the products given by the plan
    worked = build_task_table([{**LEGS, "reply": "worked"}], 10, 10, seed=0)
    same = default.merge(worked, on="question", suffixes=("", "_worked"))
    assert len(same) >= 55   # the same generator and seeds: only rows a plan would give away differ
    assert (same["answer"] == same["answer_worked"]).all()
    assert (same["oracle_plan"] != same["oracle_plan_worked"]).all()
    assert (same["solution"] != same["solution_worked"]).all()


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "chain_sum", "prompt": "original"}, "not 'chain_sum'"),
    ({"name": "leg_counting", "prompt": "compact"}, "with prompt: compact"),
])
def test_a_worked_reply_without_a_worked_renderer_is_refused(spec, message):
    with pytest.raises(ValidationError, match=message):
        TaskParams(size=50, reply="worked", **spec)
    with pytest.raises(ValueError, match="not a reply format"):
        generate_task_rows("leg_counting", 5, {}, seed=0, exclude_questions=set(), prompt="original", reply="steps")


def test_plan_only_adaptation_trains_every_question_with_its_plan_and_never_without():
    rows = [{"question": f"q{i}", "oracle_plan": f"p{i}", "answer": str(i), "solution": f"{i} = {i}"} for i in range(3)]
    both = student_examples(rows, plan_loss=False, fmt=TOY)
    plan_only = student_examples(rows, plan_loss=False, fmt=TOY, without_plan=False)
    assert AdaptParams().without_plan is True
    assert len(both) == 6 and sum("P: " in prompt for prompt, _ in both) == 3
    assert plan_only == [(f"Q: q{i}\nP: p{i}\nA:", f" {i} = {i}") for i in range(3)]
