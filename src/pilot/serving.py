"""A trained PILOT as an MLflow pyfunc model: load it anywhere, ask questions, get guided answers.

The model's artifacts are the frozen student (its ``save_pretrained`` folder), the stage-2
hyper-network folder (weights, config and checksums) and the decoding settings; the ``pilot``
package travels with it as code, and the model itself is code too (``pilot/pyfunc_entry.py``,
MLflow's "models from code"), so nothing is pickled. Answers come from the same generation path as the
evaluation (:func:`pilot.generation.generate`), so for the same questions they are the
evaluation's ``pilot_stage2`` predictions::

    model = mlflow.pyfunc.load_model("runs:/<run_id>/pilot")      # or "models:/pilot/<version>"
    model.predict(["What is 3 + 4 - 2?"])                          # -> ["5"]

    mlflow models serve -m runs:/<run_id>/pilot --env-manager local -h 127.0.0.1 -p 5001
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from pilot.generation import generate
from pilot.guidance import GuidedStudent, HyperNetwork
from pilot.models import CausalLM, load_causal_lm
from pilot.prompts import prompt_format

SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))


def questions_of(model_input: Any) -> list[str]:
    """The questions in what a caller sent: a list or array of strings, a Series, a dict or a
    DataFrame with a ``question`` column (a one-column frame is read whatever its name)."""
    if isinstance(model_input, pd.DataFrame):
        if "question" in model_input.columns:
            column = model_input["question"]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"Send a 'question' column; got columns {list(model_input.columns)}.")
        return [str(q) for q in column]
    if isinstance(model_input, dict):
        return questions_of(pd.DataFrame(model_input))
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, (pd.Series, np.ndarray, Sequence)):
        return [str(q) for q in np.asarray(model_input, dtype=object).reshape(-1)]
    raise TypeError(f"Cannot read questions from a {type(model_input).__name__}; send a list of strings "
                    "or a DataFrame with a 'question' column.")


class PilotModel(mlflow.pyfunc.PythonModel):
    """The frozen student guided by the trained hyper-network (stage 2)."""

    def load_context(self, context) -> None:
        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.student = load_causal_lm(context.artifacts["student"], device=device)
        hypernet = HyperNetwork.load(context.artifacts["hypernet"], self.student.hidden_size,
                                     self.student.num_layers, rebuild="kedro run --pipelines stage2 evaluation")
        self.guided = GuidedStudent(self.student, hypernet.eval().to(self.student.device))
        self.max_new_tokens = int(settings["max_new_tokens"])
        self.batch_size = int(settings["batch_size"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        questions = questions_of(model_input)
        if not questions:
            return []
        fmt = prompt_format(self.student.tokenizer)
        result = generate(self.student, [fmt.answer_prompt(q) for q in questions], max_new_tokens=self.max_new_tokens,
                          batch_size=self.batch_size, guidance=self.guided.guidance())
        return result.answers


def _requirements() -> list[str]:
    import safetensors
    import transformers

    pinned = {"mlflow": mlflow.__version__, "torch": torch.__version__.split("+")[0],
              "transformers": transformers.__version__, "safetensors": safetensors.__version__,
              "pandas": pd.__version__}
    return [f"{name}=={version}" for name, version in pinned.items()]


def log_pilot_model(student: CausalLM, hypernet: HyperNetwork, *, max_new_tokens: int, batch_size: int,
                    name: str = "pilot", registered_model_name: str | None = None) -> dict[str, str]:
    """Log the guided student as a pyfunc model in the active run (and register it if named).

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
        (folder / "settings.json").write_text(json.dumps({"max_new_tokens": max_new_tokens,
                                                          "batch_size": batch_size}, indent=2))
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
