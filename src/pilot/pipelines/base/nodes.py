"""Nodes of the ``base`` pipeline: the student and teacher, trained, imported or used in place.

* The embedded default: a BPE tokenizer and both models trained from scratch.
* ``models.<role>.pretrained: true`` (a local Hugging Face model used in place): nothing is
  trained; the node returns a :class:`PretrainedModelRef` and the catalog leaves the folder alone.
* ``models.<role>.source`` (a Hugging Face folder or a GGUF file): imported once into the role's
  folder, stamped with the source's sha256 (and the adaptation settings and data, when adapted);
  an unchanged stamp keeps the folder as it is. With ``base.<role>.adapt`` the imported student
  is first warm-started on the task format (questions with and without plans).

No tokenizer is trained unless a model is trained from scratch.
"""

from __future__ import annotations

import hashlib
import logging

import pandas as pd
from transformers import PreTrainedTokenizerBase

from pilot.config import BaseParams, GenerationParams, ModelParams, with_run_seed
from pilot.evaluation import answer_and_score
from pilot.models import (
    CausalLM,
    PretrainedModelRef,
    build_causal_lm,
    describe,
    import_causal_lm,
    read_stamp,
    source_fingerprint,
    train_tokenizer,
)
from pilot.prompts import TOY, answer_prompt, continuation
from pilot.statistics import summarize
from pilot.tracking import metric_records
from pilot.training.base_lm import adapt, student_examples, teacher_examples, train_causal_lm

logger = logging.getLogger(__name__)


def fit_tokenizer(tasks_train: pd.DataFrame, params: BaseParams) -> PreTrainedTokenizerBase | PretrainedModelRef:
    """A byte-level BPE tokenizer trained on the training transcripts (question, plan, answer);
    none (a :class:`PretrainedModelRef`) when no model is trained from scratch."""
    if not (params.student.trained_here or params.teacher.trained_here):
        logger.info("Both models are pretrained: no tokenizer to train.")
        return PretrainedModelRef("tokenizer")
    texts = [answer_prompt(q, p) + continuation(a)
             for q, p, a in zip(tasks_train["question"], tasks_train["oracle_plan"], tasks_train["answer"])]
    return train_tokenizer(texts, params.tokenizer.vocab_size)


# The teacher is a model of its own, not the student's twin: its seeds are offset by one.
SEED_OFFSET = {"student": 0, "teacher": 1}


def _table_fingerprint(rows: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).values.tobytes()).hexdigest()[:16]


def import_stamp(role: str, spec: ModelParams, tasks_train: pd.DataFrame, seed: int) -> dict:
    """What an imported (and adapted) model's folder is stamped with: its source's sha256, and the
    adaptation's settings and training rows; a folder with the same stamp is current."""
    stamp = {"source": spec.source, "source_sha256": source_fingerprint(spec.source)}
    if spec.adapt is not None:
        # In JSON form, as the stamp file reads back (a tuple as a list).
        # The default without_plan is left out, so students adapted before the switch existed stay current.
        stamp["adapt"] = with_run_seed(spec.adapt, seed, SEED_OFFSET[role]).model_dump(
            mode="json", exclude={"without_plan"} if spec.adapt.without_plan else None)
        stamp["adapt_data"] = _table_fingerprint(tasks_train[["question", "oracle_plan", "solution"]])
    return stamp


def _import(role: str, spec: ModelParams, tasks_train: pd.DataFrame,
            seed: int) -> tuple[CausalLM | PretrainedModelRef, pd.DataFrame]:
    """The role's model imported from ``spec.source`` (and adapted, with its loss history), or a ref
    when its folder is current."""
    stamp = import_stamp(role, spec, tasks_train, seed)
    if spec.path and read_stamp(spec.path) == stamp:
        logger.info("The %s at %s is already imported from %s (same sha256%s): kept.", role, spec.path,
                    spec.source, " and adaptation" if spec.adapt else "")
        return PretrainedModelRef(role), pd.DataFrame({"step": [], "loss": []})
    lm = import_causal_lm(spec.source)
    history = []
    if spec.adapt is not None:
        history = adapt(lm, tasks_train, with_run_seed(spec.adapt, seed, SEED_OFFSET[role]), role)
    lm.stamp = stamp
    return lm, pd.DataFrame(history) if history else pd.DataFrame({"step": [], "loss": []})


