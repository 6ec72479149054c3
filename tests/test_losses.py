"""Every loss term of both stages on hand-computed cases, and where their gradients go."""

import math

import pytest
import torch
import torch.nn.functional as F

from pilot.config import GenerationParams, GuidanceParams, LatentsParams, Stage1Config
from pilot.guidance import GuidedStudent, HyperNetConfig, HyperNetwork, make_hypernet
from pilot.latents import RecomputedLatents, plan_cache_build, select_examples
from pilot.training.losses import (
    alignment_loss,
    gather_answer_states,
    group_advantages,
    info_nce,
    masked_mean,
    mean_baseline_advantages,
    reinforce_loss,
    zero_variance_fraction,
)
from pilot.training.stage1 import imitation_terms, stage1_objective


def _policy(hidden_size: int = 4, init_log_std: float = -1.0) -> HyperNetwork:
    return HyperNetwork(HyperNetConfig(hidden_size=hidden_size, num_layers=2, mlp_hidden=8, reader="mean",
                                       modulation="add", init_log_std=init_log_std))


# ------------------------------------------------------------------------------ alignment
def test_alignment_is_zero_when_the_guided_states_are_the_targets():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 2, 8)
    mask = torch.ones(2, 3, 2)
    assert float(alignment_loss(target.clone(), target, mask)) == pytest.approx(0.0, abs=1e-6)


def test_alignment_on_a_hand_computed_example_ignores_the_masked_position():
    guided = torch.tensor([[[1.0, 0.0], [5.0, -3.0]]])   # (B=1, T=2, d=2)
    target = torch.tensor([[[1.0, 1.0], [1.0, 2.0]]])
    mask = torch.tensor([[1.0, 0.0]])                      # position 1 is padding
    # position 0 by hand: cos = 1 / sqrt(2); mse = (0 + 1) / 2; mean(target^2) = (1 + 1) / 2
    expected = (1 - 1 / math.sqrt(2)) + 0.5 / 1.0
    assert float(alignment_loss(guided, target, mask)) == pytest.approx(expected, abs=1e-6)

    garbage = guided.clone()
    garbage[0, 1] = torch.tensor([1e4, -7e3])
    garbage_target = target.clone()
    garbage_target[0, 1] = torch.tensor([-3.0, 1e-3])
    assert float(alignment_loss(garbage, garbage_target, mask)) == pytest.approx(expected, abs=1e-6)


def test_alignment_averages_over_the_valid_positions_only():
    guided = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    target = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    first = (1 - 1 / math.sqrt(2)) + 0.5 / 1.0
    # position 1: same direction (cos = 1); mse = (1 + 0) / 2; mean(target^2) = 0.5 -> relative 1
    second = 0.0 + 0.5 / 0.5
    assert float(alignment_loss(guided, target, mask)) == pytest.approx((first + second) / 2, abs=1e-6)


# ------------------------------------------------------------------------------ contrastive
def _one_hot_info_nce(n, temperature, wrong_rows=0):
    """InfoNCE of centred one-hot rows: cosine 1 with one's own row, -1/(n-1) with the others;
    ``wrong_rows`` rows have their positive at -1/(n-1) and one negative at 1."""
    match, other = math.exp(1 / temperature), math.exp(-1 / ((n - 1) * temperature))
    right = -math.log(match / (match + (n - 1) * other))
    wrong = -math.log(other / (match + (n - 1) * other))
    return ((n - wrong_rows) * right + wrong_rows * wrong) / n


def test_info_nce_on_orthogonal_one_hot_rows():
    n, temperature = 4, 0.5
    eye = torch.eye(n)
    assert float(info_nce(eye, eye, temperature)) == pytest.approx(_one_hot_info_nce(n, temperature), abs=1e-6)
    # scaling rows changes nothing (cosine similarities)
    assert float(info_nce(3 * eye, 0.1 * eye, temperature)) == pytest.approx(_one_hot_info_nce(n, temperature),
                                                                             abs=1e-6)


def test_info_nce_ignores_a_component_every_row_shares():
    """Residual-stream means share a large common part; centring keeps it from hiding the rows' differences."""
    n, temperature = 4, 0.1
    eye, shared = torch.eye(n), 100 * torch.ones(n)
    assert float(info_nce(eye + shared, eye - shared, temperature)) == pytest.approx(float(info_nce(eye, eye, temperature)),
                                                                                  abs=1e-4)
    uncentred = F.normalize(eye + shared, dim=-1) @ F.normalize(eye + shared, dim=-1).T / temperature
    assert float(F.cross_entropy(uncentred, torch.arange(n))) > 0.9 * math.log(n)  # what it was before: chance


def test_info_nce_rises_when_keys_are_swapped():
    n, temperature = 4, 0.5
    eye = torch.eye(n)
    swapped = eye[[1, 0, 2, 3]]
    matched = float(info_nce(eye, eye, temperature))
    mismatched = float(info_nce(eye, swapped, temperature))
    assert mismatched == pytest.approx(_one_hot_info_nce(n, temperature, wrong_rows=2), abs=1e-6)
    assert mismatched > matched + 1.0


