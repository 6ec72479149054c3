"""Stage 2: teacher-free refinement from verifier feedback and self-supervision.

No plans and no teacher. Each step samples a group of ``group_size`` replies per training
question from the guided student (at ``rollout_temperature``), scores them with the safe
verifier, and turns the rewards into group-relative advantages. What the policy is depends on
``policy``:

- ``token`` (default): the policy is the guided student itself. A reply's tokens are the actions;
  their log-probabilities given the question and g(q) (one teacher-forced pass with guidance on)
  carry the policy gradient through the injected guidance into the hyper-network, the student
  frozen. GRPO's clipped surrogate with token-level averaging (DAPO / Dr. GRPO,
  :func:`pilot.training.losses.token_policy_loss`), a rollout batch reused for
  ``updates_per_batch`` optimizer steps (its ratio clipped), and a per-token KL to the stage-1
  hyper-network's policy (``kl_weight``). Replies are sampled at ``rollout_temperature`` T, so
  the policy scored is softmax(logits / T), as TRL scores it.
- ``latent``: g is the mean of a Gaussian; a group of vectors is sampled, each decoded once and
  REINFORCE is applied to the vector's log-probability. Kept for the ablation: the reward's
  variance comes mostly from the token sampling, which this log-probability does not explain.

Terms trained (each logged under its name): ``policy``, ``kl``, ``self_supervision`` (language
modelling, with guidance, on the group's own verified-correct replies) and ``anchor`` (squared
distance of g to the frozen stage-1 guidance). Metrics logged beside them, named as in TRL:
``rewards/mean``, ``rewards/std`` (mean within-group std), ``frac_reward_zero_std`` (groups whose
replies all scored the same: no signal), ``kl``, ``clip_ratio``, ``completion_length``,
``entropy``; with dynamic sampling also ``groups_kept`` and ``sampling_rounds``.

Three switches choose what a step learns from: ``dynamic_sampling`` (DAPO) drops all-equal groups
and samples further questions until the batch is full or ``dynamic_sampling_rounds`` are spent;
``policy_groups: greedy_wrong`` keeps only groups whose question the current guidance answers wrong
greedily (validation and test answer greedily, so a step that only sharpens answers greedy decoding
already gets right changes neither; logged: ``greedy_accuracy``, over the questions sampled);
``select_questions`` first scores ``selection_questions`` training questions with stage-1 PILOT
(``selection_samples`` sampled replies each) and trains only on those it answers right sometimes.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from pilot import distributed
from pilot.checkpoint import CheckpointManager, run_fingerprint
from pilot.config import GenerationParams, Stage2Config
from pilot.evaluation import accuracy, answer_and_score
from pilot.guidance import GuidedStudent, HyperNetwork
from pilot.guidance.prefix import PromptCache
from pilot.invariant import repeat_rows
from pilot.models import CausalLM, lm_fingerprint
from pilot.sequences import lengths_to_mask, next_token_loss
from pilot.training.engine import (
    TrainingResult,
    sample_batch,
    sharded_score,
    step_generator,
    step_seed,
    train,
)
from pilot.training.losses import (
    group_advantages,
    reinforce_loss,
    token_kl,
    token_log_probs,
    token_policy_loss,
    zero_variance_fraction,
)

logger = logging.getLogger(__name__)


@dataclass
class Rollouts:
    """One batch of sampled groups: what the ``updates_per_batch`` steps on it share."""

    index: list[int]                  # training rows, one per group
    replies: list[str]                # group-major: group i's replies are i*k .. i*k+k-1
    rewards: torch.Tensor             # (groups, k)
    old_log_probs: torch.Tensor | None = None        # (tokens,) under the policy that sampled them
    reference_log_probs: torch.Tensor | None = None  # (tokens,) under the stage-1 hyper-network
    completion_length: float = 0.0
    metrics: dict[str, float] | None = None
    prompts: PromptCache | None = None               # the questions' keys and values, one row per reply
    correct_tokens: int = 0                          # reply tokens of verified-correct replies (self-supervision's)


def rollout_metrics(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metrics of a (groups, k) reward table."""
    return {"rewards/mean": rewards.mean(), "rewards/std": rewards.std(dim=1, unbiased=False).mean(),
            "frac_reward_zero_std": zero_variance_fraction(rewards)}


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(groups,) mask of the groups whose rewards differ (the others have zero advantage everywhere)."""
    return ~(rewards == rewards[:, :1]).all(dim=1)


def select_training_questions(guided: GuidedStudent, rows: pd.DataFrame, config: Stage2Config,
                              generation: GenerationParams) -> pd.DataFrame:
    """The rows on which the current (stage-1) guidance is right sometimes: ``selection_samples``
    sampled replies each, kept where 0 < accuracy < 1. Scores at most ``selection_questions`` rows
    (0: all), drawn from the run's seed; falls back to those rows if none qualifies."""
    pool = rows
    if config.selection_questions and len(rows) > config.selection_questions:
        pool = rows.sample(n=config.selection_questions, random_state=step_seed(config.seed, 0, stream=3) % 2**32)
    k = config.selection_samples
    repeated = pool.loc[pool.index.repeat(k)]
    vectors = guided.guidance_vectors(pool["question"].tolist()).repeat_interleave(k, dim=0)
    scored = answer_and_score(guided.student, repeated, guidance=guided.guidance(vectors.to(guided.student.device)),
                              generation=generation, temperature=config.rollout_temperature or 1.0,
                              seed=step_seed(config.seed, 0, stream=4), progress="stage2 question selection")
    rate = scored["correct"].to_numpy(dtype=float).reshape(len(pool), k).mean(1)
    keep = (rate > 0) & (rate < 1)
    logger.info("Stage 2 question selection: %d of %d scored questions answered right sometimes by stage 1 "
                "(%d always, %d never)", int(keep.sum()), len(pool), int((rate == 1).sum()), int((rate == 0).sum()))
    if not keep.any():
        logger.warning("Stage 2 question selection kept no question; training on the %d scored ones.", len(pool))
        return pool.reset_index(drop=True)
    return pool[keep].reset_index(drop=True)


