"""The metrics of the results table: Wilson intervals, gap recovered, and the per-task summary."""

import math

import pandas as pd
import pytest

from pilot.statistics import gap_recovered, summarize, wilson_interval


def _wilson_by_hand(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / total
    centre = p + z**2 / (2 * total)
    half = z * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2))
    return (centre - half) / (1 + z**2 / total), (centre + half) / (1 + z**2 / total)


@pytest.mark.parametrize("successes, total, low, high", [
    # 0/10 by hand: z^2 = 3.8416; centre = half = (3.8416 / 20) / 1.38416 = 0.138770
    (0, 10, 0.0, 0.277540),
    (10, 10, 0.722460, 1.0),
    (5, 10, 0.236590, 0.763410),
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
])
def test_wilson_interval_matches_published_values(successes, total, low, high):
    got = wilson_interval(successes, total)
    assert got[0] == pytest.approx(low, abs=1e-4)
    assert got[1] == pytest.approx(high, abs=1e-4)
    assert got[0] <= successes / total <= got[1]


def test_wilson_interval_is_the_formula_and_stays_inside_zero_one():
    for successes, total in [(3, 7), (1, 1000), (999, 1000), (40, 41)]:
        assert wilson_interval(successes, total) == pytest.approx(_wilson_by_hand(successes, total), abs=1e-12)
    assert wilson_interval(0, 1)[0] == 0.0 and wilson_interval(1, 1)[1] == 1.0
    # a wider z gives a wider interval
    narrow, wide = wilson_interval(5, 10, z=1.0), wilson_interval(5, 10, z=2.576)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def test_wilson_interval_of_no_observations_is_nan():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)


def test_gap_recovered():
    assert gap_recovered(0.6, 0.2, 0.7) == pytest.approx(0.8)
    assert gap_recovered(0.1, 0.2, 0.7) == pytest.approx(-0.2)    # below zero-shot: negative
    assert gap_recovered(0.9, 0.2, 0.7) == pytest.approx(1.4)     # beyond plan-in-context: above one
    assert gap_recovered(0.2, 0.2, 0.7) == 0.0 and gap_recovered(0.7, 0.2, 0.7) == pytest.approx(1.0)
    assert math.isnan(gap_recovered(0.5, 0.4, 0.4))               # no plan gap
    assert math.isnan(gap_recovered(0.3, 0.5, 0.4))               # plans hurt: undefined, not +2.0
    assert math.isnan(gap_recovered(0.6, 0.5, 0.4))               # nor -1.0 for a method above zero-shot


def _predictions(repeat: int = 10) -> pd.DataFrame:
    """Each question ``repeat`` times (distinct ids): enough questions for the plan gap's paired
    interval to clear zero, so gap recovered is defined."""
    rows = []

    def add(method, task, correct, seconds, tokens):
        for copy in range(repeat):
            for i, (c, s, t) in enumerate(zip(correct, seconds, tokens)):
                rows.append({"method": method, "id": f"{task}-{i}-{copy}", "task": task, "prediction": "x",
                             "correct": bool(c), "new_tokens": t, "seconds_per_query": s})

    add("zero_shot", "A", [1, 0, 0, 0], [0.01] * 4, [2] * 4)
    add("plan_in_context", "A", [1, 1, 1, 0], [0.02] * 4, [3] * 4)
    add("lora", "A", [1, 1, 0, 0], [0.01, 0.02, 0.03, 0.10], [1, 2, 3, 6])
    add("zero_shot", "B", [0, 0], [0.01] * 2, [2] * 2)
    add("plan_in_context", "B", [1, 1], [0.02] * 2, [3] * 2)
    add("lora", "B", [1, 1], [0.04, 0.06], [4, 4])
    return pd.DataFrame(rows)


