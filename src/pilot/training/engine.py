"""The one training engine: what stage 1, stage 2, LoRA and the embedded base models all run.

A stage supplies only its loss terms for a step (:class:`Objective`); the engine owns the rest,
in this order every step: learning-rate schedule, the terms (one dict per micro-batch, each
backpropagated as it comes, so length-bucketed batches never hold two graphs), the finite-loss
guard, gradient clipping, the optimizer step, an optional moving average of the weights
(``ema_decay``), the history row and progress bar, validation with best-checkpoint selection, and
resumable checkpoints.

The history shows what trains: ``grad_norm`` (the summed gradient's norm before clipping) every
step and, every ``grad_norm_every`` steps, ``grad_norm/<term>``: each weighted term's own
gradient norm on the trained parameters, so a term that swamps or never reaches the others is
visible. Measuring it reads the gradients only; the update is the same with or without it. Randomness derives from
``(seed, step)``, so a run resumed from a checkpoint draws exactly what the uninterrupted run
would have.

With N data-parallel processes (:mod:`pilot.distributed`, started by ``torchrun``) each rank's
terms are its additive share of the global batch's; the engine sums the gradients and the logged
values over the ranks before the finite-loss guard and the clipping, so every rank takes the
one-process step. Only rank 0 writes checkpoints; every rank resumes from them, whatever N was.

Interventions a stage attaches (the guided student's injector) are the stage's ``with`` blocks
around :func:`train`, so they come off however training ends: success, a pruned Optuna trial,
a NaN stop or an error.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pilot import distributed
from pilot.checkpoint import CheckpointManager
from pilot.config import LoopParams
from pilot.runtime import share_cores
from pilot.tracking import metric_records

logger = logging.getLogger(__name__)

Terms = dict[str, torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stopped with the last good checkpoint kept."""


# ------------------------------------------------------------------------------ randomness
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of one step's draws from one stream (guidance noise 0, sampled replies 1, ...)."""
    return seed * 1_000_003 + step + stream * 2_147_483_647


def step_generator(seed: int, step: int) -> torch.Generator:
    """A torch generator for one step, derived from (seed, step) so a resumed run draws the same."""
    return torch.Generator().manual_seed(step_seed(seed, step))


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


def sharded_score(rows: pd.DataFrame, score: Callable[[pd.DataFrame], float]) -> float:
    """The mean ``score`` over ``rows`` (accuracy, say) with each data-parallel process scoring its
    shard of them: every process gets the whole set's value (one process scores them all)."""
    current = distributed.world()
    if not current.parallel:
        return score(rows)
    mine = rows.iloc[current.rank::current.size]
    total = score(mine) * len(mine) if len(mine) else 0.0
    value = torch.tensor([total], dtype=torch.float64)
    distributed.all_reduce_sum([value])
    return float(value) / max(len(rows), 1)


# ------------------------------------------------------------------------------ schedule and guards
def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the base rate."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_finite(terms: Mapping[str, torch.Tensor | float], step: int) -> None:
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
        self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True,
                        disable=not distributed.is_main_process())  # one bar per run, rank 0's

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]}, refresh=False)
        self.bar.update(1)
        share_cores()  # the thread count follows the machine's load (pilot.runtime)

    def close(self, summary: str = "") -> float:
        self.bar.close()
        seconds = time.perf_counter() - self.started
        last = self.history[-1] if self.history else {}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step")
        logger.info("%s finished in %.1fs (%d steps logged; last: %s)%s", self.name, seconds,
                    len(self.history), shown, f" {summary}" if summary else "")
        return seconds


# ------------------------------------------------------------------------------ the loop
@dataclass
class Objective:
    """A stage's part of training: its loss terms for one step, and which of them train.

    ``step_terms(step)`` yields one dict of named terms per micro-batch (most stages: one).
    Terms named in ``weights`` are summed with those weights and backpropagated; any other term
    (a reward, say) is only logged. Every term is logged under its name: over several micro-batches
    the trained terms are summed (like their gradients), the logged-only metrics averaged.
    """

    step_terms: Callable[[int], Iterable[Terms]]
    weights: Mapping[str, float]


