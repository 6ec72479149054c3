"""The shared training engine on tiny hand-made objectives (real torch, no mocks)."""

import copy

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pilot.checkpoint import CheckpointManager
from pilot.config import LoopParams
from pilot.guidance import GuidedStudent, HyperNetConfig, HyperNetwork
from pilot.interventions import interventions
from pilot.models import decoder_layers
from pilot.sequences import next_token_loss
from pilot.training.engine import (
    NonFiniteLossError,
    Objective,
    learning_rate,
    step_generator,
    train,
)


def _model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def _data():
    generator = torch.Generator().manual_seed(123)
    return torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)


def _fit(model, weights=None, noisy=False):
    """``fit``: mean squared error of ``model`` on fixed data (with per-step noise drawn from (seed, step))."""
    x, y = _data()

    def step_terms(step):
        inputs = x + 0.1 * torch.randn(x.shape, generator=step_generator(0, step)) if noisy else x
        yield {"fit": F.mse_loss(model(inputs), y)}

    return Objective(step_terms, weights or {"fit": 1.0})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _capture_grads(model):
    """Gradients flowing into each parameter, one entry per backward pass."""
    seen = {name: [] for name, _ in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.register_hook(lambda grad, name=name: seen[name].append(grad.detach().clone()))
    return seen


# ------------------------------------------------------------------------------ schedule and loop
def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    assert learning_rate(0, 10, 1.0, 4) == pytest.approx(0.25)
    assert learning_rate(3, 10, 1.0, 4) == pytest.approx(1.0)
    assert learning_rate(4, 10, 1.0, 4) == pytest.approx(1.0)       # start of the decay
    assert learning_rate(7, 10, 1.0, 4) == pytest.approx(0.55)      # half way: 0.1 + 0.9 * 0.5
    assert learning_rate(10, 10, 1.0, 4) == pytest.approx(0.1)
    assert learning_rate(0, 4, 2.0, 0) == pytest.approx(2.0)


def test_without_validate_the_last_weights_are_returned_as_a_plain_adamw_loop_gives_them():
    model = _model()
    loop = LoopParams(steps=6, learning_rate=0.05, warmup_steps=2)
    result = train(model, _fit(model), loop, name="fit")
    assert result.model is model and result.best_step == -1 and result.validation == []
    assert [row["step"] for row in result.history] == [1, 2, 3, 4, 5, 6]

    reference = _model()
    x, y = _data()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.0)
    losses = []
    for step in range(6):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, 6, 0.05, 2)
        loss = F.mse_loss(reference(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert _equal(_state(result.model), _state(reference))
    assert [row["fit"] for row in result.history] == losses
    assert [row["total"] for row in result.history] == losses
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("accuracies, best_step", [([0.2, 0.5, 0.3], 2), ([0.9, 0.5, 0.3], 0),
                                                   ([0.1, 0.5, 0.5], 2)])
def test_with_validate_the_best_validation_steps_weights_are_returned(accuracies, best_step):
    model = _model()
    initial = _state(model)
    snapshots, modes = {}, []

    def validate():
        call = len(snapshots)
        snapshots[2 * call] = _state(model)   # validation runs at steps 0, 2, 4
        modes.append(model.training)
        return accuracies[call]

    result = train(model, _fit(model), LoopParams(steps=4, learning_rate=0.05, eval_every=2), name="fit",
                   validate=validate)
    assert sorted(snapshots) == [0, 2, 4] and modes == [False, False, False]
    assert torch.equal(snapshots[0]["weight"], initial["weight"])
    assert result.best_step == best_step
    assert result.best_val_accuracy == max(accuracies)
    assert result.validation == [{"step": s, "val_accuracy": a} for s, a in zip((0, 2, 4), accuracies)]
    assert _equal(_state(result.model), snapshots[best_step])
    assert not _equal(_state(result.model), _state(model)) or best_step == 4
    assert not result.model.training
    history, curve, summary = result.tables()
    assert len(history) == 4 and curve["val_accuracy"].tolist() == accuracies
    merged = result.history_with_validation()   # the baselines' one table: losses and validation by step
    assert [row["step"] for row in merged] == [0, 1, 2, 3, 4]
    assert [row.get("val_accuracy") for row in merged] == [accuracies[0], None, accuracies[1], None, accuracies[2]]
    assert "total" not in merged[0] and all(merged[s]["total"] == history["total"][s - 1] for s in range(1, 5))


def test_validation_also_runs_after_the_last_step_when_it_is_off_the_grid():
    model = _model()
    steps_seen = []
    result = train(model, _fit(model), LoopParams(steps=5, learning_rate=0.05, eval_every=2), name="fit",
                   validate=lambda: 0.0, on_validation=lambda step, value: steps_seen.append(step))
    assert steps_seen == [0, 2, 4, 5] == [row["step"] for row in result.validation]


def _averaged_run(steps: int, decay: float) -> tuple[list[dict], dict]:
    """A plain AdamW loop on ``_fit`` (as the engine steps it) and the moving average of its weights:
    the average after each step (index 0: the start) and the last trained weights."""
    model = _model()
    x, y = _data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    average = _state(model)
    averages = [dict(average)]
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, 0.05, 0)
        F.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        average = {k: decay * v + (1 - decay) * model.state_dict()[k] for k, v in average.items()}
        averages.append(average)
    return averages, _state(model)


def test_with_a_moving_average_the_average_is_validated_selected_and_returned_while_training_steps_as_ever():
    averages, trained = _averaged_run(4, decay=0.75)
    model = _model()
    seen = []

    def validate():
        seen.append(_state(model))
        return [0.1, 0.9, 0.2][len(seen) - 1]   # steps 0, 2, 4: step 2's average is the best

    result = train(model, _fit(model), LoopParams(steps=4, learning_rate=0.05, eval_every=2, ema_decay=0.75),
                   name="fit", validate=validate)
    for got, step in zip(seen, (0, 2, 4)):
        assert all(torch.allclose(got[k], averages[step][k], atol=1e-7) for k in got)
    assert not torch.allclose(seen[1]["weight"], averages[1]["weight"])   # the average, not the weights
    assert result.best_step == 2
    assert all(torch.allclose(result.model.state_dict()[k], averages[2][k], atol=1e-7) for k in trained)
    assert all(torch.allclose(model.state_dict()[k], trained[k], atol=1e-7) for k in trained)   # swapped back

    plain = _model()
    last = train(plain, _fit(plain), LoopParams(steps=4, learning_rate=0.05, ema_decay=0.75), name="fit")
    assert last.model is plain
    assert all(torch.allclose(plain.state_dict()[k], averages[4][k], atol=1e-7) for k in trained)
    assert not torch.allclose(averages[4]["weight"], trained["weight"])


# ------------------------------------------------------------------------------ which terms train
def test_terms_outside_the_weights_are_logged_but_do_not_train():
    model = _model()
    x, y = _data()

    def step_terms(step):
        yield {"fit": F.mse_loss(model(x), y), "huge": 1e6 * model.weight.pow(2).sum()}

    before = _state(model)
    grads = _capture_grads(model)
    result = train(model, Objective(step_terms, {"fit": 0.0}), LoopParams(steps=3, learning_rate=0.1),
                   name="fit")
    assert _equal(_state(model), before)                     # the only trained term has weight 0
    assert all(torch.count_nonzero(g) == 0 for gs in grads.values() for g in gs)
    expected_huge = 1e6 * float(before["weight"].pow(2).sum())
    assert [row["huge"] for row in result.history] == pytest.approx([expected_huge] * 3)
    assert [row["total"] for row in result.history] == [0.0, 0.0, 0.0]

    # and with "fit" weighted, the run equals one that never saw "huge"
    trained, plain = _model(), _model()
    x, y = _data()

    def with_huge(step):
        yield {"fit": F.mse_loss(trained(x), y), "huge": 1e6 * trained.weight.pow(2).sum()}

    train(trained, Objective(with_huge, {"fit": 1.0}), LoopParams(steps=3, learning_rate=0.1), name="fit")
    train(plain, _fit(plain), LoopParams(steps=3, learning_rate=0.1), name="fit")
    assert _equal(_state(trained), _state(plain)) and not _equal(_state(trained), before)


def test_weights_scale_the_gradient():
    model = _model()
    x, y = _data()
    reference = copy.deepcopy(model)
    F.mse_loss(reference(x), y).backward()
    grads = _capture_grads(model)
    train(model, _fit(model, {"fit": 3.0}), LoopParams(steps=1, learning_rate=0.1, clip_norm=1e9), name="fit")
    for name, parameter in reference.named_parameters():
        assert len(grads[name]) == 1
        torch.testing.assert_close(grads[name][0], 3.0 * parameter.grad)


def test_each_terms_gradient_norm_is_logged_on_its_steps_and_leaves_the_update_unchanged(caplog):
    x, y = _data()

    def objective(model):
        def step_terms(step):
            yield {"fit": F.mse_loss(model(x), y), "shrink": model.weight.pow(2).sum(),
                   "constant": torch.zeros(()), "reward": torch.ones(())}
        return Objective(step_terms, {"fit": 1.0, "shrink": 0.5, "constant": 1.0})

    measured, plain = _model(), _model()
    reference = copy.deepcopy(measured)
    result = train(measured, objective(measured), LoopParams(steps=4, learning_rate=0.1, grad_norm_every=2),
                   name="measured", validate=lambda: 0.0)
    assert "measured: no validation step beat step 0" in caplog.text  # the run's name, not a term's
    train(plain, objective(plain), LoopParams(steps=4, learning_rate=0.1), name="plain")
    assert _equal(_state(measured), _state(plain))  # measuring reads the gradients, never changes them

    def norm_of(loss):
        grads = torch.autograd.grad(loss, list(reference.parameters()), allow_unused=True)
        return float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))

    first = result.history[0]
    assert first["grad_norm/fit"] == pytest.approx(norm_of(F.mse_loss(reference(x), y)), rel=1e-5)
    assert first["grad_norm/shrink"] == pytest.approx(norm_of(0.5 * reference.weight.pow(2).sum()), rel=1e-5)
    assert first["grad_norm/constant"] == 0.0  # weighted, but reaches no parameter
    assert first["grad_norm"] == pytest.approx(
        norm_of(F.mse_loss(reference(x), y) + 0.5 * reference.weight.pow(2).sum()), rel=1e-5)
    assert "grad_norm/reward" not in first   # logged-only terms train nothing
    assert [("grad_norm/fit" in row) for row in result.history] == [True, False, True, False]
    assert all("grad_norm" in row for row in result.history)


