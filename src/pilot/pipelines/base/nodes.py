"""Nodes of the ``base`` pipeline: the embedded default tokenizer, student and teacher.

With ``models.<role>.pretrained: true`` in globals.yml (a local Hugging Face model in place of
the embedded default) nothing is trained: the node returns a :class:`PretrainedModelRef` and the
catalog leaves that model folder untouched.
"""

from __future__ import annotations

import logging

import pandas as pd
from transformers import PreTrainedTokenizerBase

from pilot.config import BaseParams, GenerationParams, with_run_seed
from pilot.evaluation import answer_and_score, summarize
from pilot.models import CausalLM, PretrainedModelRef, build_causal_lm, describe, train_tokenizer
from pilot.prompts import answer_prompt, continuation
from pilot.tracking import metric_records
from pilot.training.base_lm import student_examples, teacher_examples, train_causal_lm

logger = logging.getLogger(__name__)


def fit_tokenizer(tasks_train: pd.DataFrame, params: BaseParams) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on the training transcripts (question, plan, answer)."""
    texts = [answer_prompt(q, p) + continuation(a)
             for q, p, a in zip(tasks_train["question"], tasks_train["oracle_plan"], tasks_train["answer"])]
    return train_tokenizer(texts, params.tokenizer.vocab_size)


# The teacher is a model of its own, not the student's twin: its seeds are offset by one.
SEED_OFFSET = {"student": 0, "teacher": 1}


def _train(role: str, tasks_train: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, params: BaseParams,
           seed: int) -> tuple[CausalLM | PretrainedModelRef, pd.DataFrame]:
    spec = getattr(params, role)
    if spec.pretrained:
        logger.info("The %s is pretrained (globals.yml): nothing to train.", role)
        return PretrainedModelRef(role), pd.DataFrame({"step": [], "loss": []})
    rows = tasks_train.to_dict("records")
    examples = student_examples(rows, spec.plan_loss) if role == "student" else teacher_examples(rows)
    lm = build_causal_lm(tokenizer, family=spec.family, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                         num_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                         max_positions=spec.max_positions, seed=seed + SEED_OFFSET[role])
    logger.info("Training the %s: %s", role, describe(lm))
    history = train_causal_lm(lm, examples, with_run_seed(spec.training, seed, SEED_OFFSET[role]), role)
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
    """Test accuracy of the student without a plan and with the oracle plan in context.

    Returns:
        The per-task table (accuracy, 95 % interval) and MLflow metrics including ``plan_gap``.
    """
    runs = [
        answer_and_score(student, tasks_test, plans=plans, max_new_tokens=generation.max_new_tokens,
                         batch_size=generation.batch_size, method=method, progress=method)
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
