import torch

from pilot.config import GenerationParams
from pilot.generation import generate, stop_token_ids
from pilot.prompts import answer_prompt, first_line


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny_lm, task_table):
    prompts = [answer_prompt(q, p if i % 2 else None)
               for i, (q, p) in enumerate(zip(task_table["question"][:9], task_table["oracle_plan"][:9]))]
    batched = generate(tiny_lm, prompts, generation=GenerationParams(max_new_tokens=8, batch_size=4))
    one_at_a_time = GenerationParams(max_new_tokens=8, batch_size=1)
    single = [generate(tiny_lm, [p], generation=one_at_a_time).texts[0] for p in prompts]
    assert batched.texts == single
    assert len(batched.seconds_per_query) == 9 and all(s > 0 for s in batched.seconds_per_query)


def test_greedy_generation_matches_transformers_generate(tiny_lm, task_table):
    prompt = answer_prompt(task_table["question"][0])
    ids = tiny_lm.tokenizer(prompt, return_tensors="pt")
    reference = tiny_lm.model.generate(**ids, max_new_tokens=6, do_sample=False,
                                       pad_token_id=tiny_lm.tokenizer.pad_token_id, eos_token_id=-1)
    expected = reference[0, ids["input_ids"].shape[1]:].tolist()
    stops = set(stop_token_ids(tiny_lm.tokenizer).tolist())
    cut = next((i for i, t in enumerate(expected) if t in stops), len(expected))
    ours = generate(tiny_lm, [prompt], generation=GenerationParams(max_new_tokens=6, batch_size=1))
    assert ours.texts[0] == tiny_lm.tokenizer.decode(expected[:cut], skip_special_tokens=True)
    assert ours.new_tokens[0] == min(cut + 1, 6)


def test_sampling_is_seeded(tiny_lm, task_table):
    prompts = [answer_prompt(q) for q in task_table["question"][:6]]
    short = GenerationParams(max_new_tokens=5)
    a = generate(tiny_lm, prompts, generation=short, temperature=1.5, seed=1).texts
    assert a == generate(tiny_lm, prompts, generation=short, temperature=1.5, seed=1).texts
    assert a != generate(tiny_lm, prompts, generation=short, temperature=1.5, seed=2).texts


def test_answers_are_first_lines():
    assert first_line(" 42\nA: 7") == "42"
    assert first_line("\n42") == ""