def test_micro_batches_give_the_step_of_one_batch_with_the_summed_loss():
    x, y = _data()

    def run(split: str):
        model = _model()
        grads = _capture_grads(model)

        def step_terms(step):
            if split == "two":
                yield {"fit": F.mse_loss(model(x[:3]), y[:3], reduction="sum") / 16}
                yield {"fit": F.mse_loss(model(x[3:]), y[3:], reduction="sum") / 16}
            elif split == "one":
                yield {"fit": F.mse_loss(model(x), y, reduction="sum") / 16}
            else:  # only the first micro-batch: what a lost micro-batch would give
                yield {"fit": F.mse_loss(model(x[:3]), y[:3], reduction="sum") / 16}

        result = train(model, Objective(step_terms, {"fit": 1.0}), LoopParams(steps=3, learning_rate=0.1),
                       name=split)
        summed = {name: torch.stack(g).sum(0) for name, g in grads.items()}
        return _state(model), result.history, summed

    two, history_two, grads_two = run("two")
    one, history_one, grads_one = run("one")
    first_only, _, _ = run("first")
    for name in grads_one:
        torch.testing.assert_close(grads_two[name], grads_one[name], atol=1e-6, rtol=1e-5)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(first_only["weight"], one["weight"], atol=1e-4)
    assert [r["fit"] for r in history_two] == pytest.approx([r["fit"] for r in history_one], rel=1e-5)



