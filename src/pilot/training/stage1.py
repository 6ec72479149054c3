"""Stage 1: teacher-guided imitation in latent space.

The frozen student reads the query without a plan; the hyper-network turns that reading into
a guidance vector g, injected at ``inject_layer``. Four losses (:mod:`pilot.training.losses`),
logged under these names:

- ``alignment``: guided plan-free states at the alignment layers and answer positions vs the
  cached plan-conditioned states (1 - cosine, plus MSE relative to the target's scale);
- ``contrastive``: InfoNCE -- a query's guided state must be closer to its own
  plan-conditioned state than to the other queries' in the batch (temperature ``tau``);
- ``lm``: cross-entropy of the gold answer with guidance on;
- ``latent_rl``: g is the mean of a Gaussian policy; sampled vectors are decoded, rewarded by
  the verifier plus latent similarity to the target, and trained by REINFORCE with a
  per-query mean baseline (``rl_reward`` logs the verifier's part).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F

from pilot.checkpoint import CheckpointManager, run_fingerprint
from pilot.config import GenerationParams, GuidanceParams, LatentsParams, Stage1Config
from pilot.evaluation import accuracy, answer_and_score
from pilot.guidance import GuidedStudent, make_hypernet
from pilot.latents import CachedLatents, LatentBatch, LatentCache, plan_cache_build, select_examples
from pilot.models import CausalLM
from pilot.sequences import next_token_loss
from pilot.tasks import reply_targets
from pilot.training.engine import LoopSettings, Objective, TrainingResult, sample_batch, step_generator, train
from pilot.training.losses import (
    alignment_loss,
    gather_answer_states,
    info_nce,
    masked_mean,
    mean_baseline_advantages,
    reinforce_loss,
)


def guided_answer_pass(guided: GuidedStudent, batch: LatentBatch, vectors: torch.Tensor, questions: list[str],
                       answers: list[str], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The guided, teacher-forced pass over the batch's gold answers: (LM loss, states (B, Ta, L, d) at
    the answer positions of ``layers``, as wide as ``batch.targets``).

    From the cached frozen prefix when the batch has one (only the blocks above the site run),
    else the full pass; both give the same numbers (tests/test_prefix_cache.py)."""
    width = batch.targets.shape[1]
    if batch.prefix is not None:
        logits, states = guided.teacher_forced_from_prefix(batch.prefix, vectors, layers)
        lm = F.cross_entropy(logits.float(), batch.prefix.targets().to(logits.device))
        return lm, torch.stack([states[layer][:, :width] for layer in layers], dim=2).float()
    tokens, logits, states = guided.teacher_forced(questions, answers, vectors, layers)
    start = tokens.prompt_lengths - 1
    return next_token_loss(logits, tokens), torch.stack(
        [gather_answer_states(states[layer], start, width) for layer in layers], dim=2).float()


def imitation_terms(guided: GuidedStudent, batch: LatentBatch, vectors: torch.Tensor, questions: list[str],
                    answers: list[str], align_layers: list[int], temperature: float) -> dict[str, torch.Tensor]:
    """The ``alignment``, ``contrastive`` and ``lm`` terms for one batch."""
    last = len(align_layers) - 1
    lm, guided_states = guided_answer_pass(guided, batch, vectors, questions, answers, align_layers)
    return {
        "alignment": alignment_loss(guided_states, batch.targets,
                                    batch.target_mask[..., None].expand(-1, -1, len(align_layers))),
        "contrastive": info_nce(masked_mean(guided_states[:, :, last], batch.target_mask),
                                masked_mean(batch.targets[:, :, last], batch.target_mask), temperature),
        "lm": lm,
    }


