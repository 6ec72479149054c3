
import pytest
import torch

from pilot.config import GuidanceParams, LatentsParams
from pilot.interventions import capture_layers
from pilot.latents import (
    CorruptCacheError,
    LatentCache,
    StaleCacheError,
    plan_cache_build,
    read_shard,
    write_cache,
)
from pilot.methods.caa import steering_vector
from pilot.prompts import answer_prompt, continuation
from pilot.sequences import encode_pairs

SITE = GuidanceParams(read_layer=-1, inject_layer=0, align_layers=[0, 1])


@pytest.fixture()
def plans(task_table):
    frame = task_table[["id", "task", "split"]].copy()
    frame["plan"] = task_table["oracle_plan"]
    frame["kept"] = True
    return frame


def _build(lm, plans, task_table, **latents):
    return plan_cache_build(plans, task_table, lm, SITE, LatentsParams(shard_size=40, batch_size=16, **latents))


def test_cache_equals_a_fresh_forward_pass(tiny_lm, plans, task_table, tmp_path):
    build = _build(tiny_lm, plans, task_table)
    manifest = write_cache(build, tmp_path / "cache")
    assert manifest["num_examples"] == (task_table["split"] == "train").sum() == len(build.ids)
    assert manifest["computed_shards"] == build.num_shards == 5
    cache = LatentCache(tmp_path / "cache").load()
    for i in (0, 7, len(build.ids) - 1):
        batch = encode_pairs(tiny_lm.tokenizer, [answer_prompt(build.questions[i], build.plans[i])],
                             [continuation(build.answers[i])])
        with torch.no_grad(), capture_layers(tiny_lm.model, [0, 1]) as states:
            tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        positions = batch.answer_position_mask()[0]
        n = int(cache["answer_lengths"][i])
        assert n == int(positions.sum())
        for j, layer in enumerate((0, 1)):
            torch.testing.assert_close(cache["target_states"][i, :n, j], states[layer][0][positions], atol=1e-5, rtol=1e-4)
        plain = encode_pairs(tiny_lm.tokenizer, [answer_prompt(build.questions[i])], [""])
        with torch.no_grad(), capture_layers(tiny_lm.model, [1]) as read:
            tiny_lm.model(input_ids=plain.input_ids, attention_mask=plain.attention_mask)
        q = int(cache["query_lengths"][i])
        torch.testing.assert_close(cache["query_states"][i, :q], read[1][0][plain.query_mask()[0]], atol=1e-5, rtol=1e-4)
    vector = steering_vector(LatentCache(tmp_path / "cache"))
    assert vector["vector"].shape == (32,) and float(vector["reference_rms"]) > 0


def test_a_stale_cache_is_detected_and_never_used_silently(tiny_lm, plans, task_table, tmp_path):
    write_cache(_build(tiny_lm, plans, task_table), tmp_path / "cache")
    with torch.no_grad():
        tiny_lm.model.model.layers[0].mlp.down_proj.weight.add_(0.01)  # the student changed
    changed = _build(tiny_lm, plans, task_table)
    cache = LatentCache(tmp_path / "cache")
    with pytest.raises(StaleCacheError, match="kedro run --pipelines latents"):
        cache.check_fingerprint(changed.fingerprint)
    with pytest.raises(StaleCacheError, match="on_stale=rebuild"):
        write_cache(changed, tmp_path / "cache", on_stale="error")
    manifest = write_cache(changed, tmp_path / "cache", on_stale="rebuild")
    assert manifest["computed_shards"] == changed.num_shards and manifest["reused_shards"] == 0
    LatentCache(tmp_path / "cache").check_fingerprint(changed.fingerprint)
    other_plans = plans.assign(plan=plans["plan"] + " .")
    assert _build(tiny_lm, other_plans, task_table).fingerprint != changed.fingerprint
    assert _build(tiny_lm, plans, task_table, dtype="float16").fingerprint != changed.fingerprint