def _train(role: str, tasks_train: pd.DataFrame, tokenizer: PreTrainedTokenizerBase | None, params: BaseParams,
           seed: int) -> tuple[CausalLM | PretrainedModelRef, pd.DataFrame]:
    spec = getattr(params, role)
    if spec.pretrained:
        logger.info("The %s is pretrained (globals.yml): nothing to train.", role)
        return PretrainedModelRef(role), pd.DataFrame({"step": [], "loss": []})
    if spec.source:
        return _import(role, spec, tasks_train, seed)
    if tokenizer is None or isinstance(tokenizer, PretrainedModelRef):
        raise ValueError(f"The {role} is trained from scratch but no tokenizer was trained; rerun the base pipeline.")
    rows = tasks_train.to_dict("records")
    examples = student_examples(rows, spec.plan_loss, TOY) if role == "student" else teacher_examples(rows, TOY)
    lm = build_causal_lm(tokenizer, family=spec.family, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                         num_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                         max_positions=spec.max_positions, seed=seed + SEED_OFFSET[role])
    logger.info("Training the %s: %s", role, describe(lm))
    history = train_causal_lm(lm, examples, with_run_seed(spec.training, seed, SEED_OFFSET[role]), role).history
    return lm, pd.DataFrame(history)


def train_student(tasks_train: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, params: BaseParams,
                  seed: int) -> tuple[CausalLM | PretrainedModelRef, pd.DataFrame]:
    """The student learns question -> answer and question + plan -> answer.

    Returns:
        ``student_model`` and its per-step loss history.
    """
    return _train("student", tasks_train, tokenizer, params, seed)


def train_teacher(tasks_train: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, params: BaseParams,
                  seed: int) -> tuple[CausalLM | PretrainedModelRef, pd.DataFrame]:
    """The teacher learns question -> plan -> answer.

    Returns:
        ``teacher_model`` and its per-step loss history.
    """
    return _train("teacher", tasks_train, tokenizer, params, seed)


def measure_plan_gap(student: CausalLM, tasks_test: pd.DataFrame,
                     generation: GenerationParams) -> tuple[pd.DataFrame, dict]:
    """In-distribution test accuracy of the student without a plan and with the oracle plan in context.

    Returns:
        The per-task table (accuracy, 95 % interval) and MLflow metrics including ``plan_gap``.
    """
    # In distribution only (the evaluation reports both splits); a teacher writes the plan-less rows' plans later.
    tasks_test = tasks_test[(tasks_test["split"] == "test") & (tasks_test["oracle_plan"] != "")]
    runs = [
        answer_and_score(student, tasks_test, plans=plans, generation=generation, method=method, progress=method)
        for method, plans in (("student_no_plan", None), ("student_oracle_plan", tasks_test["oracle_plan"].tolist()))
    ]
    table = summarize(pd.concat(runs), zero_shot="student_no_plan", plan_in_context="student_oracle_plan")
    table = table.drop(columns=["gap_recovered"])
    pivot = table.pivot(index="task", columns="method", values="accuracy")
    metrics = {}
    for task, row in pivot.iterrows():
        metrics[f"accuracy_no_plan_{task}"] = row["student_no_plan"]
        metrics[f"accuracy_oracle_plan_{task}"] = row["student_oracle_plan"]
        metrics[f"plan_gap_{task}"] = row["student_oracle_plan"] - row["student_no_plan"]
    logger.info("Plan gap (oracle plan - no plan) on the test split: %s",
                ", ".join(f"{t} {100 * (r['student_oracle_plan'] - r['student_no_plan']):+.1f} pts" for t, r in pivot.iterrows()))
    return table, metric_records(metrics)
