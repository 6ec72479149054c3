"""Ops whose bits do not depend on torch's thread count, where torch's own do; every model uses them.

The thread count must change a run's speed, never its numbers (pilot.runtime shares the cores with
other jobs). Measured op by op on torch 2.13's CPU wheel at 1 and 2 threads (BENCHMARKS.md, "Same numbers
at any thread count"), matrix products, solves, norms, log-softmax and cross-entropy, and reductions along
a dimension give the same bits; these do not, and each has a stand-in here:

* scaled-dot-product attention when fewer queries attend to more keys (decoding with a key-value cache,
  PILOT's steps above the guided layer): its flash kernel's forward and its math kernel's backward vary.
  Over whole sequences (training, a prompt's first pass) it does not, and is faster: it is kept there.
  :func:`invariant_attention` is the ``attn_implementation`` of every model :mod:`pilot.models` loads.
* ``softmax``'s backward (:func:`softmax`), e.g. PILOT's attention reader.
* ``layer_norm``'s backward, whose weight and bias gradients sum over rows by thread (:class:`LayerNorm`).
* indexing that repeats rows (``x[[0, 0, 1, 1]]``), whose backward accumulates the repeats by thread
  (:func:`repeat_rows`).

Elsewhere: a sum or mean of a whole tensor of 32,768 elements or more is split by threads (the code
takes norms or per-row sums there), and MKL's QR factorization (:func:`pilot.runtime.one_thread`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "pilot_invariant"   # the ``attn_implementation`` of every model pilot.models builds or loads


def softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.softmax`` from per-row max, exp and sum: the same values, and a backward whose bits do not
    follow the thread count (``torch.softmax``'s own backward does, measured on rows of 21 and 26 values;
    ``log_softmax`` and ``cross_entropy`` do not). Rows of ``-inf`` only give zeros."""
    top = scores.amax(dim=dim, keepdim=True).detach().clamp_min(torch.finfo(scores.dtype).min)
    weights = (scores - top).exp()
    return weights / weights.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scaling: float) -> torch.Tensor:
    """``softmax(q k^T * scaling, masked) v`` over ``[batch, heads, positions, dim]``; ``mask`` is boolean
    (True: attend), broadcast over heads, or None (every query sees every key)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(softmax(scores), value)


def repeat_rows(rows: torch.Tensor, times: int) -> torch.Tensor:
    """``rows.repeat_interleave(times, dim=0)`` (each row ``times`` times in a row), whose gradient is a sum
    along a dimension; indexing with repeated rows would accumulate the repeats in an order that follows
    the thread count. Select from the result with distinct indices (``repeat_rows(x, k)[keep]``)."""
    return rows.unsqueeze(1).expand(rows.shape[0], times, *rows.shape[1:]).reshape(-1, *rows.shape[1:])


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same values) computed from per-row mean and variance, so its
    weight and bias gradients are sums along a dimension, whose bits never follow the thread count."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = states.mean(dim=dims, keepdim=True)
        centred = states - mean
        variance = centred.pow(2).mean(dim=dims, keepdim=True)
        normed = centred * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            normed = normed * self.weight
        if self.bias is not None:
            normed = normed + self.bias
        return normed


def invariant_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The transformers attention interface: SDPA over whole sequences, :func:`attend` for fewer queries."""
    if query.shape[2] == key.shape[2] or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    mask = attention_mask
    if mask is None and query.shape[2] > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        # SDPA's is_causal: query i sees keys 0..i (aligned to the top left), exactly as SDPA would compute it
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if mask is not None and mask.dtype != torch.bool:
        mask = mask == 0   # an additive mask: 0 where attended
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(query, key, value, mask, scale).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, invariant_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
