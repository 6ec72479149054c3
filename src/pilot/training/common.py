"""Pieces every training loop shares: seeding, batches, schedule, finite-loss guard, logging."""

from __future__ import annotations

import logging
import math
import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stopped with the last good checkpoint kept."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def step_rng(seed: int, step: int) -> random.Random:
    """Randomness for one step, derived from (seed, step) so a resumed run draws the same."""
    return random.Random(seed * 1_000_003 + step)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_batch(population: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of one training batch: a fresh permutation per epoch, sliced per step."""
    if population <= 0:
        raise ValueError("Cannot train on an empty set of examples.")
    batch_size = min(batch_size, population)
    per_epoch = population // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = list(range(population))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order[offset * batch_size:(offset + 1) * batch_size]


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the base rate."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


def check_finite(terms: dict[str, torch.Tensor | float], step: int) -> None:
    """Stop on the first NaN/inf loss term, naming it and the step."""
    for name, value in terms.items():
        number = float(value.detach()) if torch.is_tensor(value) else float(value)
        if not math.isfinite(number):
            raise NonFiniteLossError(
                f"Loss term '{name}' became {number} at step {step}; training stopped and the last "
                "good checkpoint is kept. Lower the learning rate or that term's weight."
            )


class ProgressLog:
    """A tqdm bar with counts and ETA, a history of per-step metrics, and a closing summary."""

    def __init__(self, name: str, total_steps: int, start_step: int = 0,
                 history: list[dict[str, float]] | None = None) -> None:
        self.name = name
        self.history = list(history or [])
        self.started = time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]}, refresh=False)
        self.bar.update(1)

    def close(self, summary: str = "") -> float:
        self.bar.close()
        seconds = time.perf_counter() - self.started
        last = self.history[-1] if self.history else {}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step")
        logger.info("%s finished in %.1fs (%d steps logged; last: %s)%s", self.name, seconds,
                    len(self.history), shown, f" {summary}" if summary else "")
        return seconds
