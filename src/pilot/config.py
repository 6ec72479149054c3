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

    steps: PositiveInt = Field(description="Optimizer steps to train.")
    learning_rate: Positive = Field(description="AdamW's peak learning rate, reached after the linear warm-up, then "
                                                "decayed by a cosine to a tenth of it.")
    warmup_steps: NonNegativeInt = Field(0, description="Steps of linear warm-up to the learning rate (0: none).")
    weight_decay: NonNegative = Field(0.0, description="AdamW's decoupled weight decay (0: none).")
    seed: int = Field(0, description="Added to the run's seed (parameters.yml) to seed this loop's batches and "
                                     "sampling.")
    eval_every: NonNegativeInt = Field(0, description="Validate every N steps, where the loop validates (0: only "
                                                      "before the first step and after the last).")
    grad_norm_every: NonNegativeInt = Field(0, description="Log each loss term's gradient norm (grad_norm/<term>) "
                                                           "every N steps (0: never); the update is the same.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW's (beta1, beta2): decay rates of its gradient and squared-gradient averages.")
    clip_norm: Positive = Field(1.0, description="The gradient's global norm is clipped to this before each step.")
    ema_decay: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None, description="Decay of an exponential moving average of the weights (Polyak averaging), updated after "
                          "every step: what is validated, selected and returned. null: the weights as trained.")


