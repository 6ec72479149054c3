"""Stage 2: teacher-free refinement from verifier feedback and self-supervision.

No plans and no teacher. For each query the hyper-network's guidance g is the mean of a
Gaussian policy; a group of vectors is sampled, each decoded and scored by the safe verifier.
Three terms, each logged under its name:

- ``policy``: GRPO-style policy gradient with group-relative advantages
  (reward - group mean) / (group std + eps);
- ``self_supervision``: language modelling, with guidance g, on the group's own
  verified-correct answers;
- ``anchor``: mean squared distance between g and the frozen stage-1 hyper-network's
  guidance, keeping the refinement near the stage-1 solution.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pandas as pd
import torch

from pilot.checkpoint import CheckpointManager
from pilot.config import GenerationParams, Stage2Config
from pilot.evaluation import accuracy
from pilot.guidance import HyperNetwork
from pilot.models import CausalLM, lm_fingerprint
from pilot.sequences import shift_labels_loss
from pilot.training.common import (
    ProgressLog,
    check_finite,
    learning_rate,
    sample_batch,
    set_learning_rate,
    set_seed,
    step_generator,
)
from pilot.latents import lengths_to_mask
from pilot.training.stage1 import GuidedStudent, TrainingResult, run_fingerprint


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each sample's reward relative to its group (a row), scaled by the group's spread."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def train_stage2(
    student: CausalLM,
    hypernet: HyperNetwork,
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    config: Stage2Config,
    generation: GenerationParams,
    checkpoints: CheckpointManager | None = None,
    on_validation: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Refine ``hypernet`` (initialised from stage 1) on ``train_rows`` without plans."""
    set_seed(config.seed)
    device = student.device
    hypernet.to(device)
    checkpoints = checkpoints or CheckpointManager(None, 0)
    reference = copy.deepcopy(hypernet).eval().requires_grad_(False)
    best = copy.deepcopy(hypernet)
    guided = GuidedStudent(student, hypernet)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    start_step, history, validation = 0, [], []
    best_state = {"step": -1, "accuracy": -1.0}
    restored = checkpoints.restore({"hypernet": hypernet, "best": best, "reference": reference}, optimizer) \
        if checkpoints.enabled else None
    if restored is not None:
        start_step, history = restored.step, restored.history
        validation, best_state = restored.extra["validation"], restored.extra["best"]

    rows = train_rows.reset_index(drop=True)
    query_states, query_lengths = guided.query_states(rows["question"].tolist())
    query_mask_all = lengths_to_mask(query_lengths, query_states.shape[1])
    log = ProgressLog("stage2", config.steps, start_step, history)

    def validate(step: int) -> None:
        hypernet.eval()
        value = accuracy(student, val_rows, guidance=guided.guidance(), max_new_tokens=generation.max_new_tokens,
                         batch_size=generation.batch_size)
        hypernet.train()
        validation.append({"step": step, "val_accuracy": value})
        if value > best_state["accuracy"]:
            best_state.update(step=step, accuracy=value)
            best.load_state_dict(hypernet.state_dict())
        if on_validation is not None:
            on_validation(step, value)

    if start_step == 0:
        validate(0)
    hypernet.train()
    k = config.group_size
    for step in range(start_step, config.steps):
        index = sample_batch(len(rows), config.batch_size, config.seed, step)
        batch_rows = rows.iloc[index]
        batch_states, batch_mask = query_states[index].to(device), query_mask_all[index].to(device)
        means = hypernet(batch_states, batch_mask)
        with torch.no_grad():
            anchor_means = reference(batch_states, batch_mask)
        actions, log_prob = hypernet.sample(means, k, generator=step_generator(config.seed, step))
        rewards, sampled_answers = guided.sample_and_score(batch_rows, actions, k, generation.max_new_tokens)
        advantages = group_advantages(rewards)
        terms = {"policy": -(advantages.reshape(-1) * log_prob).mean()}

        correct = rewards.reshape(-1) == 1.0
        if bool(correct.any()):
            owner = torch.arange(len(index), device=device).repeat_interleave(k)[correct]
            questions = batch_rows["question"].iloc[owner.tolist()].tolist()
            answers = [a for a, ok in zip(sampled_answers, correct.tolist()) if ok]
            batch, logits, _ = guided.teacher_forced(questions, answers, means[owner], [])
            terms["self_supervision"] = shift_labels_loss(logits, batch.labels)
        else:
            terms["self_supervision"] = torch.zeros((), device=device)
        terms["anchor"] = (means - anchor_means).pow(2).mean()
        total = (config.policy_weight * terms["policy"]
                 + config.self_supervision_weight * terms["self_supervision"]
                 + config.anchor_weight * terms["anchor"])
        terms["total"] = total
        terms["reward"] = rewards.mean()
        check_finite(terms, step)

        set_learning_rate(optimizer, learning_rate(step, config.steps, config.learning_rate, config.warmup_steps))
        total.backward()
        torch.nn.utils.clip_grad_norm_(hypernet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.log(step + 1, {name: float(value.detach() if torch.is_tensor(value) else value) for name, value in terms.items()})

        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            validate(done)
        if checkpoints.due(done) or (checkpoints.enabled and done == config.steps):
            checkpoints.save(done, {"hypernet": hypernet, "best": best, "reference": reference}, optimizer,
                             log.history, {"validation": validation, "best": best_state})
    seconds = log.close(f"best val accuracy {best_state['accuracy']:.3f} at step {best_state['step']}")
    guided.remove()
    best.eval()
    return TrainingResult(best.cpu(), log.history, validation, best_state["step"], best_state["accuracy"], seconds)


def run_stage2(student: CausalLM, hypernet_stage1: HyperNetwork, train_rows: pd.DataFrame, val_rows: pd.DataFrame,
               config: Stage2Config, generation: GenerationParams, checkpoint_dir: str | None = None,
               resume: bool = True, on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Stage 2 end to end: check the stage-1 hyper-network fits the student, then refine a copy."""
    hypernet_stage1.config.check_fits(student.hidden_size, student.num_layers, where="from stage 1")
    hypernet = copy.deepcopy(hypernet_stage1)
    fingerprint = run_fingerprint(lm_fingerprint(student), hypernet.fingerprint(), train_rows["id"].tolist(), config)
    checkpoints = CheckpointManager(checkpoint_dir, config.checkpoint_every, fingerprint=fingerprint)
    if not resume:
        checkpoints.clear()
    return train_stage2(student, hypernet, train_rows, val_rows, config, generation, checkpoints, on_validation)
