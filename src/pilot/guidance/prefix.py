"""The frozen prefix: what guidance cannot change, computed once, and a pass that starts above it.

Guidance enters at the injection site(s), at the answer positions only (:mod:`pilot.sequences`).
For a teacher-forced row, everything below the lowest site and the prompt's keys and values at
every layer above it are therefore the same at every training step. :func:`capture_prefix`
records them once from one frozen forward pass (the latent cache stores them beside the
trajectories); :func:`forward_from_site` then runs only the blocks above the site, over the answer
positions, with the prompt's keys and values handed to the model's own cache
(``transformers.DynamicCache``). On a 30-layer student guided at layer 20 that skips two thirds of
the blocks and every prompt position: most of a stage-1 step.

Rotary-position decoders whose blocks share Llama's call (Llama, Qwen2, Mistral, Gemma families)
are supported; :func:`prefix_support` names what stops any other model, whose callers then run
the full pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import DynamicCache

from pilot.guidance.injection import GuidanceInjector
from pilot.interventions import capture_layers, layer_hidden
from pilot.models import decoder_layers
from pilot.sequences import IGNORE_INDEX, TokenBatch, lengths_to_mask


class PrefixUnsupportedError(TypeError):
    """The model cannot be run from a cached prefix (see :func:`prefix_support`)."""


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that owns ``layers``, ``norm`` and ``rotary_emb`` (``model.model`` for *ForCausalLM)."""
    base = getattr(model, "base_model", model)
    if hasattr(base, "model") and hasattr(base.model, "layers"):  # peft-wrapped
        base = base.model
    return base.model if hasattr(base, "model") and hasattr(base.model, "layers") else base


def prefix_support(model: nn.Module) -> str | None:
    """Why ``model`` cannot run from a cached prefix, or ``None`` when it can."""
    backbone = _backbone(model)
    config = model.config.get_text_config(decoder=True)
    for part in ("layers", "norm", "rotary_emb"):
        if not hasattr(backbone, part):
            return f"{type(model).__name__} has no '{part}' (a rotary-position decoder stack like Llama's is needed)"
    if "position_embeddings" not in inspect.signature(type(backbone.layers[0]).forward).parameters:
        return f"{type(backbone.layers[0]).__name__} does not take rotary position embeddings as Llama's blocks do"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return f"{type(model).__name__} caps its logits (Gemma 2 style), which this pass does not reproduce"
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return f"{type(model).__name__} mixes sliding-window layers, which this pass does not reproduce"
    if model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no output embeddings"
    return None


