"""Stage 2's token-level policy gradient, its switches, and the paired stage-1 / stage-2 comparison."""

import math

import pandas as pd
import pytest
import torch

from pilot.config import GenerationParams, GuidanceParams, Stage2Config
from pilot.guidance import GuidedStudent, make_hypernet
from pilot.training.losses import group_advantages, token_kl, token_log_probs, token_policy_loss
from pilot.training.stage2 import GroupPolicy, Rollouts, informative_groups, rollout_metrics, run_stage2

GEN = GenerationParams(max_new_tokens=4, batch_size=16)


def _hypernet(lm, seed=0):
    site = GuidanceParams(read_layer=-1, reader="mean", modulation="add", init_log_std=-1.0, mlp_hidden=16,
                          attention_heads=2)
    net = make_hypernet(site, lm.hidden_size, lm.num_layers, seed)
    with torch.no_grad():   # away from the zero start, so g changes the student's logits
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


# ------------------------------------------------------------------------------ the loss, by hand
def test_token_policy_loss_matches_hand_computation_and_clips_only_when_reused():
    log_probs = torch.log(torch.tensor([0.5, 0.25, 0.5, 0.1]))
    rows = torch.tensor([0, 0, 1, 1])
    advantages = torch.tensor([1.0, -1.0])
    loss, clip = token_policy_loss(log_probs, log_probs, advantages, rows, 2)
    assert float(loss) == pytest.approx((-1 - 1 + 1 + 1) / 4) and float(clip) == 0.0   # ratio 1 everywhere
    # Reused batch: the old policy gave token 0 prob 0.25 (ratio 2 > 1.2 with A > 0: clipped) and
    # token 3 prob 0.2 (ratio 0.5 < 0.8 with A < 0: clipped); tokens 1 and 2 unclipped at ratio 1.
    old = torch.log(torch.tensor([0.25, 0.25, 0.5, 0.2]))
    loss, clip = token_policy_loss(log_probs, old, advantages, rows, 2, 0.2, 0.2)
    assert float(clip) == pytest.approx(0.5)
    assert float(loss) == pytest.approx((-1.2 * 1 + 1 * 1 + -1 * -1 * -1 + 0.8) / 4)
    # grpo averages per reply first; dr_grpo divides by replies x max tokens.
    lengths = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    lp = torch.zeros(7)
    adv = torch.tensor([1.0, 2.0])
    assert float(token_policy_loss(lp, lp, adv, lengths, 2, loss_type="dapo")[0]) == pytest.approx(-(3 + 8) / 7)
    assert float(token_policy_loss(lp, lp, adv, lengths, 2, loss_type="grpo")[0]) == pytest.approx(-(1 + 2) / 2)
    assert float(token_policy_loss(lp, lp, adv, lengths, 2, loss_type="dr_grpo",
                                   max_tokens=5)[0]) == pytest.approx(-(3 + 8) / 10)


def test_token_kl_is_zero_at_the_reference_and_positive_away_from_it():
    lp = torch.log(torch.tensor([0.5, 0.2]))
    assert float(token_kl(lp, lp)) == 0.0
    ref = torch.log(torch.tensor([0.25, 0.2]))
    d = math.log(0.25) - math.log(0.5)
    assert float(token_kl(lp, ref)) == pytest.approx((math.exp(d) - d - 1) / 2)