def test_summarize_per_task_and_overall():
    table = summarize(_predictions())
    assert list(zip(table["task"], table["method"])) == [
        (task, method) for task in ("A", "B", "overall") for method in ("lora", "plan_in_context", "zero_shot")]
    row = table.set_index(["method", "task"])

    expected = {  # (hits, n, gap recovered)
        ("zero_shot", "A"): (1, 4, 0.0), ("plan_in_context", "A"): (3, 4, 1.0), ("lora", "A"): (2, 4, 0.5),
        ("zero_shot", "B"): (0, 2, 0.0), ("plan_in_context", "B"): (2, 2, 1.0), ("lora", "B"): (2, 2, 1.0),
        # overall: zero-shot 1/6, plan 5/6, lora 4/6 -> (4/6 - 1/6) / (5/6 - 1/6) = 0.75
        ("zero_shot", "overall"): (1, 6, 0.0), ("plan_in_context", "overall"): (5, 6, 1.0),
        ("lora", "overall"): (4, 6, 0.75),
    }
    for key, (hits, n, gap) in expected.items():
        got = row.loc[key]
        assert got["n"] == 10 * n, key
        assert got["accuracy"] == pytest.approx(hits / n), key
        assert (got["ci_low"], got["ci_high"]) == pytest.approx(_wilson_by_hand(10 * hits, 10 * n), abs=1e-9), key
        assert got["gap_recovered"] == pytest.approx(gap), key
        assert got["gap_recovered_low"] <= gap + 1e-9 and got["gap_recovered_high"] >= gap - 1e-9, key
    assert row.loc[("zero_shot", "B"), "ci_low"] == 0.0 and row.loc[("lora", "B"), "ci_high"] == 1.0
    assert row.loc[("lora", "A"), "median_ms_per_query"] == pytest.approx(25.0)
    assert row.loc[("lora", "A"), "mean_new_tokens"] == pytest.approx(3.0)
    assert row.loc[("lora", "overall"), "median_ms_per_query"] == pytest.approx(35.0)  # median of 6 values
    assert row.loc[("lora", "overall"), "mean_new_tokens"] == pytest.approx(20 / 6)


def test_summarize_without_reference_methods_gives_nan_gap():
    only_lora = _predictions().query("method == 'lora'")
    table = summarize(only_lora)
    assert len(table) == 3 and table["gap_recovered"].isna().all() and table["gap_recovered_low"].isna().all()
    assert table.set_index("task").loc["A", "accuracy"] == pytest.approx(0.5)


def test_a_task_where_the_plan_hurts_reports_no_gap_recovered(caplog):
    predictions = _predictions()
    flipped = predictions["task"].eq("B") & predictions["method"].isin(["zero_shot", "plan_in_context"])
    predictions.loc[flipped, "correct"] = ~predictions.loc[flipped, "correct"]  # zero-shot 2/2, plan 0/2
    with caplog.at_level("WARNING", logger="pilot.evaluation"):
        table = summarize(predictions).set_index(["method", "task"])
    assert table.loc[[("zero_shot", "B"), ("plan_in_context", "B"), ("lora", "B")], "gap_recovered"].isna().all()
    assert table.loc[("lora", "A"), "gap_recovered"] == pytest.approx(0.5)  # other tasks unaffected
    assert "Task B (test split): plan-in-context does not beat zero-shot (plan gap -1.000)" in caplog.text
    assert "Task A" not in caplog.text


def test_each_split_is_summarised_against_its_own_references():
    """The out-of-distribution rows get their own per-task and overall rows, and gap recovered
    against that split's zero-shot and plan-in-context, never mixed with the in-distribution ones."""
    test = _predictions()
    ood = test.assign(split="test_ood", id=test["id"] + "-ood")
    ood.loc[ood["method"] == "lora", "correct"] = False  # LoRA fails out of distribution
    table = summarize(pd.concat([test.assign(split="test"), ood], ignore_index=True))
    row = table.set_index(["split", "method", "task"])
    assert len(table) == 2 * 9
    assert row.loc[("test", "lora", "overall"), "gap_recovered"] == pytest.approx(0.75)  # as without the ood rows
    assert row.loc[("test_ood", "lora", "overall"), "accuracy"] == 0.0
    # ood: zero-shot 1/6, plan 5/6, lora 0 -> (0 - 1/6) / (5/6 - 1/6) = -0.25
    assert row.loc[("test_ood", "lora", "overall"), "gap_recovered"] == pytest.approx(-0.25)


def test_mcnemar_exact_matches_the_binomial_by_hand():
    from pilot.statistics import mcnemar_exact

    # 2 vs 8 discordant: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert mcnemar_exact(2, 8) == pytest.approx(0.109375)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32) and mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