def latent_rl_terms(guided: GuidedStudent, means: torch.Tensor, rows: pd.DataFrame, batch: LatentBatch,
                    layer: int, config: Stage1Config, generation: GenerationParams,
                    step: int) -> dict[str, torch.Tensor]:
    """``latent_rl``: REINFORCE on sampled guidance vectors; reward = verifier success + latent similarity."""
    k = config.rl_samples
    actions, log_prob = guided.hypernet.sample(means, k, generator=step_generator(config.seed, step))
    repeated = rows.loc[rows.index.repeat(k)]
    scored = answer_and_score(guided.student, repeated, guidance=guided.guidance(actions),
                              max_new_tokens=generation.max_new_tokens, batch_size=len(repeated),
                              stop_strings=generation.stop)
    success = torch.tensor(scored["correct"].to_numpy(dtype=float), device=guided.student.device,
                           dtype=torch.float32).view(len(rows), k)
    targets, mask = batch.targets[:, :, -1].repeat_interleave(k, dim=0), batch.target_mask.repeat_interleave(k, dim=0)
    with torch.no_grad():
        samples = LatentBatch(batch.query_states, batch.query_mask, targets, mask,
                              batch.prefix.repeat_interleave(k) if batch.prefix is not None else None)
        _, sampled = guided_answer_pass(guided, samples, actions, repeated["question"].tolist(),
                                        reply_targets(repeated), [layer])
        sampled = sampled[:, :, 0]
        similarity = F.cosine_similarity(masked_mean(sampled, mask), masked_mean(targets, mask), dim=-1)
    reward = success + config.latent_reward_weight * similarity.view(-1, k)
    return {"latent_rl": reinforce_loss(mean_baseline_advantages(reward), log_prob), "rl_reward": success.mean()}


def stage1_objective(guided: GuidedStudent, latents: CachedLatents, examples: pd.DataFrame,
                     align_layers: list[int], config: Stage1Config, generation: GenerationParams) -> Objective:
    """Stage 1's terms for one step: a batch of cached trajectories, imitation, and (every
    ``rl_every`` steps) latent RL on the first ``rl_batch`` queries."""
    questions, answers = examples["question"].tolist(), reply_targets(examples)
    last = len(align_layers) - 1
    device = guided.student.device

    def step_terms(step: int) -> Iterator[dict[str, torch.Tensor]]:
        index = torch.tensor(sample_batch(len(examples), config.batch_size, config.seed, step))
        batch = latents.batch(index, device)
        vectors = guided.hypernet(batch.query_states, batch.query_mask)
        rows = index.tolist()
        terms = imitation_terms(guided, batch, vectors, [questions[i] for i in rows], [answers[i] for i in rows],
                                align_layers, config.temperature)
        if config.rl_weight > 0 and step % config.rl_every == 0:
            n = config.rl_batch
            terms.update(latent_rl_terms(guided, vectors[:n], examples.iloc[rows[:n]], batch.first(n),
                                         align_layers[last], config, generation, step))
        yield terms

    return Objective(step_terms, weights={"alignment": config.alignment_weight,
                                          "contrastive": config.contrastive_weight,
                                          "lm": config.lm_weight, "latent_rl": config.rl_weight})


def loop_settings(config: Stage1Config) -> LoopSettings:
    return LoopSettings(steps=config.steps, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                        weight_decay=config.weight_decay, seed=config.seed, eval_every=config.eval_every,
                        grad_norm_every=config.grad_norm_every)


def run_stage1(student: CausalLM, cache: LatentCache, teacher_plans: pd.DataFrame, tasks: pd.DataFrame,
               val_rows: pd.DataFrame, site: GuidanceParams, latents: LatentsParams, config: Stage1Config,
               generation: GenerationParams, checkpoint_dir: str | None = None, resume: bool = True,
               on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Stage 1 end to end: check the cache is current, build the hyper-network, train it.

    The cache must have been built for this student, these kept plans and these guidance
    settings (its fingerprint says so); otherwise this stops with the command to rebuild it.
    Checkpoints under ``checkpoint_dir`` are resumed when they belong to the same run. The
    result's model is the hyper-network of the best validation step (step 0 is the untrained,
    zero-output hyper-network: the plain student).
    """
    build = plan_cache_build(teacher_plans, tasks, student, site, latents)
    cache.check_fingerprint(build.fingerprint)
    examples = select_examples(teacher_plans, tasks, latents.splits)
    hypernet = make_hypernet(site, student.hidden_size, student.num_layers, config.seed).to(student.device)
    checkpoints = CheckpointManager(checkpoint_dir, config.checkpoint_every,
                                    fingerprint=run_fingerprint("stage1", build.fingerprint, site, config))
    if not resume:
        checkpoints.clear()
    cached = CachedLatents(cache.load())
    with GuidedStudent(student, hypernet) as guided:
        def validate() -> float:
            return accuracy(student, val_rows, guidance=guided.guidance(), max_new_tokens=generation.max_new_tokens,
                            batch_size=generation.batch_size, stop_strings=generation.stop)

        objective = stage1_objective(guided, cached, examples, list(build.settings.align_layers), config, generation)
        result = train(hypernet, objective, loop_settings(config), name="stage1", validate=validate,
                       checkpoints=checkpoints, on_validation=on_validation)
    result.model.cpu()
    return result
