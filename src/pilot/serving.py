"""A trained PILOT as an MLflow pyfunc model: load it anywhere, ask questions, get guided answers.

The model's artifacts are the frozen student (its ``save_pretrained`` folder), the stage-2
hyper-network folder (weights, config and checksums) and the decoding settings; the ``pilot``
package travels with it as code, and the model itself is code too (``pilot/pyfunc_entry.py``,
MLflow's "models from code"), so nothing is pickled. Answers come from the same generation path as the
evaluation (:func:`pilot.generation.generate`)::

    model = mlflow.pyfunc.load_model("models:/pilot@champion")     # or "runs:/<run_id>/pilot"
    model.predict(pd.DataFrame({"question": ["What is 3 + 4 - 2?"]}))   # -> ["5"]

    mlflow models serve -m models:/pilot@champion --env-manager local -h 127.0.0.1 -p 5001

A request is a frame with a ``question`` column, found by name (over HTTP, ``{"inputs": [...]}`` is
read as that column; in Python, MLflow reads a plain list as an unnamed column, which is refused in
one sentence naming the forms that work). Before any generation each request is checked against
:class:`RequestLimits`; what breaks a limit, or is not a string, is refused with one sentence (HTTP
400), never a stack trace. Concurrent requests are answered together: a :class:`MicroBatcher` gathers
them for a few milliseconds into one batched generation, each question with its own guidance, and
every answer is the one the question gets alone (see :class:`PilotModel` and docs/serving.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from pilot.config import GenerationParams
from pilot.generation import generate
from pilot.guidance import HyperNetwork
from pilot.methods.base import Method
from pilot.methods.pilot import Pilot
from pilot.methods.references import ZeroShot
from pilot.models import CausalLM, load_causal_lm
from pilot.prompts import prompt_format

logger = logging.getLogger(__name__)

QUESTION = "question"
# The column is marked optional so that MLflow hands the model what lacks it (a frame without it, or a
# plain list, which MLflow reads as an unnamed column and drops) and the model refuses it in one sentence
# naming the forms that work, instead of MLflow's "Model is missing inputs ['question']".
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", QUESTION, required=False)]),
                           outputs=Schema([ColSpec("string")]))
ACCEPTED_FORMS = (f"send a DataFrame or dict with a '{QUESTION}' column of strings "
                  f"(pd.DataFrame({{'{QUESTION}': [...]}}) or {{'{QUESTION}': [...]}}; over HTTP also {{\"inputs\": [...]}})")
CHAMPION = "champion"   # the registry alias of the model to serve: models:/pilot@champion

# CPU matrix products give a row the same bits in any batch of at least this many rows (fewer take other
# kernels: measured with torch's CPU wheel at 1 and 2 threads, every shape of the toy and SmolLM2-135M;
# benchmarks/serving.py --rows prints it for a model). A batched generation of fewer questions is filled
# up to it with copies of its first prompt, so no answer depends on how many questions shared its batch.
STABLE_ROWS = 4


class RequestError(MlflowException):
    """A request the model refuses: the scoring server answers it with a 400 (a 500 for
    ``INTERNAL_ERROR``, a 503 for ``TEMPORARILY_UNAVAILABLE``) whose body is this one sentence,
    without a stack trace."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)

    # MLflow's scoring server rewrites the message of an MlflowException raised in predict to
    # "Failed to predict data '<the whole input>'. \nError: <message>": for a 1 MB question the
    # reply would echo the megabyte back. The first message set (ours) is kept.
    @property
    def message(self) -> str:
        return self.__dict__["_message"]

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__.setdefault("_message", value)


# The environment variables that override a served model's settings (docs/serving.md).
LIMIT_VARIABLES = {"max_questions": "PILOT_SERVE_MAX_QUESTIONS", "max_question_chars": "PILOT_SERVE_MAX_QUESTION_CHARS"}
BATCHING_VARIABLES = {"batch_wait_ms": "PILOT_SERVE_BATCH_WAIT_MS",
                      "max_batch_questions": "PILOT_SERVE_MAX_BATCH_QUESTIONS",
                      "max_waiting_questions": "PILOT_SERVE_MAX_WAITING_QUESTIONS",
                      "pad_multiple": "PILOT_SERVE_PAD_MULTIPLE"}


