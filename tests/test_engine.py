"""The engine against transformers, and Kangaroo's losslessness against the engine's plain decoding."""
import itertools

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext.engine.engine import Engine, engine_for
from kangaroo_ext.engine.spec import model_spec

from models import FAMILIES, prompts, tiny_model


def engine_logits(model, ids):
    """Logits of every position of ids [1, T] from the engine's own forward (all layers at once)."""
    engine = Engine(model_spec(model))
    engine.reserve(ids.shape[1] + 8, 1)
    pos = torch.arange(ids.shape[1])[None]
    x, res = engine.run_layers(torch.nn.functional.embedding(ids, engine.spec.embed), pos, 0, engine.spec.num_layers)
    return engine.logits(x, res)


MODEL_VARIANTS = {
    "llama-gqa": dict(family="llama"),
    "llama-tied": dict(family="llama", tied=True),
    "llama-mha-headdim48": dict(family="llama", heads=2, kv_heads=2, head_dim=48),
    "llama3-rope": dict(family="llama", rope="llama3"),
    "linear-rope": dict(family="llama", rope="linear"),
    "mistral": dict(family="mistral"),
    "qwen2-bias": dict(family="qwen2"),
}


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
@torch.inference_mode()
def test_engine_logits_match_transformers(variant):
    model = tiny_model(**MODEL_VARIANTS[variant])
    ids = torch.randint(0, 111, (1, 37))
    want = model(ids).logits
    got = engine_logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_engine_uses_the_model_weights_in_place():
    model = tiny_model("qwen2")
    spec = model_spec(model)
    assert spec.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert spec.layers[0].q.data_ptr() == model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert spec.layers[0].q_bias is not None and spec.qkv_bias


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_plain_generate_matches_transformers(family):
    model = tiny_model(family)
    for ids in prompts(3, seed=1, min_len=2):
        ours = kx.generate(model, ids, max_new_tokens=24, eos_token_id=[]).sequences
        hf = model.generate(ids[None], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones_like(ids[None]))
        assert torch.equal(ours, hf)


# ---- lossless: speculative == plain, token for token, fp32 ---------------------------------------

THRESHOLDS = (0.0, 0.6, 1.0)
MAX_DRAFTS = (1, 3, 6)
EXIT_LAYERS = (1, 2, 3)  # 3 is the middle of the 6-layer test model


@pytest.mark.parametrize("mode", ["host", "device"])
@torch.inference_mode()
def test_speculative_is_lossless_over_the_grid(mode):
    """Every (η, γ, ℓ) in the grid, with random adapters and layer-copy adapters (which accept often,
    so multi-token commits are exercised), on prompts that rotate through 20 prompts x 64 tokens."""
    model = tiny_model("llama", layers=6)
    cases = prompts(20, seed=2)
    plain = [kx.generate(model, p, max_new_tokens=64, eos_token_id=[]).sequences for p in cases]
    # host mode: 2 prompts with a random adapter + 1 with a layer copy per combination; device mode
    # (γ+1 draft steps every round, the GPU's schedule) 1 prompt per combination, alternating inits.
    runs = [("random", 0), ("random", 1), ("next_layer", 2)] if mode == "host" else [(None, 0)]
    accepted_any, covered = 0, set()
    for combo, (eta, gamma, ell) in enumerate(itertools.product(THRESHOLDS, MAX_DRAFTS, EXIT_LAYERS)):
        for init, r in runs:
            init = init or ("random", "next_layer")[combo % 2]
            i = (combo * len(runs) + r) % len(cases)
            covered.add(i)
            adapter = kx.Adapter.for_model(model, exit_layer=ell, init=init, seed=combo)
            # the adapter's rounds alone (copied drafts, on by default in host mode: tests/test_copy_draft.py)
            out = kx.speculative_generate(model, cases[i], adapter=adapter, max_new_tokens=64, threshold=eta,
                                          max_draft=gamma, eos_token_id=[], mode=mode, copy_draft=False)
            assert torch.equal(out.sequences, plain[i]), f"η={eta} γ={gamma} ℓ={ell} init={init} prompt {i}"
            s = out.stats
            assert s.new_tokens == 64 and len(s.accepted) == s.rounds == len(s.drafted)
            assert all(0 <= a <= d <= gamma for a, d in zip(s.accepted, s.drafted))
            accepted_any += sum(s.accepted)
    assert accepted_any > 0, "no draft was ever accepted: the accept path went untested"
    assert len(covered) == 20 if mode == "host" else len(covered) >= 20


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@torch.inference_mode()
def test_speculative_is_lossless_on_other_families(family):
    model = tiny_model(family, tied=family == "qwen2")
    for i, p in enumerate(prompts(6, seed=3)):
        ref = kx.generate(model, p, max_new_tokens=48, eos_token_id=[]).sequences
        adapter = kx.Adapter.for_model(model, exit_layer=1 + i % 4, init="next_layer")
        out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=48, threshold=0.3,
                                      max_draft=4, eos_token_id=[], mode="device" if i % 2 else "host")
        assert torch.equal(out.sequences, ref)