def test_micro_batches_sum_the_trained_terms_and_average_the_metrics():
    x, y = _data()
    model = _model()

    def step_terms(step):
        yield {"fit": F.mse_loss(model(x[:3]), y[:3], reduction="sum") / 16, "reward": torch.tensor(0.25),
               "only_first": torch.tensor(2.0)}
        yield {"fit": F.mse_loss(model(x[3:]), y[3:], reduction="sum") / 16, "reward": torch.tensor(0.75)}

    reference = copy.deepcopy(model)
    first = train(model, Objective(step_terms, {"fit": 1.0}), LoopParams(steps=1, learning_rate=0.1),
                  name="micro").history[0]
    with torch.no_grad():
        whole = float(F.mse_loss(reference(x), y, reduction="sum") / 16)
    assert first["fit"] == pytest.approx(whole, rel=1e-5) and first["total"] == pytest.approx(whole, rel=1e-5)
    assert first["reward"] == pytest.approx(0.5)       # the mean of 0.25 and 0.75, not their sum
    assert first["only_first"] == pytest.approx(2.0)   # averaged over the micro-batches that reported it

# ------------------------------------------------------------------------------ non-finite losses
@pytest.mark.parametrize("bad_batch, bad_term, value", [(0, "fit", float("nan")), (1, "fit", float("inf")),
                                                        (0, "reward", float("nan"))])
