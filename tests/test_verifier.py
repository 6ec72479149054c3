import json
import time

import pytest
import reasoning_gym

from pilot.verifier import Verifier, prefilter, score_answers


@pytest.fixture(scope="module")
def countdown():
    entry = reasoning_gym.create_dataset("countdown", size=1, seed=1)[0]
    return entry


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(timeout_s=2.0)
    yield v
    v.close()


def _score(verifier, task, entry, answers):
    n = len(answers)
    return verifier.score([task] * n, answers, [entry["answer"]] * n, [json.dumps(entry["metadata"])] * n)


def test_correct_and_wrong_answers(verifier, countdown, task_table):
    assert _score(verifier, "countdown", countdown, [countdown["answer"], "1 + 1"]) == [1.0, 0.0]
    rows = task_table.head(20)
    assert verifier.score(rows["task"], rows["answer"], rows["answer"], rows["metadata"]) == [1.0] * 20


HOSTILE = [
    "__import__('os').system('touch {marker}')",
    "__import__(\"os\").system(\"touch {marker}\")",
    "exec(\"open('{marker}', 'w')\")",
    "eval(\"__import__('os').system('touch {marker}')\")",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "print(\"EXECUTED\")",
    "9**9**9",
    "9^9^9",
    "10**10**10 + 1",
    "9" * 60,
    "((" * 200 + "1" + "))" * 200,
    "1" + " + 1" * 2000,
    "x" * 1_000_000,
    "٣ + ٤",                                   # Arabic-Indic digits normalise, must not crash
    "1\u202e2",                                # right-to-left override
    "1\u200b+2",                               # zero-width space
    "getattr(__builtins__, 'open')('{marker}', 'w')",
    "globals()['__builtins__']",
    "\x00",
    "",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_answers_score_zero_quickly_and_execute_nothing(verifier, countdown, template, tmp_path, capfd):
    marker = tmp_path / "executed"
    answer = template.replace("{marker}", str(marker))
    started = time.perf_counter()
    assert _score(verifier, "countdown", countdown, [answer]) == [0.0]
    assert time.perf_counter() - started < 5
    assert not marker.exists()
    assert "EXECUTED" not in capfd.readouterr().out


def test_puzzle24_and_arithmetic_scorers_are_guarded_too(verifier):
    for task in ("puzzle24", "basic_arithmetic", "chain_sum"):
        entry = reasoning_gym.create_dataset(task, size=1, seed=2)[0]
        assert _score(verifier, task, entry, ["__import__('os').system('echo x')", "9**9**9"]) == [0.0, 0.0]


def test_an_answer_over_the_time_limit_scores_zero_and_the_batch_goes_on(countdown):
    impatient = Verifier(timeout_s=0.0)  # no scorer answers instantly: every answer overruns
    try:
        assert _score(impatient, "countdown", countdown, [countdown["answer"]] * 3) == [0.0, 0.0, 0.0]
        assert impatient.stats.timeouts == 3
        impatient.timeout_s = 5.0  # a fresh worker takes over after each kill
        assert _score(impatient, "countdown", countdown, [countdown["answer"]]) == [1.0]
    finally:
        impatient.close()


def test_prefilter_keeps_ordinary_answers():
    assert prefilter(" 42 ") == "42"
    assert prefilter("19 56 52 8") == "19 56 52 8"
    assert prefilter("94*4 - 61 - 6") == "94*4 - 61 - 6"
    assert prefilter("open") == "open"  # a bare word is a harmless wrong answer
    assert prefilter("open('x')") is None
    assert prefilter(None) is None
    assert prefilter(42) is None


def test_module_level_scoring_function(countdown):
    assert score_answers(["countdown"], [countdown["answer"]], [countdown["answer"]], [countdown["metadata"]]) == [1.0]