@torch.inference_mode()
def test_eos_and_max_new_tokens_are_exact():
    model = tiny_model("llama")
    p = prompts(2, seed=4)[1]
    free = kx.generate(model, p, max_new_tokens=64, eos_token_id=[]).sequences[0, len(p):].tolist()
    eos = free[17]  # a token that occurs mid-generation: output must stop right after its first occurrence
    first = free.index(eos)
    adapter = kx.Adapter.for_model(model, exit_layer=4, init="next_layer")
    for n in (1, 2, 7, 63):
        for mode in ("host", "device"):
            out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=n, threshold=0.0, max_draft=6,
                                          eos_token_id=[], mode=mode)
            assert out.sequences[0, len(p):].tolist() == free[:n]
    for mode in ("host", "device"):
        out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=64, threshold=0.0, max_draft=6,
                                      eos_token_id=eos, mode=mode)
        assert out.sequences[0, len(p):].tolist() == free[:first + 1]
        assert kx.generate(model, p, max_new_tokens=64, eos_token_id=[5, eos]).sequences[0, len(p):].tolist() == \
            free[:min(first, free.index(5) if 5 in free else 99) + 1]


@torch.inference_mode()
def test_rollback_keeps_exactly_the_accepted_cache():
    """After speculative decoding, the committed part of every cache equals what plain decoding wrote,
    and the device lengths agree with the emitted tokens."""
    model = tiny_model("llama")
    p = prompts(3, seed=5)[2]
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=40, threshold=0.0, max_draft=5,
                                  eos_token_id=[], mode="device")
    engine = engine_for(model)
    L = out.sequences.shape[1]                                   # max_new_tokens is a multiple of no round:
    committed = len(p) + sum(a + 1 for a in out.stats.accepted)  # the last round may commit past it
    assert int(engine.cache_len[0]) == committed - 1, "cache holds every committed token but the last"
    if committed == L:
        assert int(engine.tokens_in[0, 0]) == int(out.sequences[0, -1])
    spec_k = engine.k_cache[:engine.spec.num_layers, :, :, :L - 1].clone()
    kx.generate(model, p, max_new_tokens=40, eos_token_id=[], mode="device")
    plain_k = engine.k_cache[:engine.spec.num_layers, :, :, :L - 1]
    torch.testing.assert_close(spec_k, plain_k, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_streamer_receives_prompt_then_every_token():
    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, t):
            self.parts.append(t.tolist())

        def end(self):
            self.ended = True

    model = tiny_model("llama")
    p = prompts(2, seed=6)[1]
    s = Collect()
    out = kx.speculative_generate(model, p, adapter=kx.Adapter.for_model(model, 3), max_new_tokens=30,
                                  eos_token_id=[], streamer=s)
    assert s.ended and s.parts[0] == p.tolist()
    assert sum(s.parts[1:], []) == out.sequences[0, len(p):].tolist()


@torch.inference_mode()
def test_stats_are_consistent():
    model = tiny_model("llama")
    out = kx.speculative_generate(model, prompts(2, seed=7)[1], adapter=kx.Adapter.for_model(model, 3),
                                  max_new_tokens=50, threshold=0.0, max_draft=4, eos_token_id=[], mode="device")
    s = out.stats
    assert s.host_syncs == s.rounds and s.host_syncs_per_round == 1.0
    assert s.mean_accepted == pytest.approx((sum(s.accepted) + s.rounds) / s.rounds)
    assert 1.0 <= s.mean_accepted <= 5.0
    assert len(s.acceptance_by_position(4)) == 4
    plain = kx.generate(model, prompts(2, seed=7)[1], max_new_tokens=50, eos_token_id=[]).stats
    assert plain.mean_accepted == 1.0 and plain.rounds == 50


def test_draft_budget_follows_the_drafts_seen():
    from kangaroo_ext.engine.rounds import next_budget
    assert next_budget(6, 0, 6) == 1          # nothing drafted: one step next time
    assert next_budget(1, 1, 6) == 2          # the whole budget was used: double it
    assert next_budget(4, 4, 6) == 6          # ... up to γ
    assert next_budget(6, 2, 6) == 3          # stopped at 2: 3 next time


@pytest.mark.parametrize("adaptive", [True, False])
@torch.inference_mode()
def test_adaptive_draft_budget_is_lossless(adaptive):
    model = tiny_model("llama")
    for i, p in enumerate(prompts(6, seed=8)):
        ref = kx.generate(model, p, max_new_tokens=48, eos_token_id=[]).sequences
        adapter = kx.Adapter.for_model(model, exit_layer=2 + i % 3, init="next_layer" if i % 2 else "random")
        out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=48, threshold=0.3, max_draft=6,
                                      eos_token_id=[], mode="device", adaptive_draft=adaptive)
        assert torch.equal(out.sequences, ref)
        if not adaptive:
            continue
        budget = 6  # replay the policy: no round may have drafted more than its budget
        from kangaroo_ext.engine.rounds import next_budget
        for d in out.stats.drafted:
            assert d <= budget
            budget = next_budget(budget, d, 6)