def test_group_advantages_with_and_without_scaling_and_zero_variance_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    centred = group_advantages(rewards, scale=False)
    torch.testing.assert_close(centred[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert group_advantages(rewards)[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-3)
    assert informative_groups(rewards).tolist() == [True, False, True]
    metrics = rollout_metrics(rewards)
    assert float(metrics["frac_reward_zero_std"]) == pytest.approx(1 / 3)
    assert float(metrics["rewards/mean"]) == pytest.approx(7 / 12)


# ------------------------------------------------------------------------------ through the guidance
def test_the_token_policy_gradient_reaches_the_hypernetwork_and_not_the_student(tiny_lm, task_table):
    hypernet = _hypernet(tiny_lm)
    rows = task_table.head(2)
    questions = [q for q in rows["question"] for _ in range(2)]
    replies = ["12", "7", "3", "40"]
    with GuidedStudent(tiny_lm, hypernet) as guided:
        states, lengths = guided.query_states(rows["question"].tolist())
        mask = torch.arange(states.shape[1])[None] < lengths[:, None]
        vectors = hypernet(states, mask).repeat_interleave(2, dim=0)
        batch, logits, _ = guided.teacher_forced(questions, replies, vectors, [])
        log_probs, entropy = token_log_probs(logits, batch.next_tokens())
        token_rows = torch.nonzero(batch.predicting_positions())[:, 0]
        advantages = group_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).reshape(-1)
        loss, clip = token_policy_loss(log_probs, log_probs.detach(), advantages, token_rows, 4)
        loss.backward()
    assert float(clip) == 0.0 and entropy.shape == log_probs.shape and (entropy > 0).all()
    assert len(log_probs) == batch.num_targets()
    grads = [p.grad for p in hypernet.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in tiny_lm.model.parameters())  # the student stays frozen
    # Without guidance the logits do not depend on the hyper-network: the gradient went through g.
    with torch.no_grad():
        plain = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        guided_logits = logits.detach()
    assert not torch.allclose(plain[batch.predicting_positions()], guided_logits, atol=1e-6)


def test_one_token_step_logs_trl_metrics_with_ratio_one(tiny_lm, task_table):
    train = task_table[task_table["split"] == "train"].reset_index(drop=True)
    hypernet = _hypernet(tiny_lm)
    reference = _hypernet(tiny_lm).eval().requires_grad_(False)
    reference = _hypernet(tiny_lm, seed=1).eval().requires_grad_(False)
    config = Stage2Config(steps=2, batch_size=3, group_size=2, rollout_temperature=1.0, warmup_steps=0,
                          dynamic_sampling=False)
    with GuidedStudent(tiny_lm, hypernet) as guided:
        objective = GroupPolicy(guided, reference, train, config, GEN)
        terms = next(iter(objective.step_terms(0)))
    assert {"policy", "kl", "self_supervision", "anchor", "rewards/mean", "rewards/std", "frac_reward_zero_std",
            "clip_ratio", "completion_length", "entropy"} <= set(terms)
    assert float(terms["clip_ratio"]) == 0.0           # one update per batch: the ratio is exactly 1
    assert float(terms["kl"]) > 0                      # another hyper-network as the reference
    assert 1 <= float(terms["completion_length"]) <= GEN.max_new_tokens
    assert 0 <= float(terms["frac_reward_zero_std"]) <= 1 and float(terms["entropy"]) > 0
    assert set(objective.weights) == {"policy", "kl", "self_supervision", "anchor"}


def test_a_reused_batch_samples_once_and_scores_the_moved_policy_against_the_cached_one(tiny_lm, task_table):
    train = task_table[task_table["split"] == "train"].reset_index(drop=True)
    hypernet = _hypernet(tiny_lm)
    import copy
    reference = copy.deepcopy(hypernet).eval().requires_grad_(False)
    config = Stage2Config(batch_size=3, group_size=2, rollout_temperature=1.0, updates_per_batch=2,
                          dynamic_sampling=False)
    with GuidedStudent(tiny_lm, hypernet) as guided:
        objective = GroupPolicy(guided, reference, train, config, GEN)
        first = next(iter(objective.step_terms(0)))
        with torch.no_grad():   # what an optimizer step would do: the policy moves
            for p in hypernet.parameters():
                p.add_(0.2 * torch.randn_like(p))
        second = next(iter(objective.step_terms(1)))    # the same batch of rollouts, not resampled
        third = next(iter(objective.step_terms(2)))     # a new batch
    for name in ("rewards/mean", "completion_length", "frac_reward_zero_std"):
        assert float(first[name]) == float(second[name])
    assert float(first["kl"]) == pytest.approx(0.0, abs=1e-6)   # the reference is the start
    assert float(second["kl"]) > 1e-4                          # the moved policy, against the cached reference
    assert float(third["clip_ratio"]) == 0.0                    # a fresh batch starts at ratio 1
    assert float(first["entropy"]) != float(second["entropy"])


def test_dynamic_sampling_drops_all_equal_groups_and_refills(tiny_lm, task_table):
    """A random student answers nothing right: every group is all-zero, so dynamic sampling keeps
    none, spends every round looking, and the policy term is zero."""
    train = task_table[task_table["split"] == "train"].reset_index(drop=True)
    hypernet = _hypernet(tiny_lm)
    reference = _hypernet(tiny_lm).eval().requires_grad_(False)
    config = Stage2Config(batch_size=3, group_size=2, dynamic_sampling=True, dynamic_sampling_rounds=2)
    with GuidedStudent(tiny_lm, hypernet) as guided:
        terms = next(iter(GroupPolicy(guided, reference, train, config, GEN).step_terms(0)))
    assert float(terms["frac_reward_zero_std"]) == 1.0
    assert float(terms["groups_kept"]) == 0.0 and float(terms["sampling_rounds"]) == 2.0
    assert float(terms["policy"]) == 0.0


def test_greedy_wrong_groups_score_the_greedy_answers_and_keep_the_groups_greedy_gets_wrong(tiny_lm, task_table):
    """A random student answers nothing right, greedily either: greedy_accuracy is 0 and every group
    is greedy-wrong, so the step is the one every group gives."""
    train = task_table[task_table["split"] == "train"].reset_index(drop=True)
    found = {}
    for groups in ("all", "greedy_wrong"):
        hypernet = _hypernet(tiny_lm)
        reference = _hypernet(tiny_lm, seed=1).eval().requires_grad_(False)
        config = Stage2Config(batch_size=3, group_size=2, rollout_temperature=1.0, dynamic_sampling=False,
                              policy_groups=groups)
        with GuidedStudent(tiny_lm, hypernet) as guided:
            found[groups] = next(iter(GroupPolicy(guided, reference, train, config, GEN).step_terms(0)))
    assert float(found["greedy_wrong"]["greedy_accuracy"]) == 0.0 and "greedy_accuracy" not in found["all"]
    for name in ("policy", "kl", "rewards/mean", "completion_length"):
        assert float(found["greedy_wrong"][name]) == float(found["all"][name])


@pytest.mark.parametrize("dynamic, groups, kept", [
    (False, "all", [True, True, True]),            # every sampled group
    (True, "all", [True, False, True]),            # dynamic sampling: groups whose rewards differ
    (False, "greedy_wrong", [False, True, True]),  # the questions greedy decoding gets wrong
    (True, "greedy_wrong", [False, False, True]),  # both rules
])
def test_choose_groups_applies_each_rule_on_its_own_and_together(tiny_lm, task_table, dynamic, groups, kept):
    train = task_table[task_table["split"] == "train"].reset_index(drop=True)
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    greedy_right = torch.tensor([True, False, False]) if groups == "greedy_wrong" else None
    config = Stage2Config(batch_size=3, group_size=2, dynamic_sampling=dynamic, policy_groups=groups)
    with GuidedStudent(tiny_lm, _hypernet(tiny_lm)) as guided:
        policy = GroupPolicy(guided, _hypernet(tiny_lm, seed=1), train, config, GEN)
        assert policy.choose_groups(rewards, greedy_right).tolist() == kept


def test_one_process_keeps_the_whole_batch_and_its_terms_unweighted(tiny_lm, task_table):
    """In one process :meth:`GroupPolicy.shard` is the identity and :meth:`GroupPolicy.share` leaves every
    term as it is: the data-parallel weighting lives in those two methods alone."""
    train = task_table[task_table["split"] == "train"].reset_index(drop=True)
    config = Stage2Config(batch_size=2, group_size=2)
    whole = Rollouts([0, 1], ["1", "2", "3", "4"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                     old_log_probs=torch.zeros(6), correct_tokens=2, metrics={})
    terms = {"policy": torch.tensor(0.5), "kl": torch.tensor(0.1), "self_supervision": torch.tensor(2.0)}
    with GuidedStudent(tiny_lm, _hypernet(tiny_lm)) as guided:
        policy = GroupPolicy(guided, _hypernet(tiny_lm, seed=1), train, config, GEN)
        assert policy.shard(whole) is whole
        shared = policy.share(terms, whole, whole)
    assert {name: float(value) for name, value in shared.items()} == \
        {name: float(value) for name, value in terms.items()}


def test_latent_policy_is_kept_as_an_option(tiny_lm, task_table):
    train = task_table[task_table["split"] == "train"].reset_index(drop=True)
    hypernet = _hypernet(tiny_lm)
    reference = _hypernet(tiny_lm).eval().requires_grad_(False)
    config = Stage2Config(policy="latent", batch_size=3, group_size=2)
    with GuidedStudent(tiny_lm, hypernet) as guided:
        objective = GroupPolicy(guided, reference, train, config, GEN)
        terms = next(iter(objective.step_terms(0)))
    assert "kl" not in objective.weights and "clip_ratio" not in terms
    assert terms["policy"].requires_grad and "rewards/mean" in terms


def test_question_selection_falls_back_when_stage1_is_never_right(tiny_lm, task_table, caplog):
    train = task_table[task_table["split"] == "train"]
    val = task_table[task_table["split"] == "val"].head(4)
    config = Stage2Config(steps=1, batch_size=2, group_size=2, select_questions=True, selection_questions=6,
                          selection_samples=2, eval_every=1, dynamic_sampling=False)
    result = run_stage2(tiny_lm, _hypernet(tiny_lm), train, val, config, GEN)
    assert "question selection kept no question; training on the 6 scored ones" in caplog.text
    assert len(result.history) == 1


def test_training_curves_show_the_grpo_metrics():
    import matplotlib
    matplotlib.use("Agg")
    from pilot.plots import training_curves

    steps = list(range(1, 6))
    stage1 = pd.DataFrame({"step": steps, "alignment": 1.0, "grad_norm/alignment": 0.5})
    stage2 = pd.DataFrame({"step": steps, "rewards/mean": 0.5, "rewards/std": 0.3, "frac_reward_zero_std": 0.4,
                           "clip_ratio": 0.0, "kl": 0.01, "entropy": 1.2, "completion_length": 3.0,
                           "grad_norm/policy": 0.2})
    validation = pd.DataFrame({"step": [0, 5], "val_accuracy": [0.5, 0.6]})
    figure = training_curves(stage1, validation, stage2, validation)
    labels = {line.get_label() for axis in figure.axes for line in axis.lines}
    assert {"reward mean", "reward std", "groups with one reward", "clip ratio", "kl", "entropy",
            "completion_length", "policy", "alignment"} <= labels


def test_the_ablation_table_pairs_each_variant_with_the_reference(tiny_lm):
    from pilot.ablations import AblationResult, ablation_markdown, ablation_table
    from pilot.config import AblationVariant

    def predictions(method, correct):
        return pd.DataFrame({"method": method, "id": [f"q{i}" for i in range(len(correct))], "task": "A",
                             "split": "test", "correct": [bool(c) for c in correct], "new_tokens": 2,
                             "seconds_per_query": 0.01, "prediction": "x", "reply": "x"})

    n = 40
    references = pd.concat([predictions("zero_shot", [0] * n), predictions("plan_in_context", [1] * n)])
    net = _hypernet(tiny_lm)

    def result(name, correct, stage2=True):
        return AblationResult(name, AblationVariant(name=name, stage2=stage2), predictions(name, correct), net,
                              1.0, 1.0, 10, 5 if stage2 is not False else None, 0.5)

    reference = result("reference", [1] * 30 + [0] * 10)
    no_stage2 = result("no_stage2", [1] * 20 + [0] * 20, stage2=False)
    latent = result("latent_policy", [1] * 30 + [0] * 10, stage2={"policy": "latent"})
    table = ablation_table([reference, no_stage2, latent], references).set_index("variant")
    # no_stage2 is right on 10 fewer questions, never on one the reference missed: 2 / 2^10
    assert table.loc["no_stage2", "vs_reference"] == pytest.approx(-0.25)
    assert table.loc["no_stage2", "vs_reference_p"] == pytest.approx(2 / 2**10)
    assert table.loc["no_stage2", "vs_reference_high"] < 0
    assert table.loc["latent_policy", "vs_reference"] == 0.0 and table.loc["latent_policy", "vs_reference_p"] == 1.0
    assert pd.isna(table.loc["reference", "vs_reference"])
    assert table.loc["reference", "gap_recovered"] == pytest.approx(0.75)
    assert table.loc["reference", "gap_recovered_low"] < 0.75 < table.loc["reference", "gap_recovered_high"]
    markdown = ablation_markdown(table.reset_index())
    assert "| latent_policy | stage2.policy=latent |" in markdown and "| no_stage2 | no stage 2 |" in markdown
    assert "-0.250 [" in markdown and "p=0.00195" in markdown
