"""A trained baseline of your own is three things: its module, its parameter block, one registration.

Here the module is this file (a bias vector added to one decoder layer's hidden states, trained by
the shared engine), the block is passed as runtime parameters, and ``registered`` stands in for the
line in ``COMPARED``. The real ``baselines`` and ``evaluation`` pipelines then train, save, load,
answer with, time and report it through a KedroSession, with no catalog entry, node or config class
written for it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch import nn

from pilot.config import AdapterTrainingParams, GuidanceParams, ParameterError, Params
from pilot.interventions import Intervention, layer_hidden, with_hidden
from pilot.methods import Attached
from pilot.methods.registry import method_names, registered
from pilot.methods.trained import StudentShapes, Trained, TrainedBaseline, TrainedModule
from pilot.models import CausalLM, decoder_layers, freeze
from pilot.training.base_lm import answer_examples, answer_loss_terms
from pilot.training.engine import Objective, train
from pilot.training.protocol import TrainingProtocol
from tests.conftest import make_project, run


# ------------------------------------------------------------------ the method's own module
class LayerBias(TrainedModule):
    """One learned vector added to the hidden states after decoder layer ``layer``."""

    kind = "layer_bias"

    def __init__(self, hidden_size: int, layer: int) -> None:
        super().__init__()
        self.hidden_size, self.layer = int(hidden_size), int(layer)
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "layer": self.layer}

    @classmethod
    def from_config(cls, config: dict) -> LayerBias:
        return cls(config["hidden_size"], config["layer"])

    @contextmanager
    def attached(self, student: CausalLM) -> Iterator[LayerBias]:
        block = decoder_layers(student.model)[self.layer]
        with Intervention(student.model, self.kind, [self.layer]) as site:
            site.hook(block.register_forward_hook(
                lambda module, args, output: with_hidden(output, layer_hidden(output) + self.bias)))
            yield self


class LayerBiasParams(Params):
    layer: int = 0
    training: AdapterTrainingParams = AdapterTrainingParams(learning_rate=1e-2)


@dataclass
class LayerBiasMethod(TrainedBaseline):
    """A bias vector at one layer, trained on the shared protocol."""

    name: ClassVar[str] = "layer_bias"
    params: ClassVar[type[LayerBiasParams]] = LayerBiasParams
    artefact: ClassVar[str] = "layer_bias_artefact"
    inputs: ClassVar[tuple[str, ...]] = ("params:baselines", "params:stage1", "layer_bias_artefact")
    layer_bias_artefact: LayerBias

    @classmethod
    def check_against(cls, params: LayerBiasParams, shapes: StudentShapes) -> None:
        if not 0 <= params.layer < shapes.num_layers:
            raise ParameterError(f"Parameter 'baselines.layer_bias.layer' = {params.layer} is not a layer of the "
                                 f"student: give 0 to {shapes.num_layers - 1}.")

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: LayerBiasParams,
              protocol: TrainingProtocol) -> Trained:
        tasks_train, _, stage1, _, seed = protocol.unpacked()
        config = params.training.for_run(stage1.training, seed).model_copy(update={"eval_every": 0})
        freeze(student.model)
        bias = LayerBias(student.hidden_size, params.layer).to(student.device)
        terms = answer_loss_terms(student, answer_examples(student.tokenizer, tasks_train), config)
        with bias.attached(student):
            result = train(bias, Objective(terms, weights={"lm": 1.0}), config, name="train layer_bias")
        return result.model, result.history, {"parameters": bias.num_parameters}

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        with self.layer_bias_artefact.to(student.device).attached(student), torch.no_grad():
            yield Attached(student)

    @property
    def trainable_parameters(self) -> int:
        return self.layer_bias_artefact.num_parameters


# ------------------------------------------------------------------ the test
STEPS = 12
BLOCK = {"layer_bias": {"layer": 1, "training": {"steps": STEPS, "learning_rate": 0.05}}}


@pytest.fixture()
def project(finished_run, tmp_path):
    """A copy of the finished run's data (its own, fresh MLflow store)."""
    project = make_project(tmp_path)
    shutil.copytree(finished_run / "data", project / "data")
    return project