@torch.inference_mode()
def test_greedy_verify_never_materializes_logits(monkeypatch):
    """Greedy verification takes the target's tokens from the fused LM head + argmax (as a plain step
    does) and ops.accept_greedy: Engine.logits ([B, k+1, V]) is never called, in host and device
    rounds, with and without copied drafts, and the output still equals plain decoding. Sampled
    verification still scores the drafts with Engine.logits."""
    model = tiny_model("llama")
    p = prompts(3, seed=11)[2]
    ref = kx.generate(model, p, max_new_tokens=40, eos_token_id=[]).sequences
    calls = {"logits": 0, "accept_greedy": 0}
    logits, accept_greedy = Engine.logits, kx.ops.accept_greedy

    def refuse(self, x, res):
        raise AssertionError("greedy verification materialized the [B, k+1, V] logits")

    def counting_accept(*args, **kwargs):
        calls["accept_greedy"] += 1
        return accept_greedy(*args, **kwargs)

    monkeypatch.setattr(Engine, "logits", refuse)
    monkeypatch.setattr(kx.ops, "accept_greedy", counting_accept)
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    for mode, copy_draft in (("host", False), ("host", True), ("device", False)):
        out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=40, threshold=0.0, max_draft=4,
                                      eos_token_id=[], mode=mode, copy_draft=copy_draft)
        assert torch.equal(out.sequences, ref), f"mode={mode} copy_draft={copy_draft}"
        assert sum(out.stats.accepted) > 0, "no draft accepted: the accept path went untested"
    assert calls["accept_greedy"] > 0

    def counting_logits(self, x, res):
        calls["logits"] += 1
        return logits(self, x, res)

    monkeypatch.setattr(Engine, "logits", counting_logits)
    kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=16, threshold=0.0, max_draft=4,
                            eos_token_id=[], do_sample=True, seed=0)
    assert calls["logits"] > 0, "the sampled verify path no longer scores drafts with Engine.logits"


@torch.inference_mode()
def test_greedy_draft_steps_take_their_draft_in_one_op(monkeypatch):
    """Every greedy proposal (a draft step j < γ, a copied chain's extension) is recorded by exactly one
    ops.take_draft, which also maps a reduced draft vocabulary's indices to token ids: the output still
    equals plain decoding, in host and device rounds, with and without copied drafts. Sampled drafts
    never use it (their q needs the torch path)."""
    model = tiny_model("llama")
    p = prompts(3, seed=12)[2]
    ref = kx.generate(model, p, max_new_tokens=40, eos_token_id=[]).sequences
    calls = {"take_draft": 0, "proposals": 0}
    take_draft, draft_step, draft_copied = kx.ops.take_draft, Engine.draft_step, Engine.draft_copied

    def counting_take(*args, **kwargs):
        calls["take_draft"] += 1
        keep = take_draft(*args, **kwargs)
        draft_tokens, step = args[5], args[7]
        assert torch.isin(draft_tokens[:, step], ids).all(), "a draft's index was not mapped to its token id"
        return keep

    def counting_step(self, j, gamma):
        calls["proposals"] += j < gamma
        return draft_step(self, j, gamma)

    def counting_copied(self, tokens, k, extend):
        calls["proposals"] += extend
        return draft_copied(self, tokens, k, extend)

    monkeypatch.setattr(kx.ops, "take_draft", counting_take)
    monkeypatch.setattr(Engine, "draft_step", counting_step)
    monkeypatch.setattr(Engine, "draft_copied", counting_copied)
    # A reduced draft vocabulary in shuffled order (index != token id) that holds the answer's tokens
    answer = ref[0, len(p):].unique()
    rest = torch.tensor([t for t in range(111) if t not in answer.tolist()][:20])
    ids = torch.cat([answer, rest])[torch.randperm(len(answer) + 20, generator=torch.Generator().manual_seed(3))]
    adapter = kx.Adapter.for_model(model, exit_layer=4, init="next_layer").with_draft_vocab(ids)
    accepted = 0
    for mode, copy_draft in (("host", False), ("host", True), ("device", False)):
        before = dict(calls)
        out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=40, threshold=0.0, max_draft=4,
                                      eos_token_id=[], mode=mode, copy_draft=copy_draft)
        assert torch.equal(out.sequences, ref), f"mode={mode} copy_draft={copy_draft}"
        proposals = calls["proposals"] - before["proposals"]
        assert proposals > 0 and calls["take_draft"] - before["take_draft"] == proposals, (mode, copy_draft, calls)
        accepted += sum(out.stats.accepted) if not copy_draft else 0
    assert accepted > 0, "no adapter draft accepted: the drafts' token ids went untested"
    before = calls["take_draft"]
    kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=16, threshold=0.0, max_draft=4,
                            eos_token_id=[], do_sample=True, seed=0)
    assert calls["take_draft"] == before, "a sampled draft went through ops.take_draft"
