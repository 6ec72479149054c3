"""The parameter schema: a pydantic model per parameter block, and how a bad value is told.

Each top-level block (``base``, ``guidance``, ``stage1`` ...) has its model here; the ``data`` block's
lives beside the tasks (:class:`pilot.tasks.DataParams`, which checks generator settings against
reasoning-gym) and each method's settings beside the method (:attr:`pilot.methods.base.Method.params`).
The project's ``before_pipeline_run`` hook validates every block the pipeline's nodes read
(:mod:`pilot.framework.parameters`), so a wrong type, a negative loss weight, a non-finite number or an
injection layer outside the student stops the run at once, with one sentence naming the key, the bad
value and what is allowed (:func:`validate`). Unknown keys are errors too (a typo is never silently
ignored).
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class ParameterError(ValueError):
    """A parameter is invalid; the message is one sentence naming key, value and what is allowed."""


def _number_kind(annotation: Any) -> str | None:
    """'an integer' or 'a number' when ``annotation`` takes numbers but not booleans, else None."""
    if get_origin(annotation) is Annotated:
        return _number_kind(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):  # `int | None`, `str | int`: a number is one option
        options = get_args(annotation)
        kinds = [kind for option in options if (kind := _number_kind(option))]
        return None if bool in options or Any in options or not kinds else kinds[0]
    return {int: "an integer", float: "a number"}.get(annotation)


def _boolean_for_number(value: Any, annotation: Any) -> tuple[str, str] | None:
    """(what is wrong, the kind wanted) when ``value`` is a boolean where ``annotation`` wants a number."""
    kind = _number_kind(annotation)
    if kind is not None and isinstance(value, bool):
        return f"a boolean is not {kind}", kind
    inner = annotation
    while get_origin(inner) in (Annotated, Union, types.UnionType):
        options = [o for o in get_args(inner) if o is not type(None)]
        inner = options[0] if get_origin(inner) is Annotated or len(options) == 1 else None
    if isinstance(value, (list, tuple)) and get_origin(inner) is list and (kind := _number_kind(get_args(inner)[0])):
        for index, item in enumerate(value):
            if isinstance(item, bool):
                return f"item {index} is a boolean, not {kind}", kind
    return None


class Params(BaseModel):
    # allow_inf_nan=False: `inf` or `nan` as a weight, a learning rate or a range is refused
    # (they pass `ge=0` / `gt=0` and would only show up as a non-finite loss mid-training).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads `true` as 1 where a number is expected (`steps=true` ran one step); refuse it."""
        field = cls.model_fields.get(info.field_name or "")
        problem = _boolean_for_number(value, field.annotation) if field is not None else None
        if problem is not None:
            what, kind = problem
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            shown = f" (the default is {default!r})" if default not in (None, []) else ""
            raise ValueError(f"{what}; give {kind}{shown}")
        return value


def _describe(error: dict[str, Any], prefix: str) -> str:
    loc = list(error["loc"])
    value = error.get("input")
    if error["type"] == "generator_setting" and error["ctx"].get("key") is not None:
        loc.append(error["ctx"]["key"])  # name the offending generator setting itself
        value = error["ctx"]["value"]
    key = ".".join(str(part) for part in (prefix, *loc) if part != "")
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return f"Parameter '{key}' is not a known setting; remove it or fix its spelling."
    if error["type"] == "missing":
        return f"Parameter '{key}' is required but missing."
    message = message.removeprefix("Value error, ")
    return f"Parameter '{key}' = {value!r} is invalid: {message[0].lower()}{message[1:]}."


def validate(model: type[Params], value: Any, prefix: str) -> Params:
    """``model.model_validate(value)``, re-raising failures as one-sentence :class:`ParameterError`."""
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise ParameterError(_describe(error.errors()[0], prefix)) from None


Seeded = TypeVar("Seeded", bound="Params")