# ---------------------------------------------------------------------------------- base
class LMTrainConfig(LoopParams):
    """Next-token training of a whole model or adapter (base models, LoRA)."""

    steps: PositiveInt = Field(900, description="Optimizer steps to train.")
    batch_size: PositiveInt = Field(64, description="Examples (prompt and target) per step.")
    learning_rate: Positive = Field(3e-3, description="AdamW's peak learning rate, reached after the linear warm-up, "
                                                      "then decayed by a cosine to a tenth of it.")
    warmup_steps: NonNegativeInt = Field(50, description="Steps of linear warm-up to the learning rate (0: none).")
    weight_decay: NonNegative = Field(0.01, description="AdamW's decoupled weight decay (0: none).")
    length_buckets: PositiveInt = Field(4, description="Sub-batches of similar length per step: the same gradient, "
                                                       "less padding (1: the batch in one pass).")
    share_prefix: bool = Field(False, description="true: the tokens every row of a (sub-)batch starts with run once "
                                                  "per pass and the rows read their keys and values (the same logits "
                                                  "and gradients; pilot.sequences.labelled_logits).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.98), description="AdamW's (beta1, beta2): decay rates of its gradient and squared-gradient averages.")


class AdaptParams(LMTrainConfig):
    """Warm-starting a pretrained student on the task format (questions with and without plans)."""

    steps: PositiveInt = Field(150, description="Optimizer steps of the warm start.")
    batch_size: PositiveInt = Field(16, description="Examples (prompt and target) per step.")
    learning_rate: Positive = Field(5e-5, description="AdamW's peak learning rate, reached after the linear warm-up, "
                                                      "then decayed by a cosine to a tenth of it.")
    warmup_steps: NonNegativeInt = Field(10, description="Steps of linear warm-up to the learning rate (0: none).")
    train_layers: PositiveInt | None = Field(8, description="Only the top N decoder blocks (and the final norm) learn; "
                                                            "the rest stay as pretrained. null: every block.")
    without_plan: bool = Field(True, description="true: each question is trained with its plan in context and "
                                                 "without it; false: only with it, so what the plan carries is not "
                                                 "absorbed into the weights.")


class ModelParams(Params):
    """One base model: trained here from scratch (the embedded default), a local folder used as it is
    (``pretrained: true``), or imported from ``source`` (a Hugging Face folder or a GGUF file) into
    ``path``, optionally adapted to the task format (``adapt``)."""

    pretrained: bool = Field(False, description="true: `path` is a local Hugging Face model used as it is, never "
                                                "trained or written (set in globals.yml).")
    source: str | None = Field(None, description="A Hugging Face folder, a GGUF file or package://<module>/<file>.gguf "
                                                 "imported once into `path` (kept while its sha256 is unchanged); "
                                                 "null: not imported.")
    path: str | None = Field(None, description="The model's folder: written when trained or imported, read as it is "
                                               "with `pretrained: true` (set in globals.yml).")
    adapt: AdaptParams | None = Field(None, description="Warm-start the imported model on the task format before use; "
                                                        "null: use it as imported. Needs `source`.")
    family: Literal["llama", "qwen2", "gpt2"] = Field("llama", description="Architecture of a model trained here.")
    hidden_size: PositiveInt = Field(128, description="Width of the residual stream of a model trained here.")
    num_layers: PositiveInt = Field(2, description="Decoder blocks of a model trained here.")
    num_heads: PositiveInt = Field(4, description="Attention heads of a model trained here; must divide hidden_size.")
    intermediate_size: PositiveInt | None = Field(None, description="Width of each block's MLP in a model trained "
                                                                    "here; null: 4 x hidden_size.")
    max_positions: PositiveInt = Field(128, description="Longest sequence, in tokens, a model trained here is built "
                                                        "for.")
    plan_loss: bool = Field(True, description="A student trained here learns its plan-conditioned examples on plan "
                                              "and answer (teaching the step arithmetic plans are written in); "
                                              "false: on the answer only. The teacher ignores it.")
    training: LMTrainConfig = Field(LMTrainConfig(), description="The loop that trains a model here from scratch; "
                                                                 "unused for an imported or pretrained one.")

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
    vocab_size: Annotated[int, Field(ge=300)] = Field(
        512, description="Tokens in the byte-level BPE vocabulary trained for the models trained here (at least 300, "
                         "above the 256 bytes it starts from).")


class BaseParams(Params):
    tokenizer: TokenizerParams = Field(TokenizerParams(), description="The tokenizer trained when a model is trained "
                                                                      "from scratch (none otherwise).")
    student: ModelParams = Field(description="The student: the model every method guides or adapts.")
    teacher: ModelParams = Field(description="The teacher, which writes the plans (plans.teacher: hf).")


# ---------------------------------------------------------------------------------- shared
class GuidanceParams(Params):
    """Where the guidance is read and injected, shared by latents, stages and baselines."""

    read_layer: int = Field(0, description="Decoder block whose output over the query's tokens (unguided pass) the "
                                           "hyper-network reads; 0-based, negative counts from the end.")
    inject_layer: NonNegativeInt = Field(0, description="Decoder block whose output the guidance changes at the answer "
                                                        "positions (0-based).")
    align_layers: list[int] = Field(default_factory=lambda: [-1], min_length=1,
                                    description="Layers whose guided states stage 1 aligns with the plan-conditioned "
                                                "ones (at or after inject_layer; negative counts from the end); the "
                                                "last also feeds the contrastive and latent-RL terms.")
    reader: Literal["mean", "attention", "none"] = Field("attention", description="How the hyper-network reads the "
                                                                                  "query: attention (its last token "
                                                                                  "attends over it, then an MLP), mean "
                                                                                  "(an MLP on the mean of the query's "
                                                                                  "states) or none (it reads nothing: "
                                                                                  "one learned vector for every query).")
    mlp_hidden: PositiveInt = Field(256, description="Hidden width of the hyper-network's MLP.")
    attention_heads: PositiveInt = Field(8, description="Heads of the attention reader; must divide the student's "
                                                        "hidden size.")
    guidance_scale: Positive = Field(1.0, description="Strength of the guidance relative to the hidden state h: add "
                                                      "puts guidance_scale * rms(h) * g on h; film multiplies its "
                                                      "scale and its shift by it alike.")
    init_log_std: float = Field(-3.0, description="Starting log standard deviation (learned) of the Gaussian around g "
                                                  "that the latent-RL terms sample from.")
    extra_inject_layers: list[NonNegativeInt] = Field(default_factory=list,
                                                      description="Further decoder blocks guided too, each by its own "
                                                                  "slice of g ([]: inject_layer only).")
    modulation: Literal["add", "film"] = Field("film", description="How g changes the hidden state: add (an added "
                                                                   "vector) or film (a per-dimension scale and shift).")
    prior: bool = Field(False, description="true: g is a learned query-independent prior p modulated by the query, "
                                           "p * (1 + m) + a; false: the hyper-network's output itself.")

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

    max_new_tokens: PositiveInt = Field(16, description="Longest reply, in tokens.")
    batch_size: PositiveInt = Field(128, description="Prompts decoded together.")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list,
                                                            description="Strings that end a reply, cut at the first "
                                                                        "found ([]: none).")


