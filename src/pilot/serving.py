"""A trained PILOT as an MLflow pyfunc model: load it anywhere, ask questions, get guided answers.

The model's artifacts are the frozen student (its ``save_pretrained`` folder), the stage-2
hyper-network folder (weights, config and checksums) and the decoding settings; the ``pilot``
package travels with it as code, and the model itself is code too (``pilot/pyfunc_entry.py``,
MLflow's "models from code"), so nothing is pickled. Answers come from the same generation path as the
evaluation (:func:`pilot.generation.generate`), so for the same questions they are the
evaluation's ``pilot_stage2`` predictions::

    model = mlflow.pyfunc.load_model("runs:/<run_id>/pilot")      # or "models:/pilot/<version>"
    model.predict(pd.DataFrame({"question": ["What is 3 + 4 - 2?"]}))   # -> ["5"]

    mlflow models serve -m runs:/<run_id>/pilot --env-manager local -h 127.0.0.1 -p 5001

A request is a frame with a ``question`` column, found by name (the signature names it; over
HTTP, ``{"inputs": [...]}`` is read as that column; in-process, MLflow reads a plain list as an
unnamed column and refuses it). Before any generation each request is checked against
:class:`RequestLimits` (questions per request, characters per question); what breaks a limit, or
is not a string, is refused with one sentence (HTTP 400), never a stack trace. Requests are
answered one at a time per loaded model: see :class:`PilotModel` and docs/serving.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from pilot.config import GenerationParams
from pilot.generation import generate
from pilot.guidance import HyperNetwork
from pilot.methods.pilot import Pilot
from pilot.models import CausalLM, load_causal_lm
from pilot.prompts import prompt_format

logger = logging.getLogger(__name__)

QUESTION = "question"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", QUESTION)]), outputs=Schema([ColSpec("string")]))


class RequestError(MlflowException):
    """A request the model refuses: the scoring server answers it with a 400 (a 500 for
    ``INTERNAL_ERROR``) whose body is this one sentence, without a stack trace."""

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


# The environment variables that override a served model's limits.
LIMIT_VARIABLES = {"max_questions": "PILOT_SERVE_MAX_QUESTIONS", "max_question_chars": "PILOT_SERVE_MAX_QUESTION_CHARS"}


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
        values = {}
        for field, variable in LIMIT_VARIABLES.items():
            raw = environ.get(variable) or settings.get(field)
            if raw is None:
                continue
            try:
                values[field] = int(raw)
            except (TypeError, ValueError):
                raise ValueError(f"{variable} (or settings.json's {field}) must be a whole number, got {raw!r}.") from None
            if values[field] < 1:
                raise ValueError(f"{variable} (or settings.json's {field}) must be at least 1, got {raw!r}.")
        return cls(**values)


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
            raise RequestError(f"Send the questions in a '{QUESTION}' column; got columns {columns}.")
        column = model_input[QUESTION]
        items = [column] if isinstance(column, str) else list(np.asarray(column, dtype=object).reshape(-1))
    elif isinstance(model_input, (pd.Series, np.ndarray, Sequence)):
        items = list(np.asarray(model_input, dtype=object).reshape(-1))
    else:
        raise RequestError(f"Cannot read questions from a {type(model_input).__name__}; send a list of strings or "
                           f"a DataFrame with a '{QUESTION}' column.")
    return [_as_question(number, item) for number, item in enumerate(items, start=1)]


def generation_of(settings: Mapping[str, Any]) -> GenerationParams:
    """The decoding settings a logged model was saved with (``settings.json``: ``max_new_tokens``,
    ``batch_size`` and, from models logged since it was stored, ``stop``; none before: no stop strings)."""
    return GenerationParams.model_validate({key: settings[key] for key in GenerationParams.model_fields
                                            if key in settings})


class PilotModel(mlflow.pyfunc.PythonModel):
    """The frozen student guided by the trained hyper-network (stage 2).

    MLflow's scoring server answers each request in a thread of its own, but generation uses
    state shared by every request: the method's hooks on the student (attached around each request),
    the layer-capture hooks on the one student, its tokenizer. So one lock is held per request
    around generation; requests are checked before they wait for it. Serve with several workers
    (``mlflow models serve --workers N``, one model per process) to answer requests in parallel.
    """

    def load_context(self, context) -> None:
        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        student = load_causal_lm(context.artifacts["student"], device=device)
        hypernet = HyperNetwork.load(context.artifacts["hypernet"], student.hidden_size,
                                     student.num_layers, rebuild="kedro run --pipelines stage2 evaluation")
        self.attach(student, hypernet, generation=generation_of(settings),
                    limits=RequestLimits.from_settings(settings))

    def attach(self, student: CausalLM, hypernet: HyperNetwork, *, generation: GenerationParams,
               limits: RequestLimits = RequestLimits()) -> PilotModel:
        """Answer with ``student`` guided by ``hypernet``, decoding with ``generation`` (what
        :meth:`load_context` does with the logged artifacts); returns the model."""
        self.student = student
        self.method = Pilot(hypernet)   # the served method, attached around each request's generation
        self.method.prepare(student)
        self.generation = generation
        self.limits = limits
        self.context_length = getattr(student.model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()
        return self

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        questions = questions_of(model_input)
        self.limits.check(questions)
        if not questions:
            return []
        with self._lock:  # one request at a time on the shared student (see the class docstring)
            fmt = prompt_format(self.student.tokenizer)
            prompts = [fmt.answer_prompt(q) for q in questions]
            self._check_context(prompts)
            try:
                with self.method.attach(self.student) as attached:
                    result = generate(attached.student, prompts, generation=self.generation,
                                      guidance=attached.guidance, soft_prompt=attached.soft_prompt)
            except Exception as error:  # the trace goes to the server's log, not to the client
                logger.exception("PILOT failed on a request of %d questions", len(questions))
                raise RequestError(f"The model failed on this request ({type(error).__name__}); the server's log "
                                   "has the details.", error_code=INTERNAL_ERROR) from error
        return result.answers

    def _check_context(self, prompts: list[str]) -> None:
        """Refuse a prompt that, with the answer's tokens, would not fit in the student's context."""
        if not self.context_length:
            return
        answer = self.generation.max_new_tokens
        room = self.context_length - answer
        for number, ids in enumerate(self.student.tokenizer(prompts)["input_ids"], start=1):
            if len(ids) > room:
                raise RequestError(f"Question {number} is {len(ids)} tokens in its prompt; this model reads at most "
                                   f"{room} ({self.context_length} positions less {answer} for the answer).")


def _requirements() -> list[str]:
    import safetensors
    import transformers

    pinned = {"mlflow": mlflow.__version__, "torch": torch.__version__.split("+")[0],
              "transformers": transformers.__version__, "safetensors": safetensors.__version__,
              "pandas": pd.__version__}
    return [f"{name}=={version}" for name, version in pinned.items()]


def log_pilot_model(student: CausalLM, hypernet: HyperNetwork, *, generation: GenerationParams,
                    name: str = "pilot", registered_model_name: str | None = None,
                    limits: RequestLimits = RequestLimits()) -> dict[str, str]:
    """Log the guided student as a pyfunc model in the active run (and register it if named),
    with its decoding settings ``generation`` (the run's) and the request ``limits`` it will enforce.

    Returns ``{"run_id", "model_uri", "registered_model_name", "registered_model_version"}``
    (the last two empty without registration); nothing is logged without an active run.
    """
    run = mlflow.active_run()
    if run is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="pilot-model-") as folder:
        folder = Path(folder)
        student.save(folder / "student")
        hypernet.save(folder / "hypernet")
        # The package travels with the model (without caches), so any Python with its dependencies can load it.
        shutil.copytree(Path(__file__).parent, folder / "pilot", ignore=shutil.ignore_patterns("__pycache__"))
        (folder / "settings.json").write_text(json.dumps({**generation.model_dump(),
                                                          "max_questions": limits.max_questions,
                                                          "max_question_chars": limits.max_question_chars}, indent=2))
        info = mlflow.pyfunc.log_model(
            # Models from code: MLflow runs pyfunc_entry.py at load time instead of unpickling an object.
            name=name, python_model=str(Path(__file__).with_name("pyfunc_entry.py")), signature=SIGNATURE,
            pip_requirements=_requirements(),
            artifacts={"student": str(folder / "student"), "hypernet": str(folder / "hypernet"),
                       "settings": str(folder / "settings.json")},
            code_paths=[str(folder / "pilot")], registered_model_name=registered_model_name,
        )
    version = getattr(info, "registered_model_version", None)
    return {"run_id": run.info.run_id, "model_uri": f"runs:/{run.info.run_id}/{name}",
            "registered_model_name": registered_model_name or "",
            "registered_model_version": "" if version is None else str(version)}
