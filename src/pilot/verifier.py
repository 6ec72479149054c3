"""The one scoring path: reasoning-gym's verifiers, made safe for untrusted model output.

Generated answers are untrusted input, and some reasoning-gym scorers evaluate them (sympy's
``parse_expr`` or ``eval``). Two layers stand between an answer and harm:

1. **A grammar, in this process** (:mod:`pilot.answers`). Every accepted task has a strict
   grammar for its answer type; an answer that does not parse scores 0 without reaching any
   scorer, and one that does is handed on re-written from its parse. Code cannot be spelled in
   any of the grammars, nor can a number be raised to a power.
2. **A sandbox, around the scorer** (:mod:`pilot.verifier_worker`). Scorers run in a worker
   process with an empty environment, a fresh empty working directory, resource limits, no
   network where the OS allows a network namespace, and Landlock and seccomp restrictions
   where the kernel offers them. Replies come back on a pipe of their own, each with the
   request id and a per-worker nonce, so nothing the scorer prints can pass for a score. An
   answer over the wall-clock limit kills its worker; a fresh one is forked from a warm zygote
   in milliseconds and the batch goes on.

Reward is exact success: 1.0 when reasoning-gym's score is 1.0, else 0.0.
"""

from __future__ import annotations

import atexit
import hmac
import json
import math
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pilot.answers import check_scorable, equivalent, parse_answer, scorable_tasks

MAX_REPLY_BYTES = 65536
WORKER_CPU_BUDGET_S = 300  # CPU seconds a worker may use over its life before it is replaced

# The zygote's first statements: the parent's import path, then the zygote itself. Everything
# else it needs comes over the control socket or in the config argument (no secrets there).
_BOOTSTRAP = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2])['sys_path']; "
    "from pilot.verifier_worker import run_zygote; run_zygote(int(sys.argv[1]), sys.argv[2])"
)


@dataclass
class VerifierStats:
    scored: int = 0               # answers handed to a scorer
    rejected_by_grammar: int = 0  # answers that did not parse: 0, never shown to a scorer
    timeouts: int = 0             # answers over the wall-clock limit (their worker was killed)
    worker_restarts: int = 0      # workers replaced: after a timeout, a crash, a limit, or retirement
    forged_replies: int = 0       # result lines discarded for a wrong request id or nonce


class _WorkerGone(Exception):
    pass


