"""Tokenising prompt + target pairs into padded tensors, the same way for every trainer.

Position conventions used across stage 1, stage 2, baselines and the latent cache: the
*answer positions* of a row are the positions whose next-token prediction is a target token,
i.e. from the last prompt token to the token before the final target token. Guidance is
injected at exactly these positions, so training matches generation (which injects from the
last prompt token onward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass
class TokenBatch:
    """A right-padded batch of prompt + target sequences."""

    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor          # (B, T), IGNORE_INDEX outside the targets
    prompt_lengths: torch.Tensor  # (B,)
    target_lengths: torch.Tensor  # (B,) including the end-of-sequence token
    rows: torch.Tensor | None = None  # (B,) each row's index in the batch it was cut from (length_buckets)

    def answer_position_mask(self) -> torch.Tensor:
        """(B, T) mask of the answer positions (see the module docstring)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None, :]
        start = (self.prompt_lengths.to(positions.device) - 1)[:, None]
        return (positions >= start) & (positions < start + self.target_lengths.to(positions.device)[:, None])

    def query_mask(self) -> torch.Tensor:
        """(B, T) mask of the prompt tokens the hyper-network reads (all but the last)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None, :]
        return positions < (self.prompt_lengths.to(positions.device) - 1)[:, None]

    def num_targets(self) -> int:
        """Label tokens that carry loss, over the whole batch."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def predicting_positions(self) -> torch.Tensor:
        """(B, T) mask of the positions whose next token is a label: the logits the loss reads."""
        mask = torch.zeros_like(self.labels, dtype=torch.bool)
        mask[:, :-1] = self.labels[:, 1:] != IGNORE_INDEX
        return mask

    def shared_prefix_length(self) -> int:
        """How many leading tokens every row shares, up to the first position whose logits the loss
        reads (a chat template's system prompt and a task's fixed instruction, typically). A soft-token
        placeholder (a negative id, :mod:`pilot.soft_tokens`) ends it: its embedding differs by row."""
        if len(self.input_ids) < 2:
            return 0
        differs = (self.input_ids != self.input_ids[:1]).any(0) | (self.input_ids[0] < 0)
        first_difference = int(differs.nonzero()[0]) if bool(differs.any()) else self.input_ids.shape[1]
        return max(min(first_difference, int(self.prompt_lengths.min()) - 1), 0)

    def next_tokens(self) -> torch.Tensor:
        """(N,) the label tokens those positions predict, row by row."""
        shifted = self.labels[:, 1:]
        return shifted[shifted != IGNORE_INDEX]

    def length_buckets(self, buckets: int) -> list[TokenBatch]:
        """Split into ``buckets`` sub-batches of similar length, each cut to its own longest row.

        Rows are right-padded, so cutting trailing columns changes nothing a row computes; a batch
        mixing short answers with long plan transcripts then spends far less compute on padding.
        Each part's ``rows`` says which rows of this batch it holds (per-row inputs follow them).
        """
        lengths = self.attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        own_rows = self.rows if self.rows is not None else torch.arange(len(lengths))
        parts = []
        for rows in torch.tensor_split(order, min(buckets, len(order))):
            width = int(lengths[rows].max())
            parts.append(TokenBatch(self.input_ids[rows, :width], self.attention_mask[rows, :width],
                                    self.labels[rows, :width], self.prompt_lengths[rows], self.target_lengths[rows],
                                    own_rows[rows.to(own_rows.device)]))
        return parts

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                   self.prompt_lengths, self.target_lengths)),
                          rows=self.rows)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_length: int | None = None,
    prompt_prefix: Sequence[int] = (),
    prompt_suffix: Sequence[int] = (),
) -> TokenBatch:
    """Tokenise ``prompt + target + eos``; the loss (labels) covers target and eos only.

    ``prompt_prefix`` / ``prompt_suffix`` (token ids) start / end every prompt: the placeholders
    of soft tokens (:mod:`pilot.soft_tokens`), which count as prompt.
    """
    if len(prompts) != len(targets):
        raise ValueError("encode_pairs needs as many targets as prompts.")
    rows, prompt_lengths, target_lengths = [], [], []
    for prompt, target in zip(prompts, targets):
        prompt_ids = list(prompt_prefix) + tokenizer(prompt)["input_ids"] + list(prompt_suffix)
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt_ids + target_ids
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"A sequence of {len(ids)} tokens exceeds max_length={max_length}; raise the model's "
                "max positions or shorten the task's prompts."
            )
        rows.append(ids)
        prompt_lengths.append(len(prompt_ids))
        target_lengths.append(len(target_ids))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, p) in enumerate(zip(rows, prompt_lengths)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, p : len(ids)] = torch.tensor(ids[p:])
    return TokenBatch(input_ids, attention_mask, labels,
                      torch.tensor(prompt_lengths), torch.tensor(target_lengths))


def labelled_logits(model: torch.nn.Module, batch: TokenBatch, share_prefix: bool = False) -> torch.Tensor:
    """(N, vocabulary) logits at ``batch.predicting_positions()``, row by row.

    Only those positions are projected onto the vocabulary (transformers' ``logits_to_keep``): the
    full (batch, length, vocabulary) logits of SmolLM2's 49k-token vocabulary, with their softmax and
    gradient, took GiBs of training memory to score a few dozen answer tokens per row.

    With ``share_prefix`` the tokens every row starts with (:meth:`TokenBatch.shared_prefix_length`)
    run once, with gradient, and the rest of every row reads their keys and values through the
    model's own cache: the same logits and gradients (each row's prefix is the same computation),
    for a fraction of the compute when the shared part is long. Hooks on the model (adapters,
    interventions, soft-token slots) fire in both passes, as in one.
    """
    keep = batch.predicting_positions()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    prefix = batch.shared_prefix_length() if share_prefix else 0
    if prefix:
        rows, width = batch.input_ids.shape
        shared = model(input_ids=batch.input_ids[:1, :prefix], use_cache=True, logits_to_keep=1).past_key_values
        past = DynamicCache(ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                                            for layer in shared.layers])
        positions = torch.arange(prefix, width, device=batch.input_ids.device)[None, :].expand(rows, -1)
        inputs.update(input_ids=batch.input_ids[:, prefix:], position_ids=positions, past_key_values=past, use_cache=True)
        keep = keep[:, prefix:]
    logits = model(**inputs, logits_to_keep=keep).logits
    return logits if logits.dim() == 2 else logits[keep]  # a model that projects every position anyway


def next_token_loss(logits: torch.Tensor, batch: TokenBatch,
                    reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Cross-entropy of :func:`labelled_logits` against the batch's label tokens: their mean, or their sum."""
    targets = batch.next_tokens()
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return loss if reduction == "sum" else loss / max(len(targets), 1)


def lengths_to_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) lengths -> (B, width) mask of the first ``length`` positions of each row."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