@pytest.mark.parametrize("questions, discordant, better_share", [(9, 0.4, 0.8), (12, 0.7, 0.9), (10, 0.5, 0.5)])
def test_mcnemar_power_is_the_probability_of_every_outcome_that_the_test_rejects(questions, discordant,
                                                                                better_share):
    from pilot.statistics import mcnemar_exact, mcnemar_power

    expected = 0.0   # every (to the better, to the worse) count: its multinomial probability, if p < 0.05 for the better
    for better in range(questions + 1):
        for worse in range(questions - better + 1):
            ways = math.comb(questions, better) * math.comb(questions - better, worse)
            chance = (ways * (discordant * better_share) ** better * (discordant * (1 - better_share)) ** worse
                      * (1 - discordant) ** (questions - better - worse))
            if better > worse and mcnemar_exact(worse, better) < 0.05:
                expected += chance
    assert mcnemar_power(questions, discordant, better_share) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected > 0 or better_share == 0.5


def test_mcnemar_power_grows_with_the_questions_and_stays_under_half_alpha_without_an_effect():
    from pilot.statistics import mcnemar_power

    powers = [mcnemar_power(n, 0.095, 0.65) for n in (300, 600, 1200)]
    assert powers == sorted(powers) and 0.5 < powers[1] < 0.65 < 0.85 < powers[2]
    assert mcnemar_power(1200, 0.095, 0.5) < 0.025     # one side of a two-sided 5 % test
    with pytest.raises(ValueError, match="better_share"):
        mcnemar_power(600, 0.1, 1.5)


def test_paired_difference_counts_discordant_questions_and_brackets_the_difference():
    from pilot.statistics import paired_difference

    first = [1, 0, 0, 1] * 50
    second = [1, 1, 0, 1] * 50     # right on every question the first got, and on 50 more
    found = paired_difference(first, second)
    assert found["difference"] == pytest.approx(0.25)
    assert (found["only_first"], found["only_second"]) == (0, 50)
    assert 0 < found["ci_low"] < 0.25 < found["ci_high"] < 0.5
    assert found["p_value"] == pytest.approx(2 / 2**50)
    same = paired_difference(first, first)
    assert (same["difference"], same["ci_low"], same["ci_high"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same, non-empty set of questions"):
        paired_difference([1, 0], [1])


def test_gap_recovered_is_undefined_unless_the_plan_gap_clears_zero():
    """Four questions: plan-in-context beats zero-shot on two, a gap a bootstrap cannot tell from
    zero (all-concordant resamples are 6 % of them), so gap recovered is NaN, as on a seed where the
    two references differ by a tenth of a point; ten times the questions make the same gap clear."""
    small = summarize(_predictions(repeat=1)).set_index(["method", "task"])
    assert small.loc[("lora", "A"), ["gap_recovered", "gap_recovered_low", "gap_recovered_high"]].isna().all()
    large = summarize(_predictions(repeat=10)).set_index(["method", "task"])
    assert large.loc[("lora", "A"), "gap_recovered"] == pytest.approx(0.5)
    assert large.loc[("lora", "A"), "gap_recovered_low"] < 0.5 < large.loc[("lora", "A"), "gap_recovered_high"]


def test_stage2_rows_carry_the_paired_comparison_with_stage1():
    predictions = _predictions()
    stage1 = predictions[predictions["method"] == "lora"].assign(method="pilot_stage1")
    stage2 = predictions[predictions["method"] == "plan_in_context"].assign(method="pilot_stage2")
    table = summarize(pd.concat([predictions, stage1, stage2], ignore_index=True),
                      paired=[("pilot_stage2", "pilot_stage1")]).set_index(["method", "task"])
    row = table.loc[("pilot_stage2", "A")]   # 30/40 against 20/40: stage 2 alone right on 10, never the reverse
    assert row["paired_against"] == "pilot_stage1"
    assert row["paired_difference"] == pytest.approx(0.25)
    assert row["paired_p_value"] == pytest.approx(2 / 2**10)
    assert row["paired_ci_low"] > 0
    assert math.isnan(table.loc[("lora", "A"), "paired_difference"])


def test_the_results_table_pairs_each_method_with_the_one_it_names():
    """Stage 2 is read against stage 1, and each static control against PILOT (what the query adds),
    on the same questions: the pairs come from the methods themselves (Method.paired_with)."""
    from pilot.methods.registry import compared_methods

    pairs = {name: method.paired_with for name, method in compared_methods().items() if method.paired_with}
    assert pairs == {"pilot_stage2": "pilot_stage1", "static_guidance": "pilot_stage2", "bias_steering": "pilot_stage2"}
    assert set(pairs.values()) <= set(compared_methods())