# ---------------------------------------------------------------------------------- plans
class PlansParams(Params):
    teacher: Literal["hf", "oracle"] = Field("hf", description="Who writes the plans: hf (the teacher model) or oracle "
                                                               "(derived from the task's metadata; an ablation).")
    keep: Literal["verified", "all"] = Field("verified", description="verified: keep a plan only when the student "
                                                                     "answers right with it (construct-and-verify); "
                                                                     "all: keep every plan (an ablation).")
    max_plan_tokens: PositiveInt = Field(64, description="Longest plan the teacher writes, in tokens.")


class LatentsParams(Params):
    shard_size: PositiveInt = Field(1024, description="Examples per shard of the latent cache; a rebuild skips the "
                                                      "shards already current.")
    batch_size: PositiveInt = Field(256, description="Examples per student pass while the cache is built (changes "
                                                     "nothing stored).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Precision the states are stored "
                                                                                    "in (float16 and bfloat16: half "
                                                                                    "the size on disk).")
    on_stale: Literal["rebuild", "error"] = Field("rebuild", description="A cache on disk built for other inputs is "
                                                                         "rebuilt, or stops the run (error).")
    frozen_prefix: bool = Field(True, description="Also cache what guidance cannot change (the prompt's keys and "
                                                  "values above the lowest guided layer, its unguided answer states), "
                                                  "so a stage-1 step runs only the blocks above it: the same losses "
                                                  "and gradients. false: the full pass every step.")


# ---------------------------------------------------------------------------------- stages
class Stage1Config(LoopParams):
    """Stage-1 loop settings; the loss weights carry the paper's names."""

    steps: PositiveInt = Field(3000, description="Optimizer steps of stage 1; the trained baselines get as many "
                                                 "(their training.steps: null).")
    batch_size: PositiveInt = Field(64, description="Questions (cached trajectories) per step.")
    learning_rate: Positive = Field(1e-3, description="AdamW's peak learning rate, reached after the linear warm-up, "
                                                      "then decayed by a cosine to a tenth of it.")
    warmup_steps: NonNegativeInt = Field(20, description="Steps of linear warm-up to the learning rate (0: none).")
    weight_decay: NonNegative = Field(0.0, description="AdamW's decoupled weight decay (0: none).")
    alignment_weight: NonNegative = Field(0.5, description="Weight of `alignment`: the guided states at align_layers "
                                                           "against the plan-conditioned ones (1 - cosine + relative "
                                                           "squared error).")
    contrastive_weight: NonNegative = Field(0.05, description="Weight of `contrastive` (InfoNCE): each guided answer's "
                                                              "mean state must pick its own plan-conditioned one out "
                                                              "of the batch's.")
    temperature: Positive = Field(0.1, description="InfoNCE's temperature in `contrastive` (lower: sharper).")
    lm_weight: NonNegative = Field(1.0, description="Weight of `lm`: next-token loss on the gold answer, guided.")
    rl_weight: NonNegative = Field(0.1, description="Weight of `latent_rl`: REINFORCE on guidance vectors sampled "
                                                    "around g, rewarded by the verifier (0: not computed).")
    rl_every: PositiveInt = Field(4, description="Compute `latent_rl` every N steps.")
    rl_batch: PositiveInt = Field(8, description="Questions `latent_rl` samples for: the first N of the step's batch.")
    rl_samples: Annotated[int, Field(ge=2)] = Field(4, description="Guidance vectors sampled per latent-RL question "
                                                                   "(at least 2: their mean is the baseline).")
    latent_reward_weight: NonNegative = Field(0.5, description="Weight, in the latent-RL reward, of the sampled guided "
                                                               "states' cosine similarity to the plan-conditioned "
                                                               "ones (added to verified success, 0 or 1).")
    eval_every: PositiveInt = Field(250, description="Validate every N steps (and before the first); the best "
                                                     "validated hyper-network is kept.")
    grad_norm_every: NonNegativeInt = Field(10, description="Log each loss term's gradient norm (grad_norm/<term>) "
                                                            "every N steps (0: never); the update is the same.")
    checkpoint_every: NonNegativeInt = Field(250, description="Save a resumable checkpoint every N steps (0: never).")
    seed: int = Field(0, description="Added to the run's seed (parameters.yml) to seed stage 1's batches and "
                                     "sampling.")


