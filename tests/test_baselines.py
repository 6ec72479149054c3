"""The trained baselines: LoRA at a matched parameter budget, and the CAA steering vector."""

import json

import pytest
import torch

from pilot.config import GuidanceParams, LatentsParams, LMTrainConfig
from pilot.interventions import interventions
from pilot.latents import LatentCache, plan_cache_build, write_cache
from pilot.methods.caa import caa_guidance, steered, steering_vector
from pilot.methods.lora import (
    LoraAdapter,
    lora_rank_for_budget,
    lora_targets,
    train_lora,
)
from pilot.models import decoder_layers
from pilot.prompts import answer_prompt
from pilot.sequences import encode_pairs

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _per_rank_by_hand(lm) -> int:
    """A rank-1 adapter on Linear(in, out) trains in + out parameters. Per Llama block: q, k, v, o
    are hidden -> hidden (2 heads of 16, as many key/value heads); gate and up are
    hidden -> intermediate; down is intermediate -> hidden."""
    h, i = lm.model.config.hidden_size, lm.model.config.intermediate_size
    assert (h, i, lm.num_layers) == (32, 128, 2)
    return lm.num_layers * (4 * (h + h) + 2 * (h + i) + (i + h))   # = 2 * (256 + 320 + 160) = 1472


def test_lora_targets_are_the_named_linear_layers(tiny_lm):
    found = lora_targets(tiny_lm.model, ["q_proj", "down_proj"])
    assert sorted(found) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                             "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert all(isinstance(m, torch.nn.Linear) for m in found.values())
    assert len(lora_targets(tiny_lm.model, ALL)) == 7 * 2


def test_lora_targets_with_an_unknown_module_name_raise(tiny_lm):
    with pytest.raises(ValueError, match=r"c_attn.*target_modules"):
        lora_targets(tiny_lm.model, ["c_attn"])   # GPT-2's name; the student is a Llama


def test_lora_rank_for_budget_counts_in_plus_out_per_rank(tiny_lm):
    per_rank = _per_rank_by_hand(tiny_lm)
    assert per_rank == 1472
    assert lora_rank_for_budget(tiny_lm.model, ALL, 3 * per_rank, 0.01) == (3, 3 * per_rank)
    rank, count = lora_rank_for_budget(tiny_lm.model, ALL, 3 * per_rank + 120, 0.1)
    assert (rank, count) == (3, 3 * per_rank)
    assert abs(count - (3 * per_rank + 120)) <= 0.1 * (3 * per_rank + 120)
    # queries only: 2 layers * (32 + 32) = 128 per rank; 700 is closest to rank 5 (640)
    assert lora_rank_for_budget(tiny_lm.model, ["q_proj"], 700, 0.1) == (5, 640)


@pytest.mark.parametrize("budget", [int(2.5 * 1472), 100])
def test_an_unreachable_budget_raises_naming_target_modules(tiny_lm, budget):
    # 2.5 ranks is 20 % from both 2 and 3; 100 parameters are below one rank (at least rank 1 is used)
    with pytest.raises(ValueError, match=r"target_modules") as error:
        lora_rank_for_budget(tiny_lm.model, ALL, budget, 0.1)
    assert str(budget) in str(error.value)


def _logits(lm, questions):
    batch = encode_pairs(lm.tokenizer, [answer_prompt(q) for q in questions], [""] * len(questions))
    with torch.no_grad():
        return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_lora_is_selected_by_pilots_rule_and_an_untrained_pick_says_so(tiny_lm, task_table, caplog):
    """The random tiny student answers nothing right at any step, so the first best is step 0: the
    saved adapter must be the untrained one (B = 0, the plain student), with a warning saying so."""
    rows = task_table[task_table["split"] == "train"].head(16)
    val = task_table[task_table["split"] == "val"].head(12)
    config = LMTrainConfig(steps=4, batch_size=8, learning_rate=5e-2, warmup_steps=0, length_buckets=1, seed=0,
                           eval_every=2)
    adapter, result = train_lora(tiny_lm, rows, 2 * _per_rank_by_hand(tiny_lm), ALL, 0.1, 2.0, config,
                                 val_rows=val)
    assert [v["step"] for v in result.validation] == [0, 2, 4]
    assert [v["val_accuracy"] for v in result.validation] == [0.0, 0.0, 0.0]
    assert result.best_step == 0 and result.best_val_accuracy == 0.0
    assert all(v.abs().sum() == 0 for k, v in adapter.state.items() if "lora_B" in k)
    assert "train lora: no validation step beat step 0, so the selected weights are the untrained start" in caplog.text
    _, last = train_lora(tiny_lm, rows, 2 * _per_rank_by_hand(tiny_lm), ALL, 0.1, 2.0, config)
    assert any(v.abs().sum() > 0 for k, v in last.model.state_dict().items() if "lora_B" in k)  # it did train