def test_a_trained_baseline_of_your_own_is_trained_evaluated_and_reported(project, monkeypatch):
    before = pd.read_parquet(project / "data/07_model_output/predictions.parquet")
    try:
        with registered(LayerBiasMethod):
            with pytest.raises(ParameterError, match=r"'baselines.layer_bais' is not a known setting"):
                run(project, monkeypatch, "baselines", params={"baselines": {"layer_bais": BLOCK["layer_bias"]}})
            # its own check runs before the run computes anything
            with pytest.raises(ParameterError, match=r"'baselines.layer_bias.layer' = 7 is not a layer of the student"):
                run(project, monkeypatch, "baselines", params={"baselines": {"layer_bias": {"layer": 7}}})
            assert not (project / "data/07_model_output/layer_bias_history.parquet").exists()
            run(project, monkeypatch, "baselines", params={"baselines": BLOCK})
            run(project, monkeypatch, "evaluation", params={"baselines": BLOCK})
    finally:
        mlflow.set_tracking_uri(None)
    assert "layer_bias" not in method_names()
    data = project / "data"
    hidden = json.loads((data / "06_models/student/config.json").read_text())["hidden_size"]

    # trained as configured, saved in the catalog pattern's folder, in a safe format
    history = pd.read_parquet(data / "07_model_output/layer_bias_history.parquet")
    assert len(history) == STEPS and history["lm"].notna().all()
    saved = data / "06_models/layer_bias"
    assert json.loads((saved / "config.json").read_text()) == {"kind": "layer_bias", "hidden_size": hidden,
                                                                     "layer": 1}
    assert (saved / "checksums.json").is_file() and not list(saved.glob("*.pkl"))
    bias = load_file(saved / "model.safetensors")["bias"]
    assert bias.shape == (hidden,) and bias.abs().sum() > 0   # trained away from its zero start

    # answered every test question, reported beside the others, which answer as before
    predictions = pd.read_parquet(data / "07_model_output/predictions.parquet")
    new = predictions[predictions["method"] == "layer_bias"]
    assert sorted(new["id"]) == sorted(before.loc[before["method"] == "zero_shot", "id"])
    columns = ["method", "id", "split", "prediction", "correct"]
    pd.testing.assert_frame_equal(predictions.loc[predictions["method"] != "layer_bias", columns].reset_index(drop=True),
                                  before[columns].reset_index(drop=True))
    results = pd.read_parquet(data / "08_reporting/results.parquet").set_index(["split", "method", "task"])
    assert results.loc[("test", "layer_bias", "overall"), "accuracy"] == \
        new.loc[new["split"] == "test", "correct"].mean()
    settings = json.loads((data / "08_reporting/method_settings.json").read_text())["layer_bias"]
    assert (settings["trainable_parameters"], settings["training_steps"]) == (str(hidden), str(STEPS))

    # its metrics and parameters in MLflow under the baselines' keys
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pilot").experiment_id])
    trained = [r for r in runs if "baselines.layer_bias.parameters" in r.data.metrics]
    assert len(trained) == 1 and trained[0].data.metrics["baselines.layer_bias.parameters"] == hidden
    assert trained[0].data.params["baselines.layer_bias.layer"] == "1"


def test_its_block_is_validated_by_its_own_class_and_a_block_of_no_method_is_refused():
    from pilot.config import BaselinesParams, validate
    from pilot.framework.parameters import validate_parameters
    from pilot.methods.lora import Lora

    with registered(LayerBiasMethod):
        typed = validate_parameters({"baselines": BLOCK})["baselines"]
        assert LayerBiasMethod.own_params(typed) == LayerBiasParams(layer=1, training={"steps": STEPS,
                                                                                       "learning_rate": 0.05})
        assert LayerBiasMethod.own_params(BaselinesParams()) == LayerBiasParams()   # no block: its defaults
        with pytest.raises(ParameterError, match=r"^Parameter 'baselines.layer_bias.layer' = 'top' is invalid"):
            validate_parameters({"baselines": {"layer_bias": {"layer": "top"}}})
    with pytest.raises(ParameterError, match=r"^Parameter 'baselines.layer_bias' is not a known setting"):
        validate_parameters({"baselines": BLOCK})   # not registered: a block of no method
    # an in-tree method's block is read the same way, by its own class
    assert Lora.own_params(validate(BaselinesParams, {"lora": {"use_tuned": True}}, "baselines")).use_tuned