class Stage1Params(Params):
    use_tuned_weights: bool = Field(False, description="true: the contrastive and latent-RL weights (and any tuned "
                                                       "guidance scale) found by `kedro run --pipelines tune`.")
    resume: bool = Field(True, description="Resume from the last checkpoint of the same run (same data and settings) "
                                           "if there is one; false: start over.")
    checkpoint_dir: str = Field("data/06_models/checkpoints/stage1", description="Stage 1's checkpoints, one "
                                                                                 "subfolder per run (a fingerprint of "
                                                                                 "its data and settings).")
    training: Stage1Config = Field(Stage1Config(), description="Stage 1's loop and loss weights.")


class Stage2Config(LoopParams):
    """Stage-2 loop settings (:mod:`pilot.training.stage2`); the loss names follow TRL's GRPO."""

    policy: Literal["token", "latent"] = Field(
        "token", description="token: the guided student's reply tokens are the actions, their log-probabilities "
                             "reaching the hyper-network through the guidance; latent: REINFORCE on a Gaussian over g.")
    steps: PositiveInt = Field(100, description="Optimizer steps of stage 2.")
    batch_size: PositiveInt = Field(128, description="Questions (groups) per step.")
    group_size: Annotated[int, Field(ge=2)] = Field(8, description="Replies sampled per question (GRPO's group).")
    rollout_temperature: NonNegative = Field(0.7, description="Sampling temperature of the replies, so a group can "
                                                              "disagree (0: greedy).")
    learning_rate: Positive = Field(3e-4, description="AdamW's peak learning rate, reached after the linear warm-up, "
                                                      "then decayed by a cosine to a tenth of it.")
    warmup_steps: NonNegativeInt = Field(10, description="Steps of linear warm-up to the learning rate (0: none).")
    policy_weight: NonNegative = Field(1.0, description="Weight of `policy`: the group-relative policy gradient on "
                                                        "verifier rewards.")
    kl_weight: NonNegative = Field(0.1, description="Weight of `kl` (GRPO's beta): the per-token KL to the stage-1 "
                                                    "hyper-network's policy (token policy only).")
    self_supervision_weight: NonNegative = Field(1.0, description="Weight of `self_supervision`: language modelling, "
                                                                  "guided, on the group's own verified-correct "
                                                                  "replies.")
    anchor_weight: NonNegative = Field(0.1, description="Weight of `anchor`: the squared distance of g to the frozen "
                                                        "stage-1 guidance.")
    updates_per_batch: PositiveInt = Field(1, description="Optimizer steps on one batch of rollouts (above 1: the "
                                                          "probability ratio is clipped).")
    clip_epsilon: Annotated[float, Field(gt=0, lt=1)] = Field(0.2, description="PPO's clip range of the probability "
                                                                               "ratio, low side: 1 - clip_epsilon.")
    clip_epsilon_high: Positive | None = Field(None, description="The clip range's high side, 1 + clip_epsilon_high "
                                                                 "(DAPO's clip-higher, e.g. 0.28); null: clip_epsilon.")
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field(
        "dapo", description="How token terms are averaged (TRL's names): dapo, over the batch's tokens; grpo, each "
                            "reply's mean, then over replies; dr_grpo, the sum over replies x the longest possible "
                            "reply (no length bias).")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std (false: Dr. GRPO).")
    dynamic_sampling: bool = Field(True, description="Drop groups whose replies all score the same and refill the "
                                                     "batch with new questions (DAPO).")
    dynamic_sampling_rounds: PositiveInt = Field(3, description="At most this many rollout rounds per batch when "
                                                                "refilling.")
    select_questions: bool = Field(False, description="Train only on the questions stage-1 PILOT answers right "
                                                      "sometimes (found by a first scoring pass).")
    selection_questions: NonNegativeInt = Field(1024, description="Training questions scored in that first pass "
                                                                  "(0: all).")
    selection_samples: Annotated[int, Field(ge=2)] = Field(4, description="Sampled replies per question in that first "
                                                                          "pass.")
    policy_groups: Literal["all", "greedy_wrong"] = Field(
        "greedy_wrong", description="greedy_wrong: only groups whose question the current guidance answers wrong "
                                    "greedily, as validation and test decode (token policy); all: every group.")
    eval_every: PositiveInt = Field(25, description="Validate every N steps (and before the first); the best "
                                                    "validated hyper-network is kept.")
    grad_norm_every: NonNegativeInt = Field(10, description="Log each loss term's gradient norm (grad_norm/<term>) "
                                                            "every N steps (0: never); the update is the same.")
    checkpoint_every: NonNegativeInt = Field(25, description="Save a resumable checkpoint every N steps (0: never).")
    seed: int = Field(0, description="Added to the run's seed (parameters.yml) to seed stage 2's sampling.")