@dataclass
class TrainingResult:
    model: nn.Module                          # the selected weights: best on validation, else the last
    history: list[dict[str, float]]
    validation: list[dict[str, float]] = field(default_factory=list)
    best_step: int = -1
    best_val_accuracy: float = float("nan")
    seconds: float = 0.0

    def history_with_validation(self) -> list[dict[str, float]]:
        """The per-step history with ``val_accuracy`` on the validated steps (step 0: before training),
        so one table (and one MLflow metric history per column) holds the loss and validation curves."""
        rows = {int(row["step"]): dict(row) for row in self.history}
        for row in self.validation:
            rows.setdefault(int(row["step"]), {"step": row["step"]})["val_accuracy"] = row["val_accuracy"]
        return [rows[step] for step in sorted(rows)]

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, float]]]:
        """The per-step history, the validation curve and summary metrics, as a pipeline saves them."""
        summary = {"best_val_accuracy": self.best_val_accuracy, "best_step": self.best_step,
                   "train_seconds": self.seconds}
        return pd.DataFrame(self.history), pd.DataFrame(self.validation), metric_records(summary)


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Sum of ``weight * term`` over the weighted terms present, in the order of ``weights``."""
    present = [name for name in weights if name in terms]
    if not present:
        raise ValueError(f"A step produced none of the trained terms {list(weights)} (got {list(terms)}).")
    return sum(weights[name] * terms[name] for name in present)


def _accumulate(total: dict[str, torch.Tensor | float], counts: dict[str, int],
                terms: Mapping[str, torch.Tensor]) -> None:
    for name, value in terms.items():
        value = value.detach() if torch.is_tensor(value) else value
        total[name] = total[name] + value if name in total else value
        counts[name] = counts.get(name, 0) + 1


def _step_values(total: Mapping[str, torch.Tensor | float], counts: Mapping[str, int],
                 summed: Iterable[str]) -> dict[str, torch.Tensor | float]:
    """A step's logged values from its micro-batches: the trained terms and ``total`` summed (their
    gradients add up to the step's), every other term (a metric: a reward, a fraction) averaged over
    the micro-batches that reported it -- a reward of 0.5 in each of two micro-batches is 0.5, not 1."""
    summed = set(summed)
    return {name: value if name in summed else value / counts[name] for name, value in total.items()}


def term_gradients(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                   parameters: list[nn.Parameter]) -> dict[str, list[torch.Tensor]]:
    """Each weighted term's own gradient (``weight * term``) on ``parameters``; the graph is kept
    for the backward of the total and no ``.grad`` is touched. A term that reaches no trained
    parameter (say, a zero placeholder) has a zero gradient."""
    gradients = {}
    for name, weight in weights.items():
        if name not in terms or weight == 0:
            continue
        term = terms[name]
        if torch.is_tensor(term) and term.requires_grad:
            found = torch.autograd.grad(weight * term, parameters, retain_graph=True, allow_unused=True)
        else:
            found = [None] * len(parameters)
        gradients[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, found)]
    return gradients


def gradient_norm(gradients: Iterable[torch.Tensor]) -> float:
    """The gradients' total L2 norm, as clipping computes it (norms, not a whole-tensor sum: torch splits a sum
    over 32,768 elements or more by threads, so its bits would follow the thread count)."""
    norms = [torch.linalg.vector_norm(g.detach().float()) for g in gradients]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def reduce_step(parameters: list[nn.Parameter], logged: dict[str, torch.Tensor | float],
                per_term: dict[str, list[torch.Tensor]]) -> None:
    """Sum a step's gradients, logged values and per-term gradients over the data-parallel ranks
    (one collective), in place: each rank held its share, every rank now holds the whole step's."""
    # Every rank must send the same values in the same order: the union of the names, sorted (a rank
    # whose shard produced no value of a metric sends 0 for it). A parameter no rank's terms reached
    # keeps no gradient, as in one process (AdamW then leaves it alone; a zero gradient would move it).
    seen = distributed.all_gather_objects((sorted(logged), [p.grad is not None for p in parameters]))
    names = sorted(set().union(*(found for found, _ in seen)))
    reached = [any(flags[i] for _, flags in seen) for i in range(len(parameters))]
    for p, wanted in zip(parameters, reached):
        if wanted and p.grad is None:
            p.grad = torch.zeros_like(p)
    logged.update({name: 0.0 for name in names if name not in logged})
    values = [torch.as_tensor(logged[name], dtype=torch.float64).detach().reshape(1).clone() for name in names]
    terms = [grad for grads in per_term.values() for grad in grads]
    distributed.all_reduce_sum([p.grad for p, wanted in zip(parameters, reached) if wanted] + values + terms)
    logged.update({name: value[0] for name, value in zip(names, values)})