def test_a_moved_project_keeps_its_cache_valid(tiny_lm, plans, task_table, tmp_path):
    from pilot.models import load_causal_lm

    # The same student saved in two places (a project copied, or run from another folder).
    tiny_lm.save(tmp_path / "here" / "student")
    tiny_lm.save(tmp_path / "elsewhere" / "student")
    here, elsewhere = (load_causal_lm(tmp_path / where / "student") for where in ("here", "elsewhere"))
    assert here.model.config._name_or_path != elsewhere.model.config._name_or_path
    assert _build(here, plans, task_table).fingerprint == _build(elsewhere, plans, task_table).fingerprint


def test_a_truncated_shard_is_detected_and_rebuilt_alone(tiny_lm, plans, task_table, tmp_path):
    build = _build(tiny_lm, plans, task_table)
    write_cache(build, tmp_path / "cache")
    before = LatentCache(tmp_path / "cache").load()
    shard = tmp_path / "cache" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CorruptCacheError, match="shard-00002.safetensors"):
        LatentCache(tmp_path / "cache").load()
    manifest = write_cache(build, tmp_path / "cache")
    assert manifest["computed_shards"] == 1
    after = LatentCache(tmp_path / "cache").load()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_flipped_byte_fails_the_checksum(tiny_lm, plans, task_table, tmp_path):
    build = _build(tiny_lm, plans, task_table)
    write_cache(build, tmp_path / "cache")
    shard = tmp_path / "cache" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="checksum"):
        read_shard(shard, build.fingerprint)


def test_an_interrupted_build_computes_only_the_missing_shards(tiny_lm, plans, task_table, tmp_path):
    build = _build(tiny_lm, plans, task_table)
    write_cache(build, tmp_path / "cache")
    complete = LatentCache(tmp_path / "cache").load()
    for name in ("shard-00001.safetensors", "shard-00004.safetensors", "manifest.json"):
        (tmp_path / "cache" / name).unlink()  # as if the run had been killed
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        LatentCache(tmp_path / "cache")
    manifest = write_cache(build, tmp_path / "cache")
    assert (manifest["computed_shards"], manifest["reused_shards"]) == (2, build.num_shards - 2)
    resumed = LatentCache(tmp_path / "cache").load()
    assert all(torch.equal(complete[k], resumed[k]) for k in complete)


def test_float16_storage_is_smaller_and_close(tiny_lm, plans, task_table, tmp_path):
    full = write_cache(_build(tiny_lm, plans, task_table), tmp_path / "f32")
    half = write_cache(_build(tiny_lm, plans, task_table, dtype="float16"), tmp_path / "f16")
    assert half["bytes"] < 0.6 * full["bytes"]
    a, b = LatentCache(tmp_path / "f32").load(), LatentCache(tmp_path / "f16").load()
    torch.testing.assert_close(a["target_states"], b["target_states"], atol=1e-2, rtol=1e-2)


def test_no_kept_plans_is_a_clear_error(tiny_lm, plans, task_table):
    # The message says why nothing was kept and what to change (plans.teacher=oracle would not help).
    with pytest.raises(ValueError, match=r"No kept plans(.|\n)*0 of \d+ plans(.|\n)*plans.keep=all"):
        _build(tiny_lm, plans.assign(kept=False, verified=False, teacher="hf"), task_table)


def test_cached_and_recomputed_batches_agree(tiny_lm, plans, task_table, tmp_path):
    from pilot.latents import CachedLatents, RecomputedLatents

    build = _build(tiny_lm, plans, task_table)
    write_cache(build, tmp_path / "cache")
    cached, fresh = CachedLatents(LatentCache(tmp_path / "cache").load()), RecomputedLatents(build)
    index = torch.tensor([3, 0, 41, 150, 7])
    a, b = cached.batch(index, "cpu"), fresh.batch(index, "cpu")
    for name in ("query_states", "query_mask", "targets", "target_mask"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-4)
