"""KANGAROO_PREFILL_GRAPHS: the prompt fed in fixed-size chunks, each a captured graph (engine/prefill.py).

CPU: the chunk plan's invariants over every prompt length and cache end, its argument check, and the chunked
prefill run eagerly (the graphs' own chunk body) against the one-pass prefill: the same caches to fp32
rounding, padded rows full of junk tokens included, and the same tokens after it. GPU: with the switch on,
fp32 decoding equals transformers' greedy output and bf16 Kangaroo equals plain decoding, prompts of every
chunk shape (no prefill, one padded chunk, full chunks, full chunks and a padded one) through captured chunks."""
import copy

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext.engine.engine import Engine
from kangaroo_ext.engine.prefill import CHUNK_SIZES, SWITCH, PrefillGraphs, chunk_plan, graphs_key, prefill_eager
from kangaroo_ext.engine.spec import model_spec

from models import tiny_model


def _check_plan(n, start, capacity):
    plan = chunk_plan(n, start, capacity)
    assert sum(real for _, real in plan) == n
    pos = start
    for i, (size, real) in enumerate(plan):
        assert 1 <= real <= size and pos + size <= capacity, (n, start, capacity, plan)
        if i < len(plan) - 1:  # only the last chunk is padded or off the captured sizes
            assert size == real and size in CHUNK_SIZES, (n, start, capacity, plan)
        else:
            assert size in CHUNK_SIZES or size == real, (n, start, capacity, plan)
        pos += real
    return plan


def test_chunk_plan_covers_every_prompt_inside_the_cache():
    for n in range(0, 700):
        for slack in (0, 1, 5, 15, 16, 63, 64, 300):
            _check_plan(n, 0, n + slack)
    for start in (1, 37, 256):
        for n in (0, 1, 16, 17, 300):
            _check_plan(n, start, start + n + 3)


def test_chunk_plan_takes_the_fewest_chunks_where_the_cache_has_room():
    assert chunk_plan(0, 0, 100) == []
    assert chunk_plan(10, 0, 1000) == [(16, 10)]
    assert chunk_plan(16, 0, 1000) == [(16, 16)]
    assert chunk_plan(17, 0, 1000) == [(64, 17)]
    assert chunk_plan(600, 0, 1000) == [(256, 256), (256, 256), (256, 88)]
    # near the cache's end the padding may not cross it: full smaller chunks, then an unpadded rest
    assert chunk_plan(20, 0, 22) == [(16, 16), (4, 4)]
    assert chunk_plan(300, 0, 310) == [(256, 256), (16, 16), (16, 16), (12, 12)]


@pytest.mark.parametrize("n, start, capacity", [(-1, 0, 10), (5, -1, 10), (11, 0, 10), (5, 6, 10)])
def test_chunk_plan_names_what_it_expected(n, start, capacity):
    with pytest.raises(ValueError, match="start \\+ n <= capacity"):
        chunk_plan(n, start, capacity)


class EagerChunks(PrefillGraphs):
    """The captured chunks' bookkeeping with each chunk run eagerly (no graphs on a CPU)."""

    def run(self, tokens, replay=None):
        super().run(tokens, replay=self.chunk)


def _engine(model, capacity, speculative):
    engine = Engine(model_spec(model))
    engine.reserve(capacity, 1)
    if speculative:
        engine.bind_adapter(kx.Adapter.for_model(model, exit_layer=2, init="next_layer"))
    return engine


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "kangaroo"])
@pytest.mark.parametrize("n", [5, 16, 17, 70, 300])
@torch.inference_mode()
def test_chunked_prefill_fills_the_cache_as_one_pass_does(speculative, n):
    """The graphs' chunk body, run eagerly on the CPU: every slot's cache rows of the prompt's positions equal
    the one-pass prefill's to fp32 rounding (another summation order over the chunks), the padding rows of
    the last chunk hold junk tokens and change nothing, and cache_len ends at the prompt's length."""
    model = tiny_model("llama", layers=4)
    tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    one_pass = _engine(model, n + 1, speculative)
    one_pass.cache_len.zero_()
    prefill_eager(one_pass, tokens, speculative)
    chunked = _engine(model, n + 1, speculative)
    graphs = PrefillGraphs(chunked, speculative)
    graphs.tokens.random_(0, model.config.vocab_size)  # junk in the padding rows
    chunked.cache_len.zero_()
    graphs.run(tokens, replay=graphs.chunk)
    assert chunked.cache_len.tolist() == [n]
    for name in ("k_cache", "v_cache"):
        want, got = getattr(one_pass, name)[..., :n, :], getattr(chunked, name)[..., :n, :]
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale, name


