import pytest
import torch

from pilot.generation import Guidance, generate
from pilot.guidance import GuidanceInjector, HyperNetConfig, HyperNetwork, capture_layers, last_token_states
from pilot.models import build_causal_lm, decoder_layers, load_causal_lm
from pilot.prompts import answer_prompt
from pilot.sequences import encode_pairs


def _hypernet(lm, reader="mean", inject_layer=0, scale=1.0):
    return HyperNetwork(HyperNetConfig(hidden_size=lm.hidden_size, num_layers=lm.num_layers, read_layer=-1,
                                       inject_layer=inject_layer, reader=reader, mlp_hidden=16,
                                       attention_heads=2, guidance_scale=scale))


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
    plain = generate(tiny_lm, prompts, max_new_tokens=6, batch_size=5)
    hypernet = _hypernet(tiny_lm)  # zero-initialised output layer: g = 0
    injector = GuidanceInjector(tiny_lm.model, 0, 1.0)
    guided = generate(tiny_lm, prompts, max_new_tokens=6, batch_size=5, guidance=Guidance(injector, hypernet=hypernet))
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
    with pytest.raises(ValueError, match="unreadable"):
        HyperNetwork.load(tmp_path / "h")


def test_config_rejects_layers_outside_the_student():
    with pytest.raises(ValueError, match="inject_layer=5 is outside"):
        HyperNetConfig(hidden_size=32, num_layers=2, inject_layer=5).validate()


def test_models_round_trip_through_save_pretrained(tiny_lm, tmp_path):
    tiny_lm.save(tmp_path / "m")
    loaded = load_causal_lm(tmp_path / "m")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.get_vocab() == tiny_lm.tokenizer.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(tiny_lm.model.state_dict().values(), loaded.model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="kedro run --pipeline base"):
        load_causal_lm(tmp_path / "missing")
