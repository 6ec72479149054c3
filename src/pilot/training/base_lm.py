"""Training the embedded default student and teacher from scratch (the ``base`` pipeline).

The teacher learns question -> plan -> answer. The student learns question -> answer and
question + plan -> answer: the capability a plan unlocks, which PILOT later internalises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pilot.config import LMTrainConfig
from pilot.models import CausalLM
from pilot.prompts import answer_prompt, continuation, plan_prompt
from pilot.sequences import encode_pairs, shift_labels_loss
from pilot.training.common import (
    ProgressLog,
    check_finite,
    learning_rate,
    sample_batch,
    set_learning_rate,
    set_seed,
)


def student_examples(rows: Sequence[dict], plan_loss: bool = True) -> list[tuple[str, str]]:
    """Each question twice: answered without its plan, and answered with the plan in context.

    With ``plan_loss`` the plan-conditioned copy is trained on the whole transcript (plan line
    and answer), which teaches the small student the step arithmetic plans are written in;
    without it only the answer tokens carry loss.
    """
    examples = []
    for row in rows:
        examples.append((answer_prompt(row["question"]), continuation(row["answer"])))
        if plan_loss:
            examples.append(teacher_examples([row])[0])
        else:
            examples.append((answer_prompt(row["question"], row["oracle_plan"]), continuation(row["answer"])))
    return examples


def teacher_examples(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """Question -> plan, then the answer on the next line."""
    return [
        (plan_prompt(row["question"]), continuation(f"{row['oracle_plan']}\nA: {row['answer']}"))
        for row in rows
    ]


def train_causal_lm(lm: CausalLM, examples: list[tuple[str, str]], config: LMTrainConfig,
                    name: str) -> list[dict[str, float]]:
    """Next-token training on the targets of ``examples``; returns the per-step loss history."""
    set_seed(config.seed)
    model = lm.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.98))
    log = ProgressLog(f"train {name}", config.steps)
    max_length = getattr(model.config, "max_position_embeddings", None)
    for step in range(config.steps):
        batch_ids = sample_batch(len(examples), config.batch_size, config.seed, step)
        prompts, targets = zip(*(examples[i] for i in batch_ids))
        batch = encode_pairs(lm.tokenizer, prompts, targets, max_length=max_length)
        set_learning_rate(optimizer, learning_rate(step, config.steps, config.learning_rate, config.warmup_steps))
        # The batch's mean token loss, accumulated over length buckets: the same gradient as one
        # padded pass (each bucket's summed loss over the whole batch's target count), with less
        # compute spent on padding (profiling showed matmuls over padding took ~45 % of a step).
        num_targets, loss = batch.num_targets(), 0.0
        for part in batch.length_buckets(config.length_buckets):
            part = part.to(lm.device)
            logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits
            part_loss = shift_labels_loss(logits, part.labels, reduction="sum") / num_targets
            part_loss.backward()
            loss = loss + part_loss.detach()
        check_finite({"lm": loss}, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.log(step, {"loss": loss.item()})
    log.close()
    model.eval()
    return log.history
