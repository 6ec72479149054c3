"""The served PILOT answers concurrent requests in shared batches, each answer the one its question
gets alone; and what MLflow hands it in Python is read, or refused in one sentence.

In-process tests use a tiny student and a hyper-network whose guidance changes the answers; the HTTP
test fires 32 concurrent requests at `mlflow models serve` of the model the test-env run logged.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd
import pytest

from pilot.config import GenerationParams
from pilot.generation import generate
from pilot.prompts import prompt_format
from pilot.serving import (STABLE_ROWS, Batching, PilotModel, RequestError, RequestLimits, log_pilot_model,
                           questions_of)
from tests.conftest import same_code_env
from tests.serve_check import post, served
from tests.test_serving_limits import _guiding_hypernet

GENERATION = GenerationParams(max_new_tokens=6, batch_size=8)
SIZES = (1, 2, 3, 5, 4, 1, 2, 5)   # questions per request: prompts of several lengths in every batch


def _model(lm, batching: Batching = Batching(batch_wait_ms=50)) -> PilotModel:
    return PilotModel().set_up(lm, _guiding_hypernet(lm), generation=GENERATION, batching=batching)


def _requests(task_table, count: int = 32) -> list[list[str]]:
    questions = task_table["question"].tolist()
    return [questions[(7 * i) % 200:(7 * i) % 200 + SIZES[i % len(SIZES)]] for i in range(count)]


def test_concurrent_requests_share_batches_and_each_gets_its_sequential_answers(tiny_lm, task_table):
    model = _model(tiny_lm)
    requests = _requests(task_table)
    sequential = [model.predict(None, r) for r in requests]
    assert model.batcher.batches == len(requests)   # one at a time: one batch each
    fmt = prompt_format(tiny_lm.tokenizer)           # the guidance is live: unguided answers differ
    assert sequential != [generate(tiny_lm, [fmt.answer_prompt(q) for q in r], generation=GENERATION).answers
                          for r in requests]

    start = threading.Barrier(len(requests))

    def client(request: list[str]) -> list[str]:
        start.wait()
        return model.predict(None, request)

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(client, requests))
    assert together == sequential
    shared = model.batcher.batches - len(requests)
    assert shared < len(requests) / 2, f"{len(requests)} concurrent requests took {shared} batches"


def test_an_answer_is_the_one_its_question_gets_alone_whatever_its_batch(tiny_lm, task_table):
    """Prompts of different lengths in one request, and requests of one question: the same answers,
    because a batch generates equal-length prompts together, at least STABLE_ROWS rows at a time."""
    model = _model(tiny_lm, Batching(batch_wait_ms=0))
    questions = task_table["question"].tolist()[:40]
    lengths = {len(tiny_lm.tokenizer(prompt_format(tiny_lm.tokenizer).answer_prompt(q))["input_ids"]) for q in questions}
    assert len(lengths) > 1   # the request mixes prompt lengths
    assert model.predict(None, questions) == [model.predict(None, [q])[0] for q in questions]
    assert STABLE_ROWS >= 1


def test_a_full_queue_is_refused_at_once_with_a_503(tiny_lm, task_table):
    model = _model(tiny_lm, Batching(batch_wait_ms=0, max_batch_questions=2, max_waiting_questions=6))
    questions = task_table["question"].tolist()
    answered, refused = [], []

    def client(number: int) -> None:
        try:
            answered.append(model.predict(None, questions[number:number + 2]))
        except RequestError as error:
            refused.append(error)

    with model._generating:   # a long batch is generating: the queue fills behind it
        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in threads:   # one at a time: each is generating, waiting or refused before the next comes
            thread.start()
            thread.join(timeout=0.3)
        assert len(refused) == 2 and not answered
    for thread in threads:
        thread.join(timeout=60)
    assert len(answered) == 4 and len(refused) == 2   # one generating, three waiting (6 questions), two refused
    assert refused[0].get_http_status_code() == 503
    assert refused[0].message == ("The server is full: 6 questions are waiting for a batch and the limit is 6 "
                                  "(max_waiting_questions, PILOT_SERVE_MAX_WAITING_QUESTIONS); retry shortly, or "
                                  "serve with more workers.")


def test_a_request_over_its_limits_is_refused_before_it_joins_the_queue(tiny_lm):
    model = PilotModel().set_up(tiny_lm, _guiding_hypernet(tiny_lm), generation=GENERATION,
                                limits=RequestLimits(max_question_chars=20))
    with model._generating:   # a batch is generating: the refusal does not wait for it
        with pytest.raises(RequestError, match=r"^Question 1 has 21 characters; the limit is 20 "):
            model.predict(None, ["1" * 21])
    assert model.batcher.batches == 0


def test_batching_comes_from_the_logged_settings_and_the_server_environment():
    assert Batching.from_settings({}) == Batching()
    assert Batching.from_settings({"batch_wait_ms": 7}, {}) == Batching(batch_wait_ms=7.0)
    overridden = Batching.from_settings({"max_batch_questions": 3}, {"PILOT_SERVE_MAX_BATCH_QUESTIONS": "9",
                                                                     "PILOT_SERVE_BATCH_WAIT_MS": "0.5"})
    assert overridden == Batching(batch_wait_ms=0.5, max_batch_questions=9)
    with pytest.raises(ValueError, match=r"^PILOT_SERVE_MAX_WAITING_QUESTIONS \(or settings.json's "
                                         r"max_waiting_questions\) must be a whole number, got 'many'\.$"):
        Batching.from_settings({}, {"PILOT_SERVE_MAX_WAITING_QUESTIONS": "many"})
    with pytest.raises(ValueError, match="PILOT_SERVE_BATCH_WAIT_MS .* must be at least 0, got '-1'"):
        Batching.from_settings({}, {"PILOT_SERVE_BATCH_WAIT_MS": "-1"})


def test_in_python_a_dict_is_read_and_a_plain_list_refused_naming_the_accepted_forms(tiny_lm, task_table, tmp_path):
    hypernet = _guiding_hypernet(tiny_lm)
    questions = task_table["question"].head(3).tolist()
    expected = PilotModel().set_up(tiny_lm, hypernet, generation=GENERATION).predict(None, questions)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("serving-batching")
        with mlflow.start_run():
            info = log_pilot_model(tiny_lm, hypernet, generation=GENERATION, registered_model_name="pilot")
        assert info["alias"] == "champion" and info["model_id"]
        model = mlflow.pyfunc.load_model("models:/pilot@champion")
        assert model.predict(pd.DataFrame({"question": questions})) == expected
        assert model.predict({"question": questions}) == expected
        assert model.predict(pd.Series(questions, name="question")) == expected
        for plain in (questions, pd.Series(questions), pd.DataFrame({"text": questions})):
            with pytest.raises(RequestError) as refused:
                model.predict(plain)
            assert refused.value.message == (
                "Found no 'question' column (MLflow reads a plain list as an unnamed column); send a DataFrame or "
                "dict with a 'question' column of strings (pd.DataFrame({'question': [...]}) or {'question': [...]}; "
                "over HTTP also {\"inputs\": [...]}).")
            assert refused.value.get_http_status_code() == 400
    finally:
        mlflow.set_tracking_uri(None)
    assert questions_of(questions) == questions   # the model itself reads a list (MLflow never hands it one)


# ------------------------------------------------------------------------ over HTTP (loopback)
def test_mlflow_models_serve_batches_32_concurrent_requests_each_answered_as_alone(finished_run, tmp_path):
    questions = pd.read_parquet(finished_run / "data/03_primary/tasks_test.parquet")["question"].tolist()
    sizes = [1 + (i * 5) % 7 for i in range(32)]            # 1 to 7 questions, mixed prompt lengths
    requests = [questions[3 * i:3 * i + size] for i, size in enumerate(sizes)]
    log = tmp_path / "serve.log"
    env = {**same_code_env(), "PILOT_SERVE_BATCH_WAIT_MS": "20"}
    with served(finished_run, workers=1, log_path=log, env=env) as port:
        if port is None:
            pytest.skip(f"`mlflow models serve` did not start here: {log.read_text(errors='replace')[-2000:]}")
        sequential = []
        for request in requests:
            status, text = post(port, {"inputs": request})
            assert status == 200, text
            sequential.append(json.loads(text)["predictions"])
        batches_before = len(re.findall(r"PILOT batch \d+:", log.read_text(errors="replace")))
        start = threading.Barrier(len(requests))

        def client(request: list[str]) -> tuple[int, str]:
            start.wait()
            return post(port, {"inputs": request})

        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(client, requests))
    assert [status for status, _ in replies] == [200] * len(requests), replies
    assert [json.loads(text)["predictions"] for _, text in replies] == sequential
    lines = re.findall(r"PILOT batch \d+: (\d+) requests?, (\d+) questions?", log.read_text(errors="replace"))
    assert len(lines) >= batches_before == len(requests)   # one batch per request while they came one at a time
    concurrent = [(int(r), int(q)) for r, q in lines[batches_before:]]
    assert sum(r for r, _ in concurrent) == len(requests) and sum(q for _, q in concurrent) == sum(sizes)
    assert max(r for r, _ in concurrent) > 1, concurrent   # requests shared a batch
    print(f"\nbatches of the 32 concurrent requests (requests, questions): {concurrent}")
