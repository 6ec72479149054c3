"""Soft tokens: positions of the student's input whose embeddings come from a trained module.

Pause tokens append ``k`` soft tokens to every prompt, soft thoughts prepend them
(:mod:`pilot.methods.soft_prompts`). A prompt carries them as *placeholder ids* (``-1 ... -k``: never a real token), and
:class:`SoftTokenSlots`, an intervention on the student's input-embedding layer, replaces the
embedding of each placeholder with the row's soft token while a :meth:`~SoftTokenSlots.fill`
block hands it the embeddings. The student's weights are untouched; training, validation and
generation all go through the same hook, so what was trained is exactly what answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Literal, Protocol

import torch
from torch import nn

from pilot.interventions import Intervention, InterventionError


def placeholder_ids(num_tokens: int) -> list[int]:
    """The ids that mark soft token ``j`` (``-1 - j``) before or after a prompt."""
    return [-1 - j for j in range(num_tokens)]


class SoftTokenSlots(Intervention):
    """An intervention on ``model``'s input embeddings (no decoder layer): placeholder positions get soft tokens.

    Inside ``fill(embeddings)`` (``(B, k, d)``, one row per batch row, or ``(k, d)`` for every
    row), a placeholder ``-1 - j`` in row ``b`` is embedded as ``embeddings[b, j]``. A placeholder
    outside a ``fill`` block is an error, not a silent lookup. Use it as a context manager.
    """

    def __init__(self, model: nn.Module, name: str = "soft_tokens") -> None:
        super().__init__(model, name)
        self._embeddings: torch.Tensor | None = None
        self._slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        layer = model.get_input_embeddings()
        self.hook(layer.register_forward_pre_hook(self._read_placeholders))
        self.hook(layer.register_forward_hook(self._embed_placeholders))

    def _read_placeholders(self, module: nn.Module, args: tuple):
        ids = args[0]
        marked = ids < 0
        if not bool(marked.any()):
            self._slots = None
            return None
        if self._embeddings is None:
            raise InterventionError(f"The input holds soft-token placeholders but '{self.name}' has no "
                                    "embeddings; run the forward pass inside `slots.fill(embeddings)`.")
        rows, columns = marked.nonzero(as_tuple=True)
        self._slots = (rows, columns, -1 - ids[rows, columns])
        return (ids.clamp_min(0), *args[1:])   # any real id: its embedding is replaced below

    def _embed_placeholders(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if self._slots is None:
            return None
        rows, columns, slots = self._slots
        self._slots = None
        embeddings = self._embeddings
        if embeddings.dim() == 2:
            embeddings = embeddings.unsqueeze(0).expand(output.shape[0], -1, -1)
        if embeddings.shape[0] != output.shape[0] or int(slots.max()) >= embeddings.shape[1]:
            raise InterventionError(
                f"'{self.name}' holds soft tokens of shape {tuple(embeddings.shape)} for a batch of "
                f"{output.shape[0]} rows with placeholders up to {int(slots.max()) + 1}; give one row per prompt.")
        values = embeddings[rows.to(embeddings.device), slots.to(embeddings.device)]
        return output.index_put((rows, columns), values.to(device=output.device, dtype=output.dtype))

    @contextmanager
    def fill(self, embeddings: torch.Tensor):
        """Embed placeholders with ``embeddings`` while inside."""
        self.check_attached()
        previous, self._embeddings = self._embeddings, embeddings
        try:
            yield self
        finally:
            self._embeddings = previous


class SoftPrompt(Protocol):
    """What generation needs from a soft-token method: how many tokens, before (``prefix``) or
    after (``suffix``) each prompt, the slots that embed them, and their embeddings for a batch of
    prompts (``(B, k, d)`` or ``(k, d)``)."""

    num_tokens: int
    position: Literal["prefix", "suffix"]
    slots: SoftTokenSlots

    def embeddings(self, prompts: Sequence[str]) -> torch.Tensor: ...


def placeholders(soft_prompt: SoftPrompt) -> dict[str, list[int]]:
    """``{"prefix": ids}`` or ``{"suffix": ids}``: where the soft tokens' placeholders go around a prompt."""
    if soft_prompt.position not in ("prefix", "suffix"):
        raise ValueError(f"Soft tokens go before ('prefix') or after ('suffix') the prompt, not {soft_prompt.position!r}.")
    return {soft_prompt.position: placeholder_ids(soft_prompt.num_tokens)}
