"""PILOT's trained static controls: the hyper-network with the query taken out (reader ``none``), the
plain-bias injection, and the two compared methods built on them (static guidance, bias steering)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from pilot.config import GenerationParams, GuidanceParams, ParameterError, Stage1Config, Stage1Params, Stage2Config, \
    Stage2Params
from pilot.guidance import GuidanceInjector, GuidedStudent, HyperNetConfig, HyperNetwork
from pilot.interventions import capture_layers
from pilot.latents import CachedLatents, LatentCache, select_examples
from pilot.methods.static_guidance import BiasSteering, BiasSteeringParams, StaticGuidance, StaticGuidanceParams, \
    bias_vectors
from pilot.models import count_parameters
from pilot.training.engine import train
from pilot.training.protocol import TrainingProtocol
from pilot.training.stage1 import stage1_objective
from pilot.training.stage2 import GroupPolicy, Rollouts
from tests.conftest import stage1_inputs

GEN = GenerationParams(max_new_tokens=4, batch_size=16)


def answer_logits(lm, hypernet: HyperNetwork | None, rows: pd.DataFrame) -> torch.Tensor:
    """The student's logits at the gold answers' positions, guided by ``hypernet`` (None: plain)."""
    questions, answers = rows["question"].tolist(), rows["answer"].astype(str).tolist()
    net = hypernet or HyperNetwork(HyperNetConfig(lm.hidden_size, lm.num_layers, reader="none"))
    with GuidedStudent(lm, net) as guided, torch.no_grad():
        vectors = guided.guidance_vectors(questions) if hypernet is not None else None
        _, logits, _ = guided.teacher_forced(questions, answers, vectors, [])
    return logits


@pytest.mark.parametrize("modulation, prior, extra, outputs", [
    ("film", False, [], 2 * 32), ("film", True, [], 3 * 2 * 32), ("add", False, [1], 2 * 32)])
def test_the_none_reader_reads_nothing_and_starts_as_the_plain_student(tiny_lm, task_table, modulation, prior, extra,
                                                                       outputs):
    config = HyperNetConfig(32, 2, reader="none", modulation=modulation, prior=prior, extra_inject_layers=extra)
    net = HyperNetwork(config)
    # its parameters: the output layer's size (and the prior), plus log_std; no norm, attention or MLP
    assert count_parameters(net) == outputs + 1
    assert {name for name, _ in net.named_parameters()} <= {"output", "prior", "log_std"}
    first, second = torch.randn(3, 5, 32), torch.randn(3, 7, 32) * 10
    assert net(first, torch.ones(3, 5)).abs().sum() == 0 and net(first, torch.ones(3, 5)).shape == (3, config.guidance_size)
    rows = task_table.head(3)
    assert torch.equal(answer_logits(tiny_lm, net, rows), answer_logits(tiny_lm, None, rows))  # exactly the student
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_()
    out = net(first, torch.ones(3, 5))
    assert torch.equal(out, net(second, torch.ones(3, 7))) and torch.equal(out[0], out[2])   # the query is ignored
    assert out.abs().sum() > 0


def test_plain_scaling_adds_the_vector_itself_and_rms_scaling_is_unchanged(tiny_lm, task_table):
    batch = tiny_lm.tokenizer(task_table["question"].head(2).tolist(), return_tensors="pt", padding=True)
    vector = torch.randn(1, 32)

    def layer0(scaling: str | None) -> torch.Tensor:   # the injector's hook first, then the capture's
        with GuidanceInjector(tiny_lm.model, 0, 0.5, scaling=scaling or "rms") as injector, \
                injector.guide(None if scaling is None else vector.expand(2, -1)), \
                capture_layers(tiny_lm.model, [0]) as captured, torch.no_grad():
            tiny_lm.model(**batch)
        return captured[0]

    plain = layer0(None)
    torch.testing.assert_close(layer0("none") - plain, (0.5 * vector).expand_as(plain))
    rms = plain.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(layer0("rms") - plain, 0.5 * rms * vector)


def test_bias_steering_puts_one_vector_at_every_layer_and_checks_its_layers():
    net = bias_vectors(BiasSteeringParams(), GuidanceParams(), 32, 3)
    config = net.config
    assert (config.inject_layers, config.modulation, config.scaling, config.reader) == ([0, 1, 2], "add", "none", "none")
    assert config.guidance_size == 3 * 32 and count_parameters(net) == 3 * 32 + 1
    assert bias_vectors(BiasSteeringParams(layers=[2, 0]), GuidanceParams(), 32, 3).config.inject_layers == [2, 0]
    with pytest.raises(ParameterError, match=r"'baselines.bias_steering.layers' = \[0, 3\] names a layer outside"):
        BiasSteeringParams(layers=[0, 3]).check_against(3)
    with pytest.raises(ParameterError, match="names a layer twice"):
        BiasSteeringParams(layers=[1, 1]).check_against(3)


def test_the_policy_gradient_reaches_every_layers_bias_and_a_step_moves_the_logits(tiny_lm, task_table):
    train_rows = task_table[task_table["split"] == "train"].reset_index(drop=True)
    net = bias_vectors(BiasSteeringParams(), GuidanceParams(), tiny_lm.hidden_size, tiny_lm.num_layers)
    reference = copy.deepcopy(net).eval().requires_grad_(False)
    config = Stage2Config(batch_size=2, group_size=2, dynamic_sampling=False)
    with GuidedStudent(tiny_lm, net) as guided:
        policy = GroupPolicy(guided, reference, train_rows, config, GEN)
        rollouts = Rollouts([0, 1], ["12", "7", "3", "40"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        terms = policy.token_terms(rollouts, first_update=True)
        terms["policy"].backward()
    per_layer = net.output.grad.view(tiny_lm.num_layers, tiny_lm.hidden_size)
    assert (per_layer.abs().sum(-1) > 0).all()
    assert all(p.grad is None for p in tiny_lm.model.parameters())   # the student stays frozen
    with torch.no_grad():
        net.output -= 0.5 * net.output.grad.sign()
    rows = train_rows.head(4)
    assert not torch.allclose(answer_logits(tiny_lm, net, rows), answer_logits(tiny_lm, None, rows))


def test_stage1_trains_the_static_vector_and_moves_the_logits(tiny_lm, task_table, tmp_path):
    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    net = HyperNetwork(HyperNetConfig.from_site(site.model_copy(update={"reader": "none"}), tiny_lm.hidden_size,
                                                tiny_lm.num_layers))
    config = Stage1Config(steps=3, batch_size=8, rl_weight=0.0, learning_rate=1e-2, warmup_steps=0)
    with GuidedStudent(tiny_lm, net) as guided:
        objective = stage1_objective(guided, CachedLatents(LatentCache(tmp_path / "cache").load()),
                                     select_examples(plans, task_table), site.resolved_align_layers(2), config, GEN)
        result = train(net, objective, config, name="static stage1")   # no validation: the last step's weights
    history = pd.DataFrame(result.history)
    assert {"alignment", "contrastive", "lm"} <= set(history.columns)
    assert result.model.output.abs().sum() > 0
    rows = task_table.head(4)
    assert not torch.allclose(answer_logits(tiny_lm, result.model, rows), answer_logits(tiny_lm, None, rows))


def test_both_controls_train_through_their_hooks_and_round_trip(tiny_lm, task_table, tmp_path):
    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    train_rows, val = task_table[task_table["split"] == "train"], task_table[task_table["split"] == "val"].head(4)
    stage1 = Stage1Params(training=Stage1Config(steps=2, batch_size=8, rl_weight=0.0, eval_every=2, warmup_steps=0))
    stage2 = Stage2Params(training=Stage2Config(steps=2, batch_size=2, group_size=2, eval_every=2, warmup_steps=0,
                                                dynamic_sampling=False))
    protocol = TrainingProtocol(train_rows, val, stage1, GEN, 0)

    static, history, metrics = StaticGuidance.train(tiny_lm, site, StaticGuidanceParams(checkpoint_dir=None),
                                                    protocol, LatentCache(tmp_path / "cache"), plans, latents, stage2)
    assert static.config.reader == "none" and static.config.inject_layer == site.inject_layer
    assert count_parameters(static) == static.config.guidance_size + 1
    columns = set(pd.DataFrame(history).columns)
    assert {"step", "stage1/alignment", "stage1/val_accuracy", "stage2/policy", "stage2/val_accuracy"} <= columns
    assert [row["step"] for row in history] == [0, 1, 2]
    assert {"best_step", "best_val_accuracy", "stage1_best_step", "stage1_best_val_accuracy", "parameters"} <= set(metrics)

    bias, history, metrics = BiasSteering.train(tiny_lm, site, BiasSteeringParams(checkpoint_dir=None), protocol,
                                                stage2)
    assert bias.config.inject_layers == [0, 1] and bias.config.scaling == "none"
    assert "policy" in pd.DataFrame(history).columns and metrics["parameters"] == 2 * tiny_lm.hidden_size + 1

    for method, artefact in ((StaticGuidance, static), (BiasSteering, bias)):
        with torch.no_grad():
            artefact.output.normal_()   # away from zero, so the round trip is checked on values that matter
        method.save_artefact(artefact, tmp_path / method.name)
        loaded = method.load_artefact(tmp_path / method.name, "rebuild")
        assert loaded.config == artefact.config
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in artefact.state_dict().items())
        built = method(None, stage1, loaded, stage2)
        with built.attach(tiny_lm) as attached:
            assert attached.guidance is not None and attached.guidance.injector.scaling == artefact.config.scaling
        assert built.trainable_parameters == count_parameters(artefact)
        assert not any(layer._forward_hooks for layer in tiny_lm.model.model.layers)   # detached after the block