# ------------------------------------------------------------------------------ policy gradient
@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_reinforce_moves_the_mean_toward_good_actions_and_away_from_bad(advantage):
    policy = _policy()
    mean = torch.nn.Parameter(torch.zeros(1, 4))
    actions, log_prob = policy.sample(mean, 1, generator=torch.Generator().manual_seed(3))
    loss = reinforce_loss(torch.tensor([advantage]), log_prob)
    optimizer = torch.optim.SGD([mean], lr=0.01)
    loss.backward()
    optimizer.step()
    std = math.exp(-1.0)
    # log p is averaged over the d = 4 dimensions: d(-A log p)/dm = -A (a - m) / (d s^2),
    # so one SGD step is m += lr * A * (a - m) / (d s^2)
    torch.testing.assert_close(mean.detach(), 0.01 * advantage * actions / (4 * std**2))
    before, after = actions.norm(), (actions - mean.detach()).norm()
    if advantage > 0:
        assert after < before
    else:
        assert after > before


def test_reinforce_does_not_backpropagate_into_the_advantages():
    mean = torch.nn.Parameter(torch.zeros(2, 3))
    actions = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 2.0]])
    log_prob = torch.distributions.Normal(mean, 1.0).log_prob(actions).sum(-1)
    advantages = torch.tensor([1.0, -0.5], requires_grad=True)
    loss = reinforce_loss(advantages, log_prob)
    loss.backward()
    assert advantages.grad is None
    # mean over the batch: dL/dm_i = -A_i (a_i - m_i) / (s^2 * batch)
    torch.testing.assert_close(mean.grad, -torch.tensor([[1.0], [-0.5]]) * actions / 2)


def test_reinforce_loss_value():
    log_prob = torch.tensor([-1.0, -2.0, -3.0])
    advantages = torch.tensor([[1.0, 0.0, -2.0]])   # any shape with one entry per sample
    assert float(reinforce_loss(advantages, log_prob)) == pytest.approx(-(-1.0 + 0.0 + 6.0) / 3)


# ------------------------------------------------------------------------------ the Gaussian policy
def test_sample_log_prob_is_the_gaussian_closed_form():
    torch.manual_seed(0)
    d, k = 4, 3
    policy = _policy(hidden_size=d, init_log_std=math.log(0.5))
    mean = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, 10.0, -10.0]])
    actions, log_prob = policy.sample(mean, k, generator=torch.Generator().manual_seed(1))
    assert actions.shape == (2 * k, d) and log_prob.shape == (2 * k,)
    expanded = mean.repeat_interleave(k, dim=0)
    # rows i*k .. i*k+k-1 are samples of mean i
    assert (actions[:k].abs() < 3).all() and (actions[k:] - expanded[k:]).abs().max() < 3
    s = 0.5
    closed = (-0.5 * ((actions - expanded) / s).pow(2).sum(-1) - d * math.log(s) - d / 2 * math.log(2 * math.pi))
    torch.testing.assert_close(log_prob.detach(), closed / d)  # averaged over the dimensions


def test_samples_are_seeded_by_the_generator_and_detached():
    policy = _policy()
    mean = torch.randn(3, 4, requires_grad=True)
    first, _ = policy.sample(mean, 2, generator=torch.Generator().manual_seed(7))
    again, _ = policy.sample(mean, 2, generator=torch.Generator().manual_seed(7))
    other, _ = policy.sample(mean, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not first.requires_grad and first.grad_fn is None


def test_sample_log_prob_carries_gradients_to_the_mean_and_log_std():
    d, k = 4, 5
    policy = _policy(hidden_size=d, init_log_std=-0.5)
    mean = torch.tensor([[0.3, -0.2, 0.1, 0.0]], requires_grad=True)
    actions, log_prob = policy.sample(mean, k, generator=torch.Generator().manual_seed(2))
    log_prob.sum().backward()
    s = math.exp(-0.5)
    z = (actions - mean.detach()) / s
    # log p averaged over the d dimensions: d log p / d m = (a - m) / (d s^2) ;
    # d log p / d log s = (sum(z^2) - d) / d  (summed over the k samples)
    torch.testing.assert_close(mean.grad, (z / s).sum(0, keepdim=True) / d)
    torch.testing.assert_close(policy.log_std.grad, ((z.pow(2).sum(-1) - d) / d).sum())
    assert float(policy.log_std.grad) != 0.0


# ------------------------------------------------------------------------------ advantages
def test_group_advantages_hand_example():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    advantages = group_advantages(rewards)
    torch.testing.assert_close(advantages[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3, rtol=0)
    assert torch.equal(advantages[1:], torch.zeros(2, 4))


def test_zero_variance_fraction_counts_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert float(zero_variance_fraction(rewards)) == 0.5
    assert float(zero_variance_fraction(rewards[:1])) == 0.0


def test_mean_baseline_advantages_hand_example():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 5.0]])
    torch.testing.assert_close(mean_baseline_advantages(rewards),
                               torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-1.0, -1.0, 2.0]]))


