"""ReFT (LoReFT), pause tokens and soft thoughts: no-op where the design starts from one, changed
logits once trained, the same tokens in training and generation, and safetensors + JSON round trips."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pilot.artifacts import atomic_folder
from pilot.config import GenerationParams, LMTrainConfig
from pilot.evaluation import answer_and_score
from pilot.generation import generate, stop_token_ids
from pilot.guidance import GuidanceInjector
from pilot.interventions import InterventionError, interventions
from pilot.methods.reft import LoReft, ReftModule, reft_rank_for_budget, train_reft
from pilot.methods.soft_prompts import (
    AttachedSoftPrompt,
    PauseTokenModule,
    SoftThoughtModule,
    assistant_reading,
    make_soft_prompt,
    soft_thoughts_hidden_for_budget,
    train_soft_prompt,
)
from pilot.methods.trained import load_trained_module
from pilot.models import build_causal_lm
from pilot.prompts import answer_prompt
from pilot.sequences import encode_pairs
from pilot.soft_tokens import SoftTokenSlots, placeholder_ids, placeholders
from pilot.training.base_lm import answer_examples, answer_loss_terms

CONFIG = LMTrainConfig(steps=6, batch_size=8, learning_rate=3e-2, warmup_steps=0, length_buckets=2, seed=0)


def _logits(lm, questions, soft=None):
    """The student's logits on the questions' prompts (with ``soft``'s placeholders around them)."""
    around = {f"prompt_{where}": ids for where, ids in placeholders(soft).items()} if soft is not None else {}
    batch = encode_pairs(lm.tokenizer, [answer_prompt(q) for q in questions], [""] * len(questions), **around)
    with torch.no_grad():
        return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


@pytest.fixture()
def assistant(tokenizer):
    """A second tiny model with another width, standing in for the teacher that reads the prompt."""
    return build_causal_lm(tokenizer, family="llama", hidden_size=48, num_layers=2, num_heads=2, seed=1)


# ------------------------------------------------------------------------------ ReFT
def test_loreft_is_the_papers_formula_and_a_no_op_at_initialisation():
    torch.manual_seed(0)
    edit = LoReft(hidden_size=16, rank=4)
    hidden = torch.randn(3, 5, 16)
    assert torch.equal(edit(hidden), hidden)          # W = R, b = 0
    rotation = edit.rotation.weight
    assert torch.allclose(rotation @ rotation.T, torch.eye(4), atol=1e-5)   # orthonormal rows
    with torch.no_grad():
        edit.source.weight.add_(0.1 * torch.randn(4, 16))
        edit.source.bias.fill_(0.3)
    w, b = edit.source.weight, edit.source.bias
    expected = hidden + (hidden @ w.T + b - hidden @ rotation.T) @ rotation   # h + R^T (W h + b - R h)
    assert torch.allclose(edit(hidden), expected, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        LoReft(hidden_size=16, rank=17)


def test_reft_rank_matches_the_budget_and_the_cap_at_the_hidden_size_warns(caplog):
    per_rank = 2 * (2 * 32 + 1)                 # two layers of hidden size 32
    assert reft_rank_for_budget(32, 2, 5 * per_rank + 10, 0.1) == (5, 5 * per_rank)
    assert "ReFT" not in caplog.text
    rank, count = reft_rank_for_budget(32, 2, 100 * per_rank, 0.1)
    assert (rank, count) == (32, 32 * per_rank)
    assert "list more layers in baselines.reft.layers" in caplog.text


def test_reft_starts_as_the_plain_student_changes_it_once_trained_and_round_trips(tiny_lm, task_table, tmp_path):
    rows = task_table[task_table["split"] == "train"].head(24)
    questions = task_table["question"].head(4).tolist()
    plain = _logits(tiny_lm, questions)
    untrained = ReftModule(tiny_lm.hidden_size, 4, [0, 1])
    assert untrained.num_parameters == 2 * (2 * 4 * 32 + 4)
    with untrained.attached(tiny_lm):
        assert torch.allclose(_logits(tiny_lm, questions), plain, atol=1e-6)

    reft, result = train_reft(tiny_lm, rows, 2 * (2 * 4 * 32 + 4), [0, 1], 0.1, CONFIG)
    assert reft.rank == 4 and len(result.history) == CONFIG.steps
    with reft.attached(tiny_lm):
        trained = _logits(tiny_lm, questions)
        assert [site.name for site in interventions(tiny_lm.model).values()] == ["reft"]
        with pytest.raises(InterventionError, match="already carries"):
            GuidanceInjector(tiny_lm.model, 1, 1.0)   # no silent stacking with PILOT's injector
    assert not torch.allclose(trained, plain, atol=1e-4)
    assert not interventions(tiny_lm.model) and torch.equal(_logits(tiny_lm, questions), plain)   # hooks removed

    reft.save(tmp_path / "reft")
    assert json.loads((tmp_path / "reft/config.json").read_text()) == {"kind": "reft", "hidden_size": 32, "rank": 4,
                                                                       "layers": [0, 1]}
    loaded = load_trained_module(tmp_path / "reft")
    assert isinstance(loaded, ReftModule)
    with loaded.attached(tiny_lm), loaded.frozen_weights():
        assert torch.allclose(_logits(tiny_lm, questions), trained, atol=1e-5)


def test_a_negative_layer_and_its_positive_index_are_one_site(tiny_lm):
    with GuidanceInjector(tiny_lm.model, -1, 1.0):
        with pytest.raises(InterventionError, match="Decoder layer 1 already carries"):
            with ReftModule(tiny_lm.hidden_size, 2, [1]).attached(tiny_lm):
                pass
    assert not interventions(tiny_lm.model)


def test_reft_refuses_a_student_of_another_shape(tiny_lm, tokenizer):
    wide = build_causal_lm(tokenizer, family="llama", hidden_size=48, num_layers=2, num_heads=2, seed=0)
    with pytest.raises(ValueError, match="Retrain it"):
        with ReftModule(48, 2, [0, 1]).attached(tiny_lm):
            pass
    with pytest.raises(ValueError, match="Retrain it"):
        with ReftModule(48, 2, [5]).attached(wide):
            pass


# ------------------------------------------------------------------------------ soft-token slots
def test_slots_embed_placeholders_as_given_and_refuse_them_without_embeddings(tiny_lm):
    questions = ["1 + 2", "3 + 4 + 5"]
    batch = encode_pairs(tiny_lm.tokenizer, [answer_prompt(q) for q in questions], [" 3", " 12"],
                         prompt_suffix=placeholder_ids(3))
    assert (batch.input_ids < 0).sum(1).tolist() == [3, 3]
    assert all(batch.labels[i, :p].eq(-100).all() for i, p in enumerate(batch.prompt_lengths.tolist()))
    tokens = torch.randn(2, 3, tiny_lm.hidden_size)
    # by hand: the same sequence with the soft tokens' embeddings put in directly
    embedded = tiny_lm.model.get_input_embeddings()(batch.input_ids.clamp_min(0)).detach().clone()
    for row in range(2):
        columns = (batch.input_ids[row] < 0).nonzero()[:, 0]
        embedded[row, columns] = tokens[row]
    with torch.no_grad():
        expected = tiny_lm.model(inputs_embeds=embedded, attention_mask=batch.attention_mask).logits
        with SoftTokenSlots(tiny_lm.model) as slots:
            with slots.fill(tokens):
                got = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            with pytest.raises(InterventionError, match="fill"):
                tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not interventions(tiny_lm.model)


@pytest.mark.parametrize("kind", ["pause_tokens", "soft_thoughts"])
def test_generation_with_soft_tokens_starts_where_the_teacher_forced_pass_does(tiny_lm, assistant, kind):
    """The first generated token is the argmax of the training-time logits after the prompt, with
    the soft tokens after it (pause tokens) or before it (soft thoughts, read from the assistant)."""
    questions = ["1 + 2", "3 + 4 + 5", "6 - 2"]
    prompts = [answer_prompt(q) for q in questions]
    module = make_soft_prompt(kind, tiny_lm, 3, budget=5000, seed=0, assistant=assistant)
    if kind == "soft_thoughts":   # a projection that is not zero, so each question gets its own tokens
        torch.nn.init.normal_(module.projection[-1].weight, std=0.5)
    with AttachedSoftPrompt(module, tiny_lm, assistant) as soft:
        batch = encode_pairs(tiny_lm.tokenizer, prompts, [""] * 3,
                             **{f"prompt_{where}": ids for where, ids in placeholders(soft).items()})
        assert ((batch.input_ids < 0).nonzero()[:, 1].view(3, 3) < 3).all() == (kind == "soft_thoughts")
        with soft.slots.fill(soft.embeddings(prompts)), torch.no_grad():
            logits = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        first = logits[torch.arange(3), batch.prompt_lengths - 1].argmax(-1).tolist()
        result = generate(tiny_lm, prompts, generation=GenerationParams(max_new_tokens=1), soft_prompt=soft)
    stops = set(stop_token_ids(tiny_lm.tokenizer).tolist())
    assert result.texts == ["" if t in stops else tiny_lm.tokenizer.decode([t]) for t in first]


# ------------------------------------------------------------------------------ pause tokens and soft thoughts
def test_pause_tokens_start_at_vocabulary_rows_change_the_logits_once_trained_and_round_trip(tiny_lm, task_table,
                                                                                               tmp_path):
    rows = task_table[task_table["split"] == "train"].head(24)
    questions = task_table["question"].head(4).tolist()
    pause = make_soft_prompt("pause_tokens", tiny_lm, 4, budget=10_000, seed=0)
    table = tiny_lm.model.get_input_embeddings().weight
    assert pause.num_parameters == 4 * 32
    assert all(any(torch.equal(token, row) for row in table) for token in pause.tokens.detach())
    with AttachedSoftPrompt(pause, tiny_lm) as soft, soft.slots.fill(pause()):
        untrained = _logits(tiny_lm, questions, soft)

    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    trained_pause, result = train_soft_prompt(tiny_lm, pause, rows, CONFIG)
    assert len(result.history) == CONFIG.steps
    assert not torch.equal(trained_pause.tokens, make_soft_prompt("pause_tokens", tiny_lm, 4, 10_000, 0).tokens)
    with AttachedSoftPrompt(trained_pause, tiny_lm) as soft, soft.slots.fill(trained_pause()):
        trained = _logits(tiny_lm, questions, soft)
    assert not torch.allclose(trained, untrained, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items())   # the student is untouched

    trained_pause.save(tmp_path / "pause")
    loaded = load_trained_module(tmp_path / "pause")
    assert isinstance(loaded, PauseTokenModule) and torch.equal(loaded.tokens, trained_pause.tokens)
    generation = GenerationParams(max_new_tokens=4)
    with AttachedSoftPrompt(loaded, tiny_lm) as soft:
        first = answer_and_score(tiny_lm, rows.head(6), generation=generation, soft_prompt=soft)
    with AttachedSoftPrompt(trained_pause, tiny_lm) as soft:
        second = answer_and_score(tiny_lm, rows.head(6), generation=generation, soft_prompt=soft)
    assert first["reply"].tolist() == second["reply"].tolist()


def test_soft_thoughts_start_query_independent_then_depend_on_the_question_and_round_trip(tiny_lm, assistant,
                                                                                          task_table, tmp_path):
    rows = task_table[task_table["split"] == "train"].head(24)
    questions = task_table["question"].head(4).tolist()
    prompts = [answer_prompt(q) for q in questions]
    budget = 20_000
    thoughts = make_soft_prompt("soft_thoughts", tiny_lm, 2, budget, seed=0, assistant=assistant)
    hidden = soft_thoughts_hidden_for_budget(2, 48, 32, budget)
    assert thoughts.projection_hidden == hidden and abs(thoughts.num_parameters - budget) <= 48 + 32 + 1
    reading = assistant_reading(assistant, prompts, 2)
    assert reading.shape == (4, 2, 48)
    start = thoughts(reading).detach()
    assert torch.equal(start, thoughts.slots.detach().expand(4, -1, -1))   # the projection starts at zero
    assert torch.equal(thoughts.slots.detach(), make_soft_prompt("pause_tokens", tiny_lm, 2, budget, 0).tokens.detach())
    with AttachedSoftPrompt(thoughts, tiny_lm, assistant) as soft, soft.slots.fill(start):
        before = _logits(tiny_lm, questions, soft)

    trained, _ = train_soft_prompt(tiny_lm, thoughts, rows, CONFIG, assistant=assistant)
    tokens = trained(reading).detach()
    assert not torch.allclose(tokens[0], tokens[1], atol=1e-5)    # one soft prompt per question now
    with AttachedSoftPrompt(trained, tiny_lm, assistant) as soft:
        assert torch.equal(soft.embeddings(prompts), tokens)
        with soft.slots.fill(tokens):
            after = _logits(tiny_lm, questions, soft)
    assert not torch.allclose(after, before, atol=1e-4)

    trained.save(tmp_path / "soft")
    loaded = load_trained_module(tmp_path / "soft")
    assert isinstance(loaded, SoftThoughtModule) and torch.equal(loaded(reading), trained(reading))
    with pytest.raises(ValueError, match="assistant"):
        AttachedSoftPrompt(loaded, tiny_lm)


def test_per_question_soft_tokens_follow_their_rows_through_the_length_buckets(tiny_lm, assistant, task_table):
    """In training, each length bucket (rows reordered by length) fills row b's soft tokens from the
    example that row b really holds: the prompt tokens after row b's placeholders are that example's."""
    rows = task_table[task_table["split"] == "train"].head(12)
    thoughts = make_soft_prompt("soft_thoughts", tiny_lm, 2, 20_000, seed=0, assistant=assistant)
    examples = answer_examples(tiny_lm.tokenizer, rows)
    readings = assistant_reading(assistant, [prompt for prompt, _ in examples], 2)
    filled_for, checked = [], []
    with AttachedSoftPrompt(thoughts, tiny_lm, assistant) as soft, torch.no_grad():
        def filled(members):
            filled_for.append(list(members))
            return soft.slots.fill(thoughts(readings[members]))
        spy = tiny_lm.model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: checked.append((filled_for[-1], args[0].clone())))
        config = CONFIG.model_copy(update={"batch_size": 12, "length_buckets": 3})
        terms = answer_loss_terms(tiny_lm, examples, config, placeholders=placeholders(soft), around=filled)
        assert len(list(terms(0))) == 3
        spy.remove()
    assert sorted(i for members, _ in checked for i in members) == sorted(set(range(12)) & set(sum(filled_for, [])))
    for members, ids in checked:
        for row, example in enumerate(members):
            prompt_ids = tiny_lm.tokenizer(examples[example][0])["input_ids"]
            assert ids[row, 2:2 + len(prompt_ids)].tolist() == prompt_ids   # 2 placeholders, then this prompt
    assert any(len({examples[i][0] for i in members}) > 1 for members, _ in checked)   # a swap would show


def test_soft_thoughts_refuse_an_assistant_they_were_not_trained_on(tiny_lm, assistant, tokenizer):
    thoughts = make_soft_prompt("soft_thoughts", tiny_lm, 2, 20_000, seed=0, assistant=assistant)
    narrow = build_causal_lm(tokenizer, family="llama", hidden_size=32, num_layers=2, num_heads=2, seed=2)
    with pytest.raises(ValueError, match="width 48.*width 32.*kedro run --pipelines baselines"):
        AttachedSoftPrompt(thoughts, tiny_lm, narrow)


def test_an_unknown_saved_kind_is_refused_with_the_rebuild_command(tmp_path):
    with atomic_folder(tmp_path / "prefix") as folder:   # a well-formed folder (checksums and all) of another kind
        (folder / "config.json").write_text(json.dumps({"kind": "prefix_tuning"}))
        save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"prefix_tuning.*pause_tokens.*rebuild it with `kedro run --pipelines baselines`"):
        load_trained_module(tmp_path / "prefix")
