"""Shared fixtures: small real components (reasoning-gym tasks, a BPE tokenizer, tiny models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pilot.models import build_causal_lm, train_tokenizer  # noqa: E402
from pilot.prompts import answer_prompt, continuation  # noqa: E402
from pilot.tasks import build_task_table  # noqa: E402

TASKS = [
    {"name": "chain_sum", "size": 120, "kwargs": {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 1}},
    {"name": "basic_arithmetic", "size": 120,
     "kwargs": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"]}},
]


@pytest.fixture(scope="session")
def task_table() -> pd.DataFrame:
    return build_task_table(TASKS, val_per_task=10, test_per_task=20, seed=0)


@pytest.fixture(scope="session")
def tokenizer(task_table):
    texts = [answer_prompt(q, p) + continuation(a)
             for q, p, a in zip(task_table["question"], task_table["oracle_plan"], task_table["answer"])]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture()
def tiny_lm(tokenizer):
    """A randomly initialised 2-layer Llama student (fresh per test: tests may attach hooks)."""
    torch.manual_seed(0)
    return build_causal_lm(tokenizer, family="llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
