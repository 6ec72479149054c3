"""The one way to generate answers (or plans), with or without guidance.

Every method -- zero-shot, plan-in-context, LoRA, the static steering vector and PILOT --
answers through :func:`generate`, with the same decoding settings, so their accuracies and
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

from pilot.guidance import Guidance, capture_layers
from pilot.models import CausalLM
from pilot.prompts import first_line


@dataclass
class GenerationResult:
    texts: list[str]                     # generated continuations, up to the stop token
    new_tokens: list[int]                # tokens generated per prompt (stop token included)
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    guidance_vectors: torch.Tensor | None = None

    @property
    def answers(self) -> list[str]:
        return [first_line(text) for text in self.texts]

    @property
    def seconds_per_query(self) -> list[float]:
        """Wall time of each prompt's batch divided by the batch size."""
        return [s / n for s, n in zip(self.batch_seconds, self.batch_sizes) for _ in range(n)]


@lru_cache(maxsize=8)
def _stop_ids_cached(tokenizer_id: int, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    # A line ends the answer: stop at end-of-sequence or at any token whose text has a newline.
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id}
    for token_id in vocab.values():
        if "\n" in tokenizer.decode([token_id]):
            ids.add(token_id)
    return torch.tensor(sorted(i for i in ids if i is not None))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    return _stop_ids_cached(id(tokenizer), tokenizer)


def left_pad(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    if min(map(len, rows)) < 2:
        raise ValueError("Every prompt must be at least two tokens long.")
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    return input_ids, mask


@torch.no_grad()
def _generate_batch(lm: CausalLM, prompts: Sequence[str], max_new_tokens: int, guidance: Guidance | None,
                    vectors: torch.Tensor | None, temperature: float, generator: torch.Generator | None):
    model, tokenizer, device = lm.model, lm.tokenizer, lm.device
    input_ids, mask = (t.to(device) for t in left_pad(tokenizer, prompts))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    read_layer = guidance.hypernet.config.resolved_read_layer() if guidance and guidance.hypernet else None
    with capture_layers(model, [read_layer]) if read_layer is not None else nullcontext() as captured:
        model(input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
              past_key_values=cache, use_cache=True)
    if guidance is not None and vectors is None:
        vectors = guidance.hypernet(captured[read_layer], mask[:, :-1])
    stop_ids = stop_token_ids(tokenizer).to(device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens = []
    step_input, step_positions = input_ids[:, -1:], positions[:, -1:]
    context = guidance.injector.guide(vectors) if guidance is not None else nullcontext()
    with context:
        for _ in range(max_new_tokens):
            logits = model(step_input, attention_mask=mask, position_ids=step_positions,
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_token = logits.argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, tokenizer.pad_token_id), next_token)
            tokens.append(next_token)
            finished |= torch.isin(next_token, stop_ids)
            if bool(finished.all()):
                break
            step_input, step_positions = next_token[:, None], step_positions + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    generated = torch.stack(tokens, dim=1).tolist()
    texts, counts = [], []
    stop = set(stop_ids.tolist())
    for row in generated:
        cut = next((i for i, t in enumerate(row) if t in stop), None)
        kept = row if cut is None else row[:cut]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
        counts.append(len(row) if cut is None else cut + 1)
    return texts, counts, vectors


def generate(
    lm: CausalLM,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    guidance: Guidance | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    progress: str | None = None,
) -> GenerationResult:
    """Generate one continuation per prompt (greedy unless ``temperature > 0``).

    ``progress`` names a progress bar (hidden when None). Latency is measured per batch.
    """
    was_training = lm.model.training
    lm.model.eval()
    generator = torch.Generator(device=lm.device).manual_seed(seed) if seed is not None else None
    result = GenerationResult(texts=[], new_tokens=[])
    vectors_out = []
    bar = tqdm(total=len(prompts), desc=progress, unit="q", disable=progress is None, leave=False)
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        vectors = None
        if guidance is not None and guidance.vectors is not None:
            vectors = guidance.vectors[start:start + batch_size].to(lm.device)
        began = time.perf_counter()
        texts, counts, used = _generate_batch(lm, batch, max_new_tokens, guidance, vectors, temperature, generator)
        result.batch_seconds.append(time.perf_counter() - began)
        result.batch_sizes.append(len(batch))
        result.texts.extend(texts)
        result.new_tokens.extend(counts)
        if used is not None:
            vectors_out.append(used.detach().cpu())
        bar.update(len(batch))
    bar.close()
    if vectors_out:
        result.guidance_vectors = torch.cat(vectors_out)
    lm.model.train(was_training)
    return result
