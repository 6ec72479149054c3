"""Model artefacts: written atomically with checksums, verified on load, a mismatch names the fix."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pilot.artifacts import ArtifactChecksumError, atomic_folder
from pilot.framework.datasets import (
    CausalLMDataset,
    HyperNetworkDataset,
    TrainedBaselineDataset,
)
from pilot.guidance import HyperNetConfig, HyperNetwork
from pilot.methods.caa import CaaSteering
from pilot.methods.lora import LoraAdapter
from pilot.methods.soft_prompts import make_soft_prompt


def _flip_bytes(path, count: int) -> None:
    """XOR ``count`` bytes spread over the file's data section (past the safetensors header)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else 0
    positions = torch.linspace(start, len(data) - 1, min(count, len(data) - start)).long().tolist()
    for position in positions:
        data[position] ^= 0x5A
    path.write_bytes(bytes(data))


def _hypernet(seed: int = 0) -> HyperNetwork:
    torch.manual_seed(seed)
    net = HyperNetwork(HyperNetConfig(hidden_size=32, num_layers=2, mlp_hidden=16, attention_heads=2))
    torch.nn.init.normal_(net.mlp[-1].weight)
    return net


def test_a_flipped_byte_hypernetwork_stops_with_its_path_and_the_rebuilding_command(tmp_path):
    dataset = HyperNetworkDataset(str(tmp_path / "hypernet_stage1"), producer="stage1")
    dataset.save(_hypernet())
    assert dataset.load().fingerprint() == _hypernet().fingerprint()
    weights = tmp_path / "hypernet_stage1" / "hypernet.safetensors"
    _flip_bytes(weights, 4000)  # the fault that once gave a weight of 2.4e24 and exit code 0
    with pytest.raises(Exception) as error:
        dataset.load()
    assert isinstance(error.value.__cause__ or error.value, ArtifactChecksumError)
    message = str(error.value)
    assert str(weights) in message and "kedro run --pipelines stage1" in message


def test_lora_adapter_and_caa_steering_are_verified_too(tmp_path, tiny_lm, task_table):
    steering = TrainedBaselineDataset("caa", str(tmp_path / "caa"), producer="baselines")
    steering.save(CaaSteering.of({"vector": torch.randn(32), "reference_rms": torch.tensor(1.5)}, scale=0.25))
    loaded = steering.load()
    assert loaded.vector.shape == (32,) and loaded.scale == 0.25 and float(loaded.reference_rms) == 1.5
    _flip_bytes(tmp_path / "caa" / "model.safetensors", 3)
    with pytest.raises(Exception, match=r"model.safetensors' does not match its checksum.*"
                                        r"kedro run --pipelines baselines"):
        steering.load()

    adapter = LoraAdapter(config={"r": 2}, state={"base_model.x.lora_A.weight": torch.randn(2, 4)})
    folder = TrainedBaselineDataset("lora", str(tmp_path / "lora_adapter"), producer="baselines")
    folder.save(adapter)
    torch.testing.assert_close(folder.load().state["base_model.x.lora_A.weight"],
                               adapter.state["base_model.x.lora_A.weight"])
    config = tmp_path / "lora_adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 2', '"r": 3'))  # an edit is a mismatch as well
    with pytest.raises(Exception, match=r"adapter_config.json' does not match its checksum"):
        folder.load()


def test_a_trained_baseline_module_is_verified_too(tmp_path, tiny_lm):
    folder = TrainedBaselineDataset("pause_tokens", str(tmp_path / "pause_tokens"), producer="baselines")
    pause = make_soft_prompt("pause_tokens", tiny_lm, 3, budget=1000, seed=0)
    folder.save(pause)
    assert torch.equal(folder.load().tokens, pause.tokens)
    _flip_bytes(tmp_path / "pause_tokens" / "model.safetensors", 100)
    with pytest.raises(Exception, match=r"model.safetensors' does not match its checksum.*kedro run --pipelines baselines"):
        folder.load()
    with pytest.raises(Exception, match=r"trained baseline 'not_a_method', which is not registered"):
        TrainedBaselineDataset("not_a_method", str(tmp_path / "pause_tokens")).load()


def test_the_embedded_model_is_verified_and_a_pretrained_one_is_read_as_it_is(tmp_path, tiny_lm):
    embedded = CausalLMDataset(str(tmp_path / "student"))
    embedded.save(tiny_lm)
    assert json.loads((tmp_path / "student" / "checksums.json").read_text()).keys() >= {"model.safetensors",
                                                                                          "config.json"}
    embedded.load()
    tiny_lm.model.save_pretrained(tmp_path / "pretrained")  # a model from elsewhere: no checksums
    tiny_lm.tokenizer.save_pretrained(tmp_path / "pretrained")
    CausalLMDataset(str(tmp_path / "pretrained"), pretrained=True).load()
    _flip_bytes(tmp_path / "student" / "model.safetensors", 100)
    with pytest.raises(Exception, match=r"model.safetensors' does not match its checksum.*kedro run --pipelines base"):
        embedded.load()


def test_a_write_that_fails_midway_leaves_the_previous_version_whole(tmp_path):
    dataset = HyperNetworkDataset(str(tmp_path / "h"), producer="stage1")
    dataset.save(_hypernet(0))
    before = {p.name: p.read_bytes() for p in (tmp_path / "h").iterdir()}
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(tmp_path / "h") as scratch:
        (scratch / "hypernet.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert {p.name: p.read_bytes() for p in (tmp_path / "h").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["h"]  # no scratch folder left behind
    assert dataset.load().fingerprint() == _hypernet(0).fingerprint()
    dataset.save(_hypernet(1))  # and a complete write replaces it
    assert dataset.load().fingerprint() == _hypernet(1).fingerprint()
