import pytest
import torch

from pilot.artifacts import ArtifactChecksumError
from pilot.config import GenerationParams
from pilot.generation import generate
from pilot.guidance import Guidance, GuidanceInjector, GuidedStudent, HyperNetConfig, HyperNetwork, last_token_states
from pilot.interventions import InterventionError, capture_layers, interventions
from pilot.models import build_causal_lm, decoder_layers, load_causal_lm
from pilot.prompts import answer_prompt
from pilot.sequences import encode_pairs


def _hypernet(lm, reader="mean", inject_layer=0, scale=1.0):
    return HyperNetwork(HyperNetConfig(hidden_size=lm.hidden_size, num_layers=lm.num_layers, read_layer=-1,
                                       inject_layer=inject_layer, reader=reader, mlp_hidden=16,
                                       attention_heads=2, guidance_scale=scale, modulation="add"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_injection_moves_exactly_the_later_layers_at_the_masked_positions(tokenizer, family):
    lm = build_causal_lm(tokenizer, family=family, hidden_size=32, num_layers=3, num_heads=2, seed=0)
    batch = encode_pairs(tokenizer, [answer_prompt("1 + 2 - 3 ="), answer_prompt("4 - 5 + 6 - 7 =")], [" 0", " -2"])
    mask = batch.answer_position_mask()
    injector = GuidanceInjector(lm.model, inject_layer=1, guidance_scale=0.5)
    vectors = torch.randn(2, 32)
    with torch.no_grad(), capture_layers(lm.model, [0, 1, 2]) as plain:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    plain = {k: v.clone() for k, v in plain.items()}
    with torch.no_grad(), injector.guide(vectors, mask), capture_layers(lm.model, [0, 1, 2]) as guided:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(plain[0], guided[0])                                   # before the site: untouched
    delta = guided[1] - plain[1]
    assert torch.allclose(delta[~mask], torch.zeros_like(delta[~mask]))        # outside the answer positions
    rms = plain[1].pow(2).mean(-1, keepdim=True).sqrt()
    expected = 0.5 * rms * vectors[:, None, :]                                # energy-aligned
    assert torch.allclose(delta[mask], expected.expand_as(delta)[mask], atol=1e-5)
    assert not torch.allclose(guided[2][mask], plain[2][mask])                # later layers see it
    injector.enabled = False                                                  # switch off
    with torch.no_grad(), injector.guide(vectors, mask), capture_layers(lm.model, [1]) as off:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(off[1], plain[1])
    injector.remove()
    assert not decoder_layers(lm.model)[1]._forward_hooks


def test_zero_guidance_is_the_plain_student(tiny_lm, task_table):
    prompts = [answer_prompt(q) for q in task_table["question"][:12]]
    generation = GenerationParams(max_new_tokens=6, batch_size=5)
    plain = generate(tiny_lm, prompts, generation=generation)
    hypernet = _hypernet(tiny_lm)  # zero-initialised output layer: g = 0
    injector = GuidanceInjector(tiny_lm.model, 0, 1.0)
    guided = generate(tiny_lm, prompts, generation=generation, guidance=Guidance(injector, hypernet=hypernet))
    assert guided.texts == plain.texts
    assert torch.count_nonzero(guided.guidance_vectors) == 0


@pytest.mark.parametrize("reader", ["mean", "attention"])
def test_readers_ignore_padding_and_depend_on_the_query(reader):
    torch.manual_seed(0)
    net = _hypernet(type("LM", (), {"hidden_size": 16, "num_layers": 2})(), reader=reader)
    torch.nn.init.normal_(net.mlp[-1].weight)
    states = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = net(states, mask)
    padded = states.clone()
    padded[0, 3:] = 100.0  # garbage in the padding must not matter
    assert torch.allclose(net(padded, mask), out, atol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_attention_reader_equals_multihead_attention_over_every_token():
    torch.manual_seed(0)
    net = _hypernet(type("LM", (), {"hidden_size": 16, "num_layers": 2})(), reader="attention")
    torch.nn.init.normal_(net.attention.in_proj_bias)  # biases on, so their handling is checked too
    states = torch.randn(3, 6, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).bool()
    query = last_token_states(states, mask)
    expected, _ = net.attention(query[:, None], states, states, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(net._attention_pool(query, states, mask), expected[:, 0], atol=1e-5, rtol=1e-4)


def test_training_through_the_student_leaves_its_weights_bit_identical(tiny_lm, task_table):
    from pilot.models import freeze

    freeze(tiny_lm.model)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    hypernet = _hypernet(tiny_lm, reader="attention")
    injector = GuidanceInjector(tiny_lm.model, 0, 1.0)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-2)
    batch = encode_pairs(tiny_lm.tokenizer, [answer_prompt(q) for q in task_table["question"][:8]],
                         [" " + a for a in task_table["answer"][:8]])
    for _ in range(3):
        with capture_layers(tiny_lm.model, [1]) as read:
            with torch.no_grad():
                tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        vectors = hypernet(read[1], batch.query_mask())
        with injector.guide(vectors, batch.answer_position_mask()):
            loss = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 labels=batch.labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(p.abs().sum() > 0 for p in hypernet.mlp[-1].parameters())  # the hyper-network did learn
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hypernet_round_trip_and_shape_checks(tiny_lm, tmp_path):
    net = _hypernet(tiny_lm, reader="attention")
    torch.nn.init.normal_(net.mlp[-1].weight)
    net.save(tmp_path / "h")
    loaded = HyperNetwork.load(tmp_path / "h", tiny_lm.hidden_size, tiny_lm.num_layers)
    assert loaded.fingerprint() == net.fingerprint()
    with pytest.raises(ValueError, match="hidden size 32 != student's 64"):
        HyperNetwork.load(tmp_path / "h", 64, 2)
    with pytest.raises(ValueError, match="layer count 2 != student's 4"):
        HyperNetwork.load(tmp_path / "h", 32, 4)
    (tmp_path / "h" / "hypernet.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ArtifactChecksumError, match="hypernet.safetensors' does not match its checksum"):
        HyperNetwork.load(tmp_path / "h")


def test_config_rejects_layers_outside_the_student():
    with pytest.raises(ValueError, match="injection layer 5 is outside"):
        HyperNetConfig(hidden_size=32, num_layers=2, inject_layer=5).validate()
    with pytest.raises(ValueError, match="injection layer 3 is outside"):
        HyperNetConfig(hidden_size=32, num_layers=2, extra_inject_layers=[3]).validate()
    with pytest.raises(ValueError, match="repeat a layer"):
        HyperNetConfig(hidden_size=32, num_layers=2, inject_layer=1, extra_inject_layers=[1]).validate()


def test_models_round_trip_through_save_pretrained(tiny_lm, tmp_path):
    tiny_lm.save(tmp_path / "m")
    loaded = load_causal_lm(tmp_path / "m")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.get_vocab() == tiny_lm.tokenizer.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(tiny_lm.model.state_dict().values(), loaded.model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="kedro run --pipelines base"):
        load_causal_lm(tmp_path / "missing")


def test_an_injector_is_a_named_intervention_that_refuses_a_shared_site_and_always_comes_off(tiny_lm):
    layers = decoder_layers(tiny_lm.model)
    with GuidanceInjector(tiny_lm.model, 1, 1.0, name="a") as first:
        assert interventions(tiny_lm.model) == {"a": first}
        with pytest.raises(InterventionError, match="Decoder layer 1 already carries the intervention"):
            GuidanceInjector(tiny_lm.model, 1, 1.0, name="b")
        with pytest.raises(InterventionError, match="named 'a' is already attached"):
            GuidanceInjector(tiny_lm.model, 0, 1.0, name="a")
        with GuidanceInjector(tiny_lm.model, 1, 1.0, name="b", allow_shared_site=True):
            assert len(layers[1]._forward_hooks) == 2           # stacked only when asked
        assert set(interventions(tiny_lm.model)) == {"a"}
    assert interventions(tiny_lm.model) == {} and not layers[1]._forward_hooks
    with pytest.raises(InterventionError, match="was removed"):
        with first.guide(torch.zeros(1, 32)):
            pass
    with pytest.raises(RuntimeError, match="boom"), GuidanceInjector(tiny_lm.model, 0, 1.0):
        raise RuntimeError("boom")                              # an error inside still detaches it
    assert interventions(tiny_lm.model) == {} and not layers[0]._forward_hooks


@pytest.mark.parametrize("reader", ["mean", "attention"])
def test_guided_generation_starts_where_the_teacher_forced_guided_pass_does(tiny_lm, task_table, reader):
    """Generation injects from the last prompt token on, training from the first answer position:
    the first generated token's logits must equal the teacher-forced guided pass's there."""
    hypernet = _hypernet(tiny_lm, reader=reader, inject_layer=0, scale=2.0)
    torch.manual_seed(1)
    torch.nn.init.normal_(hypernet.mlp[-1].weight, std=0.5)
    questions = task_table["question"].tolist()[:5]
    prompts = [answer_prompt(q) for q in questions]
    decode_steps = []  # logits of one-token decode steps (the prefill reads many tokens)
    one_token = GenerationParams(max_new_tokens=1, batch_size=2)
    handle = tiny_lm.model.register_forward_hook(
        lambda module, args, kwargs, output: decode_steps.append(output.logits[:, -1].detach())
        if (args[0] if args else kwargs["input_ids"]).shape[1] == 1 else None, with_kwargs=True)
    try:
        with GuidedStudent(tiny_lm, hypernet.eval()) as guided:
            vectors = guided.guidance_vectors(questions)
            batch, logits, _ = guided.teacher_forced(questions, ["0"] * len(questions), vectors, [])
            generated = generate(tiny_lm, prompts, generation=one_token, guidance=guided.guidance())
        generated_first = torch.cat(decode_steps)
        decode_steps.clear()
        generate(tiny_lm, prompts, generation=one_token)
        plain_first = torch.cat(decode_steps)
    finally:
        handle.remove()
    forced_first = logits[torch.cumsum(batch.target_lengths, 0) - batch.target_lengths]  # each row's first
    torch.testing.assert_close(generated.guidance_vectors, vectors, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(generated_first, forced_first, atol=1e-4, rtol=1e-4)
    assert (generated_first - plain_first).abs().max() > 1e-2  # the guidance did change the logits


# ------------------------------------------------------------------------------ the paper's components
# Each component on its own, beside a plain added vector at one site.
OPTIONS = {"film": {"modulation": "film"}, "prior": {"prior": True, "modulation": "add"},
           "two layers": {"extra_inject_layers": [1], "modulation": "add"}}


def _guided_logits(lm, hypernet, questions, answers):
    with GuidedStudent(lm, hypernet) as guided:
        return guided.teacher_forced(questions, answers, guided.guidance_vectors(questions), [])[1]


@pytest.mark.parametrize("option", OPTIONS)
def test_each_component_is_the_plain_student_at_zero_output_and_changes_the_logits_once_trained(tiny_lm, task_table,
                                                                                               option):
    from pilot.sequences import lengths_to_mask, next_token_loss

    rows = task_table[task_table["split"] == "train"].head(8)
    questions, answers = rows["question"].tolist(), rows["answer"].tolist()
    hypernet = HyperNetwork(HyperNetConfig(hidden_size=tiny_lm.hidden_size, num_layers=tiny_lm.num_layers,
                                           inject_layer=0, mlp_hidden=16, **OPTIONS[option]))
    assert hypernet.config.guidance_size == tiny_lm.hidden_size * (1 if option == "prior" else 2)
    with GuidedStudent(tiny_lm, hypernet) as guided:
        plain = guided.teacher_forced(questions, answers, None, [])[1]
        untrained = guided.teacher_forced(questions, answers, guided.guidance_vectors(questions), [])[1]
        assert torch.equal(untrained, plain)  # zero output: the plain student
        optimizer = torch.optim.Adam(hypernet.parameters(), lr=0.05)
        states, lengths = guided.query_states(questions)
        for _ in range(3):  # a few steps of the stage-1 language-modelling term
            vectors = hypernet(states, lengths_to_mask(lengths, states.shape[1]))
            batch, logits, _ = guided.teacher_forced(questions, answers, vectors, [])
            next_token_loss(logits, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
    trained = _guided_logits(tiny_lm, hypernet, questions, answers)
    assert (trained - plain).abs().max() > 1e-3


def test_film_scales_and_shifts_the_hidden_state_at_each_site(tiny_lm, task_table):
    """g holds, per site, a scale then a shift: h <- h (1 + s gamma) + s rms(h) beta, at that site only."""
    batch = encode_pairs(tiny_lm.tokenizer, [answer_prompt(q) for q in task_table["question"][:2]], [" 1", " 2"])
    d = tiny_lm.hidden_size
    gamma, beta = torch.randn(2, d), torch.randn(2, d)
    film = GuidanceInjector(tiny_lm.model, 0, 0.5, extra_layers=[1], modulation="film")
    vectors = torch.cat([torch.zeros(2, 2 * d), gamma, beta], dim=1)  # site 0 (layer 0) zero, site 1 (layer 1) set
    with torch.no_grad(), capture_layers(tiny_lm.model, [0, 1]) as plain:
        tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    plain = {k: v.clone() for k, v in plain.items()}
    with torch.no_grad(), film.guide(vectors), capture_layers(tiny_lm.model, [0, 1]) as guided:
        tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    film.remove()
    assert torch.equal(guided[0], plain[0])  # layer 0's slice is zero
    h = plain[1]
    rms = h.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(guided[1], h * (1 + 0.5 * gamma[:, None]) + 0.5 * rms * beta[:, None])
    with pytest.raises(InterventionError, match="need 128"):
        with GuidanceInjector(tiny_lm.model, 0, 1.0, extra_layers=[1], modulation="film") as wrong, \
                wrong.guide(torch.zeros(2, d)):
            tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


def test_the_prior_is_the_same_guidance_for_every_query(tiny_lm, task_table):
    hypernet = HyperNetwork(HyperNetConfig(hidden_size=tiny_lm.hidden_size, num_layers=tiny_lm.num_layers,
                                           mlp_hidden=16, prior=True))
    torch.nn.init.normal_(hypernet.prior)
    with GuidedStudent(tiny_lm, hypernet) as guided:
        vectors = guided.guidance_vectors(task_table["question"][:4].tolist())
    assert torch.equal(vectors, hypernet.prior.detach().expand(4, -1))  # the query part is still zero
