import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pilot.checkpoint import CheckpointManager, CorruptCheckpointError, find_checkpoints
from pilot.config import GenerationParams, Stage1Config, Stage2Config
from pilot.guidance import HyperNetwork
from pilot.latents import LatentCache, plan_cache_build, write_cache
from pilot.training.engine import NonFiniteLossError
from pilot.training.stage1 import run_stage1
from pilot.training.stage2 import run_stage2
from tests.conftest import stage1_inputs

JOB = Path(__file__).parent / "jobs" / "stage1_job.py"
GEN = GenerationParams(max_new_tokens=4, batch_size=16)


@pytest.fixture()
def workdir(tmp_path, tiny_lm, task_table):
    tiny_lm.save(tmp_path / "student")
    task_table.to_parquet(tmp_path / "tasks.parquet")
    plans = task_table[["id", "task", "split"]].assign(plan=task_table["oracle_plan"], kept=True)
    plans.to_parquet(tmp_path / "plans.parquet")
    return tmp_path


def _run_job(workdir: Path, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(JOB), str(workdir), str(steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_run_resumes_to_the_uninterrupted_result(workdir, tmp_path_factory):
    reference = tmp_path_factory.mktemp("reference")
    for name in ("student", "tasks.parquet", "plans.parquet"):
        (shutil.copytree if name == "student" else shutil.copy)(workdir / name, reference / name)
    assert _run_job(reference, 40).wait(timeout=600) == 0

    job = _run_job(workdir, 40)
    checkpoints = CheckpointManager(workdir / "checkpoints", every=4)
    deadline = time.time() + 300
    while not any(p.name >= "step-00000012" for p in find_checkpoints(workdir / "checkpoints")):
        assert job.poll() is None, "the job finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    kept = find_checkpoints(workdir / "checkpoints")
    assert kept and all(checkpoints.verify(p)["step"] % 4 == 0 for p in kept)  # no completed checkpoint lost
    assert not (workdir / "hypernet").exists()

    assert _run_job(workdir, 40).wait(timeout=600) == 0
    resumed = HyperNetwork.load(workdir / "hypernet")
    uninterrupted = HyperNetwork.load(reference / "hypernet")
    assert resumed.fingerprint() == uninterrupted.fingerprint()
    pd.testing.assert_frame_equal(pd.read_parquet(workdir / "history.parquet"),
                                  pd.read_parquet(reference / "history.parquet"))


def test_a_non_finite_loss_stops_training_naming_term_and_step_and_removes_the_injector(tiny_lm, task_table,
                                                                                      tmp_path):
    from pilot.guidance import GuidedStudent, make_hypernet
    from pilot.interventions import interventions
    from pilot.latents import CachedLatents
    from pilot.training.engine import train
    from pilot.training.stage1 import stage1_objective

    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    cache = LatentCache(tmp_path / "cache").load()
    cache["target_states"][:] = float("inf")  # e.g. a corrupt, overflowing cache
    examples = task_table[task_table["split"] == "train"].assign(plan=lambda f: f["oracle_plan"]).sort_values("id")
    config = Stage1Config(steps=4, batch_size=4, rl_weight=0)
    hypernet = make_hypernet(site, tiny_lm.hidden_size, tiny_lm.num_layers, 0)
    with pytest.raises(NonFiniteLossError, match=r"'alignment' became (nan|inf) at step 0"):
        with GuidedStudent(tiny_lm, hypernet) as guided:
            objective = stage1_objective(guided, CachedLatents(cache), examples.reset_index(drop=True), [1], config, GEN)
            train(hypernet, objective, config, name="stage1",
                  checkpoints=CheckpointManager(tmp_path / "ckpt", every=2))
    assert interventions(tiny_lm.model) == {}
    assert not any(layer._forward_hooks for layer in tiny_lm.model.model.layers)


def test_a_corrupted_checkpoint_is_reported_with_its_path(tiny_lm, task_table, tmp_path):
    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    config = Stage1Config(steps=4, batch_size=4, rl_weight=0, eval_every=4, checkpoint_every=2)
    val = task_table[task_table["split"] == "val"].head(4)
    run_stage1(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, val, site, latents, config, GEN,
               checkpoint_dir=str(tmp_path / "ckpt"))
    newest = find_checkpoints(tmp_path / "ckpt")[-1]
    (newest / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match=str(newest / "weights.safetensors")):
        run_stage1(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, val, site, latents, config, GEN,
                   checkpoint_dir=str(tmp_path / "ckpt"))


def test_stage1_refuses_a_stale_cache(tiny_lm, task_table, tmp_path):
    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    moved = site.model_copy(update={"inject_layer": 1})
    from pilot.latents import StaleCacheError

    with pytest.raises(StaleCacheError, match="kedro run --pipelines latents"):
        run_stage1(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, task_table.head(4), moved, latents,
                   Stage1Config(steps=2), GEN)


def test_stage1_and_stage2_run_and_record_their_terms(tiny_lm, task_table, tmp_path):
    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    val = task_table[task_table["split"] == "val"]
    first = run_stage1(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, val, site, latents,
                       Stage1Config(steps=6, batch_size=8, rl_every=2, rl_batch=2, rl_samples=2, eval_every=3,
                                    grad_norm_every=2), GEN)
    history = pd.DataFrame(first.history)
    assert {"alignment", "contrastive", "lm", "latent_rl", "total", "grad_norm"} <= set(history.columns)
    assert history["alignment"].notna().all() and history["latent_rl"].notna().sum() == 3
    for term in ("alignment", "contrastive", "lm", "latent_rl"):  # every term reaches the hyper-network
        norms = history[f"grad_norm/{term}"]
        assert norms.notna().tolist() == [True, False] * 3 and (norms.dropna() > 0).all(), term
    assert [v["step"] for v in first.validation] == [0, 3, 6]
    train = task_table[task_table["split"] == "train"]
    assert first.best_val_accuracy == max(v["val_accuracy"] for v in first.validation)
    assert first.best_step == next(v["step"] for v in first.validation if v["val_accuracy"] == first.best_val_accuracy)
    second = run_stage2(tiny_lm, first.model, train, val, Stage2Config(steps=4, batch_size=4, group_size=2,
                                                                           eval_every=2, dynamic_sampling=False), GEN)
    history2 = pd.DataFrame(second.history)
    assert {"policy", "kl", "self_supervision", "anchor", "rewards/mean", "rewards/std", "frac_reward_zero_std",
            "clip_ratio", "completion_length", "entropy", "grad_norm/policy", "grad_norm/anchor"} <= set(history2.columns)
    assert history2["frac_reward_zero_std"].between(0, 1).all() and (history2["clip_ratio"] == 0).all()
    assert [v["step"] for v in second.validation] == [0, 2, 4]
    assert second.best_val_accuracy == max(v["val_accuracy"] for v in second.validation)
    assert not any(layer._forward_hooks for layer in tiny_lm.model.model.layers)  # both injectors removed


def test_logits_only_at_the_answer_positions_give_the_full_pass_loss(tiny_lm, task_table):
    from pilot.sequences import IGNORE_INDEX, encode_pairs, labelled_logits, next_token_loss
    from pilot.training.base_lm import student_examples

    prompts, targets = zip(*student_examples(task_table.head(6).to_dict("records")))
    batch = encode_pairs(tiny_lm.tokenizer, prompts, targets)
    full = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    kept = labelled_logits(tiny_lm.model, batch)
    assert kept.shape == (batch.num_targets(), full.shape[-1])
    assert kept.shape[0] < full.shape[0] * full.shape[1] / 2  # most positions never reach the vocabulary
    torch.testing.assert_close(kept, full[batch.predicting_positions()], atol=1e-5, rtol=1e-4)
    reference = torch.nn.functional.cross_entropy(full[:, :-1].transpose(1, 2), batch.labels[:, 1:],
                                                  ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(next_token_loss(kept, batch), reference, atol=1e-5, rtol=1e-4)


def test_length_buckets_give_the_gradient_of_one_padded_pass(tiny_lm, task_table):
    from pilot.sequences import encode_pairs, labelled_logits, next_token_loss
    from pilot.training.base_lm import student_examples

    # Short answers mixed with long plan transcripts: the case the buckets are for.
    prompts, targets = zip(*student_examples(task_table.head(12).to_dict("records")))
    batch = encode_pairs(tiny_lm.tokenizer, prompts, targets)
    model = tiny_lm.model.train()
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = batch.length_buckets(4)
    assert len(parts) == 4 and sum(len(p.input_ids) for p in parts) == len(batch.input_ids)
    assert sum(p.input_ids.numel() for p in parts) < batch.input_ids.numel()  # padding was cut
    for part in parts:
        (next_token_loss(labelled_logits(model, part), part, reduction="sum") / batch.num_targets()).backward()
    for expected, got in zip(reference, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_both_stages_train_every_component_switched_on_together(tiny_lm, task_table, tmp_path):
    """FiLM at two sites with a learned prior: a guidance vector of 2 sites x (scale, shift) x d,
    through the cache, both stages' terms (latent RL, sampled rollouts) and saving."""
    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    site = site.model_copy(update={"modulation": "film", "prior": True, "extra_inject_layers": [1]})
    write_cache(plan_cache_build(plans, task_table, tiny_lm, site, latents), tmp_path / "cache")
    val = task_table[task_table["split"] == "val"].head(8)
    first = run_stage1(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, val, site, latents,
                       Stage1Config(steps=2, batch_size=8, rl_every=1, rl_batch=2, rl_samples=2, eval_every=2), GEN)
    assert first.model.config.guidance_size == 4 * tiny_lm.hidden_size
    assert pd.DataFrame(first.history)["latent_rl"].notna().all()
    train = task_table[task_table["split"] == "train"]
    second = run_stage2(tiny_lm, first.model, train, val, Stage2Config(steps=2, batch_size=4, group_size=2,
                                                                           eval_every=2), GEN)
    second.model.save(tmp_path / "hypernet")
    loaded = HyperNetwork.load(tmp_path / "hypernet", tiny_lm.hidden_size, tiny_lm.num_layers)
    assert loaded.config == second.model.config and torch.equal(loaded.prior, second.model.prior)
