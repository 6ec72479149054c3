"""The one scoring path: reasoning-gym's verifiers, made safe for untrusted model output.

Generated answers are untrusted input. Some reasoning-gym scorers evaluate them with sympy's
``parse_expr`` or even ``eval`` (countdown, puzzle24, list-valued tasks), so an answer such as
``__import__('os').system(...)`` or ``9**9**9`` must never reach them unchecked. Three layers:

1. a pre-filter in this process rejects over-long answers, control and format characters,
   Python dunder/keyword tricks and exponent operators before any scorer sees them;
2. the scorer itself runs in a separate worker process with a memory limit
   (:mod:`pilot.verifier_worker`);
3. every answer has a wall-clock limit: a worker that overruns it is killed and restarted, the
   answer scores 0 and the rest of the batch goes on.

Reward is exact success: 1.0 when reasoning-gym's score is 1.0, else 0.0.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_ANSWER_CHARS = 512
# Always rejected: dunder access, exponent operators (``9**9**9``, sympy's ``^``), and
# characters no verifiable answer needs.
_FORBIDDEN_ALWAYS = re.compile(r"__|\*\*|\^|[`\\$;{}@!]")
# Rejected when the answer has call, attribute or index syntax: the names that turn an
# expression into code. A bare word ("open", "system") stays a harmless wrong answer.
_CODE_SYNTAX = re.compile(r"[(\[.:=]")
_FORBIDDEN_NAMES = re.compile(
    r"\b(import|lambda|exec|eval|compile|open|globals|locals|getattr|setattr|delattr|system|"
    r"subprocess|os|sys|print|input|breakpoint|vars|dir|type|object|class|builtins)\b",
    re.IGNORECASE,
)
_MAX_DIGIT_RUN = re.compile(r"\d{40,}")


def prefilter(answer: Any) -> str | None:
    """Return the answer ready for a scorer, or None when it must score 0 unseen by any scorer."""
    if not isinstance(answer, str):
        return None
    if len(answer) > MAX_ANSWER_CHARS:
        return None
    normalized = unicodedata.normalize("NFKC", answer).strip()
    if not normalized or len(normalized) > MAX_ANSWER_CHARS:
        return None
    # Control, format (zero-width, bidi overrides), surrogate and unassigned characters.
    if any(unicodedata.category(ch)[0] == "C" for ch in normalized):
        return None
    if _FORBIDDEN_ALWAYS.search(normalized) or _MAX_DIGIT_RUN.search(normalized):
        return None
    if _CODE_SYNTAX.search(normalized) and _FORBIDDEN_NAMES.search(normalized):
        return None
    return normalized


@dataclass
class VerifierStats:
    scored: int = 0
    prefiltered: int = 0
    timeouts: int = 0


class Verifier:
    """Scores answers in a sandboxed worker process; see the module docstring.

    The worker is ``python -m pilot.verifier_worker``, talking JSON lines over its stdin and
    stdout: a separate interpreter, so nothing of the caller (its ``__main__`` included) is
    re-imported, and it can be killed at any moment without harming the caller.
    """

    def __init__(self, timeout_s: float = 2.0, memory_limit_mb: int = 2048, startup_timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.stats = VerifierStats()
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pilot.verifier_worker", str(self.memory_limit_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        ready = self._read_line(self.startup_timeout_s)
        if ready != "ready":
            self._kill()
            raise RuntimeError("The verifier worker (python -m pilot.verifier_worker) failed to start.")

    def _read_line(self, timeout: float) -> str | None:
        assert self._process is not None and self._process.stdout is not None
        readable, _, _ = select.select([self._process.stdout], [], [], timeout)
        if not readable:
            return None
        line = self._process.stdout.readline()
        return line.strip() if line else None

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=5)
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    stream.close()
        self._process = None

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _score_one(self, task: str, answer: str, entry: dict[str, Any]) -> float:
        if self._process is None or self._process.poll() is not None:
            self._kill()
            self._start()
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(json.dumps({"task": task, "answer": answer, "entry": entry}) + "\n")
            self._process.stdin.flush()
            line = self._read_line(self.timeout_s)
            if line is not None:
                return float(json.loads(line)["score"])
        except (OSError, ValueError, KeyError):
            pass
        # Too slow, or the worker died (e.g. at its memory limit): a wrong answer, fresh worker.
        self.stats.timeouts += 1
        self._kill()
        return 0.0

    def score(self, tasks: Sequence[str], answers: Sequence[Any], golds: Sequence[str],
              metadatas: Sequence[dict[str, Any] | str], questions: Sequence[str] | None = None) -> list[float]:
        """Exact-success rewards (0.0 or 1.0) for a batch of answers."""
        if not (len(tasks) == len(answers) == len(golds) == len(metadatas)):
            raise ValueError("score() needs tasks, answers, golds and metadatas of the same length.")
        rewards = []
        with self._lock:
            for i, (task, answer, gold, metadata) in enumerate(zip(tasks, answers, golds, metadatas)):
                clean = prefilter(answer)
                if clean is None:
                    self.stats.prefiltered += 1
                    rewards.append(0.0)
                    continue
                meta = json.loads(metadata) if isinstance(metadata, str) else metadata
                entry = {"question": questions[i] if questions else "", "answer": gold, "metadata": meta}
                score = self._score_one(task, clean, entry)
                self.stats.scored += 1
                rewards.append(1.0 if score == 1.0 else 0.0)
        return rewards


_DEFAULT: Verifier | None = None


def get_verifier() -> Verifier:
    """The process-wide verifier (one worker, started on first use, stopped at exit)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Verifier()
        atexit.register(_DEFAULT.close)
    return _DEFAULT


def score_answers(tasks, answers, golds, metadatas, questions=None) -> list[float]:
    """Score a batch with the process-wide verifier: the scoring function used everywhere."""
    return get_verifier().score(tasks, answers, golds, metadatas, questions)