class Stage2Params(Params):
    resume: bool = Field(True, description="Resume from the last checkpoint of the same run (same data and settings) "
                                           "if there is one; false: start over.")
    checkpoint_dir: str = Field("data/06_models/checkpoints/stage2", description="Stage 2's checkpoints, one "
                                                                                 "subfolder per run (a fingerprint of "
                                                                                 "its data and settings).")
    training: Stage2Config = Field(Stage2Config(), description="Stage 2's loop and loss weights.")


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
    low: Positive = Field(description="The range's lower end.")
    high: Positive = Field(description="The range's upper end, above low.")
    log: bool = Field(True, description="Sample on a log scale (false: uniformly).")

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.low >= self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        return self


class TuneParams(Params):
    study_name: str = Field("pilot-stage1-loss-balance", description="The Optuna study over stage 1's loss "
                                                                     "balance; a rerun continues it.")
    storage: str = Field("sqlite:///data/07_model_output/optuna.db", description="The study's database URL (any "
                                                                                 "RDB URL); processes sharing it "
                                                                                 "share the study.")
    n_trials: NonNegativeInt = Field(12, description="Trials this process runs (0: none, only read an existing "
                                                     "study's best).")
    timeout_s: PositiveInt | None = Field(None, description="Seconds after which this process starts no further "
                                                            "trial; null: no limit.")
    sampler_seed: int = Field(0, description="Seed of the TPE sampler; each worker's derives from it, the worker's "
                                             "name and its trials so far, so workers never propose the same points.")
    worker: str | int | None = Field(None, description="This process's name in a shared study; set distinct names "
                                                       "(`--params tune.worker=a`) for reproducible workers. null: "
                                                       "host and process id (unique, not reproducible).")
    trial_steps: PositiveInt = Field(300, description="Stage-1 steps per trial.")
    eval_every: PositiveInt = Field(100, description="Validate a trial every N steps; each result is an intermediate "
                                                     "value for the pruner.")
    stage2_steps: NonNegativeInt = Field(0, description="Follow each trial with this many stage-2 steps and score "
                                                        "that (0: stage 1 alone).")
    pruner_warmup_steps: NonNegativeInt = Field(100, description="Steps a trial runs before the median pruner may "
                                                                 "stop it.")
    enqueue_baseline: bool = Field(True, description="A new study's first trial is stage 1's configured (untuned) "
                                                     "weights, the reference.")
    heartbeat_interval_s: PositiveInt = Field(30, description="Seconds between a running trial's heartbeats.")
    grace_period_s: PositiveInt | None = Field(None, description="Seconds of silence after which a trial's worker is "
                                                                 "taken for dead: the trial is marked FAIL and queued "
                                                                 "again. null: twice heartbeat_interval_s.")
    max_retry: NonNegativeInt | None = Field(2, description="Times a dead worker's trial is queued again (null: "
                                                            "always).")
    wait_for_workers_s: NonNegativeInt | None = Field(3600, description="Seconds a worker that ran its trials waits "
                                                                        "for those other workers are running, so its "
                                                                        "best weights include them; null: no limit.")
    contrastive_weight: SearchRange = Field(SearchRange(low=0.01, high=1.0),
                                            description="Range searched for stage1.training.contrastive_weight.")
    rl_weight: SearchRange = Field(SearchRange(low=0.01, high=1.0),
                                   description="Range searched for stage1.training.rl_weight.")
    guidance_scale: SearchRange | None = Field(None, description="Range searched for guidance.guidance_scale; null: "
                                                                 "not searched.")
    inject_layers: list[NonNegativeInt] | None = Field(None, description="Injection layers searched among (e.g. [0, "
                                                                         "1]; a latent cache each); null: not "
                                                                         "searched.")
    lora_study_name: str = Field("pilot-lora-baseline", description="LoRA's own study (`kedro run --pipelines "
                                                                    "tune_lora`): the same trials, steps, pruner and "
                                                                    "storage; its rank stays pinned by the budget.")
    lora_learning_rate: SearchRange = Field(SearchRange(low=1e-4, high=1e-2),
                                            description="Range searched for LoRA's learning rate.")
    lora_alpha_ratio: SearchRange = Field(SearchRange(low=0.5, high=8.0),
                                          description="Range searched for LoRA's alpha over its rank.")
    cache_dir: str = Field("data/05_model_input/tune_latents", description="Folder of the latent caches built for "
                                                                           "the searched injection layers.")

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

    questions_per_task: PositiveInt = Field(16, description="Questions timed per task: the first N of each task in "
                                                            "the test split.")
    passes: PositiveInt = Field(3, description="Round-robin passes over the methods; each query's median is reported.")
    warmup_questions: NonNegativeInt = Field(2, description="Untimed questions every method answers first (0: no "
                                                            "warm-up).")


