"""The frozen student with a guidance injector: the forward passes both training stages go through."""

from __future__ import annotations

import torch

from pilot.guidance.hypernet import HyperNetwork
from pilot.guidance.injection import Guidance, GuidanceInjector
from pilot.guidance.prefix import (
    FrozenPrefix,
    PromptCache,
    answer_logits,
    answer_part,
    forward_after_prompt,
    forward_from_site,
    prompt_cache,
)
from pilot.interventions import capture_layers
from pilot.models import CausalLM, freeze
from pilot.prompts import prompt_format
from pilot.sequences import TokenBatch, encode_pairs, labelled_logits, lengths_to_mask


class GuidedStudent:
    """``student`` (frozen here) with ``hypernet``'s injector attached at its site.

    Use it as a context manager: the injector is removed when the block ends, however it ends.
    """

    def __init__(self, student: CausalLM, hypernet: HyperNetwork) -> None:
        self.student = student
        freeze(student.model)
        self.hypernet = hypernet
        self.format = prompt_format(student.tokenizer)
        config = hypernet.config
        self.injector = GuidanceInjector(student.model, config.inject_layer, config.guidance_scale,
                                         extra_layers=config.extra_inject_layers, modulation=config.modulation,
                                         scaling=config.scaling)

    def __enter__(self) -> GuidedStudent:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        self.injector.remove()

    def guidance(self, vectors: torch.Tensor | None = None) -> Guidance:
        """Generation-time guidance: the hyper-network's, or explicit ``vectors`` (one per prompt)."""
        return Guidance(self.injector, hypernet=None if vectors is not None else self.hypernet, vectors=vectors)

    @torch.no_grad()
    def query_states(self, questions: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """The plan-free reading of each question at the hyper-network's read layer (prompt minus last token)."""
        layer = self.hypernet.config.resolved_read_layer()
        states, lengths = [], []
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            batch = encode_pairs(self.student.tokenizer, [self.format.answer_prompt(q) for q in chunk], [""] * len(chunk))
            with capture_layers(self.student.model, [layer]) as captured:
                self.student.model(input_ids=batch.input_ids.to(self.student.device),
                                   attention_mask=batch.attention_mask.to(self.student.device), logits_to_keep=1)
            mask = batch.query_mask().to(self.student.device)
            states.extend(captured[layer][i][mask[i]].cpu() for i in range(len(mask)))
            lengths.extend(int(m.sum()) for m in mask)
        out = states[0].new_zeros((len(states), max(lengths), states[0].shape[-1]))
        for i, s in enumerate(states):
            out[i, : s.shape[0]] = s
        return out, torch.tensor(lengths)

    @torch.no_grad()
    def guidance_vectors(self, questions: list[str]) -> torch.Tensor:
        """The hyper-network's guidance vector for each question (as used at generation time)."""
        states, lengths = self.query_states(questions)
        device = next(self.hypernet.parameters()).device
        mask = lengths_to_mask(lengths, states.shape[1])
        return self.hypernet(states.to(device), mask.to(device)).cpu()

    def teacher_forced(self, questions: list[str], answers: list[str], vectors: torch.Tensor,
                       layers: list[int]) -> tuple[TokenBatch, torch.Tensor, dict[int, torch.Tensor]]:
        """Guided forward on question + answer; returns (batch, logits, {layer: states}), the logits
        only at the answer positions, row by row (:func:`pilot.sequences.labelled_logits`)."""
        batch = encode_pairs(self.student.tokenizer, [self.format.answer_prompt(q) for q in questions],
                             [self.format.answer_target(a) for a in answers]).to(self.student.device)
        with self.injector.guide(vectors, batch.answer_position_mask()), \
                capture_layers(self.student.model, layers) as captured:
            logits = labelled_logits(self.student.model, batch)
        return batch, logits, dict(captured)

    def teacher_forced_from_prefix(self, prefix: FrozenPrefix, vectors: torch.Tensor,
                                   layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`teacher_forced` from the rows' cached frozen prefix (:mod:`pilot.guidance.prefix`):
        only the blocks above the lowest site run, over the answer positions. Returns the logits
        at the answer positions, row by row (the targets are ``prefix.targets()``), and
        ``{layer: states (B, Ta, d)}`` already at the answer positions."""
        prefix = prefix.to(self.student.device, self.student.model.dtype)
        with self.injector.guide(vectors, prefix.answer_mask()):
            hidden, captured = forward_from_site(self.student.model, self.injector, prefix, layers)
            logits = answer_logits(self.student.model, hidden, prefix)
        return logits, captured

    def prompt_cache(self, questions: list[str]) -> PromptCache:
        """The questions' prompts read once (keys and values at every layer, no guidance, no gradient),
        for :meth:`teacher_forced_after_prompt` over any replies to them."""
        batch = encode_pairs(self.student.tokenizer, [self.format.answer_prompt(q) for q in questions],
                             [""] * len(questions))
        return prompt_cache(self.student.model, batch)

    def teacher_forced_after_prompt(self, cache: PromptCache, questions: list[str], answers: list[str],
                                    vectors: torch.Tensor, layers: list[int] = ()
                                    ) -> tuple[TokenBatch, torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`teacher_forced` for any replies (stage 2's samples) over prompts whose keys and values
        ``cache`` holds (:func:`pilot.guidance.prefix.prompt_cache`, one row per question): only the
        answer positions run. The same logits; the captured states are (B, Ta, d), at the answer
        positions only."""
        batch = encode_pairs(self.student.tokenizer, [self.format.answer_prompt(q) for q in questions],
                             [self.format.answer_target(a) for a in answers])
        _, answer_mask = answer_part(batch)
        with self.injector.guide(vectors, answer_mask.to(self.student.device)), \
                capture_layers(self.student.model, list(layers)) as captured:
            logits, _ = forward_after_prompt(self.student.model, cache, batch)
        return batch.to(self.student.device), logits, dict(captured)
