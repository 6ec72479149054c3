"""The text every model reads and writes, in one place: one prompt builder per kind of model.

Two formats, chosen from the tokenizer (:func:`prompt_format`):

* :class:`ToyFormat`, for the embedded models trained from scratch (their tokenizer has no chat
  template). One line each::

      Q: <question>            the student's zero-shot prompt ends with "A:"
      P: <plan>                present when a plan is in context
      A: <answer>

  The teacher is prompted with ``Q: <question>`` then ``P:`` and writes the plan line; the
  answer is the first generated line.

* :class:`ChatFormat`, for a pretrained instruct model: the tokenizer's own chat template, with
  the question (and the plan, when in context) in the user turn. The teacher is asked in its
  user turn for a plan that gives the strategy and never the answer. Answers are free text
  (chain of thought allowed), ending at the end of the assistant turn; a per-task rule
  (:func:`pilot.answers.extract_answer`) reads the answer out of it.

Every method, the teacher, training and serving build their prompts through these objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedTokenizerBase


def answer_prompt(question: str, plan: str | None = None) -> str:
    """The toy student's prompt: question, optional plan, then ``A:``."""
    plan_line = f"P: {plan}\n" if plan else ""
    return f"Q: {question}\n{plan_line}A:"


def plan_prompt(question: str) -> str:
    """The toy teacher's prompt for writing a plan."""
    return f"Q: {question}\nP:"


def continuation(text: str) -> str:
    """How a toy answer or plan follows its prompt (one space after the colon)."""
    return f" {text}"


def first_line(generated: str) -> str:
    """A generated continuation's first line, stripped."""
    return generated.split("\n", 1)[0].strip()


class PromptFormat(Protocol):
    name: str
    line_answers: bool   # True: an answer (or plan) is one line, and generation stops at a newline

    def answer_prompt(self, question: str, plan: str | None = None) -> str: ...

    def answer_target(self, answer: str) -> str: ...

    def plan_prompt(self, question: str) -> str: ...

    def plan_transcript(self, plan: str, answer: str) -> str: ...

    def read_plan(self, generated: str) -> str: ...


@dataclass(frozen=True)
class ToyFormat:
    """The one-line ``Q: / P: / A:`` format of the embedded models."""

    name: str = "toy"
    line_answers: bool = True

    def answer_prompt(self, question: str, plan: str | None = None) -> str:
        return answer_prompt(question, plan)

    def answer_target(self, answer: str) -> str:
        return continuation(answer)

    def plan_prompt(self, question: str) -> str:
        return plan_prompt(question)

    def plan_transcript(self, plan: str, answer: str) -> str:
        """What follows :meth:`plan_prompt` in a training transcript: the plan, then the answer."""
        return continuation(f"{plan}\nA: {answer}")

    def read_plan(self, generated: str) -> str:
        return first_line(generated)


PLAN_REQUEST = ("Write a short plan for solving this problem: the steps to take, in order. "
                "Do not carry out the steps and do not give the final answer.")
PLAN_HEADER = "A plan for solving it:"


@dataclass(frozen=True)
class ChatFormat:
    """The tokenizer's chat template: question (and plan) in the user turn, the answer as the reply."""

    tokenizer: PreTrainedTokenizerBase
    name: str = "chat"
    line_answers: bool = False

    def _user_turn(self, content: str) -> str:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        bos = self.tokenizer.bos_token
        # A template that writes the BOS token itself, for a tokenizer that adds one too, would double it.
        if bos and text.startswith(bos) and _adds_bos(self.tokenizer):
            text = text[len(bos):]
        return text

    def answer_prompt(self, question: str, plan: str | None = None) -> str:
        return self._user_turn(f"{question}\n\n{PLAN_HEADER}\n{plan}" if plan else question)

    def answer_target(self, answer: str) -> str:
        return answer

    def plan_prompt(self, question: str) -> str:
        return self._user_turn(f"{question}\n\n{PLAN_REQUEST}")

    def plan_transcript(self, plan: str, answer: str) -> str:
        return plan

    def read_plan(self, generated: str) -> str:
        return generated.strip()


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


TOY = ToyFormat()


def prompt_format(tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """The chat format when the tokenizer has a chat template, the toy format otherwise."""
    return ChatFormat(tokenizer) if getattr(tokenizer, "chat_template", None) else TOY