def test_train_lora_matches_the_budget_leaves_the_student_alone_and_round_trips(tiny_lm, task_table, tmp_path):
    rows = task_table[task_table["split"] == "train"].head(16)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    questions = task_table["question"].head(4).tolist()
    plain_logits = _logits(tiny_lm, questions)
    budget = 2 * _per_rank_by_hand(tiny_lm)
    config = LMTrainConfig(steps=4, batch_size=8, learning_rate=1e-2, warmup_steps=0, length_buckets=1, seed=0)

    adapter, result = train_lora(tiny_lm, rows, budget, ALL, 0.1, 2.0, config)

    assert len(result.history) == 4 and all("lm" in row for row in result.history)
    assert adapter.num_parameters == lora_rank_for_budget(tiny_lm.model, ALL, budget, 0.1)[1] == budget
    assert adapter.config["r"] == 2 and adapter.config["lora_alpha"] == 4.0
    assert sorted(adapter.config["target_modules"]) == sorted(ALL)
    assert all("lora_A" in k or "lora_B" in k for k in adapter.state)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.state.items())  # B starts at zero

    adapted = adapter.adapted(tiny_lm)
    assert adapted.model is not tiny_lm.model and adapted.tokenizer is tiny_lm.tokenizer
    adapted_logits = _logits(adapted, questions)
    assert not torch.allclose(adapted_logits, plain_logits, atol=1e-4)
    after = tiny_lm.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in tiny_lm.model.named_modules())
    assert torch.equal(_logits(tiny_lm, questions), plain_logits)

    adapter.save(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 2
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    loaded = LoraAdapter.load(tmp_path / "lora")
    assert loaded.num_parameters == adapter.num_parameters
    assert all(torch.equal(loaded.state[k], adapter.state[k]) for k in adapter.state)
    assert torch.equal(_logits(loaded.adapted(tiny_lm), questions), adapted_logits)


# ------------------------------------------------------------------------------ CAA
SITE = GuidanceParams(read_layer=-1, inject_layer=0, align_layers=[0, 1])


def test_steering_vector_is_the_mean_plan_minus_free_difference_over_every_shard(tiny_lm, task_table, tmp_path):
    plans = task_table[["id", "task", "split"]].assign(plan=task_table["oracle_plan"], kept=True)
    build = plan_cache_build(plans, task_table, tiny_lm, SITE, LatentsParams(shard_size=40, batch_size=32))
    manifest = write_cache(build, tmp_path / "cache")
    assert len(manifest["shards"]) > 1   # the sum runs over several shards
    cache = LatentCache(tmp_path / "cache")
    tensors = cache.load()
    n = len(build.ids)
    assert tensors["inject_plan_mean"].shape == tensors["inject_free_mean"].shape == (n, 32)

    steering = steering_vector(cache)
    expected = (tensors["inject_plan_mean"] - tensors["inject_free_mean"]).mean(0)
    torch.testing.assert_close(steering["vector"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(steering["reference_rms"], tensors["inject_free_rms"].mean(), atol=1e-6, rtol=1e-5)
    assert steering["vector"].abs().sum() > 0 and float(steering["reference_rms"]) > 0


def test_caa_guidance_divides_by_the_reference_rms():
    steering = {"vector": torch.tensor([2.0, -4.0, 0.5]), "reference_rms": torch.tensor(2.0)}
    torch.testing.assert_close(caa_guidance(steering), torch.tensor([1.0, -2.0, 0.25]))
    tiny = {"vector": torch.tensor([1e-7]), "reference_rms": torch.tensor(0.0)}
    torch.testing.assert_close(caa_guidance(tiny), torch.tensor([0.1]))   # clamped at 1e-6, no inf


def test_steered_injects_scale_times_the_vector_at_a_typical_state_and_comes_off(tiny_lm):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    steering = {"vector": vector, "reference_rms": torch.tensor(3.0)}
    with steered(tiny_lm, steering, inject_layer=1, scale=0.5, num_prompts=3) as guidance:
        assert guidance.vectors.shape == (3, 32)
        torch.testing.assert_close(guidance.vectors, (vector / 3.0).expand(3, -1))
        assert list(interventions(tiny_lm.model)) == ["caa_steering"]
        assert guidance.injector.inject_layer == 1 and guidance.injector.guidance_scale == 0.5
    assert interventions(tiny_lm.model) == {}
    assert not any(layer._forward_hooks for layer in decoder_layers(tiny_lm.model))
