"""Adapter architectures and reduced draft vocabularies: each round-trips through save/load, decodes
losslessly on the engine, and bad adapters fail with a message naming what is wrong. CPU, fp32."""
import json

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext.adapter import ARCHITECTURES, MAX_BLOCKS, WEIGHTS_NAME
from kangaroo_ext.engine.engine import ADAPTER_SLOTS, Engine
from kangaroo_ext.engine.spec import model_spec

from models import prompts, tiny_model

VOCAB = 111


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_the_engine_keeps_a_cache_slot_for_every_adapter_block():
    assert ADAPTER_SLOTS == MAX_BLOCKS


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@torch.inference_mode()
def test_every_architecture_round_trips_and_is_lossless(model, architecture, tmp_path):
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="random", seed=5, architecture=architecture)
    adapter.save_pretrained(tmp_path / "a")
    back = kx.Adapter.from_pretrained(str(tmp_path / "a"))
    assert back.architecture == architecture and back.config == json.loads(json.dumps(adapter.config))
    for (n1, p1), (n2, p2) in zip(adapter.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    for p in prompts(3, seed=31):
        ref = kx.generate(model, p, max_new_tokens=24, eos_token_id=[]).sequences
        for a in (adapter, back):
            out = kx.speculative_generate(model, p, adapter=a, max_new_tokens=24, threshold=0.0, max_draft=4,
                                          eos_token_id=[])
            assert torch.equal(out.sequences, ref)


def test_architectures_have_the_documented_parameters(model):
    spec = model_spec(model)
    counts = {a: sum(p.numel() for p in kx.Adapter.for_model(model, 2, architecture=a).parameters())
              for a in ARCHITECTURES}
    layer = sum(t.numel() for t in vars(spec.layers[2]).values() if isinstance(t, torch.Tensor))
    H = spec.hidden_size
    assert counts["decoder"] == layer + H               # one target layer plus the final norm
    assert counts["decoder2"] == 2 * layer + H
    assert counts["kangaroo"] < counts["decoder"]


def test_next_layer_init_copies_the_following_layers(model):
    spec = model_spec(model)
    a = kx.Adapter.for_model(model, exit_layer=2, architecture="decoder2")
    assert torch.equal(a.blocks[0].gate_proj.weight, spec.layers[2].gate)
    assert torch.equal(a.blocks[1].q_proj.weight, spec.layers[3].q)
    assert torch.equal(a.final_norm, spec.final_norm)


# ---- reduced draft vocabulary ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 40, VOCAB])
@torch.inference_mode()
def test_a_reduced_draft_vocabulary_is_lossless(model, n):
    g = torch.Generator().manual_seed(n)
    ids = torch.randperm(VOCAB, generator=g)[:n]
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer").with_draft_vocab(ids)
    assert adapter.config["draft_vocab_size"] == n
    for p in prompts(3, seed=32):
        ref = kx.generate(model, p, max_new_tokens=24, eos_token_id=[]).sequences
        out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=24, threshold=0.0, max_draft=4,
                                      eos_token_id=[])
        assert torch.equal(out.sequences, ref)


@torch.inference_mode()
def test_the_draft_only_proposes_tokens_of_its_vocabulary(model):
    ids = torch.tensor([3, 17, 42, 99, 100])
    adapter = kx.Adapter.for_model(model, exit_layer=2).with_draft_vocab(ids)
    engine = Engine(model_spec(model))
    engine.reserve(64, 4)
    engine.bind_adapter(adapter)
    assert engine.draft_head.shape == (5, model.config.hidden_size) and engine.draft_head.is_contiguous()
    assert torch.equal(engine.draft_head, model.lm_head.weight[ids])
    engine.prefill(torch.tensor([[5, 6, 7]]), speculative=True)
    engine.begin_round()
    for j in range(4):
        engine.draft_step(j, 4)
    assert set(engine.draft_tokens[0].tolist()) <= set(ids.tolist())


def test_draft_vocabulary_round_trips_and_can_be_removed(model, tmp_path):
    ids = torch.tensor([9, 1, 50])
    a = kx.Adapter.for_model(model, exit_layer=1).with_draft_vocab(ids)
    a.save_pretrained(tmp_path / "v")
    back = kx.Adapter.from_pretrained(str(tmp_path / "v"))
    assert torch.equal(back.draft_vocab_ids, ids)
    back.with_draft_vocab(None)
    assert back.draft_vocab_ids is None and "draft_vocab_size" not in back.config


@pytest.mark.parametrize("ids,message", [
    (torch.tensor([0, 5, VOCAB]), r"draft vocabulary ids must lie in \[0, 111\)"),
    (torch.tensor([-1, 5]), r"draft vocabulary ids must lie in \[0, 111\)"),
    (torch.tensor([4, 4, 5]), "draft vocabulary ids must be distinct"),
    (torch.arange(VOCAB + 1) % VOCAB, r"draft vocabulary size must be an int in \[1, 111\]"),
    (torch.tensor([], dtype=torch.int64), r"draft vocabulary size must be an int in \[1, 111\]"),
])
def test_bad_draft_vocabularies_are_refused(model, ids, message):
    with pytest.raises(ValueError, match=message):
        kx.Adapter.for_model(model, exit_layer=1).with_draft_vocab(ids)


