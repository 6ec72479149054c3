import json

import pandas as pd
import pytest

from pilot.tasks import (
    RENDERERS,
    build_task_table,
    check_task_name,
    generate_task_rows,
    plan_reveals_answer,
    validate_task_table,
)


def test_every_row_has_the_schema_and_a_plan(task_table):
    assert list(task_table.columns) == ["id", "task", "split", "question", "answer", "metadata", "oracle_plan", "extract", "solution"]
    assert set(task_table["extract"]) == {"first_line"}  # the compact tasks are read by their first line
    assert set(task_table["task"]) == {"chain_sum", "basic_arithmetic"}
    assert task_table.groupby("task").size().tolist() == [120, 120]
    for metadata in task_table["metadata"]:
        assert isinstance(json.loads(metadata), dict)


def test_no_oracle_plan_contains_its_answer(task_table):
    leaks = [(row.plan, row.answer) for row in task_table.rename(columns={"oracle_plan": "plan"}).itertuples()
             if plan_reveals_answer(row.plan, row.answer)]
    assert leaks == []


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_every_renderer_keeps_the_answer_out_of_its_plans(name):
    kwargs = {"path_star": {"node_range": 100}, "count_bits": {"max_n": 255}}.get(name, {})
    rows, counts = generate_task_rows(name, 40, kwargs, seed=3, exclude_questions=set())
    assert len(rows) == 40
    assert not any(plan_reveals_answer(r["oracle_plan"], r["answer"]) for r in rows)
    assert all(r["question"] and r["oracle_plan"] for r in rows)


def test_plan_leak_check_is_token_aligned():
    assert plan_reveals_answer("left to right: 4 - 1 = 3 , then 3 - 7", "3")
    assert not plan_reveals_answer("left to right: 4 - 1 = 3 , then 3 - 7", "-4")
    assert not plan_reveals_answer("back from goal: 8 from 52 , 52 from 56", "19 56 52 8")
    assert plan_reveals_answer("go 19 56 52 8 now", "19 56 52 8")


def test_splits_are_disjoint(task_table):
    by_split = {s: set(part["question"]) for s, part in task_table.groupby("split")}
    assert set(by_split) == {"train", "val", "test"}
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    assert (task_table[task_table["split"] == "test"].groupby("task").size() == 20).all()


def test_generation_is_reproducible_from_its_seed():
    spec = [{"name": "chain_sum", "size": 50, "kwargs": {"min_terms": 3, "max_terms": 3}}]
    first = build_task_table(spec, 5, 5, seed=1)
    pd.testing.assert_frame_equal(first, build_task_table(spec, 5, 5, seed=1))
    assert not first["question"].equals(build_task_table(spec, 5, 5, seed=2)["question"])


def test_the_out_of_distribution_split_is_harder_disjoint_and_leaves_the_rest_unchanged():
    specs = [{"name": "chain_sum", "size": 60, "kwargs": {"min_terms": 3, "max_terms": 4, "max_digits": 1}},
             {"name": "basic_arithmetic", "size": 60, "kwargs": {"min_terms": 3, "max_terms": 3, "max_digits": 1,
                                                                 "operators": ["+", "-"], "allow_negation": False}}]
    plain = build_task_table(specs, 5, 10, seed=1, ood_per_task=12)  # no task asks for one: nothing added
    assert set(plain["split"]) == {"train", "val", "test"}
    specs[0]["ood_kwargs"] = {"min_terms": 6, "max_terms": 7}
    table = validate_task_table(build_task_table(specs, 5, 10, seed=1, ood_per_task=12))
    pd.testing.assert_frame_equal(table[table["split"] != "test_ood"].reset_index(drop=True), plain)
    ood = table[table["split"] == "test_ood"]
    assert len(ood) == 12 and set(ood["task"]) == {"chain_sum"}
    terms = ood["question"].str.count(r"[+-]") + 1
    assert terms.between(6, 7).all()  # trained on 3 to 4 terms
    assert not set(ood["question"]) & set(plain["question"])


def test_unknown_task_names_the_supported_ones():
    with pytest.raises(ValueError, match="use one of .*chain_sum"):
        check_task_name("not_a_task")
    with pytest.raises(ValueError, match="is a reasoning-gym task"):
        check_task_name("sudoku")


def test_too_small_a_task_space_is_a_clear_error():
    with pytest.raises(ValueError, match="yielded only .* unique questions"):
        generate_task_rows("count_bits", 500, {"max_n": 30}, seed=0, exclude_questions=set())


def test_schema_validation_catches_broken_tables(task_table):
    with pytest.raises(ValueError, match="missing columns"):
        validate_task_table(task_table.drop(columns=["oracle_plan"]))
    duplicated = pd.concat([task_table, task_table.iloc[:1].assign(id="dup")])
    with pytest.raises(ValueError, match="appears twice"):
        validate_task_table(duplicated)


def test_basic_arithmetic_with_division_skips_and_counts_inexact_rows():
    """reasoning-gym floors an inexact division (its gold answer for 7 / 2 is 3); such rows are skipped
    and counted instead of crashing the renderer, and every kept plan divides exactly."""
    kwargs = {"min_terms": 3, "max_terms": 5, "min_digits": 1, "max_digits": 2, "operators": ["+", "-", "*", "/"]}
    rows, counts = generate_task_rows("basic_arithmetic", 300, kwargs, seed=0, exclude_questions=set())
    assert len(rows) == 300
    assert counts["inexact_division"] > 0
    divisions = [step for r in rows for step in r["oracle_plan"].split(" , ") if " / " in step and "=" in step]
    assert divisions
    for step in divisions:
        (a, b), value = step.split(" = ")[0].split(" / ")[-2:], int(step.split(" = ")[1])
        assert int(a.split()[-1]) == int(b) * value


@pytest.mark.parametrize("kwargs, key, message", [
    ({"min_termz": 3}, "min_termz", "did you mean 'min_terms'? accepted keys: allow_negation, max_digits, max_terms, "
                                    "min_digits, min_terms"),
    ({"min_terms": "three"}, "min_terms", "it must be an integer (the generator's default is 2)"),
    ({"size": 10}, "size", "'size' is set by the project"),
    ({"min_terms": 5, "max_terms": 2}, None, "refuses these settings (max_terms must be >= min_terms)"),
])
def test_generator_settings_are_checked_before_any_row(kwargs, key, message):
    from pilot.tasks import GeneratorSettingError, check_generator_kwargs

    with pytest.raises(GeneratorSettingError) as error:
        check_generator_kwargs("chain_sum", kwargs)
    assert error.value.key == key
    assert message in str(error.value)


def test_basic_arithmetic_renderer_preconditions():
    from pilot.tasks import GeneratorSettingError, check_generator_kwargs

    check_generator_kwargs("basic_arithmetic", {"operators": ["+", "-", "*", "/"]})
    # the flat generator computes '*' and '/' left to right, so its answers contradict the expression
    with pytest.raises(GeneratorSettingError, match="left to right") as error:
        check_generator_kwargs("basic_arithmetic", {"operators": ["+", "/"], "allow_parentheses": False})
    assert error.value.key == "operators"
    check_generator_kwargs("basic_arithmetic", {"operators": ["+", "-"], "allow_parentheses": False})
