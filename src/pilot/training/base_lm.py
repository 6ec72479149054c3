"""Next-token training: the embedded default student and teacher (``base`` pipeline), and LoRA.

The teacher learns question -> plan -> answer. The student learns question -> answer and
question + plan -> answer: the capability a plan unlocks, which PILOT later internalises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from pilot.config import LMTrainConfig
from pilot.models import CausalLM
from pilot.prompts import TOY, PromptFormat
from pilot.sequences import encode_pairs, labelled_logits, next_token_loss
from pilot.training.engine import LoopSettings, Objective, TrainingResult, sample_batch, train


def student_examples(rows: Sequence[dict], plan_loss: bool = True, fmt: PromptFormat = TOY) -> list[tuple[str, str]]:
    """Each question twice: answered without its plan, and answered with the plan in context.

    With ``plan_loss`` the plan-conditioned copy is trained on the whole transcript (plan line
    and answer), which teaches the small student the step arithmetic plans are written in;
    without it only the answer tokens carry loss.
    """
    examples = []
    for row in rows:
        target = fmt.answer_target(row.get("solution") or row["answer"])
        examples.append((fmt.answer_prompt(row["question"]), target))
        if plan_loss:
            examples.append(teacher_examples([row], fmt)[0])
        else:
            examples.append((fmt.answer_prompt(row["question"], row["oracle_plan"]), target))
    return examples


def teacher_examples(rows: Sequence[dict], fmt: PromptFormat = TOY) -> list[tuple[str, str]]:
    """Question -> plan (then, in the toy format, the answer on the next line)."""
    return [(fmt.plan_prompt(row["question"]), fmt.plan_transcript(row["oracle_plan"], row["answer"]))
            for row in rows]


def train_causal_lm(lm: CausalLM, examples: list[tuple[str, str]], config: LMTrainConfig, name: str,
                    validate: Callable[[], float] | None = None, eval_every: int = 0,
                    on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Next-token training (``lm``) on the targets of ``examples``.

    Trains every parameter of ``lm.model`` that requires gradients: the whole model for the
    embedded base models, only the adapter for LoRA. With ``validate`` the weights of the best
    validation step (every ``eval_every`` steps, step 0 included) are selected, as for PILOT.
    """
    max_length = getattr(lm.model.config, "max_position_embeddings", None)

    def step_terms(step: int) -> Iterator[dict[str, torch.Tensor]]:
        batch_ids = sample_batch(len(examples), config.batch_size, config.seed, step)
        prompts, targets = zip(*(examples[i] for i in batch_ids))
        batch = encode_pairs(lm.tokenizer, prompts, targets, max_length=max_length)
        # The batch's mean token loss, one micro-batch per length bucket: the same gradient as one
        # padded pass (each bucket's summed loss over the whole batch's target count), with less
        # compute spent on padding (profiling showed matmuls over padding took ~45 % of a step).
        num_targets = batch.num_targets()
        for part in batch.length_buckets(config.length_buckets):
            part = part.to(lm.device)
            yield {"lm": next_token_loss(labelled_logits(lm.model, part), part, reduction="sum") / num_targets}

    loop = LoopSettings(steps=config.steps, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                        weight_decay=config.weight_decay, seed=config.seed, betas=(0.9, 0.98), eval_every=eval_every)
    return train(lm.model, Objective(step_terms, weights={"lm": 1.0}), loop, name=f"train {name}", validate=validate,
                 on_validation=on_validation)
