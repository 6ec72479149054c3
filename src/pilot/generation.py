"""The one way to generate answers (or plans), with or without guidance.

Every method -- zero-shot, plan-in-context, LoRA, ReFT, CAA, pause tokens, soft thoughts and
PILOT -- answers through :func:`generate`, with the same decoding settings, so their accuracies and
latencies are comparable.

Guided generation costs one small MLP call per query and no extra forward pass: the prompt
minus its last token is prefilled unguided (that prefill is also the plan-free reading the
hyper-network needs), the guidance vector is computed from it, and injection starts at the
last prompt token, continuing through every generated token via the KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from pilot import distributed
from pilot.config import GenerationParams
from pilot.guidance import Guidance
from pilot.interventions import capture_layers
from pilot.models import CausalLM
from pilot.prompts import first_line, prompt_format
from pilot.runtime import share_cores
from pilot.soft_tokens import SoftPrompt, placeholders


@dataclass
class GenerationResult:
    texts: list[str]                     # generated continuations, up to the stop token
    new_tokens: list[int]                # tokens generated per prompt (stop token included)
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    guidance_vectors: torch.Tensor | None = None
    line_answers: bool = True            # the toy format: the answer is the first line

    @property
    def answers(self) -> list[str]:
        """The replies as answers: their first line in the toy format, the whole reply otherwise
        (:func:`pilot.answers.extract_answer` then reads a chain-of-thought reply by its task's rule)."""
        return [first_line(text) if self.line_answers else text.strip() for text in self.texts]

    @property
    def seconds_per_query(self) -> list[float]:
        """Wall time of each prompt's batch divided by the batch size."""
        return [s / n for s, n in zip(self.batch_seconds, self.batch_sizes) for _ in range(n)]


@lru_cache(maxsize=8)
def _stop_ids_cached(tokenizer_id: int, tokenizer: PreTrainedTokenizerBase, line_answers: bool,
                     extra_eos: tuple[int, ...]) -> torch.Tensor:
    # End of sequence always ends a reply; in the toy format so does any token whose text has a newline.
    ids = {tokenizer.eos_token_id, *extra_eos}
    if line_answers:
        for token_id in tokenizer.get_vocab().values():
            if "\n" in tokenizer.decode([token_id]):
                ids.add(token_id)
    return torch.tensor(sorted(i for i in ids if i is not None))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, line_answers: bool = True,
                   model: torch.nn.Module | None = None) -> torch.Tensor:
    """Token ids that end a reply: end of sequence (the tokenizer's, and the model's generation
    config's), plus every newline-bearing token when answers are single lines."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = tuple(configured if isinstance(configured, list) else [] if configured is None else [configured])
    return _stop_ids_cached(id(tokenizer), tokenizer, line_answers, extra)


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stop_strings`` (excluded), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def left_pad(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], prefix: Sequence[int] = (),
             suffix: Sequence[int] = (), width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``prompts`` (each between ``prefix`` and ``suffix``), left-padded to
    the longest, or to ``width`` tokens if that is more."""
    rows = [list(prefix) + tokenizer(p)["input_ids"] + list(suffix) for p in prompts]
    if min(map(len, rows)) < 2:
        raise ValueError("Every prompt must be at least two tokens long.")
    width = max(width, *map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    return input_ids, mask


@torch.no_grad()
def _generate_batch(lm: CausalLM, prompts: Sequence[str], max_new_tokens: int, guidance: Guidance | None,
                    vectors: torch.Tensor | None, temperature: float, generator: torch.Generator | None,
                    stop_strings: Sequence[str] = (), soft_prompt: SoftPrompt | None = None, pad_to: int = 0):
    if soft_prompt is None:
        return _decode(lm, prompts, max_new_tokens, guidance, vectors, temperature, generator, stop_strings,
                       {"width": pad_to})
    with soft_prompt.slots.fill(soft_prompt.embeddings(prompts)):
        return _decode(lm, prompts, max_new_tokens, guidance, vectors, temperature, generator, stop_strings,
                       {**placeholders(soft_prompt), "width": pad_to})


def _decode(lm: CausalLM, prompts: Sequence[str], max_new_tokens: int, guidance: Guidance | None,
            vectors: torch.Tensor | None, temperature: float, generator: torch.Generator | None,
            stop_strings: Sequence[str], around_prompt: dict[str, list[int] | int]):
    model, tokenizer, device = lm.model, lm.tokenizer, lm.device
    line_answers = prompt_format(tokenizer).line_answers
    input_ids, mask = (t.to(device) for t in left_pad(tokenizer, prompts, **around_prompt))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    read_layer = guidance.hypernet.config.resolved_read_layer() if guidance and guidance.hypernet else None
    with capture_layers(model, [read_layer]) if read_layer is not None else nullcontext() as captured:
        model(input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
              past_key_values=cache, use_cache=True, logits_to_keep=1)  # only the cache is read
    if guidance is not None and vectors is None:
        vectors = guidance.hypernet(captured[read_layer], mask[:, :-1])
    stop_ids = stop_token_ids(tokenizer, line_answers, model).to(device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    lengths = torch.full((len(prompts),), max_new_tokens, dtype=torch.long, device=device)  # stop token included
    tokens = []
    step_input, step_positions = input_ids[:, -1:], positions[:, -1:]
    context = guidance.injector.guide(vectors) if guidance is not None else nullcontext()
    with context:
        for step in range(max_new_tokens):
            logits = model(step_input, attention_mask=mask, position_ids=step_positions,
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_token = logits.argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, tokenizer.pad_token_id), next_token)
            tokens.append(next_token)
            done_now = ~finished & torch.isin(next_token, stop_ids)
            if stop_strings:  # the decoded reply is checked only for rows still running
                so_far = torch.stack(tokens, dim=1)
                for i in (~finished & ~done_now).nonzero()[:, 0].tolist():
                    done_now[i] = cut_at_stop_strings(tokenizer.decode(so_far[i], skip_special_tokens=True),
                                                      stop_strings)[1]
            lengths = torch.where(done_now, torch.full_like(lengths, step + 1), lengths)
            finished |= done_now
            if bool(finished.all()):
                break
            step_input, step_positions = next_token[:, None], step_positions + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    generated = torch.stack(tokens, dim=1).tolist()
    stop = set(stop_ids.tolist())
    texts, counts = [], lengths.tolist()
    for row, length in zip(generated, counts):
        kept = row[:length]
        if kept and kept[-1] in stop:
            kept = kept[:-1]
        texts.append(cut_at_stop_strings(tokenizer.decode(kept, skip_special_tokens=True), stop_strings)[0])
    return texts, counts, vectors


def generate(
    lm: CausalLM,
    prompts: Sequence[str],
    *,
    generation: GenerationParams,   # no default here: the run's decoding settings (conf/base generation)
    guidance: Guidance | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    progress: str | None = None,
    soft_prompt: SoftPrompt | None = None,
    spread: bool = False,
    pad_to: int = 0,
) -> GenerationResult:
    """Generate one continuation per prompt (greedy unless ``temperature > 0``), ``generation.batch_size``
    prompts at a time.

    ``soft_prompt`` puts its soft tokens before or after every prompt (computing them, e.g. an assistant
    model's reading, is part of each batch's measured time).

    A reply ends at end of sequence, at a newline in the toy format (:mod:`pilot.prompts`), at
    the first of ``generation.stop`` (cut off), or after ``generation.max_new_tokens``. ``progress`` names a
    progress bar (hidden when None). Latency is measured per batch.

    ``spread``: with data-parallel processes (:mod:`pilot.distributed`), each generates its share of
    the batches one process would generate (:func:`~pilot.distributed.my_batches`) and every process
    gets every reply back in order: the result is one process's, each batch timed where it ran. Greedy
    decoding only; a sampled reply depends on every earlier batch's draws, so with ``temperature > 0``
    every process generates them all (the same replies everywhere). Without a process group, or
    for a caller that already holds only its rank's rows (validation during training), it changes
    nothing.

    ``pad_to``: every batch left-padded to at least this many tokens. A prompt's bits then depend on its
    padded width, not on the longest prompt beside it (the served model, :mod:`pilot.serving`).
    """
    max_new_tokens, batch_size, stop_strings = generation.max_new_tokens, generation.batch_size, tuple(generation.stop)
    was_training = lm.model.training
    lm.model.eval()
    generator = torch.Generator(device=lm.device).manual_seed(seed) if seed is not None else None
    result = GenerationResult(texts=[], new_tokens=[], line_answers=prompt_format(lm.tokenizer).line_answers)
    spreading = spread and temperature == 0
    batches = distributed.my_batches(len(prompts), batch_size) if spreading else \
        distributed.my_batches(len(prompts), batch_size, distributed.World())   # all of them, in order
    done = []   # per batch: texts, token counts, seconds, guidance vectors used
    bar = tqdm(total=sum(map(len, batches)), desc=progress, unit="q", disable=progress is None, leave=False)
    for rows in batches:
        start = rows.start
        batch = list(prompts[start:rows.stop])
        vectors = None
        if guidance is not None and guidance.vectors is not None:
            vectors = guidance.vectors[start:start + batch_size] if len(guidance.vectors) > 1 \
                else guidance.vectors.expand(len(batch), -1)   # one vector: every prompt's
            vectors = vectors.to(lm.device)
        began = time.perf_counter()
        texts, counts, used = _generate_batch(lm, batch, max_new_tokens, guidance, vectors, temperature, generator,
                                              stop_strings, soft_prompt, pad_to)
        done.append((texts, counts, time.perf_counter() - began, used.detach().cpu() if used is not None else None))
        bar.update(len(batch))
        share_cores()
    bar.close()
    if spreading:
        done = distributed.gather_batches(done, len(prompts), batch_size)
    for texts, counts, seconds, used in done:
        result.batch_seconds.append(seconds)
        result.batch_sizes.append(len(texts))
        result.texts.extend(texts)
        result.new_tokens.extend(counts)
    vectors_out = [used for *_, used in done if used is not None]
    if vectors_out:
        result.guidance_vectors = torch.cat(vectors_out)
    lm.model.train(was_training)
    return result