@dataclass
class FrozenPrefix:
    """What guidance cannot change for a batch of teacher-forced rows (right-padded per field).

    ``prefix`` positions are the prompt minus its last token; the answer positions follow (the
    last prompt token and the target tokens but the final one: those that predict a target).
    """

    keys: torch.Tensor            # (B, U, kv_heads, P, head_dim) prompt keys at the U layers above the site
    values: torch.Tensor          # (B, U, kv_heads, P, head_dim)
    prefix_lengths: torch.Tensor  # (B,) prompt positions before the first answer position
    site_states: torch.Tensor     # (B, Ta, d) the lowest site's output at the answer positions, unguided
    answer_tokens: torch.Tensor   # (B, Ta) the token each answer position predicts; IGNORE_INDEX past the row
    answer_lengths: torch.Tensor  # (B,)

    def __len__(self) -> int:
        return len(self.prefix_lengths)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FrozenPrefix:
        """Moved to ``device``; the floating tensors cast to ``dtype`` (the model's) when given."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        return FrozenPrefix(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def trimmed(self) -> FrozenPrefix:
        """Cut to the longest prefix and answer of these rows (a batch drawn from a padded cache)."""
        p, a = int(self.prefix_lengths.max()), int(self.answer_lengths.max())
        return FrozenPrefix(self.keys[..., :p, :], self.values[..., :p, :], self.prefix_lengths,
                            self.site_states[:, :a], self.answer_tokens[:, :a], self.answer_lengths)

    def select(self, rows: slice | torch.Tensor) -> FrozenPrefix:
        return FrozenPrefix(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def repeat_interleave(self, k: int) -> FrozenPrefix:
        """Each row ``k`` times in a row (a group of samples per question)."""
        return FrozenPrefix(**{f.name: getattr(self, f.name).repeat_interleave(k, dim=0) for f in fields(self)})

    def answer_mask(self) -> torch.Tensor:
        """(B, Ta) the valid answer positions of each row."""
        return lengths_to_mask(self.answer_lengths, self.site_states.shape[1])

    def targets(self) -> torch.Tensor:
        """(N,) the predicted tokens of every valid answer position, row by row."""
        return self.answer_tokens[self.answer_mask()]


def lowest_site(injector: GuidanceInjector) -> int:
    return min(injector.layers)


@torch.no_grad()
def capture_prefix(model: nn.Module, batch: TokenBatch, site: int) -> list[dict[str, torch.Tensor]]:
    """One frozen forward pass over ``batch`` (question + answer, no guidance): each row's frozen
    prefix for guidance whose lowest site is decoder layer ``site``, as CPU tensors (see
    :func:`prefix_rows`). The latent cache gets the same rows from the pass it runs anyway."""
    check_prefix_support(model)
    device = next(model.parameters()).device
    with capture_layers(model, [site]) as captured:
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    use_cache=True, logits_to_keep=1)
    return prefix_rows(batch, out.past_key_values, captured[site], site)


def check_prefix_support(model: nn.Module) -> None:
    reason = prefix_support(model)
    if reason is not None:
        raise PrefixUnsupportedError(f"No frozen-prefix cache for this model: {reason}. Set "
                                     "`latents.frozen_prefix: false` to train with the full pass.")


def prefix_rows(batch: TokenBatch, cache, site_states: torch.Tensor, site: int) -> list[dict[str, torch.Tensor]]:
    """Each row's frozen prefix, cut from an unguided pass over ``batch`` that returned its
    ``cache`` (``use_cache=True``) and ``site_states``, the output of decoder layer ``site``.

    Keys ``prefix_keys``/``prefix_values`` (U, kv_heads, P_row, head_dim) for the U layers above the
    site, ``site_states`` (Ta_row, d) and ``answer_tokens`` (Ta_row,), on the CPU:
    :func:`stack_prefix` pads and stacks rows.
    """
    upper = range(site + 1, len(cache.layers))
    keys = torch.stack([cache.layers[layer].keys for layer in upper], dim=1) if upper else None
    values = torch.stack([cache.layers[layer].values for layer in upper], dim=1) if upper else None
    rows = []
    for row in range(len(batch.input_ids)):
        start, length = int(batch.prompt_lengths[row]) - 1, int(batch.target_lengths[row])
        if keys is None:  # guided at the last layer: no block above reads the prompt
            row_keys = row_values = site_states.new_zeros((0, 1, start, 1)).cpu()
        else:
            row_keys, row_values = keys[row, :, :, :start].cpu(), values[row, :, :, :start].cpu()
        rows.append({
            "prefix_keys": row_keys,
            "prefix_values": row_values,
            "site_states": site_states[row, start:start + length].cpu(),
            "answer_tokens": batch.input_ids[row, start + 1:start + 1 + length].cpu(),
        })
    return rows


def stack_prefix(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows of :func:`capture_prefix` padded and stacked into tensors (the latent cache's layout)."""
    p = max(r["prefix_keys"].shape[2] for r in rows)
    a = max(r["site_states"].shape[0] for r in rows)
    first = rows[0]
    keys = first["prefix_keys"].new_zeros((len(rows), *first["prefix_keys"].shape[:2], p, first["prefix_keys"].shape[3]))
    values = torch.zeros_like(keys)
    states = first["site_states"].new_zeros((len(rows), a, first["site_states"].shape[-1]))
    tokens = torch.full((len(rows), a), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n, m = r["prefix_keys"].shape[2], r["site_states"].shape[0]
        keys[i, :, :, :n], values[i, :, :, :n] = r["prefix_keys"], r["prefix_values"]
        states[i, :m], tokens[i, :m] = r["site_states"], r["answer_tokens"]
    return {
        "prefix_keys": keys, "prefix_values": values,
        "prefix_lengths": torch.tensor([r["prefix_keys"].shape[2] for r in rows], dtype=torch.int64),
        "site_states": states, "answer_tokens": tokens,
    }


def frozen_prefix(tensors: dict[str, torch.Tensor], answer_lengths: torch.Tensor) -> FrozenPrefix:
    """A :class:`FrozenPrefix` over tensors laid out as :func:`stack_prefix` writes them."""
    return FrozenPrefix(tensors["prefix_keys"], tensors["prefix_values"], tensors["prefix_lengths"],
                        tensors["site_states"], tensors["answer_tokens"], answer_lengths)


def _attention_mask(prefix: FrozenPrefix, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Ta, P + Ta) additive mask: a row's own prompt positions, then its answer positions causally."""
    batch, width = prefix.site_states.shape[:2]
    device = prefix.site_states.device
    prompt_keys = torch.arange(prefix.keys.shape[3], device=device)[None, None, :] < prefix.prefix_lengths[:, None, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = torch.cat([prompt_keys.expand(batch, width, -1), causal.expand(batch, -1, -1)], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def forward_from_site(model: nn.Module, injector: GuidanceInjector, prefix: FrozenPrefix,
                      capture: list[int] | tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """A teacher-forced pass that starts at the lowest guidance site from ``prefix``: the final
    hidden states (B, Ta, d, after the final norm) and ``{layer: (B, Ta, d)}`` for the ``capture``
    layers (at or above the site), both at the answer positions.

    The site's cached output is guided by ``injector``'s current vectors (as its hook would), then
    only the blocks above run, over the answer positions, reading the prompt's cached keys and
    values. Forward hooks on those blocks (further guidance sites) fire as in a full pass; call it
    inside the injector's ``guide(vectors, prefix.answer_mask())`` block."""
    layers = decoder_layers(model)
    site = lowest_site(injector)
    upper = range(site + 1, len(layers))
    if len(upper) and prefix.keys.shape[1] != len(upper):
        raise ValueError(f"The cached prefix holds {prefix.keys.shape[1]} layers above its site, but guidance "
                         f"from layer {site} needs {len(upper)}; rebuild the latent cache for this site.")
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    total = prefix.keys.shape[3] + prefix.site_states.shape[1]
    if window is not None and getattr(config, "use_sliding_window", True) and total > window:
        raise PrefixUnsupportedError(f"Rows of {total} positions exceed the model's sliding window of {window}.")
    backbone = _backbone(model)
    hidden = injector.apply(injector.layers.index(site), prefix.site_states)
    positions = prefix.prefix_lengths[:, None] + torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    cache = DynamicCache(ddp_cache_data=[(None, None)] * (site + 1)
                         + [(prefix.keys[:, i], prefix.values[:, i]) for i in range(len(upper))])
    mask = _attention_mask(prefix, hidden.dtype)
    rotary = backbone.rotary_emb(hidden, position_ids=positions)
    wanted = {layer % len(layers) for layer in capture}
    if any(layer < site for layer in wanted):
        raise ValueError(f"Layers {sorted(wanted)} cannot be read from a pass that starts at layer {site}.")
    captured = {site: hidden} if site in wanted else {}
    for layer in upper:
        hidden = layer_hidden(layers[layer](hidden, attention_mask=mask, position_embeddings=rotary,
                                            position_ids=positions, past_key_values=cache, use_cache=True))
        if layer in wanted:
            captured[layer] = hidden
    return backbone.norm(hidden), captured


def answer_logits(model: nn.Module, hidden: torch.Tensor, prefix: FrozenPrefix) -> torch.Tensor:
    """(N, vocabulary) logits of every valid answer position of :func:`forward_from_site`'s hidden
    states, row by row: the rows and order of :func:`pilot.sequences.labelled_logits` over the same rows."""
    return model.get_output_embeddings()(hidden[prefix.answer_mask()])


# ------------------------------------------------------------------------------ any reply: the prompt's cache
@dataclass
class PromptCache:
    """The prompts' keys and values at every layer, for teacher-forcing replies that are not known
    in advance (stage 2's sampled replies): computed once per batch of questions, without gradient,
    and reused by every guided pass over their replies."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: (B, kv_heads, P, head_dim) keys, values
    prefix_lengths: torch.Tensor                      # (B,) prompt positions before the first answer position

    def repeat_interleave(self, k: int) -> PromptCache:
        """Each row ``k`` times in a row (a group of replies per question)."""
        index = torch.arange(len(self.prefix_lengths), device=self.prefix_lengths.device).repeat_interleave(k)
        return self.select(index)

    def select(self, rows: torch.Tensor) -> PromptCache:
        return PromptCache([(keys[rows], values[rows]) for keys, values in self.layers], self.prefix_lengths[rows])


@torch.no_grad()
def prompt_cache(model: nn.Module, batch: TokenBatch) -> PromptCache:
    """One unguided pass over each row's prompt minus its last token (the positions guidance never
    reaches): the keys and values every later guided pass over an answer reads."""
    prefix_lengths = batch.prompt_lengths - 1
    width = int(prefix_lengths.max())
    device = next(model.parameters()).device
    mask = lengths_to_mask(prefix_lengths, width)
    out = model(input_ids=batch.input_ids[:, :width].to(device), attention_mask=mask.long().to(device),
                use_cache=True, logits_to_keep=1)
    return PromptCache([(layer.keys, layer.values) for layer in out.past_key_values.layers], prefix_lengths.to(device))


def answer_part(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Ta) the input tokens at each row's answer positions (pad after the row) and (B, Ta) their mask."""
    start, lengths = batch.prompt_lengths - 1, batch.target_lengths
    width = int(lengths.max())
    index = (start[:, None] + torch.arange(width)[None, :]).clamp(max=batch.input_ids.shape[1] - 1)
    mask = lengths_to_mask(lengths, width)
    return batch.input_ids.gather(1, index).masked_fill(~mask, 0), mask


def forward_after_prompt(model: nn.Module, cache: PromptCache, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The model over each row's answer positions only, reading its prompt from ``cache``, through the
    model's own cache interface: (logits (N, vocabulary) of the valid answer positions row by row, as
    :func:`pilot.sequences.labelled_logits` gives them, and the (B, Ta) answer mask). Guidance hooks
    fire as in a full pass; give the injector the returned mask's shape (``answer_part``)."""
    device = cache.prefix_lengths.device
    ids, answer_mask = (t.to(device) for t in answer_part(batch))
    width = cache.layers[0][0].shape[2]
    prompt_mask = lengths_to_mask(cache.prefix_lengths, width)
    positions = cache.prefix_lengths[:, None] + torch.arange(ids.shape[1], device=device)[None, :]
    past = DynamicCache(ddp_cache_data=list(cache.layers))
    logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, answer_mask], dim=1).long(),
                   position_ids=positions, past_key_values=past, use_cache=True, logits_to_keep=answer_mask).logits
    return (logits if logits.dim() == 2 else logits[answer_mask]), answer_mask
