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

from pilot import distributed
from pilot.checkpoint import CheckpointManager, run_fingerprint
from pilot.config import GenerationParams, GuidanceParams, LatentsParams, ParameterError, Stage1Config
from pilot.evaluation import accuracy, answer_and_score
from pilot.guidance import GuidedStudent, make_hypernet
from pilot.latents import CachedLatents, LatentBatch, LatentCache, plan_cache_build, select_examples
from pilot.models import CausalLM
from pilot.sequences import next_token_loss
from pilot.tasks import reply_targets
from pilot.training.engine import (
    Objective,
    TrainingResult,
    sample_batch,
    sharded_score,
    step_generator,
    train,
)
from pilot.training.losses import (
    alignment_loss,
    gather_answer_states,
    info_nce,
    masked_mean,
    mean_baseline_advantages,
    reinforce_loss,
)

# What `kedro run --pipelines tune` searches, and where stage 1 takes its best values from.
LOSS_KEYS = ("contrastive_weight", "rl_weight")        # Stage1Config fields
SITE_KEYS = ("guidance_scale", "inject_layer")         # GuidanceParams fields


def apply_tuned(tuned: dict, training: Stage1Config, guidance: GuidanceParams) -> tuple[Stage1Config, GuidanceParams]:
    """Stage 1's settings with the ``tune`` pipeline's best values in place of the configured ones."""
    if not tuned:
        raise ValueError("stage1.use_tuned_weights is true but no tuned weights exist; run "
                         "`kedro run --pipelines tune` first or set it to false.")
    if "inject_layer" in tuned and tuned["inject_layer"] != guidance.inject_layer:
        raise ParameterError(
            f"The tuned injection layer is {tuned['inject_layer']} but guidance.inject_layer is {guidance.inject_layer}; "
            "the latent cache and the baselines follow guidance.inject_layer, so set it there "
            f"(`--params guidance.inject_layer={tuned['inject_layer']}`) and rerun from the latents pipeline.")
    return (training.model_copy(update={k: v for k, v in tuned.items() if k in LOSS_KEYS}),
            guidance.model_copy(update={k: v for k, v in tuned.items() if k in SITE_KEYS}))


def guided_answer_pass(guided: GuidedStudent, batch: LatentBatch, vectors: torch.Tensor, questions: list[str],
                       answers: list[str], layers: list[int],
                       reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The guided, teacher-forced pass over the batch's gold answers: (LM loss, states (B, Ta, L, d) at
    the answer positions of ``layers``, as wide as ``batch.targets``, and the number of answer tokens
    the loss is over); the loss is their mean, or with ``reduction="sum"`` their sum.

    From the cached frozen prefix when the batch has one (only the blocks above the site run),
    else the full pass; both give the same numbers (tests/test_prefix_cache.py)."""
    width = batch.targets.shape[1]
    if batch.prefix is not None:
        logits, states = guided.teacher_forced_from_prefix(batch.prefix, vectors, layers)
        targets = batch.prefix.targets().to(logits.device)
        lm = F.cross_entropy(logits.float(), targets, reduction=reduction)
        return lm, torch.stack([states[layer][:, :width] for layer in layers], dim=2).float(), len(targets)
    tokens, logits, states = guided.teacher_forced(questions, answers, vectors, layers)
    start = tokens.prompt_lengths - 1
    return next_token_loss(logits, tokens, reduction=reduction), torch.stack(
        [gather_answer_states(states[layer], start, width) for layer in layers], dim=2).float(), tokens.num_targets()


def imitation_terms(guided: GuidedStudent, batch: LatentBatch, vectors: torch.Tensor, questions: list[str],
                    answers: list[str], align_layers: list[int], temperature: float,
                    global_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The ``alignment``, ``contrastive`` and ``lm`` terms for one batch.

    With data-parallel processes the batch is this rank's shard of ``global_rows`` rows and each
    term is its additive share of the global batch's (:mod:`pilot.distributed`): the token means
    are divided by the global token counts, and InfoNCE, which compares every row with every
    other, is computed on the gathered batch with the gradient through this rank's rows."""
    last = len(align_layers) - 1
    lm_sum, guided_states, lm_tokens = guided_answer_pass(guided, batch, vectors, questions, answers, align_layers,
                                                          reduction="sum")
    mask = batch.target_mask[..., None].expand(-1, -1, len(align_layers))
    positions = float(mask.sum())
    alignment = alignment_loss(guided_states, batch.targets, mask) * max(positions, 1.0)
    queries = masked_mean(guided_states[:, :, last], batch.target_mask)
    keys = masked_mean(batch.targets[:, :, last], batch.target_mask)
    rows = global_rows if global_rows is not None else len(queries)
    queries = distributed.with_own_rows(distributed.all_gather_rows(queries, rows), queries)
    keys = distributed.all_gather_rows(keys, rows)
    return {
        "alignment": alignment / max(distributed.global_count(positions), 1.0),
        "contrastive": distributed.replicated_share(info_nce(queries, keys, temperature)),
        "lm": lm_sum / max(distributed.global_count(lm_tokens), 1.0),
    }


