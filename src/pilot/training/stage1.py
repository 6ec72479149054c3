"""Stage 1: teacher-guided imitation in latent space.

The frozen student reads the query without a plan; the hyper-network turns that reading into
a guidance vector g, injected at ``inject_layer``. Four losses, each in one place below and
logged under the same name:

- ``alignment``: guided plan-free states at the alignment layers and answer positions vs the
  cached plan-conditioned states (1 - cosine, plus MSE relative to the target's scale);
- ``contrastive``: InfoNCE -- a query's guided state must be closer to its own
  plan-conditioned state than to the other queries' in the batch (temperature ``tau``);
- ``lm``: cross-entropy of the gold answer with guidance on;
- ``latent_rl``: g is the mean of a Gaussian policy; sampled vectors are decoded, rewarded by
  the verifier plus latent similarity to the target, and trained by REINFORCE with a
  per-query mean baseline.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from pilot.checkpoint import CheckpointManager
from pilot.config import GenerationParams, GuidanceParams, LatentsParams, Stage1Config
from pilot.evaluation import accuracy
from pilot.generation import Guidance, generate
from pilot.guidance import GuidanceInjector, HyperNetConfig, HyperNetwork, capture_layers
from pilot.latents import (
    CachedLatents,
    LatentBatch,
    LatentCache,
    RecomputedLatents,
    lengths_to_mask,
    plan_cache_build,
    select_examples,
)
from pilot.models import CausalLM, freeze
from pilot.prompts import answer_prompt, continuation
from pilot.sequences import encode_pairs, shift_labels_loss
from pilot.training.common import (
    ProgressLog,
    check_finite,
    learning_rate,
    sample_batch,
    set_learning_rate,
    set_seed,
    step_generator,
)
from pilot.verifier import score_answers

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    hypernet: HyperNetwork
    history: list[dict[str, float]]
    validation: list[dict[str, float]]
    best_step: int
    best_val_accuracy: float
    seconds: float


def gather_answer_states(states: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, d) states -> (B, length, d) at positions start..start+length-1 (clamped)."""
    start = start.to(states.device)
    index = (start[:, None] + torch.arange(length, device=states.device)[None, :]).clamp(max=states.shape[1] - 1)
    return states.gather(1, index[..., None].expand(-1, -1, states.shape[-1]))