@torch.inference_mode()
def test_chunked_prefill_then_decoding_gives_the_one_pass_tokens(monkeypatch):
    """Decoding after a chunked prefill (chunks run eagerly through Engine.prefill's captured branch) gives the
    one-pass prefill's tokens, plain and Kangaroo, for prompts of every chunk shape."""
    model = copy.deepcopy(tiny_model("llama", layers=4))
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    lengths = (1, 2, 17, 65, 300)
    want = {}
    for T in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        want[T] = (ids, kx.generate(model, ids, max_new_tokens=32, eos_token_id=[]).sequences,
                   kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=32, eos_token_id=[]).sequences)
    # Engine.prefill(captured=True) finds its chunks where graphs_for keeps them: a stand-in there that runs
    # each chunk's body eagerly, so the captured branch's own bookkeeping is what runs here
    original = Engine.prefill

    def chunked_prefill(engine, prompt, speculative, captured=False):
        engine._graphs[graphs_key(engine, speculative)] = EagerChunks(engine, speculative)
        return original(engine, prompt, speculative, captured=True)

    monkeypatch.setattr(Engine, "prefill", chunked_prefill)
    for T, (ids, plain, spec) in want.items():
        assert torch.equal(kx.generate(model, ids, max_new_tokens=32, eos_token_id=[]).sequences, plain), T
        assert torch.equal(kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=32,
                                                   eos_token_id=[]).sequences, spec), T


def test_the_switch_says_why_prefill_is_eager(monkeypatch):
    model = tiny_model("llama", layers=4)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    monkeypatch.delenv(SWITCH, raising=False)
    out = kx.generate(model, ids, max_new_tokens=4, eos_token_id=[])
    assert out.stats.prefill_kernel == "eager" and "without graphs" in out.stats.prefill_graphs_off
    engine = _engine(model, 64, False)
    assert f"{SWITCH} is off" in engine.prefill_graphs_off()
    monkeypatch.setenv(SWITCH, "1")
    assert "need a CUDA device" in engine.prefill_graphs_off()
    assert engine.prepare_prefill(False) == (0.0, engine.prefill_graphs_off())


def test_long_prompts_stay_eager(monkeypatch):
    """Past MAX_CAPTURED_TOKENS one eager pass costs no more than captured chunks: the switch's reason says so."""
    from kangaroo_ext.engine import prefill
    engine = _engine(tiny_model("llama", layers=4), 64, False)
    monkeypatch.setattr(prefill, "graphs_off", lambda e: "")
    assert engine.prefill_graphs_off(prefill.MAX_CAPTURED_TOKENS) == ""
    why = engine.prefill_graphs_off(prefill.MAX_CAPTURED_TOKENS + 1)
    assert f"a prompt of {prefill.MAX_CAPTURED_TOKENS + 1} tokens" in why and "eager" in why


def test_a_failed_capture_leaves_the_prefill_eager_and_says_why(monkeypatch):
    """A capture error (as conditional.py recognises one) while capturing the chunks: the prefill stays eager,
    and why is the reason; any other error propagates."""
    from kangaroo_ext.engine import conditional, prefill
    model = tiny_model("llama", layers=4)
    engine = _engine(model, 64, False)
    monkeypatch.setattr(prefill, "graphs_off", lambda e: "")

    def failing(e, speculative):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(prefill, "graphs_for", failing)
    monkeypatch.setattr(conditional, "is_capture_error", lambda e: "stream is capturing" in str(e))
    seconds, why = engine.prepare_prefill(False)
    assert seconds == 0.0 and why.startswith("capturing the prefill chunks failed") and "capturing" in why
    monkeypatch.setattr(conditional, "is_capture_error", lambda e: False)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        engine.prepare_prefill(False)


# ---- GPU: captured chunks ------------------------------------------------------------------------

LENGTHS = (1, 2, 17, 64, 65, 300, 600)  # no prefill, padded, exactly full, full + padded, 256s + padded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.usefixtures("_prefill_graphs_on")
@torch.inference_mode()
def test_fp32_with_captured_prefill_equals_transformers(family):
    model = copy.deepcopy(tiny_model(family)).cuda()
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    for T in LENGTHS:
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).cuda()
        hf = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones_like(ids))[0, T:].tolist()
        plain = kx.generate(model, ids, max_new_tokens=32, eos_token_id=[])
        spec = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=32, threshold=0.0,
                                       eos_token_id=[])
        assert plain.stats.prefill_kernel == "graphs", plain.stats.prefill_graphs_off
        assert plain.sequences[0, T:].tolist() == hf, f"prompt of {T} tokens"
        assert torch.equal(spec.sequences, plain.sequences), f"prompt of {T} tokens"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("_prefill_graphs_on")
@torch.inference_mode()
def test_bf16_kangaroo_equals_plain_with_captured_prefill():
    heads, kv_heads, head_dim = 9, 3, 64
    model = copy.deepcopy(tiny_model("llama", layers=4, hidden=heads * head_dim, heads=heads, kv_heads=kv_heads))
    model = model.to(torch.bfloat16).cuda()
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    for T in LENGTHS:
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).cuda()
        plain = kx.generate(model, ids, max_new_tokens=200, eos_token_id=[])
        spec = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=200, threshold=0.3,
                                       eos_token_id=[])
        assert spec.stats.prefill_kernel == "graphs", spec.stats.prefill_graphs_off
        assert torch.equal(spec.sequences, plain.sequences), f"prompt of {T} tokens"


@pytest.fixture
def _prefill_graphs_on(monkeypatch):
    monkeypatch.setenv(SWITCH, "1")