def with_run_seed(config: Seeded, run_seed: int, offset: int = 0) -> Seeded:
    """``config`` with its ``seed`` made the run's: ``run_seed + config.seed + offset``.

    The one place seeds derive: every component's own ``seed`` setting is an offset from the
    run's ``seed`` (``conf/base/parameters.yml``), so ``--params seed=1`` reseeds everything.
    """
    return config.model_copy(update={"seed": run_seed + config.seed + offset})


# ---------------------------------------------------------------------------------- the loop
class LoopParams(Params):
    """How long and how fast to train: what the training engine (:func:`pilot.training.engine.train`)
    reads. Every stage's and model's training block is one of these, with its own defaults."""

    steps: PositiveInt
    learning_rate: Positive
    warmup_steps: NonNegativeInt = 0
    weight_decay: NonNegative = 0.0
    seed: int = 0
    eval_every: NonNegativeInt = 0           # validate every N steps (0: only before the first and after the last)
    grad_norm_every: NonNegativeInt = 0      # log each term's gradient norm every N steps (0: never)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)   # AdamW's
    clip_norm: Positive = 1.0                # the gradient's global norm is clipped to this
    # an exponential moving average of the trained weights (Polyak averaging), updated after every step
    # with this decay: what is validated, selected and returned. None: the weights as trained
    ema_decay: Annotated[float, Field(ge=0, lt=1)] | None = None


# ---------------------------------------------------------------------------------- base
class LMTrainConfig(LoopParams):
    """Next-token training of a whole model or adapter (base models, LoRA)."""

    steps: PositiveInt = 900
    batch_size: PositiveInt = 64
    learning_rate: Positive = 3e-3
    warmup_steps: NonNegativeInt = 50
    weight_decay: NonNegative = 0.01
    length_buckets: PositiveInt = 4   # sub-batches of similar length per step (same gradient, less padding)
    # true: the tokens every row of a (sub-)batch starts with run once per pass and the rows read their
    # keys and values (the same logits and gradients; pilot.sequences.labelled_logits)
    share_prefix: bool = False
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.98)


class AdaptParams(LMTrainConfig):
    """Warm-starting a pretrained student on the task format (questions with and without plans)."""

    steps: PositiveInt = 150
    batch_size: PositiveInt = 16
    learning_rate: Positive = 5e-5
    warmup_steps: NonNegativeInt = 10
    train_layers: PositiveInt | None = 8   # only the top N decoder blocks learn (null: all); the rest stay as pretrained
    # false: each question is trained only with its plan in context, so what the plan carries is not
    # absorbed into the weights (the student never learns to answer without it); true: with and without.
    without_plan: bool = True


class ModelParams(Params):
    """One base model: trained here from scratch (the embedded default), a local folder used as it is
    (``pretrained: true``), or imported from ``source`` (a Hugging Face folder or a GGUF file) into
    ``path``, optionally adapted to the task format (``adapt``)."""

    pretrained: bool = False
    source: str | None = None
    path: str | None = None
    adapt: AdaptParams | None = None
    family: Literal["llama", "qwen2", "gpt2"] = "llama"
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt | None = None
    max_positions: PositiveInt = 128
    plan_loss: bool = True
    training: LMTrainConfig = LMTrainConfig()

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.source and self.pretrained:
            raise ValueError("a model is either imported from `source` into `path` or used in place (`pretrained: "
                             "true`), not both; drop one of them in globals.yml")
        if self.adapt is not None and not self.source:
            raise ValueError("`adapt` warm-starts a model imported from `source`; set models.<role>.source")
        return self

    @property
    def trained_here(self) -> bool:
        """Trained from scratch by the base pipeline (needs the project's own tokenizer)."""
        return not (self.pretrained or self.source)


class TokenizerParams(Params):
    vocab_size: Annotated[int, Field(ge=300)] = 512


class BaseParams(Params):
    tokenizer: TokenizerParams = TokenizerParams()
    student: ModelParams
    teacher: ModelParams