def _saved(model, tmp_path, **config_changes):
    a = kx.Adapter.for_model(model, exit_layer=1).with_draft_vocab(torch.tensor([1, 2, 3]))
    a.save_pretrained(tmp_path / "x")
    cfg_path = tmp_path / "x" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config_changes)
    cfg_path.write_text(json.dumps(cfg))
    return str(tmp_path / "x")


def test_a_config_whose_vocabulary_does_not_fit_the_model_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match=r"draft vocabulary size must be an int in \[1, 111\]"):
        kx.Adapter.from_pretrained(_saved(model, tmp_path, draft_vocab_size=500))


def test_a_saved_id_map_outside_the_vocabulary_is_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file
    path = _saved(model, tmp_path)
    state = load_file(f"{path}/{WEIGHTS_NAME}")
    state["draft_vocab"] = torch.tensor([1, 2, 4000])
    save_file(state, f"{path}/{WEIGHTS_NAME}")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 111\)"):
        kx.Adapter.from_pretrained(path)


def test_an_unknown_architecture_is_named(model, tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'medusa'; known: kangaroo, decoder, decoder2"):
        kx.Adapter.read_config(_saved(model, tmp_path, architecture="medusa"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_or_truncated_weights_file_is_named(model, tmp_path, damage):
    path = _saved(model, tmp_path)
    weights = tmp_path / "x" / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    with pytest.raises(ValueError, match="adapter.safetensors is corrupt or truncated"):
        kx.Adapter.from_pretrained(path)


def test_a_decoder_adapter_for_another_mlp_size_is_refused(model):
    other = tiny_model("llama", hidden=64, heads=4, kv_heads=2, seed=1)
    adapter = kx.Adapter.for_model(model, exit_layer=2, architecture="decoder")
    adapter.config["target"] = dict(adapter.config["target"], intermediate_size=999,
                                    fingerprint=model_spec(other).fingerprint())
    with pytest.raises(ValueError, match="intermediate_size=999"):
        adapter.check_compatible(model_spec(other))


def test_alternating_adapters_reuse_their_bindings(model):
    """Two adapters used in turn keep their bindings (the sliced draft head is made once each), so
    alternating neither re-slices the head nor, on a GPU, re-captures the graphs."""
    a = kx.Adapter.for_model(model, exit_layer=1).with_draft_vocab(torch.arange(20))
    b = kx.Adapter.for_model(model, exit_layer=2)
    engine = Engine(model_spec(model))
    engine.bind_adapter(a)
    head_a = engine.draft_head
    engine.bind_adapter(b)
    assert engine.draft_head is model_spec(model).lm_head or engine.draft_head.shape[0] == VOCAB
    engine.bind_adapter(a)
    assert engine.draft_head is head_a and engine.adapter is a
    for i in range(Engine.MAX_BOUND_ADAPTERS + 1):  # the cache is bounded
        engine.bind_adapter(kx.Adapter.for_model(model, exit_layer=1, init="random", seed=i))
    assert len(engine._bindings) == Engine.MAX_BOUND_ADAPTERS


def test_an_evicted_adapters_graphs_go_with_its_binding(model):
    """Graphs replay the bound adapter's weights, and a later adapter may get an evicted one's id(): when a
    binding leaves the bounded cache, the decode and prefill graphs keyed by its adapter leave with it (stand-in
    entries under the keys the engine builds; the other adapters' and plain decoding's stay)."""
    from kangaroo_ext.engine import prefill
    engine = Engine(model_spec(model))
    adapters = [kx.Adapter.for_model(model, exit_layer=1, init="random", seed=i)
                for i in range(Engine.MAX_BOUND_ADAPTERS + 1)]
    for a in adapters[:Engine.MAX_BOUND_ADAPTERS]:
        engine.bind_adapter(a)
        for key in (engine._graphs_key(3, True, True), prefill.graphs_key(engine, True)):
            engine._graphs[key] = ("graphs of", id(a))
    plain = (engine._graphs_key(0, False, False), prefill.graphs_key(engine, False))
    engine._graphs.update({key: "plain" for key in plain})
    engine.bind_adapter(adapters[-1])  # evicts adapters[0]'s binding
    owners = [g[1] for g in engine._graphs.values() if g != "plain"]
    assert id(adapters[0]) not in owners
    assert sorted(owners) == sorted(2 * [id(a) for a in adapters[1:Engine.MAX_BOUND_ADAPTERS]])
    assert all(engine._graphs[key] == "plain" for key in plain)


@torch.inference_mode()
def test_a_sampled_draft_keeps_q_over_the_full_vocabulary(model):
    """With a reduced draft vocabulary, q (what the accept rule divides by) is the draft's distribution
    laid over the full vocabulary: a probability on the draft's tokens, exactly 0 elsewhere."""
    from kangaroo_ext.engine.engine import Sampling
    ids = torch.tensor([3, 17, 42, 99, 100])
    adapter = kx.Adapter.for_model(model, exit_layer=2).with_draft_vocab(ids)
    engine = Engine(model_spec(model))
    engine.reserve(64, 3)
    engine.bind_adapter(adapter)
    engine.set_sampling(Sampling(temperature=1.0))
    engine.seed(7)
    engine.prefill(torch.tensor([[5, 6, 7]]), speculative=True)
    engine.begin_round()
    for j in range(3):
        engine.draft_step(j, 3)
    q = engine.draft_probs[0]                                       # [γ, V]
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.all(q[:, outside] == 0) and torch.allclose(q.sum(-1), torch.ones(3))
    assert set(engine.draft_tokens[0].tolist()) <= set(ids.tolist())
