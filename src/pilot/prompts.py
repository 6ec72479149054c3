"""The text format every model reads and writes, in one place.

    Q: <question>            the student's zero-shot prompt ends with "A:"
    P: <plan>                present when a plan is in context
    A: <answer>

The teacher is prompted with ``Q: <question>`` then ``P:`` and writes the plan line.
"""

from __future__ import annotations


def answer_prompt(question: str, plan: str | None = None) -> str:
    """The student's prompt: question, optional plan, then ``A:``."""
    plan_line = f"P: {plan}\n" if plan else ""
    return f"Q: {question}\n{plan_line}A:"


def plan_prompt(question: str) -> str:
    """The teacher's prompt for writing a plan."""
    return f"Q: {question}\nP:"


def continuation(text: str) -> str:
    """How an answer or plan follows its prompt (one space after the colon)."""
    return f" {text}"


def first_line(generated: str) -> str:
    """The answer (or plan) in a generated continuation: its first line, stripped."""
    return generated.split("\n", 1)[0].strip()