# ---------------------------------------------------------------------------------- shared
class GuidanceParams(Params):
    """Where the guidance is read and injected, shared by latents, stages and baselines."""

    read_layer: int = 0
    inject_layer: NonNegativeInt = 0
    align_layers: list[int] = Field(default_factory=lambda: [-1], min_length=1)
    reader: Literal["mean", "attention"] = "attention"
    mlp_hidden: PositiveInt = 256
    attention_heads: PositiveInt = 8
    guidance_scale: Positive = 1.0
    init_log_std: float = -3.0
    # The paper's components, each a switch (pilot.guidance.hypernet): further injection sites,
    # FiLM (a per-dimension scale and shift, not only an added vector), a learned query-independent prior.
    extra_inject_layers: list[NonNegativeInt] = Field(default_factory=list)
    modulation: Literal["add", "film"] = "film"
    prior: bool = False

    def resolved_align_layers(self, num_layers: int) -> list[int]:
        return sorted({layer % num_layers for layer in self.align_layers})

    def check_against(self, num_layers: int, hidden_size: int | None = None) -> None:
        """Layer indices must exist in a student with ``num_layers`` decoder layers, and the attention
        reader's heads must divide its ``hidden_size`` (when given).

        Each message offers only what that key accepts: ``inject_layer`` is a non-negative index,
        ``read_layer`` and ``align_layers`` may also count from the end.
        """
        if hidden_size is not None and self.reader == "attention" and hidden_size % self.attention_heads:
            divisors = ", ".join(str(d) for d in range(1, min(hidden_size, 64) + 1) if hidden_size % d == 0)
            raise ParameterError(
                f"Parameter 'guidance.attention_heads' = {self.attention_heads} must divide the student's hidden size "
                f"{hidden_size} (guidance.reader: attention): use one of {divisors}."
            )
        if not 0 <= self.inject_layer < num_layers:
            raise ParameterError(
                f"Parameter 'guidance.inject_layer' = {self.inject_layer} is outside the student's "
                f"layers: allowed 0..{num_layers - 1}."
            )
        for layer in self.extra_inject_layers:
            if not 0 <= layer < num_layers or layer == self.inject_layer:
                raise ParameterError(
                    f"Parameter 'guidance.extra_inject_layers' = {self.extra_inject_layers} must name layers "
                    f"0..{num_layers - 1} other than inject_layer={self.inject_layer}."
                )
        if len(set(self.extra_inject_layers)) != len(self.extra_inject_layers):
            raise ParameterError(f"Parameter 'guidance.extra_inject_layers' = {self.extra_inject_layers} "
                                 "repeats a layer; list each once.")
        allowed = f"0..{num_layers - 1}, or -{num_layers}..-1 counting from the end"
        for key, layers in (("read_layer", [self.read_layer]), ("align_layers", self.align_layers)):
            for layer in layers:
                if not -num_layers <= layer < num_layers:
                    raise ParameterError(
                        f"Parameter 'guidance.{key}' = {layer} is outside the student's layers: allowed {allowed}."
                    )
        if min(self.resolved_align_layers(num_layers)) < self.inject_layer:
            raise ParameterError(
                f"Parameter 'guidance.align_layers' = {self.align_layers} must be at or after "
                f"inject_layer={self.inject_layer}: earlier layers cannot see the guidance."
            )


class GenerationParams(Params):
    """One decoding setting for every method, the teacher and validation. A reply ends at end of
    sequence, at a newline in the embedded models' one-line format, at the first of ``stop``, or
    after ``max_new_tokens``."""

    max_new_tokens: PositiveInt = 16
    batch_size: PositiveInt = 128
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)


# ---------------------------------------------------------------------------------- plans
class PlansParams(Params):
    teacher: Literal["hf", "oracle"] = "hf"
    keep: Literal["verified", "all"] = "verified"
    max_plan_tokens: PositiveInt = 64


