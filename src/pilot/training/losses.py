"""The loss terms of PILOT's two stages, each in one place, under the name it is logged with.

Stage 1 (:mod:`pilot.training.stage1`): ``alignment``, ``contrastive``, ``lm``, ``latent_rl``.
Stage 2 (:mod:`pilot.training.stage2`): ``policy``, ``self_supervision``, ``anchor``.
The language-modelling terms are :func:`pilot.sequences.next_token_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_answer_states(states: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, d) states -> (B, length, d) at positions start..start+length-1 (clamped)."""
    start = start.to(states.device)
    index = (start[:, None] + torch.arange(length, device=states.device)[None, :]).clamp(max=states.shape[1] - 1)
    return states.gather(1, index[..., None].expand(-1, -1, states.shape[-1]))


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) states, (B, T) mask -> (B, d) mean over the masked positions."""
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def alignment_loss(guided: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``alignment``: (1 - cosine) + squared error relative to the target's mean square, averaged
    over the valid positions of ``mask``."""
    cosine = F.cosine_similarity(guided, target, dim=-1)
    scale = target.pow(2).mean(-1).clamp_min(1e-6)
    relative_mse = (guided - target).pow(2).mean(-1) / scale
    per_position = (1 - cosine) + relative_mse
    return (per_position * mask).sum() / mask.sum().clamp_min(1)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """``contrastive`` (InfoNCE): row i of ``queries`` should match row i of ``keys`` among all rows.

    Each side is centred on its batch mean before the cosine: residual-stream states share a large
    common component that would otherwise make every pair look alike."""
    queries, keys = queries - queries.mean(0, keepdim=True), keys - keys.mean(0, keepdim=True)
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def reinforce_loss(advantages: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """Policy gradient: minimising it raises the log-probability of actions with positive advantage.

    ``advantages`` are constants (detached); the gradient flows through ``log_prob`` only.
    """
    return -(advantages.reshape(-1).detach() * log_prob).mean()


def mean_baseline_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Stage 1's latent RL: each sample's reward minus its query's mean reward (rows are queries)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each sample's reward relative to its group (a row), scaled by the group's spread."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def zero_variance_fraction(rewards: torch.Tensor) -> torch.Tensor:
    """The fraction of groups (rows) whose rewards are all equal: their advantages are all zero."""
    return (rewards == rewards[:, :1]).all(dim=1).float().mean()