def _overridden(variables: Mapping[str, str], settings: Mapping[str, Any], environ: Mapping[str, str],
                kinds: Mapping[str, tuple[type, float]]) -> dict[str, Any]:
    """The values of ``variables``' fields in ``settings``, each overridden by its environment variable;
    ``kinds[field]`` is the type and the smallest value allowed."""
    values = {}
    for name, variable in variables.items():
        raw = environ.get(variable) or settings.get(name)
        if raw is None:
            continue
        kind, least = kinds[name]
        try:
            values[name] = kind(raw)
        except (TypeError, ValueError):
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{variable} (or settings.json's {name}) must be {what}, got {raw!r}.") from None
        if values[name] < least:
            raise ValueError(f"{variable} (or settings.json's {name}) must be at least {least:g}, got {raw!r}.")
    return values


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask, checked before any generation.

    The defaults are stored with a logged model (``settings.json``); a server overrides them with
    the environment variables in :data:`LIMIT_VARIABLES` (see docs/serving.md).
    """

    max_questions: int = 256         # questions per request (2 evaluation batches): bounds a request's time
    max_question_chars: int = 2000   # characters per question: the toy questions are ~50, GSM8K's < 1000

    def check(self, questions: Sequence[str]) -> None:
        """Raise :class:`RequestError` naming the first limit ``questions`` breaks."""
        if len(questions) > self.max_questions:
            raise RequestError(f"This request has {len(questions)} questions; the limit is {self.max_questions} "
                               f"per request (max_questions, {LIMIT_VARIABLES['max_questions']}): split it.")
        for number, question in enumerate(questions, start=1):
            if len(question) > self.max_question_chars:
                raise RequestError(f"Question {number} has {len(question)} characters; the limit is "
                                   f"{self.max_question_chars} (max_question_chars, "
                                   f"{LIMIT_VARIABLES['max_question_chars']}).")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> RequestLimits:
        """The limits a logged model was saved with, each overridden by its environment variable."""
        return cls(**_overridden(LIMIT_VARIABLES, settings, environ,
                                 {"max_questions": (int, 1), "max_question_chars": (int, 1)}))


@dataclass(frozen=True)
class Batching:
    """How one loaded model gathers concurrent requests into shared batched generations.

    A batch starts when its oldest request has waited ``batch_wait_ms``, or when it holds
    ``max_batch_questions``; a request that arrived while no other was in the server starts at once, so
    a lone client never waits. Each prompt is left-padded to the next multiple of ``pad_multiple`` tokens,
    a width fixed by the question alone; prompts of one width share a generation. Stored with a logged
    model (``settings.json``); a server overrides each with its variable in :data:`BATCHING_VARIABLES`.
    """

    batch_wait_ms: float = 2.0          # how long a batch gathers, from its oldest request's arrival
    max_batch_questions: int = 128      # whole requests up to this many questions (a bigger one goes alone)
    max_waiting_questions: int = 1024   # questions waiting for a batch; a request beyond them gets a 503
    pad_multiple: int = 32              # prompt widths: larger, fewer generations a batch and more padding

    def width(self, tokens: int) -> int:
        """The width a prompt of ``tokens`` tokens is padded to."""
        return -(-tokens // self.pad_multiple) * self.pad_multiple

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Batching:
        """The batching a logged model was saved with, each setting overridden by its environment variable."""
        return cls(**_overridden(BATCHING_VARIABLES, settings, environ,
                                 {"batch_wait_ms": (float, 0), "max_batch_questions": (int, 1),
                                  "max_waiting_questions": (int, 1), "pad_multiple": (int, 1)}))


def _as_question(number: int, value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and value != value):  # pandas reads a missing string as NaN
        raise RequestError(f"Question {number} is missing (null); send every question as a string.")
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise RequestError(f"Question {number} is {shown} (type {type(value).__name__}), not a string; send every "
                       "question as a string.")


def questions_of(model_input: Any) -> list[str]:
    """The questions in what a caller sent: a string, a list, array or Series of strings, or a
    DataFrame or dict with a ``question`` column (found by name; other columns are ignored).
    Anything else, or an item that is not a string, is a :class:`RequestError`."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, (pd.DataFrame, Mapping)):
        if QUESTION not in model_input:
            columns = list(model_input.columns if isinstance(model_input, pd.DataFrame) else model_input)
            if not columns:  # what MLflow leaves of a plain list, or of a frame without the column
                raise RequestError(f"Found no '{QUESTION}' column (MLflow reads a plain list as an unnamed column); "
                                   f"{ACCEPTED_FORMS}.")
            raise RequestError(f"Send the questions in a '{QUESTION}' column; got columns {columns}.")
        column = model_input[QUESTION]
        items = [column] if isinstance(column, str) else list(np.asarray(column, dtype=object).reshape(-1))
        if len(items) == 1 and isinstance(items[0], (list, tuple, np.ndarray)):
            items = list(items[0])   # MLflow makes {"question": [...]} one row that holds the list
    elif isinstance(model_input, (pd.Series, np.ndarray, Sequence)):
        items = list(np.asarray(model_input, dtype=object).reshape(-1))
    else:
        raise RequestError(f"Cannot read questions from a {type(model_input).__name__}; {ACCEPTED_FORMS}.")
    return [_as_question(number, item) for number, item in enumerate(items, start=1)]


def generation_of(settings: Mapping[str, Any]) -> GenerationParams:
    """The decoding settings a logged model was saved with (``settings.json``: ``max_new_tokens``,
    ``batch_size`` and, from models logged since it was stored, ``stop``; none before: no stop strings)."""
    return GenerationParams.model_validate({key: settings[key] for key in GenerationParams.model_fields
                                            if key in settings})


# ------------------------------------------------------------------------------ micro-batching
@dataclass
class _Request:
    questions: list[str]
    arrived: float              # time.monotonic() when it joined the queue
    alone: bool                 # no other request was in the server when it arrived
    result: list[str] | Exception | None = None


# What answers a batch: the requests' questions in, per request its answers or the error that refuses it,
# and a few words for the batch's log line.
AnswerBatch = Callable[[list[list[str]]], tuple[list["list[str] | Exception"], str]]


class MicroBatcher:
    """Answers requests from many threads in shared batches, one batch at a time.

    :meth:`submit` queues a request and blocks until its answers are back. Whichever waiting thread finds
    no batch being answered leads the next one: it takes the queued requests (whole, first come first
    served) up to ``max_batch_questions``, after gathering for up to ``batch_wait_ms`` unless the oldest
    came alone, answers them with one call of ``answer`` in its own thread, and logs one line per batch;
    then the next waiting thread leads. A lone request is thus answered in its caller's thread, at once.
    A request that would put more than ``max_waiting_questions`` in the queue is refused (HTTP 503).
    """

    def __init__(self, answer: AnswerBatch, batching: Batching) -> None:
        self.answer = answer
        self.batching = batching
        self.batches = 0
        self._queue: list[_Request] = []
        self._waiting_questions = 0
        self._in_server = 0       # requests submitted and not yet answered
        self._leading = False     # a thread is gathering or answering a batch
        self._changed = threading.Condition()

    def submit(self, questions: list[str]) -> list[str]:
        """The answers to ``questions``, from the batch they joined (raises what refused them)."""
        with self._changed:
            waiting, limit = self._waiting_questions, self.batching.max_waiting_questions
            if waiting and waiting + len(questions) > limit:
                raise RequestError(f"The server is full: {waiting} questions are waiting for a batch and the limit "
                                   f"is {limit} (max_waiting_questions, {BATCHING_VARIABLES['max_waiting_questions']});"
                                   " retry shortly, or serve with more workers.", error_code=TEMPORARILY_UNAVAILABLE)
            request = _Request(questions, time.monotonic(), alone=self._in_server == 0)
            self._queue.append(request)
            self._waiting_questions += len(questions)
            self._in_server += 1
            self._changed.notify_all()
        while True:
            with self._changed:
                while request.result is None and self._leading:
                    self._changed.wait()
                if request.result is not None:
                    break
                self._leading = True
                batch = self._gather()
            self._answer(batch)
        if isinstance(request.result, Exception):
            raise request.result
        return request.result

    def _gather(self) -> list[_Request]:
        """The next batch from the queue (not empty), once gathered. Called holding the lock."""
        gather_until = max(time.monotonic(), self._queue[0].arrived) + self.batching.batch_wait_ms / 1000
        while not self._queue[0].alone and self._waiting_questions < self.batching.max_batch_questions:
            left = gather_until - time.monotonic()
            if left <= 0:
                break
            self._changed.wait(timeout=left)
        batch, questions = [], 0
        while self._queue and (not batch or questions + len(self._queue[0].questions) <= self.batching.max_batch_questions):
            request = self._queue.pop(0)
            batch.append(request)
            questions += len(request.questions)
        self._waiting_questions -= questions
        return batch

    def _answer(self, batch: list[_Request]) -> None:
        """Answer ``batch`` (every request gets its answers or an error), then let the next batch be led."""
        began = time.monotonic()
        try:
            results, note = self.answer([request.questions for request in batch])
        except Exception as error:  # the trace goes to the server's log, not to the clients
            logger.exception("PILOT failed on a batch of %d requests", len(batch))
            failed = RequestError(f"The model failed on this request ({type(error).__name__}); the server's log "
                                  "has the details.", error_code=INTERNAL_ERROR)
            results, note = [failed] * len(batch), "failed"
        seconds = time.monotonic() - began
        with self._changed:
            for request, result in zip(batch, results):
                request.result = result
            self.batches += 1
            number = self.batches
            self._in_server -= len(batch)
            self._leading = False
            self._changed.notify_all()
        questions = sum(len(r.questions) for r in batch)
        logger.info("PILOT batch %d: %d request%s, %d question%s, waited up to %.1f ms, %s, %.1f ms", number,
                    len(batch), "" if len(batch) == 1 else "s", questions, "" if questions == 1 else "s",
                    1000 * (began - batch[0].arrived), note, 1000 * seconds)


def _log_to_stderr() -> None:
    """Batch lines on the server's stderr (MLflow's server configures no handler for them), at the level
    ``PILOT_SERVE_LOG_LEVEL`` names (INFO: one line per batch; WARNING: none)."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("PILOT_SERVE_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


class PilotModel(mlflow.pyfunc.PythonModel):
    """The frozen student guided by the trained hyper-network (stage 2), or alone (no hyper-network:
    the plain student served the same way, for comparisons).

    MLflow's scoring server answers each request in a thread of its own; generation, which uses state
    shared by every request (the method's hooks on the one student, its tokenizer), runs one batch at a
    time: a :class:`MicroBatcher` gathers concurrent requests into one batched generation. Each question gets
    its own guidance (the hyper-network reads each prompt alone), and the same bits whatever shares its
    batch: its prompt is left-padded to a width fixed by its own length (:meth:`Batching.width`; padded to
    the longest beside it, the last bits of attention would follow its companions), in a generation of at
    least :data:`STABLE_ROWS` rows. Requests are checked (:class:`RequestLimits`) before they join the
    queue, and against the student's context before they join a batch.
    """

    def load_context(self, context) -> None:
        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        student = load_causal_lm(context.artifacts["student"], device=device)
        hypernet = None
        if "hypernet" in context.artifacts:
            hypernet = HyperNetwork.load(context.artifacts["hypernet"], student.hidden_size, student.num_layers,
                                         rebuild="kedro run --pipelines stage2 evaluation")
        _log_to_stderr()
        self.set_up(student, hypernet, generation=generation_of(settings),
                    limits=RequestLimits.from_settings(settings), batching=Batching.from_settings(settings))

    def set_up(self, student: CausalLM, hypernet: HyperNetwork | None, *, generation: GenerationParams,
               limits: RequestLimits = RequestLimits(), batching: Batching = Batching()) -> PilotModel:
        """Answer with ``student`` guided by ``hypernet`` (None: the student alone), decoding with
        ``generation`` (what :meth:`load_context` does with the logged artifacts); returns the model."""
        self.student = student
        self.method: Method = Pilot(hypernet) if hypernet is not None else ZeroShot()
        self.method.prepare(student)   # attached around each batch's generation
        self.generation = generation
        # Every batched generation in one piece of at least STABLE_ROWS rows (generate would split it).
        self._batch_generation = generation.model_copy(update={"batch_size": max(generation.batch_size, STABLE_ROWS)})
        self.limits = limits
        self.context_length = getattr(student.model.config, "max_position_embeddings", None)
        self._generating = threading.Lock()   # held while a batch generates
        self.batching = batching
        self.batcher = MicroBatcher(self._answer_batch, batching)
        return self

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        questions = questions_of(model_input)
        self.limits.check(questions)
        if not questions:
            return []
        return self.batcher.submit(questions)

    def _answer_batch(self, requests: list[list[str]]) -> tuple[list[list[str] | Exception], str]:
        """Each request's answers (or the error refusing it), from one generation per prompt width."""
        fmt = prompt_format(self.student.tokenizer)
        results: list[list[str] | Exception] = []
        rows: dict[int, list[tuple[int, int, str]]] = {}   # prompt width -> (request, question, prompt)
        for number, questions in enumerate(requests):
            prompts = [fmt.answer_prompt(q) for q in questions]
            lengths = [len(ids) for ids in self.student.tokenizer(prompts)["input_ids"]]
            try:
                self._check_context(lengths)
            except RequestError as refused:
                results.append(refused)
                continue
            results.append([""] * len(questions))
            for index, (prompt, length) in enumerate(zip(prompts, lengths)):
                rows.setdefault(self.batching.width(length), []).append((number, index, prompt))
        generations, size = 0, self._batch_generation.batch_size
        with self._generating, self.method.attach(self.student) as attached:
            for width in sorted(rows):
                for start in range(0, len(rows[width]), size):
                    chunk = rows[width][start:start + size]
                    prompts = [prompt for *_, prompt in chunk]
                    prompts += [prompts[0]] * (STABLE_ROWS - len(prompts))
                    answers = generate(attached.student, prompts, generation=self._batch_generation,
                                       guidance=attached.guidance, soft_prompt=attached.soft_prompt,
                                       pad_to=width).answers
                    generations += 1
                    for (number, index, _), answer in zip(chunk, answers):
                        results[number][index] = answer
        widths = ", ".join(map(str, sorted(rows)))
        return results, f"{generations} generation{'' if generations == 1 else 's'} (widths {widths or 'none'})"

    def _check_context(self, lengths: list[int]) -> None:
        """Refuse a prompt that, with the answer's tokens, would not fit in the student's context."""
        if not self.context_length:
            return
        answer = self.generation.max_new_tokens
        room = self.context_length - answer
        for number, length in enumerate(lengths, start=1):
            if length > room:
                raise RequestError(f"Question {number} is {length} tokens in its prompt; this model reads at most "
                                   f"{room} ({self.context_length} positions less {answer} for the answer).")


def _requirements() -> list[str]:
    import safetensors
    import transformers

    pinned = {"mlflow": mlflow.__version__, "torch": torch.__version__.split("+")[0],
              "transformers": transformers.__version__, "safetensors": safetensors.__version__,
              "pandas": pd.__version__}
    return [f"{name}=={version}" for name, version in pinned.items()]


def log_pilot_model(student: CausalLM, hypernet: HyperNetwork | None, *, generation: GenerationParams,
                    name: str = "pilot", registered_model_name: str | None = None, alias: str | None = CHAMPION,
                    limits: RequestLimits = RequestLimits(), batching: Batching = Batching()) -> dict[str, str]:
    """Log the guided student (``hypernet`` None: the student alone) as a pyfunc model in the active run,
    with its decoding settings ``generation`` (the run's), the request ``limits`` it will enforce and its
    ``batching``; registered under ``registered_model_name`` if given, that version then under ``alias``.

    Returns ``{"run_id", "model_id", "model_uri", "registered_model_name", "registered_model_version",
    "alias"}`` (the last three empty without registration); nothing is logged without an active run.
    """
    run = mlflow.active_run()
    if run is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="pilot-model-") as folder:
        folder = Path(folder)
        student.save(folder / "student")
        artifacts = {"student": str(folder / "student"), "settings": str(folder / "settings.json")}
        if hypernet is not None:
            hypernet.save(folder / "hypernet")
            artifacts["hypernet"] = str(folder / "hypernet")
        # The package travels with the model (without caches), so any Python with its dependencies can load it.
        shutil.copytree(Path(__file__).parent, folder / "pilot", ignore=shutil.ignore_patterns("__pycache__"))
        settings = {**generation.model_dump(), "max_questions": limits.max_questions,
                    "max_question_chars": limits.max_question_chars, **batching.__dict__}
        (folder / "settings.json").write_text(json.dumps(settings, indent=2))
        info = mlflow.pyfunc.log_model(
            # Models from code: MLflow runs pyfunc_entry.py at load time instead of unpickling an object.
            name=name, python_model=str(Path(__file__).with_name("pyfunc_entry.py")), signature=SIGNATURE,
            pip_requirements=_requirements(), artifacts=artifacts, code_paths=[str(folder / "pilot")],
            registered_model_name=registered_model_name,
        )
    version = getattr(info, "registered_model_version", None)
    if registered_model_name and version is not None and alias:
        MlflowClient().set_registered_model_alias(registered_model_name, alias, str(version))
    registered = bool(registered_model_name and version is not None)
    return {"run_id": run.info.run_id, "model_id": info.model_id or "", "model_uri": f"runs:/{run.info.run_id}/{name}",
            "registered_model_name": registered_model_name or "",
            "registered_model_version": str(version) if registered else "",
            "alias": alias if registered and alias else ""}