class WeightAverage:
    """An exponential moving average of ``model``'s trained parameters (Polyak averaging):
    ``average = decay * average + (1 - decay) * weights`` after every optimizer step, starting from
    the weights training starts from. ``module`` is a copy of the model that holds it (checkpointed
    with the run); ``swapped_in()`` puts the average into the model for a while (validation)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model)
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        own, copied = dict(model.named_parameters()), dict(self.module.named_parameters())
        self.pairs = [(own[name], copied[name]) for name in names]

    @torch.no_grad()
    def update(self) -> None:
        for weight, average in self.pairs:
            average.lerp_(weight, 1 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for weight, average in self.pairs:
            weight.copy_(average)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        trained = [weight.detach().clone() for weight, _ in self.pairs]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for (weight, _), kept in zip(self.pairs, trained):
                    weight.copy_(kept)


def train(model: nn.Module, objective: Objective, loop: LoopParams, *, name: str,
          validate: Callable[[], float] | None = None,
          checkpoints: CheckpointManager | None = None,
          saved_with_model: Mapping[str, nn.Module] | None = None,
          on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Train the parameters of ``model`` that require gradients on ``objective``.

    With ``validate`` (a function returning validation accuracy, run in eval mode) the model is
    validated before the first step and every ``loop.eval_every`` steps, and the best of those
    is returned; ``on_validation(step, accuracy)`` follows each validation (Optuna prunes there).
    Without it the last weights are returned. With ``loop.ema_decay`` the moving average of the
    weights stands in for the weights in both cases (validated, selected, returned); training itself
    steps the weights as ever. ``checkpoints`` are resumed from when they belong
    to the same run; ``saved_with_model`` are further modules checkpointed alongside (e.g. a
    frozen reference), restored on resume.
    """
    set_seed(loop.seed)
    checkpoints = checkpoints or CheckpointManager(None, 0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=loop.learning_rate, weight_decay=loop.weight_decay,
                                  betas=loop.betas)
    best = copy.deepcopy(model) if validate is not None else None
    average = WeightAverage(model, loop.ema_decay) if loop.ema_decay is not None else None
    modules = {"model": model, **({"best": best} if best is not None else {}),
               **({"average": average.module} if average is not None else {}), **(saved_with_model or {})}
    start_step, history, validation = 0, [], []
    best_state = {"step": -1, "accuracy": -1.0}
    ranks = distributed.world()
    if checkpoints.enabled:
        distributed.barrier()  # rank 0 may have just cleared this run's checkpoints (resume: false)
    restored = checkpoints.restore(modules, optimizer) if checkpoints.enabled else None
    if restored is not None:
        start_step, history = restored.step, restored.history
        validation, best_state = restored.extra["validation"], restored.extra["best"]
    elif ranks.parallel:  # every rank starts from rank 0's weights, however each built its own
        distributed.broadcast_from_main(parameters)

    def run_validation(step: int) -> None:
        model.eval()
        with average.swapped_in() if average is not None else contextlib.nullcontext():
            value = validate()
            if value > best_state["accuracy"]:
                best_state.update(step=step, accuracy=value)
                best.load_state_dict(model.state_dict())
        model.train()
        validation.append({"step": step, "val_accuracy": value})
        if on_validation is not None:
            on_validation(step, value)

    log = ProgressLog(name if ranks.is_main else f"{name} [rank {ranks.rank}]", loop.steps, start_step, history)
    try:
        if validate is not None and start_step == 0:
            run_validation(0)
        model.train()
        for step in range(start_step, loop.steps):
            rate = learning_rate(step, loop.steps, loop.learning_rate, loop.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = rate
            logged: dict[str, torch.Tensor | float] = {}
            counts: dict[str, int] = {}
            per_term: dict[str, list[torch.Tensor]] = {}
            measure_terms = bool(loop.grad_norm_every) and step % loop.grad_norm_every == 0
            for terms in objective.step_terms(step):
                total = weighted_total(terms, objective.weights)
                terms = {**terms, "total": total}
                if not ranks.parallel:  # in parallel the reduced values are checked, so every rank stops together
                    check_finite(terms, step)
                if measure_terms:  # summed over micro-batches, like the total's gradient
                    for term, grads in term_gradients(terms, objective.weights, parameters).items():
                        per_term[term] = [a + b for a, b in zip(per_term[term], grads)] if term in per_term else grads
                total.backward()
                _accumulate(logged, counts, terms)
            logged = _step_values(logged, counts, [*objective.weights, "total"])
            if ranks.parallel:
                reduce_step(parameters, logged, per_term)
            check_finite(logged, step)
            logged["grad_norm"] = torch.nn.utils.clip_grad_norm_(parameters, loop.clip_norm)
            logged.update({f"grad_norm/{term}": gradient_norm(grads) for term, grads in per_term.items()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update()
            done = step + 1
            log.log(done, {k: float(v) for k, v in logged.items()})
            if validate is not None and ((loop.eval_every and done % loop.eval_every == 0) or done == loop.steps):
                run_validation(done)
            if ranks.is_main and (checkpoints.due(done) or (checkpoints.enabled and done == loop.steps)):
                checkpoints.save(done, modules, optimizer, log.history, {"validation": validation, "best": best_state})
    finally:
        summary = f"best val accuracy {best_state['accuracy']:.3f} at step {best_state['step']}" if validate else ""
        seconds = log.close(summary)
    model.eval()
    if best is None:
        if average is not None:
            average.copy_to_model()
        return TrainingResult(model, log.history, seconds=seconds)
    if best_state["step"] == 0 and loop.steps > 0:
        logger.warning("%s: no validation step beat step 0, so the selected weights are the untrained start "
                       "(validation accuracy %.3f); its test results are those of the start.", name,
                       best_state["accuracy"])
    best.eval()
    return TrainingResult(best, log.history, validation, best_state["step"], best_state["accuracy"], seconds)