def test_a_non_finite_term_stops_naming_it_and_the_step_without_taking_the_step(tmp_path, bad_batch, bad_term,
                                                                                 value):
    model = _model()
    x, y = _data()
    before_step_2 = {}

    def step_terms(step):
        if step == 2:
            before_step_2.update(_state(model))
        for batch in range(2):
            terms = {"fit": F.mse_loss(model(x), y) / 2, "reward": torch.tensor(1.0)}
            if step == 2 and batch == bad_batch:
                terms[bad_term] = terms[bad_term] * value
            yield terms

    checkpoints = CheckpointManager(tmp_path / "ckpt", every=1, keep=5)
    with pytest.raises(NonFiniteLossError, match=rf"'{bad_term}' became {value} at step 2"):
        train(model, Objective(step_terms, {"fit": 1.0}), LoopParams(steps=5, learning_rate=0.1), name="fit",
              checkpoints=checkpoints)
    assert before_step_2 and _equal(_state(model), before_step_2)
    assert [p.name for p in checkpoints.list()] == ["step-00000001", "step-00000002"]


# ------------------------------------------------------------------------------ clean-up of interventions
class _Stop(RuntimeError):
    pass


@pytest.mark.parametrize("ending", ["nan", "pruned", "error", "normal"])
def test_the_injector_comes_off_however_training_ends(tiny_lm, task_table, ending):
    torch.manual_seed(0)
    hypernet = HyperNetwork(HyperNetConfig(hidden_size=32, num_layers=2, inject_layer=1, mlp_hidden=16))
    nn.init.normal_(hypernet.mlp[-1].weight, std=0.1)
    rows = task_table.head(4)
    questions, answers = rows["question"].tolist(), rows["answer"].tolist()
    attached_during = []

    def on_validation(step, value):
        if ending == "pruned" and step == 1:
            raise optuna.TrialPruned(f"validation accuracy {value:.3f} at step {step}")

    expected = {"nan": NonFiniteLossError, "pruned": optuna.TrialPruned, "error": _Stop, "normal": None}[ending]
    try:
        with GuidedStudent(tiny_lm, hypernet) as guided:
            states, lengths = guided.query_states(questions)
            mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]

            def step_terms(step):
                attached_during.append(dict(interventions(tiny_lm.model)))
                if ending == "error" and step == 1:
                    raise _Stop("a bug in a stage")
                vectors = hypernet(states, mask)
                batch, logits, _ = guided.teacher_forced(questions, answers, vectors, [])
                loss = next_token_loss(logits, batch)
                yield {"lm": loss * (float("nan") if ending == "nan" and step == 1 else 1.0)}

            result = train(hypernet, Objective(step_terms, {"lm": 1.0}),
                           LoopParams(steps=3, learning_rate=0.01, eval_every=1), name="guided",
                           validate=lambda: 0.5, on_validation=on_validation)
        assert expected is None and len(result.history) == 3
    except (NonFiniteLossError, optuna.TrialPruned, _Stop) as error:
        assert expected is not None and isinstance(error, expected)
    assert attached_during and all(list(a) == ["pilot_guidance"] for a in attached_during)
    assert interventions(tiny_lm.model) == {}
    assert not any(layer._forward_hooks for layer in decoder_layers(tiny_lm.model))