class _Worker:
    """The parent's end of one worker: its pid, request pipe, result pipe and nonce."""

    def __init__(self, pid: int, request_fd: int, result_fd: int, nonce: str) -> None:
        self.pid, self.request_fd, self.result_fd, self.nonce = pid, request_fd, result_fd, nonce
        self._buffer = b""
        self._poll = select.poll()
        self._poll.register(result_fd, select.POLLIN)

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.request_fd, data):]

    def read_reply(self, deadline: float) -> dict[str, Any] | None:
        """The next result line, decoded; None if it is not JSON. TimeoutError, _WorkerGone."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll.poll(remaining * 1000):
                raise TimeoutError
            chunk = os.read(self.result_fd, MAX_REPLY_BYTES)
            if not chunk:
                raise _WorkerGone
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise _WorkerGone  # no genuine reply is this long
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None

    def is_genuine(self, reply: dict[str, Any] | None, request_id: int) -> bool:
        return (reply is not None and reply.get("id") == request_id
                and hmac.compare_digest(str(reply.get("nonce", "")).encode(), self.nonce.encode()))

    def close(self) -> None:
        for fd in (self.request_fd, self.result_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Verifier:
    """Scores answers: grammar first, then reasoning-gym's scorer in a sandboxed worker.

    ``timeout_s`` is the wall-clock limit per answer, ``cpu_limit_s`` the CPU limit per answer
    inside the worker, ``worker_cpu_budget_s`` the CPU a worker may use before it is replaced.
    ``sandbox`` holds what the latest worker reported it could enforce, ``workdir`` its
    working directory. ``scorer_module`` is for tests only: a module whose ``SCORERS`` dict
    adds fake scorers (probes of the sandbox) to the worker.
    """

    def __init__(self, timeout_s: float = 2.0, memory_limit_mb: int = 2048, cpu_limit_s: int | None = None,
                 worker_cpu_budget_s: int = WORKER_CPU_BUDGET_S, startup_timeout_s: float = 60.0,
                 scorer_module: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        # RLIMIT_CPU counts whole seconds; it backs up the wall-clock limit the parent enforces.
        self.cpu_limit_s = cpu_limit_s if cpu_limit_s is not None else math.ceil(timeout_s) + 1
        self.worker_cpu_budget_s = max(worker_cpu_budget_s, self.cpu_limit_s + 1)
        self.startup_timeout_s = startup_timeout_s
        self.scorer_module = scorer_module
        self.stats = VerifierStats()
        self.sandbox: dict[str, str] | None = None
        self.workdir: str | None = None
        self._zygote: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._worker: _Worker | None = None
        self._request_id = 0
        self._lock = threading.RLock()

    # -------------------------------------------------------------- processes
    def _start_zygote(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="pilot-verifier-")
        config = {
            "sys_path": [os.path.abspath(path) for path in sys.path if path],
            "tasks": scorable_tasks(),
            "scorer_module": self.scorer_module,
            "memory_limit_mb": self.memory_limit_mb,
            "cpu_limit_s": self.cpu_limit_s,
            "worker_cpu_budget_s": self.worker_cpu_budget_s,
        }
        parent_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with zygote_end:
            self._zygote = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(zygote_end.fileno()), json.dumps(config)],
                env={}, cwd=self.workdir, pass_fds=(zygote_end.fileno(),), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        self._control = parent_end
        hello = self._ask(None, [], self.startup_timeout_s)
        if not hello.get("ready"):
            self._stop_zygote()
            raise RuntimeError(
                f"The verifier's scorer process failed to start ({hello.get('error', 'no answer')}); "
                "check that `python -c 'import reasoning_gym'` works in this environment."
            )

    def _ask(self, message: dict[str, Any] | None, fds: list[int], timeout: float) -> dict[str, Any]:
        """Send ``message`` (with ``fds``) to the zygote and return its answer ({} if none)."""
        assert self._control is not None
        self._control.settimeout(timeout)
        try:
            if message is not None:
                socket.send_fds(self._control, [json.dumps(message).encode()], fds)
            answer = self._control.recv(65536)
            return json.loads(answer) if answer else {}
        except (OSError, ValueError):
            return {}

    def _stop_zygote(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._zygote is not None:
            if self._zygote.poll() is None:
                try:  # the zygote leads its own process group: it and any worker go together
                    os.killpg(self._zygote.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._zygote.wait(timeout=10)
            self._zygote = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _spawn_worker(self) -> _Worker:
        for _ in range(2):
            if self._zygote is None or self._zygote.poll() is not None:
                self._stop_zygote()
                self._start_zygote()
            request_read, request_write = os.pipe()
            result_read, result_write = os.pipe()
            nonce = secrets.token_hex(16)
            try:
                answer = self._ask({"nonce": nonce}, [request_read, result_write], self.startup_timeout_s)
            finally:
                os.close(request_read)
                os.close(result_write)
            if "pid" not in answer:
                os.close(request_write)
                os.close(result_read)
                self._stop_zygote()  # the zygote is gone or stuck: a new one on the next attempt
                continue
            worker = _Worker(answer["pid"], request_write, result_read, nonce)
            try:
                ready = worker.read_reply(time.monotonic() + self.startup_timeout_s)
            except (TimeoutError, _WorkerGone):
                ready = None
            if not (worker.is_genuine(ready, 0) and ready.get("ready")):
                self._kill(worker)
                raise RuntimeError("The verifier worker could not lock itself down; scoring stopped rather than run "
                                   "scorers without their resource limits.")
            self.sandbox = ready["sandbox"]
            return worker
        raise RuntimeError("The verifier's scorer process keeps failing to fork workers; see pilot.verifier_worker.")

    def _discard_worker(self) -> None:
        if self._worker is not None:
            self._kill(self._worker)
            self._worker = None

    def _kill(self, worker: _Worker) -> None:
        # Only the zygote reaps its workers, and only when asked for a new one, so while the
        # zygote lives this pid cannot have been reused.
        if self._zygote is not None and self._zygote.poll() is None:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.close()

    def close(self) -> None:
        with self._lock:
            self._discard_worker()
            self._stop_zygote()

    # -------------------------------------------------------------- scoring
    def _score_one(self, task: str, answer: str, entry: dict[str, Any]) -> float:
        """reasoning-gym's score for one already-parsed answer; 0.0 on timeout or crash."""
        for _ in range(2):
            if self._worker is None:
                self._worker = self._spawn_worker()
            worker = self._worker
            self._request_id += 1
            request_id = self._request_id
            try:
                worker.send({"id": request_id, "task": task, "answer": answer, "entry": entry})
                break
            except OSError:  # the worker had exited between answers: a fresh one, same answer
                self._discard_worker()
                self.stats.worker_restarts += 1
        else:
            raise RuntimeError("The verifier worker exits before it can be sent an answer; see pilot.verifier_worker.")
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                reply = worker.read_reply(deadline)
            except (TimeoutError, _WorkerGone) as failure:
                # Over the time limit, or killed by its CPU/memory limit: a wrong answer, new worker.
                if isinstance(failure, TimeoutError):
                    self.stats.timeouts += 1
                self.stats.worker_restarts += 1
                self._discard_worker()
                return 0.0
            if not worker.is_genuine(reply, request_id):
                self.stats.forged_replies += 1
                continue
            if reply.get("retire"):
                self._discard_worker()
                self.stats.worker_restarts += 1
            score = reply.get("score")
            return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else 0.0

    def _run_scorers(self, tasks: Sequence[str], answers: Sequence[str],
                     entries: Sequence[dict[str, Any]]) -> list[float]:
        """Raw scores for answers that have already passed their grammar (tests call it directly)."""
        with self._lock:
            scores = []
            for task, answer, entry in zip(tasks, answers, entries):
                scores.append(self._score_one(task, answer, entry))
                self.stats.scored += 1
            return scores

    def score(self, tasks: Sequence[str], answers: Sequence[Any], golds: Sequence[str],
              metadatas: Sequence[dict[str, Any] | str], questions: Sequence[str] | None = None) -> list[float]:
        """Exact-success rewards (0.0 or 1.0) for a batch of answers."""
        tasks, answers, golds, metadatas = list(tasks), list(answers), list(golds), list(metadatas)
        questions = list(questions) if questions is not None else [""] * len(tasks)
        if not (len(tasks) == len(answers) == len(golds) == len(metadatas) == len(questions)):
            raise ValueError("score() needs tasks, answers, golds, metadatas (and questions) of the same length.")
        metadatas = [json.loads(m) if isinstance(m, str) else m for m in metadatas]
        local = [isinstance(m, dict) and m.get("source") == "file" for m in metadatas]
        for task in {t for t, is_local in zip(tasks, local) if not is_local}:
            check_scorable(task)
        rewards = [0.0] * len(tasks)
        with self._lock:
            to_score: list[int] = []
            parsed: list[str] = []
            for i, (task, answer) in enumerate(zip(tasks, answers)):
                if local[i]:  # a local dataset's row: an exact numeric / normalised-text match, in process
                    rewards[i] = 1.0 if equivalent(answer, golds[i]) else 0.0
                    continue
                canonical = parse_answer(task, answer)
                if canonical is None:  # scores 0 and is never shown to a scorer
                    self.stats.rejected_by_grammar += 1
                else:
                    to_score.append(i)
                    parsed.append(canonical)
            entries = [{"question": questions[i], "answer": golds[i], "metadata": metadatas[i]} for i in to_score]
            scores = self._run_scorers([tasks[i] for i in to_score], parsed, entries)
        for i, score in zip(to_score, scores):
            rewards[i] = 1.0 if score == 1.0 else 0.0
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