def latent_rl_terms(guided: GuidedStudent, means: torch.Tensor, rows: pd.DataFrame, batch: LatentBatch,
                    layer: int, config: Stage1Config, generation: GenerationParams,
                    step: int, positions: list[int] | None = None, global_rows: int | None = None,
                    ) -> dict[str, torch.Tensor]:
    """``latent_rl``: REINFORCE on sampled guidance vectors; reward = verifier success + latent similarity.

    ``positions`` are these rows' places among the step's ``global_rows`` RL queries (data-parallel
    shards): each row draws the noise it draws in one process, and the terms are shares."""
    k = config.rl_samples
    positions = list(range(len(rows))) if positions is None else positions
    global_rows = len(rows) if global_rows is None else global_rows
    if not positions:  # this rank holds none of the RL queries: it adds nothing, but logs the same names
        zero = means.sum() * 0
        return {"latent_rl": zero, "rl_reward": zero.detach()}
    noise = torch.randn((global_rows * k, means.shape[-1]), generator=step_generator(config.seed, step),
                        dtype=means.dtype)
    noise = noise.view(global_rows, k, -1)[positions].reshape(len(positions) * k, -1)
    actions, log_prob = guided.hypernet.sample(means, k, noise=noise)
    repeated = rows.loc[rows.index.repeat(k)]
    scored = answer_and_score(guided.student, repeated, guidance=guided.guidance(actions),
                              generation=generation.model_copy(update={"batch_size": len(repeated)}))
    success = torch.tensor(scored["correct"].to_numpy(dtype=float), device=guided.student.device,
                           dtype=torch.float32).view(len(rows), k)
    targets, mask = batch.targets[:, :, -1].repeat_interleave(k, dim=0), batch.target_mask.repeat_interleave(k, dim=0)
    with torch.no_grad():
        samples = LatentBatch(batch.query_states, batch.query_mask, targets, mask,
                              batch.prefix.repeat_interleave(k) if batch.prefix is not None else None)
        _, sampled, _ = guided_answer_pass(guided, samples, actions, repeated["question"].tolist(),
                                           reply_targets(repeated), [layer])
        sampled = sampled[:, :, 0]
        similarity = F.cosine_similarity(masked_mean(sampled, mask), masked_mean(targets, mask), dim=-1)
    reward = success + config.latent_reward_weight * similarity.view(-1, k)
    share = len(positions) / global_rows
    return {"latent_rl": reinforce_loss(mean_baseline_advantages(reward), log_prob) * share,
            "rl_reward": success.mean() * share}


def stage1_objective(guided: GuidedStudent, latents: CachedLatents, examples: pd.DataFrame,
                     align_layers: list[int], config: Stage1Config, generation: GenerationParams) -> Objective:
    """Stage 1's terms for one step: a batch of cached trajectories, imitation, and (every
    ``rl_every`` steps) latent RL on the first ``rl_batch`` queries."""
    questions, answers = examples["question"].tolist(), reply_targets(examples)
    last = len(align_layers) - 1
    device = guided.student.device

    def step_terms(step: int) -> Iterator[dict[str, torch.Tensor]]:
        global_index = sample_batch(len(examples), config.batch_size, config.seed, step)
        rows = distributed.shard(global_index)   # this process's rows: all of them in one process
        batch = latents.batch(torch.tensor(rows), device)
        vectors = guided.hypernet(batch.query_states, batch.query_mask)
        terms = imitation_terms(guided, batch, vectors, [questions[i] for i in rows], [answers[i] for i in rows],
                                align_layers, config.temperature, global_rows=len(global_index))
        if config.rl_weight > 0 and step % config.rl_every == 0:
            # the RL queries are the global batch's first `rl_batch`; this rank's come first in its shard
            global_rl = min(config.rl_batch, len(global_index))
            positions = [p for p in distributed.shard_positions(len(global_index)) if p < global_rl]
            n = len(positions)
            terms.update(latent_rl_terms(guided, vectors[:n], examples.iloc[rows[:n]], batch.first(max(n, 1)),
                                         align_layers[last], config, generation, step, positions, global_rl))
        yield terms

    return Objective(step_terms, weights={"alignment": config.alignment_weight,
                                          "contrastive": config.contrastive_weight,
                                          "lm": config.lm_weight, "latent_rl": config.rl_weight})


def run_stage1(student: CausalLM, cache: LatentCache, teacher_plans: pd.DataFrame, train_rows: pd.DataFrame,
               val_rows: pd.DataFrame, guidance: GuidanceParams, latents: LatentsParams, config: Stage1Config,
               generation: GenerationParams, checkpoint_dir: str | None = None, resume: bool = True,
               on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Stage 1 end to end: check the cache is current, build the hyper-network, train it.

    The cache must have been built for this student, these kept plans and these guidance
    settings (its fingerprint says so); otherwise this stops with the command to rebuild it.
    Checkpoints under ``checkpoint_dir`` are resumed when they belong to the same run. The
    result's model is the hyper-network of the best validation step (step 0 is the untrained,
    zero-output hyper-network: the plain student).
    """
    build = plan_cache_build(teacher_plans, train_rows, student, guidance, latents)
    cache.check_fingerprint(build.fingerprint)
    examples = select_examples(teacher_plans, train_rows)
    hypernet = make_hypernet(guidance, student.hidden_size, student.num_layers, config.seed).to(student.device)
    checkpoints = CheckpointManager(checkpoint_dir, config.checkpoint_every,
                                    fingerprint=run_fingerprint("stage1", build.fingerprint, guidance, config))
    if not resume:
        checkpoints.clear()
    distributed.check_global_batch(config.batch_size, "stage1.training.batch_size")
    cached = CachedLatents(cache.load())
    with GuidedStudent(student, hypernet) as guided:
        def validate() -> float:  # each data-parallel process scores its shard of the rows
            return sharded_score(val_rows, lambda rows: accuracy(
                student, rows, guidance=guided.guidance(), generation=generation))

        objective = stage1_objective(guided, cached, examples, list(build.settings.align_layers), config, generation)
        result = train(hypernet, objective, config, name="stage1", validate=validate,
                       checkpoints=checkpoints, on_validation=on_validation)
    result.model.cpu()
    return result