# ------------------------------------------------------------------------------ checkpoints
class _Interrupted(RuntimeError):
    pass


@pytest.mark.parametrize("ema_decay", [None, 0.7])
def test_a_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run_bit_for_bit(tmp_path, ema_decay):
    loop = LoopParams(steps=6, learning_rate=0.05, warmup_steps=1, eval_every=2, ema_decay=ema_decay)
    x_val, y_val = _data()

    def objective(model, stop_at=None):
        inner = _fit(model, noisy=True)

        def step_terms(step):
            if step == stop_at:
                raise _Interrupted(step)
            yield from inner.step_terms(step)

        return Objective(step_terms, inner.weights)

    def validator(model):
        return lambda: -float(F.mse_loss(model(2 * x_val), y_val).detach())

    uninterrupted = _model()
    full = train(uninterrupted, objective(uninterrupted), loop, name="full", validate=validator(uninterrupted),
                 checkpoints=CheckpointManager(tmp_path / "a", every=2, fingerprint="x"))

    checkpoints = CheckpointManager(tmp_path / "b", every=2, fingerprint="x")
    first = _model()
    with pytest.raises(_Interrupted):
        train(first, objective(first, stop_at=4), loop, name="first", validate=validator(first),
              checkpoints=checkpoints)
    assert checkpoints.latest().name == "step-00000004"
    second = _model()   # a fresh process: the same initial weights, nothing else
    resumed = train(second, objective(second), loop, name="resumed", validate=validator(second),
                    checkpoints=checkpoints)

    assert _equal(_state(second), _state(uninterrupted))
    assert _equal(_state(resumed.model), _state(full.model))
    assert resumed.history == full.history and len(full.history) == 6
    assert resumed.validation == full.validation and [v["step"] for v in full.validation] == [0, 2, 4, 6]
    assert (resumed.best_step, resumed.best_val_accuracy) == (full.best_step, full.best_val_accuracy)

    unseeded = _model()  # without the checkpoint the noise differs from step 0 on: the test can tell
    other = train(unseeded, _fit(unseeded), loop, name="plain")
    assert not _equal(_state(other.model), _state(full.model))


def test_checkpoints_of_another_run_are_not_resumed(tmp_path):
    loop = LoopParams(steps=4, learning_rate=0.05)
    first = _model()
    train(first, _fit(first), loop, name="x", checkpoints=CheckpointManager(tmp_path, every=2, fingerprint="x"))
    other = _model()
    result = train(other, _fit(other, noisy=True), loop, name="y",
                   checkpoints=CheckpointManager(tmp_path, every=2, fingerprint="y"))
    scratch = _model()
    expected = train(scratch, _fit(scratch, noisy=True), loop, name="scratch")
    assert _equal(_state(other), _state(scratch)) and result.history == expected.history  # trained afresh
    assert not _equal(_state(other), _state(first))
    for run in ("x", "y"):  # each run keeps its own resumable checkpoints
        assert [p.name for p in CheckpointManager(tmp_path, every=2, fingerprint=run).list()] == \
            ["step-00000002", "step-00000004"]