def alignment_loss(guided: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1 - cosine) + squared error relative to the target's mean square, over valid positions."""
    cosine = F.cosine_similarity(guided, target, dim=-1)
    scale = target.pow(2).mean(-1).clamp_min(1e-6)
    relative_mse = (guided - target).pow(2).mean(-1) / scale
    per_position = (1 - cosine) + relative_mse
    return (per_position * mask).sum() / mask.sum().clamp_min(1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: row i of ``queries`` should match row i of ``keys`` among all rows."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


class GuidedStudent:
    """The frozen student with a guidance injector: the forward passes both stages train through."""

    def __init__(self, student: CausalLM, hypernet: HyperNetwork) -> None:
        self.student = student
        freeze(student.model)
        self.hypernet = hypernet
        self.injector = GuidanceInjector(student.model, hypernet.config.inject_layer,
                                         hypernet.config.guidance_scale)

    def guidance(self, vectors: torch.Tensor | None = None) -> Guidance:
        return Guidance(self.injector, hypernet=None if vectors is not None else self.hypernet, vectors=vectors)

    @torch.no_grad()
    def query_states(self, questions: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """The plan-free reading of each question at the hyper-network's read layer (prompt minus last token)."""
        layer = self.hypernet.config.resolved_read_layer()
        states, masks = [], []
        for start in range(0, len(questions), batch_size):
            batch = encode_pairs(self.student.tokenizer, [answer_prompt(q) for q in questions[start:start + batch_size]],
                                 [""] * len(questions[start:start + batch_size]))
            with capture_layers(self.student.model, [layer]) as captured:
                self.student.model(input_ids=batch.input_ids.to(self.student.device),
                                   attention_mask=batch.attention_mask.to(self.student.device))
            mask = batch.query_mask()
            states.extend(captured[layer][i][mask[i]].cpu() for i in range(len(mask)))
            masks.extend(int(m.sum()) for m in mask)
        width = max(masks)
        out = states[0].new_zeros((len(states), width, states[0].shape[-1]))
        for i, s in enumerate(states):
            out[i, : s.shape[0]] = s
        return out, torch.tensor(masks)

    @torch.no_grad()
    def guidance_vectors(self, questions: list[str]) -> torch.Tensor:
        """The hyper-network's guidance vector for each question (as used at generation time)."""
        states, lengths = self.query_states(questions)
        device = next(self.hypernet.parameters()).device
        mask = lengths_to_mask(lengths, states.shape[1])
        return self.hypernet(states.to(device), mask.to(device)).cpu()

    def teacher_forced(self, questions: list[str], answers: list[str], vectors: torch.Tensor,
                       layers: list[int]):
        """Guided forward on question + answer; returns (batch, logits, {layer: states})."""
        batch = encode_pairs(self.student.tokenizer, [answer_prompt(q) for q in questions],
                             [continuation(a) for a in answers]).to(self.student.device)
        with self.injector.guide(vectors, batch.answer_position_mask()), \
                capture_layers(self.student.model, layers) as captured:
            logits = self.student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return batch, logits, dict(captured)

    def sample_and_score(self, rows: pd.DataFrame, actions: torch.Tensor, num_samples: int,
                         max_new_tokens: int) -> tuple[torch.Tensor, list[str]]:
        """Decode each row once per sampled guidance vector and verify; rewards shaped (B, K)."""
        repeated = rows.loc[rows.index.repeat(num_samples)]
        result = generate(self.student, [answer_prompt(q) for q in repeated["question"]],
                          max_new_tokens=max_new_tokens, batch_size=len(repeated), guidance=self.guidance(actions))
        rewards = score_answers(repeated["task"].tolist(), result.answers, repeated["answer"].tolist(),
                                repeated["metadata"].tolist(), repeated["question"].tolist())
        return torch.tensor(rewards, device=self.student.device).view(len(rows), num_samples), result.answers

    def remove(self) -> None:
        self.injector.remove()


def stage1_losses(guided: GuidedStudent, batch: LatentBatch, vectors: torch.Tensor, questions: list[str],
                  answers: list[str], align_layers: list[int], temperature: float) -> dict[str, torch.Tensor]:
    """The alignment, contrastive and language-modelling terms for one batch, each in one place."""
    width, last = batch.targets.shape[1], len(align_layers) - 1
    tokens, logits, states = guided.teacher_forced(questions, answers, vectors, align_layers)
    start = tokens.prompt_lengths - 1
    guided_states = torch.stack(
        [gather_answer_states(states[layer], start, width) for layer in align_layers], dim=2).float()
    return {
        "alignment": alignment_loss(guided_states, batch.targets,
                                    batch.target_mask[..., None].expand(-1, -1, len(align_layers))),
        "contrastive": info_nce(masked_mean(guided_states[:, :, last], batch.target_mask),
                                masked_mean(batch.targets[:, :, last], batch.target_mask), temperature),
        "lm": shift_labels_loss(logits, tokens.labels),
    }


def train_stage1(
    student: CausalLM,
    hypernet: HyperNetwork,
    latents: CachedLatents | RecomputedLatents,
    examples: pd.DataFrame,
    val_rows: pd.DataFrame,
    align_layers: list[int],
    config: Stage1Config,
    generation: GenerationParams,
    checkpoints: CheckpointManager | None = None,
    on_validation: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Train ``hypernet`` on the plan-conditioned trajectories of ``examples`` (rows in cache order).

    ``on_validation(step, accuracy)`` is called after each validation (Optuna prunes there).
    """
    set_seed(config.seed)
    device = student.device
    hypernet.to(device)
    checkpoints = checkpoints or CheckpointManager(None, 0)
    guided = GuidedStudent(student, hypernet)
    best = copy.deepcopy(hypernet)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    start_step, history, validation = 0, [], []
    best_state = {"step": -1, "accuracy": -1.0}
    restored = checkpoints.restore({"hypernet": hypernet, "best": best}, optimizer) if checkpoints.enabled else None
    if restored is not None:
        start_step, history = restored.step, restored.history
        validation, best_state = restored.extra["validation"], restored.extra["best"]

    questions, answers = examples["question"].tolist(), examples["answer"].tolist()
    last = len(align_layers) - 1
    log = ProgressLog("stage1", config.steps, start_step, history)

    def validate(step: int) -> None:
        hypernet.eval()
        value = accuracy(student, val_rows, guidance=guided.guidance(), max_new_tokens=generation.max_new_tokens,
                         batch_size=generation.batch_size)
        hypernet.train()
        validation.append({"step": step, "val_accuracy": value})
        if value > best_state["accuracy"]:
            best_state.update(step=step, accuracy=value)
            best.load_state_dict(hypernet.state_dict())
        if on_validation is not None:
            on_validation(step, value)

    if start_step == 0:
        validate(0)  # the untrained hyper-network is the zero-shot student (zero-initialised output)
    hypernet.train()
    for step in range(start_step, config.steps):
        index = torch.tensor(sample_batch(len(examples), config.batch_size, config.seed, step))
        batch = latents.batch(index, device)
        vectors = hypernet(batch.query_states, batch.query_mask)
        rows = index.tolist()
        terms = stage1_losses(guided, batch, vectors, [questions[i] for i in rows], [answers[i] for i in rows],
                              align_layers, config.temperature)
        if config.rl_weight > 0 and step % config.rl_every == 0:
            terms["latent_rl"], terms["rl_reward"] = _latent_rl(
                guided, hypernet, vectors[: config.rl_batch], examples.iloc[rows[: config.rl_batch]],
                batch.targets[: config.rl_batch, :, last], batch.target_mask[: config.rl_batch], align_layers[last],
                config, generation, step)
        total = (config.alignment_weight * terms["alignment"] + config.contrastive_weight * terms["contrastive"]
                 + config.lm_weight * terms["lm"] + config.rl_weight * terms.get("latent_rl", 0.0))
        terms["total"] = total
        check_finite(terms, step)

        set_learning_rate(optimizer, learning_rate(step, config.steps, config.learning_rate, config.warmup_steps))
        total.backward()
        torch.nn.utils.clip_grad_norm_(hypernet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.log(step + 1, {name: float(value.detach() if torch.is_tensor(value) else value) for name, value in terms.items()})

        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            validate(done)
        if checkpoints.due(done) or (checkpoints.enabled and done == config.steps):
            checkpoints.save(done, {"hypernet": hypernet, "best": best}, optimizer, log.history,
                             {"validation": validation, "best": best_state})
    seconds = log.close(f"best val accuracy {best_state['accuracy']:.3f} at step {best_state['step']}")
    guided.remove()
    best.eval()
    return TrainingResult(best.cpu(), log.history, validation, best_state["step"], best_state["accuracy"], seconds)


def _latent_rl(guided: GuidedStudent, hypernet: HyperNetwork, means: torch.Tensor, rows: pd.DataFrame,
               targets: torch.Tensor, target_mask: torch.Tensor, layer: int, config: Stage1Config,
               generation: GenerationParams, step: int):
    """REINFORCE on sampled guidance vectors; reward = verifier success + latent similarity."""
    k = config.rl_samples
    actions, log_prob = hypernet.sample(means, k, generator=step_generator(config.seed, step))
    success, _ = guided.sample_and_score(rows, actions, k, generation.max_new_tokens)
    with torch.no_grad():
        repeated = rows.loc[rows.index.repeat(k)]
        batch, _, states = guided.teacher_forced(repeated["question"].tolist(), repeated["answer"].tolist(),
                                                 actions, [layer])
        width = targets.shape[1]
        sampled = gather_answer_states(states[layer], batch.prompt_lengths - 1, width).float()
        mask = target_mask.repeat_interleave(k, dim=0)
        similarity = F.cosine_similarity(masked_mean(sampled, mask),
                                         masked_mean(targets.repeat_interleave(k, dim=0), mask), dim=-1)
    reward = success + config.latent_reward_weight * similarity.view(-1, k)
    advantage = reward - reward.mean(dim=1, keepdim=True)
    loss = -(advantage.reshape(-1).detach() * log_prob).mean()
    return loss, success.mean()


def make_hypernet(site: GuidanceParams, student: CausalLM, seed: int) -> HyperNetwork:
    """A fresh hyper-network for ``student`` at the configured read/injection site."""
    torch.manual_seed(seed)
    return HyperNetwork(HyperNetConfig(
        hidden_size=student.hidden_size, num_layers=student.num_layers,
        read_layer=site.read_layer % student.num_layers, inject_layer=site.inject_layer, reader=site.reader,
        mlp_hidden=site.mlp_hidden, attention_heads=site.attention_heads, guidance_scale=site.guidance_scale,
        init_log_std=site.init_log_std,
    ))


def run_fingerprint(*parts: object) -> str:
    payload = json.dumps([p.model_dump() if hasattr(p, "model_dump") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_stage1(student: CausalLM, cache: LatentCache, teacher_plans: pd.DataFrame, tasks: pd.DataFrame,
               val_rows: pd.DataFrame, site: GuidanceParams, latents: LatentsParams, config: Stage1Config,
               generation: GenerationParams, checkpoint_dir: str | None = None, resume: bool = True,
               on_validation: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Stage 1 end to end: check the cache is current, build the hyper-network, train it.

    The cache must have been built for this student, these kept plans and these guidance
    settings (its fingerprint says so); otherwise this stops with the command to rebuild it.
    Checkpoints under ``checkpoint_dir`` are resumed when they belong to the same run.
    """
    build = plan_cache_build(teacher_plans, tasks, student, site, latents)
    cache.check_fingerprint(build.fingerprint)
    examples = select_examples(teacher_plans, tasks, latents.splits)
    hypernet = make_hypernet(site, student, config.seed)
    checkpoints = CheckpointManager(checkpoint_dir, config.checkpoint_every,
                                    fingerprint=run_fingerprint(build.fingerprint, site, config))
    if not resume:
        checkpoints.clear()
    return train_stage1(student, hypernet, CachedLatents(cache.load()), examples, val_rows,
                        list(build.settings.align_layers), config, generation, checkpoints, on_validation)
