"""The loss terms of PILOT's two stages, each in one place, under the name it is logged with.

Stage 1 (:mod:`pilot.training.stage1`): ``alignment``, ``contrastive``, ``lm``, ``latent_rl``.
Stage 2 (:mod:`pilot.training.stage2`): ``policy`` (token-level clipped policy gradient,
:func:`token_policy_loss`, or REINFORCE on a latent Gaussian, :func:`reinforce_loss`), ``kl``
(:func:`token_kl`), ``self_supervision``, ``anchor``.
The language-modelling terms are :func:`pilot.sequences.next_token_loss`.
"""

from __future__ import annotations

from typing import Literal

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


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO: each sample's reward relative to its group (a row), scaled by the group's spread;
    ``scale=False`` leaves the spread out (Dr. GRPO: the scaling favours near-unanimous groups)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps) if scale else centred


LossType = Literal["dapo", "grpo", "dr_grpo"]


def _reduce_tokens(per_token: torch.Tensor, rows: torch.Tensor, num_rows: int, loss_type: LossType,
                   max_tokens: int) -> torch.Tensor:
    """Token values -> one number, as TRL's ``loss_type`` does it.

    ``dapo``: the mean over every token of the batch (a long reply counts per token, not per reply);
    ``grpo``: each reply's token mean, then the mean over replies (a long reply's tokens weigh less);
    ``dr_grpo``: the sum over tokens divided by a constant (replies x ``max_tokens``), no length bias.
    """
    if loss_type == "dapo":
        return per_token.sum() / max(per_token.numel(), 1)
    if loss_type == "dr_grpo":
        return per_token.sum() / max(num_rows * max_tokens, 1)
    sums = torch.zeros(num_rows, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    counts = torch.zeros(num_rows, dtype=per_token.dtype, device=per_token.device).index_add(
        0, rows, torch.ones_like(per_token))
    return (sums / counts.clamp_min(1)).mean()


def token_policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      rows: torch.Tensor, num_rows: int, clip_low: float = 0.2, clip_high: float = 0.2,
                      loss_type: LossType = "dapo", max_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``policy`` (token level, PPO-clipped as in GRPO / DAPO): ``-min(r A, clip(r, 1 - low, 1 + high) A)``.

    ``log_probs`` (N,) are the sampled reply tokens' log-probabilities under the current policy,
    ``old_log_probs`` (N,) under the policy that sampled them (equal, so the ratio r is 1, with one
    update per batch), ``rows`` (N,) each token's reply, ``advantages`` (num_rows,) each reply's.
    Returns the loss and the clip ratio: the fraction of tokens whose clipped side was taken
    (their gradient is zero)."""
    advantage = advantages.detach()[rows]
    ratio = torch.exp(log_probs - old_log_probs.detach())
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        taken = ((ratio < 1 - clip_low) & (advantage < 0)) | ((ratio > 1 + clip_high) & (advantage > 0))
        clip_ratio = taken.float().mean() if taken.numel() else torch.zeros((), device=log_probs.device)
    return _reduce_tokens(per_token, rows, num_rows, loss_type, max_tokens), clip_ratio


def token_kl(log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """``kl``: the per-token KL(policy || reference) estimate GRPO uses (Schulman's k3, always >= 0),
    ``exp(ref - logp) - (ref - logp) - 1``, averaged over the tokens."""
    delta = reference_log_probs.detach() - log_probs
    return (torch.exp(delta) - delta - 1).mean() if delta.numel() else log_probs.sum() * 0


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits and (N,) target tokens -> each target's log-probability (N,) and each position's
    entropy (N,) (detached: entropy is logged, not trained)."""
    log_softmax = torch.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_softmax.gather(1, targets[:, None]).squeeze(1), entropy


def zero_variance_fraction(rewards: torch.Tensor) -> torch.Tensor:
    """The fraction of groups (rows) whose rewards are all equal: their advantages are all zero."""
    return (rewards == rewards[:, :1]).all(dim=1).float().mean()