# ------------------------------------------------------------------------------ helpers
def test_masked_mean_averages_the_masked_positions_and_gives_zero_for_an_empty_mask():
    states = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]],
                           [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_mean(states, mask), torch.tensor([[2.0, 4.0], [0.0, 0.0]]))
    one = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(masked_mean(states, one), torch.tensor([[100.0, 100.0], [7.0, 7.0]]))


def test_gather_answer_states_reads_from_start_and_clamps_at_the_end():
    positions = torch.arange(5, dtype=torch.float32)
    states = torch.stack([positions, 10 + positions])[..., None].expand(-1, -1, 2)  # (2, 5, 2)
    gathered = gather_answer_states(states, torch.tensor([1, 3]), 3)
    assert gathered.shape == (2, 3, 2)
    torch.testing.assert_close(gathered[..., 0], torch.tensor([[1.0, 2.0, 3.0], [13.0, 14.0, 14.0]]))
    torch.testing.assert_close(gathered[..., 1], gathered[..., 0])


# ------------------------------------------------------------------------------ where gradients go
# The mean reader with an added vector: the parameters `learning` below are that reader's whole path.
SITE = GuidanceParams(read_layer=-1, inject_layer=0, align_layers=[0, 1], reader="mean", modulation="add",
                      mlp_hidden=16, attention_heads=2)


def _plans(task_table):
    return task_table[["id", "task", "split"]].assign(plan=task_table["oracle_plan"], kept=True)


def _trained_looking_hypernet(lm, seed=0):
    hypernet = make_hypernet(SITE, lm.hidden_size, lm.num_layers, seed)
    with torch.no_grad():  # the output layer starts at zero; open it so gradients reach earlier layers
        torch.nn.init.normal_(hypernet.mlp[-1].weight, std=0.3)
    return hypernet


def test_each_imitation_term_trains_the_hypernet_and_never_the_student(tiny_lm, task_table):
    build = plan_cache_build(_plans(task_table), task_table, tiny_lm, SITE, LatentsParams(batch_size=8))
    rows = [0, 1, 2, 3]
    batch = RecomputedLatents(build).batch(torch.tensor(rows), "cpu")
    hypernet = _trained_looking_hypernet(tiny_lm)
    learning = [hypernet.norm.weight, hypernet.mlp[0].weight, hypernet.mlp[0].bias,
                hypernet.mlp[-1].weight, hypernet.mlp[-1].bias]
    with GuidedStudent(tiny_lm, hypernet) as guided:
        vectors = hypernet(batch.query_states, batch.query_mask)
        terms = imitation_terms(guided, batch, vectors, [build.questions[i] for i in rows],
                                [build.answers[i] for i in rows], [0, 1], temperature=0.1)
        assert set(terms) == {"alignment", "contrastive", "lm"}
        for name, term in terms.items():
            value = float(term.detach())
            assert term.ndim == 0 and math.isfinite(value) and value > 0, name
            grads = torch.autograd.grad(term, learning, retain_graph=True, allow_unused=True)
            for parameter, grad in zip(learning, grads):
                assert grad is not None and grad.abs().sum() > 0, f"'{name}' does not reach {parameter.shape}"
        (terms["alignment"] + 0.1 * terms["contrastive"] + terms["lm"]).backward()
    assert all(not p.requires_grad and p.grad is None for p in tiny_lm.model.parameters())
    assert hypernet.log_std.grad is None  # only the latent-RL term uses the policy's spread


def test_a_full_stage1_step_with_latent_rl_trains_only_the_hypernet(tiny_lm, task_table):
    build = plan_cache_build(_plans(task_table), task_table, tiny_lm, SITE, LatentsParams(batch_size=8))
    examples = select_examples(_plans(task_table), task_table)
    assert examples["id"].tolist() == build.ids  # the rows RecomputedLatents computes
    config = Stage1Config(batch_size=4, rl_weight=0.5, rl_every=1, rl_batch=2, rl_samples=2)
    hypernet = _trained_looking_hypernet(tiny_lm)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    with GuidedStudent(tiny_lm, hypernet) as guided:
        objective = stage1_objective(guided, RecomputedLatents(build), examples, [0, 1], config,
                                     GenerationParams(max_new_tokens=3, batch_size=8))
        (terms,) = list(objective.step_terms(0))
        assert {"alignment", "contrastive", "lm", "latent_rl", "rl_reward"} <= set(terms)
        assert not terms["rl_reward"].requires_grad        # logged, not trained
        total = sum(weight * terms[name] for name, weight in objective.weights.items())
        total.backward()
    assert all(p.grad is None for p in tiny_lm.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.model.state_dict().items())
    for name, parameter in hypernet.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