# ---------------------------------------------------------------------------------- ablations
class AblationVariant(Params):
    """One row of the ablation report: settings laid over the configured ones."""

    name: str = Field(description="The row's name in the report and in its nested MLflow run.")
    guidance: dict[str, Any] = Field(default_factory=dict, description="GuidanceParams fields laid over the "
                                                                       "configured ones.")
    stage1: dict[str, Any] = Field(default_factory=dict, description="Stage1Config fields (the loss weights, ...) laid "
                                                                     "over stage 1's.")
    stage2: bool | dict[str, Any] = Field(True, description="true: stage 2 as configured; false: stage 1's "
                                                            "hyper-network is the result; a mapping: Stage2Config "
                                                            "fields laid over stage 2's.")

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

    stage1_steps: PositiveInt | None = Field(None, description="Stage-1 steps of every variant; null: stage 1's "
                                                               "configured steps.")
    stage2_steps: PositiveInt | None = Field(None, description="Stage-2 steps of every variant; null: stage 2's "
                                                               "configured steps.")
    variants: list[AblationVariant] = Field(min_length=1, description="The report's rows, names unique; required "
                                                                      "(conf/base lists them), and an environment's "
                                                                      "list replaces the base one whole.")

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[AblationVariant]) -> list[AblationVariant]:
        names = [v.name for v in variants]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"variant names must be unique; {repeated} repeat")
        return variants


class EvaluationParams(Params):
    latency: LatencyParams = Field(LatencyParams(), description="How every method's latency is timed.")
    model_name: str = Field("pilot", description="Artifact path of the trained PILOT's pyfunc model in its MLflow run "
                                                 "(runs:/<run_id>/<model_name>).")
    registered_model_name: str | None = Field("pilot", description="Its name in the MLflow model registry "
                                                                   "(models:/<name>/<version>); null: log, don't "
                                                                   "register.")


class TrackingParams(Params):
    on_unavailable: Literal["fail", "disable"] = Field("fail", description="When the MLflow store cannot be reached: "
                                                                           "fail (stop before the run) or disable "
                                                                           "(run without tracking).")
