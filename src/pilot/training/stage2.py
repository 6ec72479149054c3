"""Stage 2: teacher-free refinement from verifier feedback and self-supervision.

No plans and no teacher. For each query the hyper-network's guidance g is the mean of a
Gaussian policy; a group of vectors is sampled, each decoded (sampled at ``rollout_temperature``,
so a group's replies can differ) and scored by the safe verifier.
Three terms (:mod:`pilot.training.losses`), each logged under its name, plus ``reward`` (mean
verifier reward of the sampled answers) and ``zero_variance_groups`` (the fraction of groups whose
answers all scored the same: they give the policy term no signal):

- ``policy``: GRPO-style policy gradient with group-relative advantages
  (reward - group mean) / (group std + eps);
- ``self_supervision``: language modelling, with guidance g, on the group's own
  verified-correct answers;
- ``anchor``: mean squared distance between g and the frozen stage-1 hyper-network's
  guidance, keeping the refinement near the stage-1 solution.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pandas as pd
import torch

from pilot.checkpoint import CheckpointManager, run_fingerprint
from pilot.config import GenerationParams, Stage2Config
from pilot.evaluation import accuracy, answer_and_score
from pilot.guidance import GuidedStudent, HyperNetwork
from pilot.models import CausalLM, lm_fingerprint
from pilot.sequences import lengths_to_mask, next_token_loss
from pilot.training.engine import LoopSettings, Objective, TrainingResult, sample_batch, step_generator, step_seed, train
from pilot.training.losses import group_advantages, reinforce_loss, zero_variance_fraction


def stage2_objective(guided: GuidedStudent, reference: HyperNetwork, rows: pd.DataFrame, config: Stage2Config,
                     generation: GenerationParams) -> Objective:
    """Stage 2's terms for one step: a batch of training questions, a group of sampled guidance
    vectors per question, verifier rewards, and the three terms."""
    hypernet, device, k = guided.hypernet, guided.student.device, config.group_size
    query_states, query_lengths = guided.query_states(rows["question"].tolist())
    query_mask = lengths_to_mask(query_lengths, query_states.shape[1])

    def step_terms(step: int) -> Iterator[dict[str, torch.Tensor]]:
        index = sample_batch(len(rows), config.batch_size, config.seed, step)
        batch_rows = rows.iloc[index]
        states, mask = query_states[index].to(device), query_mask[index].to(device)
        means = hypernet(states, mask)
        with torch.no_grad():
            anchor_means = reference(states, mask)
        actions, log_prob = hypernet.sample(means, k, generator=step_generator(config.seed, step))
        repeated = batch_rows.loc[batch_rows.index.repeat(k)]
        scored = answer_and_score(guided.student, repeated, guidance=guided.guidance(actions),
                                  max_new_tokens=generation.max_new_tokens, batch_size=len(repeated),
                                  stop_strings=generation.stop, temperature=config.rollout_temperature,
                                  seed=step_seed(config.seed, step, stream=1))
        rewards = torch.tensor(scored["correct"].to_numpy(dtype=float), device=device,
                               dtype=torch.float32).view(len(index), k)
        terms = {"policy": reinforce_loss(group_advantages(rewards), log_prob)}

        correct = rewards.reshape(-1) == 1.0
        if bool(correct.any()):
            owner = torch.arange(len(index), device=device).repeat_interleave(k)[correct]
            questions = batch_rows["question"].iloc[owner.tolist()].tolist()
            answers = scored["reply"][correct.cpu().numpy()].tolist()  # the whole reply, reasoning included
            batch, logits, _ = guided.teacher_forced(questions, answers, means[owner], [])
            terms["self_supervision"] = next_token_loss(logits, batch)
        else:
            terms["self_supervision"] = torch.zeros((), device=device)
        terms["anchor"] = (means - anchor_means).pow(2).mean()
        terms["reward"] = rewards.mean()
        terms["zero_variance_groups"] = zero_variance_fraction(rewards)
        yield terms

    return Objective(step_terms, weights={"policy": config.policy_weight,
                                          "self_supervision": config.self_supervision_weight,
                                          "anchor": config.anchor_weight})


def run_stage2(student: CausalLM, hypernet_stage1: HyperNetwork, train_rows: pd.DataFrame, val_rows: pd.DataFrame,
               config: Stage2Config, generation: GenerationParams, checkpoint_dir: str | None = None,
               resume: bool = True, on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Stage 2 end to end: check the stage-1 hyper-network fits the student, then refine a copy.

    The result's model is the refined hyper-network of the best validation step (step 0 is the
    stage-1 hyper-network unchanged).
    """
    hypernet_stage1.config.check_fits(student.hidden_size, student.num_layers, where="from stage 1")
    hypernet = copy.deepcopy(hypernet_stage1).to(student.device)
    reference = copy.deepcopy(hypernet).eval().requires_grad_(False)
    rows = train_rows.reset_index(drop=True)
    fingerprint = run_fingerprint("stage2", lm_fingerprint(student), hypernet.fingerprint(), rows["id"].tolist(),
                                  config)
    checkpoints = CheckpointManager(checkpoint_dir, config.checkpoint_every, fingerprint=fingerprint)
    if not resume:
        checkpoints.clear()
    loop = LoopSettings(steps=config.steps, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                        weight_decay=0.0, seed=config.seed, eval_every=config.eval_every,
                        grad_norm_every=config.grad_norm_every)
    with GuidedStudent(student, hypernet) as guided:
        def validate() -> float:
            return accuracy(student, val_rows, guidance=guided.guidance(), max_new_tokens=generation.max_new_tokens,
                            batch_size=generation.batch_size, stop_strings=generation.stop)

        objective = stage2_objective(guided, reference, rows, config, generation)
        result = train(hypernet, objective, loop, name="stage2", validate=validate, checkpoints=checkpoints,
                       saved_with_model={"reference": reference}, on_validation=on_validation)
    result.model.cpu()
    return result