class LatentsParams(Params):
    shard_size: PositiveInt = 1024
    batch_size: PositiveInt = 256
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    on_stale: Literal["rebuild", "error"] = "rebuild"
    # Also cache what guidance cannot change (the prompt's keys and values above the lowest guided
    # layer, that layer's unguided states at the answer positions), so each stage-1 step runs only
    # the blocks above the site over the answer positions (pilot.guidance.prefix). Same losses and
    # gradients as the full pass; false runs the full pass every step.
    frozen_prefix: bool = True


# ---------------------------------------------------------------------------------- stages
class Stage1Config(LoopParams):
    """Stage-1 loop settings; the loss weights carry the paper's names."""

    steps: PositiveInt = 3000
    batch_size: PositiveInt = 64
    learning_rate: Positive = 1e-3
    warmup_steps: NonNegativeInt = 20
    weight_decay: NonNegative = 0.0
    alignment_weight: NonNegative = 0.5
    contrastive_weight: NonNegative = 0.05
    temperature: Positive = 0.1
    lm_weight: NonNegative = 1.0
    rl_weight: NonNegative = 0.1
    rl_every: PositiveInt = 4
    rl_batch: PositiveInt = 8
    rl_samples: Annotated[int, Field(ge=2)] = 4
    latent_reward_weight: NonNegative = 0.5
    eval_every: PositiveInt = 250
    grad_norm_every: NonNegativeInt = 10   # log each term's gradient norm every N steps (0: never)
    checkpoint_every: NonNegativeInt = 250
    seed: int = 0


class Stage1Params(Params):
    use_tuned_weights: bool = False
    resume: bool = True
    checkpoint_dir: str = "data/06_models/checkpoints/stage1"
    training: Stage1Config = Stage1Config()


class Stage2Config(LoopParams):
    """Stage-2 loop settings (:mod:`pilot.training.stage2`); the loss names follow TRL's GRPO."""

    # token: the guided student's reply tokens are the actions (their log-probabilities reach the
    # hyper-network through the injected guidance); latent: a Gaussian over g, REINFORCE (the earlier default)
    policy: Literal["token", "latent"] = "token"
    steps: PositiveInt = 100
    batch_size: PositiveInt = 128            # questions (groups) per step
    group_size: Annotated[int, Field(ge=2)] = 8   # replies sampled per question (GRPO group)
    rollout_temperature: NonNegative = 0.7   # sampled replies, so a group can disagree (0: greedy)
    learning_rate: Positive = 3e-4
    warmup_steps: NonNegativeInt = 10
    policy_weight: NonNegative = 1.0
    kl_weight: NonNegative = 0.1             # beta: per-token KL to the stage-1 hyper-network's policy (token only)
    self_supervision_weight: NonNegative = 1.0   # language modelling on its own verified-correct replies
    anchor_weight: NonNegative = 0.1         # squared distance of g to the stage-1 guidance
    updates_per_batch: PositiveInt = 1       # optimizer steps on one batch of rollouts (>1: the ratio is clipped)
    clip_epsilon: Annotated[float, Field(gt=0, lt=1)] = 0.2   # PPO clip range, low side
    clip_epsilon_high: Positive | None = None  # high side (DAPO's clip-higher); None: clip_epsilon
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"   # how token terms are averaged (TRL's names)
    scale_rewards: bool = True               # divide advantages by the group's std (false: Dr. GRPO)
    dynamic_sampling: bool = True            # drop groups whose replies all score the same, refill with new ones
    dynamic_sampling_rounds: PositiveInt = 3   # at most this many rollout rounds per batch when refilling
    select_questions: bool = False           # train only on questions stage-1 PILOT answers right sometimes
    selection_questions: NonNegativeInt = 1024   # questions scored in that first pass (0: all)
    selection_samples: Annotated[int, Field(ge=2)] = 4   # sampled replies per question in that pass
    # greedy_wrong: only groups whose question the current guidance answers wrong greedily (one greedy
    # reply per question and round; token policy), so a step moves wrong greedy answers; all: every group
    policy_groups: Literal["all", "greedy_wrong"] = "greedy_wrong"
    eval_every: PositiveInt = 25
    grad_norm_every: NonNegativeInt = 10   # log each term's gradient norm every N steps (0: never)
    checkpoint_every: NonNegativeInt = 25
    seed: int = 0