class GroupPolicy:
    """Stage 2's learning step (see the module docstring) as its parts, each a method to test or override
    on its own, as TRL's GRPO trainer keeps them:

    - :meth:`sample_groups`: a group of ``group_size`` replies per question, scored by the verifier;
    - :meth:`choose_groups`: which sampled groups a step learns from (dynamic sampling, ``policy_groups``);
    - :meth:`collect`: one batch of rollouts, refilled with further questions where groups are dropped;
    - :meth:`token_terms` and :meth:`latent_terms`: the losses of the ``token`` and ``latent`` policies;
    - :meth:`shard` and :meth:`share`: the one place data-parallel processes split a batch of rollouts and
      weigh their terms so that the summed gradient is the whole batch's.

    It is the engine's :class:`~pilot.training.engine.Objective`: :meth:`step_terms` and :attr:`weights`.
    """

    def __init__(self, guided: GuidedStudent, reference: HyperNetwork, rows: pd.DataFrame, config: Stage2Config,
                 generation: GenerationParams) -> None:
        self.guided, self.reference, self.rows = guided, reference, rows
        self.config, self.generation = config, generation
        self.hypernet, self.device, self.k = guided.hypernet, guided.student.device, config.group_size
        self.questions = rows["question"].tolist()
        self.query_states, query_lengths = guided.query_states(self.questions)
        self.query_mask = lengths_to_mask(query_lengths, self.query_states.shape[1])
        self.clip_high = config.clip_epsilon_high if config.clip_epsilon_high is not None else config.clip_epsilon
        self.temperature = config.rollout_temperature or 1.0   # greedy rollouts (T = 0) are scored at T = 1
        self.weights = {"policy": config.policy_weight, "self_supervision": config.self_supervision_weight,
                        "anchor": config.anchor_weight}
        if config.policy == "token":
            self.weights["kl"] = config.kl_weight
        self._rollouts: dict[int, tuple[Rollouts, Rollouts]] = {}   # the current batch: whole, and this rank's

    # ------------------------------------------------------------------ sampling
    def guidance_of(self, index: list[int], net: HyperNetwork) -> torch.Tensor:
        """``net``'s guidance for training rows ``index``, from the questions' cached states."""
        return net(self.query_states[index].to(self.device), self.query_mask[index].to(self.device))

    def sample_groups(self, index: list[int], vectors: torch.Tensor, step: int, round_: int) -> pd.DataFrame:
        """The groups' replies and scores, group-major (``vectors``: one per reply). With data-parallel
        processes each samples its shard of the groups (its own seed) and every process gets all of them
        back, in order."""
        k, ranks = self.k, distributed.world()
        mine = distributed.shard_positions(len(index), ranks)
        batch_rows = self.rows.iloc[[index[g] for g in mine]]
        repeated = batch_rows.loc[batch_rows.index.repeat(k)]
        vectors = vectors.view(len(index), k, -1)[mine].reshape(len(mine) * k, -1)
        scored = answer_and_score(self.guided.student, repeated, guidance=self.guided.guidance(vectors),
                                  generation=self.generation, temperature=self.config.rollout_temperature,
                                  seed=step_seed(self.config.seed, step, stream=1 + 10 * round_) + 7919 * ranks.rank)
        if not ranks.parallel:
            return scored
        columns = ["reply", "correct", "new_tokens"]
        parts = distributed.all_gather_objects(scored[columns].to_dict("list"))
        groups: list[dict] = [{}] * len(index)
        for rank, part in enumerate(parts):
            for local, g in enumerate(distributed.shard_positions(len(index), distributed.World(rank, ranks.size))):
                groups[g] = {c: part[c][local * k:(local + 1) * k] for c in columns}
        return pd.DataFrame({c: [value for group in groups for value in group[c]] for c in columns})

    def greedy_correct(self, index: list[int], vectors: torch.Tensor) -> torch.Tensor:
        """(groups,) whether the guidance answers each group's question right greedily (every
        data-parallel process gets all of them)."""
        scored = answer_and_score(self.guided.student, self.rows.iloc[index], guidance=self.guided.guidance(vectors),
                                  generation=self.generation, spread=True)
        return torch.tensor(scored["correct"].to_numpy(dtype=bool))

    def rewards_of(self, scored: pd.DataFrame, groups: int) -> torch.Tensor:
        """(groups, k) rewards of group-major scored replies."""
        return torch.tensor(scored["correct"].to_numpy(dtype=float), dtype=torch.float32).view(groups, self.k)

    def choose_groups(self, rewards: torch.Tensor, greedy_right: torch.Tensor | None) -> torch.Tensor:
        """(groups,) mask of the sampled groups a step learns from: with dynamic sampling those whose
        rewards differ; with ``policy_groups: greedy_wrong`` those whose question the guidance answers
        wrong greedily (``greedy_right``); every group otherwise."""
        keep = (informative_groups(rewards) if self.config.dynamic_sampling
                else torch.ones(len(rewards), dtype=torch.bool))
        if greedy_right is not None:
            keep &= ~greedy_right
        return keep

    def collect(self, step: int) -> Rollouts:
        """Sample and score this batch's groups; keep the chosen ones, drawing further questions for the
        dropped ones for up to ``dynamic_sampling_rounds`` rounds."""
        config, k, rows = self.config, self.k, self.rows
        index = sample_batch(len(rows), config.batch_size, config.seed, step)
        kept_index, kept_replies, kept_rewards, seen_rewards, lengths, greedy_seen = [], [], [], [], [], []
        rounds = config.dynamic_sampling_rounds if config.dynamic_sampling else 1
        draw = random.Random(step_seed(config.seed, step, stream=2))
        for round_ in range(rounds):
            with torch.no_grad():
                vectors = self.guidance_of(index, self.hypernet)
            scored = self.sample_groups(index, vectors.repeat_interleave(k, dim=0), step, round_)
            rewards = self.rewards_of(scored, len(index))
            seen_rewards.append(rewards)
            lengths.extend(scored["new_tokens"].tolist())
            greedy_right = None
            if config.policy_groups == "greedy_wrong":
                greedy_right = self.greedy_correct(index, vectors)
                greedy_seen.append(greedy_right)
            replies = scored["reply"].tolist()
            for g in torch.nonzero(self.choose_groups(rewards, greedy_right)).flatten().tolist():
                if len(kept_index) == config.batch_size:
                    break
                kept_index.append(index[g])
                kept_replies.extend(replies[g * k:(g + 1) * k])
                kept_rewards.append(rewards[g])
            if len(kept_index) == config.batch_size:
                break
            index = draw.sample(range(len(rows)), min(config.batch_size, len(rows)))
        seen = torch.cat(seen_rewards)
        metrics = {name: float(value) for name, value in rollout_metrics(seen).items()}
        metrics["completion_length"] = float(sum(lengths) / max(len(lengths), 1))
        if config.dynamic_sampling:
            metrics.update(groups_kept=float(len(kept_index)), sampling_rounds=float(len(seen_rewards)))
        if greedy_seen:
            metrics["greedy_accuracy"] = float(torch.cat(greedy_seen).float().mean())
        rewards = torch.stack(kept_rewards) if kept_rewards else torch.zeros((0, k))
        return Rollouts(kept_index, kept_replies, rewards.to(self.device), metrics=metrics)

    # ------------------------------------------------------------------ losses
    def token_terms(self, rollouts: Rollouts, first_update: bool) -> dict[str, torch.Tensor]:
        """The token policy's terms on ``rollouts``: the clipped surrogate, the KL to the stage-1
        policy, self-supervision on the verified-correct replies, the anchor and the entropy. The first
        update on a batch records the sampling policy's and the reference's log-probabilities."""
        config, k, guided = self.config, self.k, self.guided
        index, groups = rollouts.index, len(rollouts.index)
        means = self.guidance_of(index, self.hypernet)
        terms: dict[str, torch.Tensor] = {
            "anchor": (means - self.guidance_of(index, self.reference).detach()).pow(2).mean()}
        questions = [self.questions[i] for i in index for _ in range(k)]
        if rollouts.prompts is None:   # read each prompt once per batch of rollouts; only the replies run after
            rollouts.prompts = guided.prompt_cache([self.questions[i] for i in index]).repeat_interleave(k)
        batch, logits, _ = guided.teacher_forced_after_prompt(rollouts.prompts, questions, rollouts.replies,
                                                              repeat_rows(means, k))
        targets = batch.next_tokens()
        # The sampling policy is softmax(logits / T) (as TRL scores it); self-supervision is plain LM at T = 1.
        log_probs, entropy = token_log_probs(logits / self.temperature, targets)
        token_rows = torch.nonzero(batch.predicting_positions())[:, 0]
        if first_update:   # the policy that sampled them is this one: ratio 1 (TRL's num_iterations=1)
            rollouts.old_log_probs = log_probs.detach()
            with torch.no_grad():
                _, reference_logits, _ = guided.teacher_forced_after_prompt(
                    rollouts.prompts, questions, rollouts.replies,
                    repeat_rows(self.guidance_of(index, self.reference), k))
                rollouts.reference_log_probs, _ = token_log_probs(reference_logits / self.temperature, targets)
        advantages = group_advantages(rollouts.rewards, scale=config.scale_rewards).reshape(-1)
        terms["policy"], terms["clip_ratio"] = token_policy_loss(
            log_probs, rollouts.old_log_probs, advantages, token_rows, groups * k, config.clip_epsilon, self.clip_high,
            config.loss_type, self.generation.max_new_tokens + 1)
        terms["kl"] = token_kl(log_probs, rollouts.reference_log_probs)
        correct = (rollouts.rewards.reshape(-1) == 1.0)[token_rows]
        rollouts.correct_tokens = int(correct.sum())
        if bool(correct.any()):
            terms["self_supervision"] = -token_log_probs(logits[correct], targets[correct])[0].mean()
        else:
            terms["self_supervision"] = log_probs.sum() * 0
        terms["entropy"] = entropy.mean()
        return terms

    def latent_terms(self, step: int) -> dict[str, torch.Tensor]:
        """The latent policy's terms: REINFORCE on sampled guidance vectors, self-supervision and the anchor."""
        config, k, device = self.config, self.k, self.device
        index = sample_batch(len(self.rows), config.batch_size, config.seed, step)
        batch_rows = self.rows.iloc[index]
        means = self.guidance_of(index, self.hypernet)
        actions, log_prob = self.hypernet.sample(means, k, generator=step_generator(config.seed, step))
        scored = self.sample_groups(index, actions, step, 0)
        rewards = self.rewards_of(scored, len(index)).to(device)
        terms = {"policy": reinforce_loss(group_advantages(rewards, scale=config.scale_rewards), log_prob)}
        correct = rewards.reshape(-1) == 1.0
        if bool(correct.any()):
            owner = torch.arange(len(index), device=device).repeat_interleave(k)[correct]
            questions = batch_rows["question"].iloc[owner.tolist()].tolist()
            answers = scored["reply"][correct.cpu().numpy()].tolist()  # the whole reply, reasoning included
            batch, logits, _ = self.guided.teacher_forced(questions, answers, repeat_rows(means, k)[correct], [])
            terms["self_supervision"] = next_token_loss(logits, batch)
        else:
            terms["self_supervision"] = torch.zeros((), device=device)
        terms["anchor"] = (means - self.guidance_of(index, self.reference).detach()).pow(2).mean()
        terms.update(rollout_metrics(rewards))
        terms["completion_length"] = torch.tensor(float(scored["new_tokens"].mean()))
        # every data-parallel process computed the whole batch's terms (the rollouts are gathered): 1/N each
        return {name: value / distributed.world().size for name, value in terms.items()}

    # ------------------------------------------------------------------ data-parallel processes
    def shard(self, whole: Rollouts) -> Rollouts:
        """This process's groups of a batch of rollouts (all of them in one process)."""
        if not distributed.world().parallel:
            return whole
        k, mine = self.k, distributed.shard_positions(len(whole.index))
        return Rollouts([whole.index[g] for g in mine], [r for g in mine for r in whole.replies[g * k:(g + 1) * k]],
                        whole.rewards[mine], metrics=whole.metrics)

    def share(self, terms: dict[str, torch.Tensor], mine: Rollouts, whole: Rollouts) -> dict[str, torch.Tensor]:
        """This process's token terms (means over its groups' tokens or replies) as shares of the whole
        batch's, so the processes' summed gradients are the whole batch's: token means weighted by token
        counts (``self_supervision``'s by the tokens of correct replies), per-reply and per-group means by
        counts of replies. Collective: every process calls it, one without groups with zero terms."""
        tokens = float(mine.old_log_probs.numel()) if mine.index else 0.0
        correct = float(mine.correct_tokens) if mine.index else 0.0
        all_tokens, all_correct = distributed.global_count(tokens), distributed.global_count(correct)
        by_reply = len(mine.index) / max(len(whole.index), 1)
        by_token = tokens / max(all_tokens, 1.0)
        weight = {"anchor": by_reply, "kl": by_token, "entropy": by_token, "clip_ratio": by_token,
                  "policy": by_token if self.config.loss_type == "dapo" else by_reply,
                  "self_supervision": correct / all_correct if all_correct else 0.0}
        return {name: value * weight.get(name, 1 / distributed.world().size) for name, value in terms.items()}

    # ------------------------------------------------------------------ the engine's objective
    def step_terms(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """One step's terms: a new batch of rollouts every ``updates_per_batch`` steps (and after a resume)."""
        config = self.config
        if config.policy == "latent":
            yield self.latent_terms(step)
            return
        block = step // config.updates_per_batch
        first_update = block not in self._rollouts
        if first_update:
            self._rollouts.clear()
            whole = self.collect(block)
            self._rollouts[block] = (whole, self.shard(whole))
        rollouts, mine = self._rollouts[block]
        ranks = distributed.world()
        # every process holds the whole batch's metrics: each logs its 1/N of them (the engine sums)
        metrics = {name: torch.tensor(value / ranks.size) for name, value in rollouts.metrics.items()}
        if not mine.index:   # dynamic sampling found no group that disagrees (or none is this process's)
            means = self.guidance_of(sample_batch(len(self.rows), config.batch_size, config.seed, step), self.hypernet)
            zero = means[:1].sum() * 0   # 0, connected to the graph (one row: its bits never follow the threads)
            if ranks.parallel and rollouts.index:   # other processes have groups: share this one's zero counts
                self.share({}, mine, rollouts)
            yield {"policy": zero, "kl": zero, "self_supervision": zero, "anchor": zero,
                   "clip_ratio": torch.zeros(()), **({"entropy": torch.zeros(())} if rollouts.index else {}),
                   **metrics}
            return
        terms = self.token_terms(mine, first_update)
        if ranks.parallel:
            terms = self.share(terms, mine, rollouts)
        yield {**terms, **metrics}


def run_stage2(student: CausalLM, hypernet_stage1: HyperNetwork, train_rows: pd.DataFrame, val_rows: pd.DataFrame,
               config: Stage2Config, generation: GenerationParams, checkpoint_dir: str | None = None,
               resume: bool = True, on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Stage 2 end to end: check the stage-1 hyper-network fits the student, then refine a copy.

    The result's model is the refined hyper-network of the best validation step (step 0 is the
    stage-1 hyper-network unchanged).
    """
    hypernet_stage1.config.check_fits(student.hidden_size, student.num_layers, where="from stage 1")
    distributed.check_global_batch(config.batch_size, "stage2.training.batch_size")
    hypernet = copy.deepcopy(hypernet_stage1).to(student.device)
    reference = copy.deepcopy(hypernet).eval().requires_grad_(False)
    rows = train_rows.reset_index(drop=True)
    fingerprint = run_fingerprint("stage2", lm_fingerprint(student), hypernet.fingerprint(), rows["id"].tolist(),
                                  config)
    checkpoints = CheckpointManager(checkpoint_dir, config.checkpoint_every, fingerprint=fingerprint)
    if not resume:
        checkpoints.clear()
    with GuidedStudent(student, hypernet) as guided:
        def validate() -> float:  # each data-parallel process scores its shard of the rows
            return sharded_score(val_rows, lambda shard: accuracy(
                student, shard, guidance=guided.guidance(), generation=generation))

        if config.select_questions:
            hypernet.eval()
            rows = select_training_questions(guided, rows, config, generation)
        objective = GroupPolicy(guided, reference, rows, config, generation)
        result = train(hypernet, objective, config, name="stage2", validate=validate, checkpoints=checkpoints,
                       saved_with_model={"reference": reference}, on_validation=on_validation)
    result.model.cpu()
    return result
