"""Next-token training: the embedded default student and teacher (``base`` pipeline), and the
adapter baselines (LoRA, ReFT, pause tokens, soft thoughts), which all train through
:func:`answer_loss_terms` on question -> answer.

The teacher learns question -> plan -> answer. The student learns question -> answer and
question + plan -> answer: the capability a plan unlocks, which PILOT later internalises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from pilot import distributed
from pilot.config import AdaptParams, LMTrainConfig
from pilot.models import CausalLM, decoder_layers
from pilot.prompts import TOY, PromptFormat, prompt_format
from pilot.sequences import encode_pairs, labelled_logits, next_token_loss
from pilot.tasks import reply_targets
from pilot.training.engine import Objective, TrainingResult, sample_batch, train

logger = logging.getLogger(__name__)


def student_examples(rows: Sequence[dict], plan_loss: bool = True, fmt: PromptFormat = TOY,
                     without_plan: bool = True) -> list[tuple[str, str]]:
    """Each question twice: answered without its plan, and answered with the plan in context
    (only the latter with ``without_plan`` false).

    With ``plan_loss`` the plan-conditioned copy is trained on the whole transcript (plan line
    and answer), which teaches the small student the step arithmetic plans are written in;
    without it only the answer tokens carry loss.
    """
    examples = []
    for row in rows:
        target = fmt.answer_target(row.get("solution") or row["answer"])
        if without_plan:
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


def answer_examples(tokenizer: PreTrainedTokenizerBase, rows: pd.DataFrame) -> list[tuple[str, str]]:
    """Question -> answer in the student's format: what every adapter baseline trains on."""
    fmt = prompt_format(tokenizer)
    return [(fmt.answer_prompt(q), fmt.answer_target(a)) for q, a in zip(rows["question"], reply_targets(rows))]


def answer_loss_terms(lm: CausalLM, examples: list[tuple[str, str]], config: LMTrainConfig, *,
                      placeholders: dict[str, Sequence[int]] | None = None,
                      around: Callable[[list[int]], AbstractContextManager] | None = None,
                      ) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """A step's ``lm`` term: the mean next-token loss on the targets of a batch of ``examples``.

    One micro-batch per length bucket: the same gradient as one padded pass (each bucket's summed
    loss over the whole batch's target count), with less compute spent on padding (profiling
    showed matmuls over padding took ~45 % of a step). With ``config.share_prefix`` the tokens every
    row of a micro-batch starts with run once (:func:`pilot.sequences.labelled_logits`).
    ``placeholders`` (``{"prefix": ids}`` or ``{"suffix": ids}``) go around every prompt (soft
    tokens'); ``around(example_indices)`` opens a context for each micro-batch's forward pass (soft
    tokens fill their slots for exactly those examples). With data-parallel
    processes each encodes and runs only its shard of the batch, divided by the whole batch's target
    count, so the ranks' terms sum to the one-process term (:mod:`pilot.distributed`).
    """
    max_length = getattr(lm.model.config, "max_position_embeddings", None)

    def step_terms(step: int) -> Iterator[dict[str, torch.Tensor]]:
        batch_ids = distributed.shard(sample_batch(len(examples), config.batch_size, config.seed, step))
        prompts, targets = zip(*(examples[i] for i in batch_ids))
        around_prompt = {f"prompt_{where}": ids for where, ids in (placeholders or {}).items()}
        batch = encode_pairs(lm.tokenizer, prompts, targets, max_length=max_length, **around_prompt)
        num_targets = max(distributed.global_count(batch.num_targets()), 1.0)
        for part in batch.length_buckets(config.length_buckets):
            members = [batch_ids[row] for row in part.rows.tolist()]
            part = part.to(lm.device)
            with around(members) if around is not None else nullcontext():
                logits = labelled_logits(lm.model, part, share_prefix=config.share_prefix)
                loss = next_token_loss(logits, part, reduction="sum") / num_targets
            yield {"lm": loss}

    return step_terms


def train_causal_lm(lm: CausalLM, examples: list[tuple[str, str]], config: LMTrainConfig, name: str,
                    validate: Callable[[], float] | None = None,
                    on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Next-token training (``lm``) on the targets of ``examples``.

    Trains every parameter of ``lm.model`` that requires gradients: the whole model for the
    embedded base models, only the adapter for LoRA. With ``validate`` the weights of the best
    validation step (every ``config.eval_every`` steps, step 0 included) are selected, as for PILOT.
    """
    return train(lm.model, Objective(answer_loss_terms(lm, examples, config), weights={"lm": 1.0}),
                 config, name=f"train {name}", validate=validate, on_validation=on_validation)


def adapt(lm: CausalLM, tasks_train: pd.DataFrame, config: AdaptParams, role: str) -> list[dict]:
    """Warm-start a pretrained model on the task format: each training question answered without its
    plan (unless ``config.without_plan`` is false) and with it in context, in the model's own prompt
    format; only the top ``train_layers`` decoder blocks (and the final norm) learn, the embeddings and
    lower blocks stay as pretrained."""
    rows = tasks_train[tasks_train["oracle_plan"] != ""].to_dict("records")
    if not rows:
        raise ValueError("Adapting a pretrained student needs training rows with oracle plans; its tasks have none.")
    layers = decoder_layers(lm.model)
    trainable = layers if config.train_layers is None else layers[-config.train_layers:]
    for parameter in lm.model.parameters():
        parameter.requires_grad_(False)
    for module in [*trainable, getattr(getattr(lm.model, "model", lm.model), "norm", None)]:
        if module is not None:
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    logger.info("Adapting the %s: top %s of %d blocks learn, %d steps, %s", role, config.train_layers or "all",
                len(layers), config.steps, "with and without plans" if config.without_plan else "with plans only")
    examples = student_examples(rows, plan_loss=False, fmt=prompt_format(lm.tokenizer), without_plan=config.without_plan)
    history = train_causal_lm(lm, examples, config, f"adapt {role}").history
    for parameter in lm.model.parameters():
        parameter.requires_grad_(True)
    lm.model.eval()
    return history