class Stage2Params(Params):
    resume: bool = True
    checkpoint_dir: str = "data/06_models/checkpoints/stage2"
    training: Stage2Config = Stage2Config()


# ---------------------------------------------------------------------------------- baselines
class AdapterTrainingParams(LMTrainConfig):
    """A trained baseline's loop: next-token training whose steps, batch size and validation cadence,
    left ``None``, are PILOT's stage 1's (the common protocol); :meth:`for_run` fills them in."""

    steps: PositiveInt | None = Field(None, description="Optimizer steps; null: stage 1's.")
    batch_size: PositiveInt | None = Field(None, description="Rows per step; null: stage 1's.")
    eval_every: NonNegativeInt | None = Field(None, description="Validate every N steps; null: as often as stage 1.")
    learning_rate: Positive = Field(1e-3, description="AdamW's peak learning rate, after a linear warm-up.")
    warmup_steps: NonNegativeInt = Field(20, description="Steps of linear warm-up to the learning rate.")
    weight_decay: NonNegative = Field(0.0, description="AdamW's weight decay.")
    length_buckets: PositiveInt = Field(1, description="Sub-batches of similar length per step; question -> answer "
                                                       "rows have similar lengths, so one pass is fastest.")

    def for_run(self, stage1: Stage1Config, seed: int) -> LMTrainConfig:
        """The loop the trainer runs: stage 1's steps, batch size and validation cadence where these are
        ``None``, and the run's seed (so every baseline draws the same batches)."""
        loop = with_run_seed(self, seed)
        return LMTrainConfig(**{**loop.model_dump(), "steps": loop.steps or stage1.steps,
                                "batch_size": loop.batch_size or stage1.batch_size,
                                "eval_every": stage1.eval_every if loop.eval_every is None else loop.eval_every})


class BaselinesParams(Params):
    """One block per compared method that has settings, ``baselines.<name>``: kept as configured here and
    validated by that method's own parameter class (:meth:`pilot.methods.base.Method.own_params`), which
    lives beside the method; a block naming no such method is an error before the run
    (:func:`pilot.methods.registry.check_baseline_blocks`)."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------- tuning
class SearchRange(Params):
    low: Positive
    high: Positive
    log: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.low >= self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        return self


class TuneParams(Params):
    study_name: str = "pilot-stage1-loss-balance"
    storage: str = "sqlite:///data/07_model_output/optuna.db"
    n_trials: NonNegativeInt = 12  # 0: run no trial, only read an existing study's best
    timeout_s: PositiveInt | None = None
    sampler_seed: int = 0
    # This process's name in a study shared by several workers; its sampler seed is derived from
    # (sampler_seed, worker), so workers never propose the same points. None: host and process id
    # (unique, not reproducible); set distinct names (`--params tune.worker=a`) for reproducible workers.
    worker: str | int | None = None
    trial_steps: PositiveInt = 300
    eval_every: PositiveInt = 100
    stage2_steps: NonNegativeInt = 0
    pruner_warmup_steps: NonNegativeInt = 100
    enqueue_baseline: bool = True   # a new study's first trial is the configured (untuned) weights
    # A running trial records a heartbeat every heartbeat_interval_s; one silent for grace_period_s
    # (default twice the interval) belonged to a dead worker: it is marked FAIL and queued again
    # (at most max_retry times; null: always) by the next worker that asks for a trial.
    heartbeat_interval_s: PositiveInt = 30
    grace_period_s: PositiveInt | None = None
    max_retry: NonNegativeInt | None = 2
    # A worker that ran its trials waits (at most this long; null: no limit) for the trials other
    # workers are running at that moment, so the best weights it writes include them.
    wait_for_workers_s: NonNegativeInt | None = 3600
    contrastive_weight: SearchRange = SearchRange(low=0.01, high=1.0)
    rl_weight: SearchRange = SearchRange(low=0.01, high=1.0)
    guidance_scale: SearchRange | None = None
    inject_layers: list[NonNegativeInt] | None = None   # e.g. [0, 1]: search the injection layer too
    # `kedro run --pipelines tune_lora`: LoRA's own study with the same trials, steps and pruner
    # (its rank is pinned by the matched parameter budget; its learning rate and scale are searched).
    lora_study_name: str = "pilot-lora-baseline"
    lora_learning_rate: SearchRange = SearchRange(low=1e-4, high=1e-2)
    lora_alpha_ratio: SearchRange = SearchRange(low=0.5, high=8.0)
    cache_dir: str = "data/05_model_input/tune_latents"  # a latent cache per searched injection layer

    @model_validator(mode="after")
    def _grace_outlasts_heartbeat(self) -> TuneParams:
        if self.grace_period_s is not None and self.grace_period_s <= self.heartbeat_interval_s:
            raise ValueError(f"grace_period_s={self.grace_period_s} must exceed heartbeat_interval_s="
                             f"{self.heartbeat_interval_s}, or every running trial would be declared dead")
        return self


# ---------------------------------------------------------------------------------- evaluation
class LatencyParams(Params):
    """How latency is measured: every method answers the same questions one at a time, after a
    shared warm-up, interleaved round-robin over ``passes``; the median per query is reported."""

    questions_per_task: PositiveInt = 16
    passes: PositiveInt = 3
    warmup_questions: NonNegativeInt = 2


# ---------------------------------------------------------------------------------- ablations
class AblationVariant(Params):
    """One row of the ablation report: settings laid over the configured ones."""

    name: str
    guidance: dict[str, Any] = Field(default_factory=dict)   # GuidanceParams fields
    stage1: dict[str, Any] = Field(default_factory=dict)     # Stage1Config fields (the loss weights, ...)
    # false: stage 1's hyper-network is the result; a mapping: Stage2Config fields laid over stage 2's
    stage2: bool | dict[str, Any] = True

    @model_validator(mode="after")
    def _known_fields(self) -> AblationVariant:
        stage2 = self.stage2 if isinstance(self.stage2, dict) else {}
        for block, model, overrides in (("guidance", GuidanceParams, self.guidance),
                                        ("stage1", Stage1Config, self.stage1), ("stage2", Stage2Config, stage2)):
            unknown = sorted(set(overrides) - set(model.model_fields))
            if unknown:
                raise ValueError(f"{block} has no setting(s) {unknown}; known: {', '.join(model.model_fields)}")
            model(**{**model().model_dump(), **overrides})  # the values must be valid too
        return self


class AblationsParams(Params):
    """``kedro run --pipelines ablations``: PILOT retrained once per variant, evaluated on both test splits."""

    stage1_steps: PositiveInt | None = None   # None: stage 1's configured steps
    stage2_steps: PositiveInt | None = None
    # A list (an environment's list replaces the base one whole): each variant's name and settings.
    # Required: which rows the report holds is the configuration's choice (conf/base lists them).
    variants: list[AblationVariant] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[AblationVariant]) -> list[AblationVariant]:
        names = [v.name for v in variants]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"variant names must be unique; {repeated} repeat")
        return variants


class EvaluationParams(Params):
    latency: LatencyParams = LatencyParams()
    model_name: str = "pilot"                     # artifact path of the logged pyfunc model in its run
    registered_model_name: str | None = "pilot"   # MLflow model registry name; null: log, don't register


class TrackingParams(Params):
    on_unavailable: Literal["fail", "disable"] = "fail"
