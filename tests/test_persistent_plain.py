"""A whole plain step as one launch of the persistent draft kernel (kangaroo_ext/engine/persistent_plain.py,
behind KANGAROO_PERSISTENT_PLAIN_STEP). On the CPU: the construction (layers 0..N-2 as exit layers, N-1 as the
block, the model's head, γ 1, η +inf) run through ops.persistent_draft's reference leaves exactly the per-op
plain step's token and caches; the switch and its reasons. On a GPU: the kernel's launch is bitwise the per-op
plain step, and generation with the switch on is plain generation, token for token."""
import copy

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext.engine.engine import engine_for
from kangaroo_ext.engine.persistent_plain import SWITCH, PersistentPlainStep

from models import tiny_model
from test_persistent_draft import KERNEL_MODES, eligible_model, kernel_switches

CUDA = torch.cuda.is_available() and kx._extension.loaded()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the extension")


def _after_prefill(model, prompt_len, seed=0, capacity=64):
    """The engine of `model` after a plain prefill of a random prompt: a plain step is next."""
    engine = engine_for(model)
    engine.reserve(capacity, 1)
    engine.set_sampling(None)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(engine.spec.device)
    engine.prefill(prompt, speculative=False)
    return engine


def _plain_state(engine):
    n = engine.spec.num_layers   # the adapter's slots past N are not the plain step's
    return {"cache_len": engine.cache_len.clone(), "k_cache": engine.k_cache[:n].clone(),
            "v_cache": engine.v_cache[:n].clone()}


def _per_op_then_kernel(engine, run_kernel):
    """(per-op step's state and token, the kernel's) from the same start; the step's cache slot is poisoned
    before the kernel runs, so a launch that writes nothing cannot pass."""
    start = {n: getattr(engine, n).clone() for n in ("cache_len", "tokens_in", "k_cache", "v_cache", "history")}
    engine.plain_step()
    want, want_token = _plain_state(engine), engine.tokens_in[:, :1].clone()
    for n, t in start.items():
        getattr(engine, n).copy_(t)
    pos, n = int(engine.cache_len[0]), engine.spec.num_layers
    engine.k_cache[:n, :, :, pos].fill_(1234.0)
    engine.v_cache[:n, :, :, pos].fill_(1234.0)
    step = PersistentPlainStep(engine)
    step.token.fill_(-1)
    run_kernel(step)
    got = _plain_state(engine)
    got["cache_len"] = got["cache_len"] + 1  # the kernel leaves the commit (the length) to accept_commit
    return want, want_token, got, step.token


@pytest.mark.parametrize("layers,prompt_len", [(2, 5), (4, 9), (5, 30)])
@torch.inference_mode()
def test_the_construction_is_the_plain_step_by_the_reference(layers, prompt_len, monkeypatch):
    """fp32 on the CPU: ops.persistent_draft's reference run with PersistentPlainStep's arguments appends the
    per-op plain step's K/V in every layer and proposes its token, and stops after step 0 (nothing kept)."""
    monkeypatch.delenv(SWITCH, raising=False)
    engine = _after_prefill(tiny_model("llama", layers=layers), prompt_len)
    want, want_token, got, token = _per_op_then_kernel(engine, lambda s: s.launch(backend="reference"))
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs"
    assert torch.equal(token, want_token)


def test_off_by_default_and_the_reasons(monkeypatch):
    model = tiny_model("llama", layers=4)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    monkeypatch.delenv(SWITCH, raising=False)
    off = kx.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert off.stats.plain_kernel == "per-op" and f"{SWITCH} is off" in off.stats.plain_kernel_off
    monkeypatch.setenv(SWITCH, "1")
    on = kx.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert on.stats.plain_kernel == "per-op" and "not on a GPU" in on.stats.plain_kernel_off
    assert torch.equal(on.sequences, off.sequences)
    sampled = kx.generate(model, ids, max_new_tokens=4, eos_token_id=[], do_sample=True, seed=3)
    assert "sampling" in sampled.stats.plain_kernel_off
    spec = kx.speculative_generate(model, ids, adapter=kx.Adapter.for_model(model, exit_layer=2, init="next_layer"),
                                   max_new_tokens=4, eos_token_id=[])
    assert spec.stats.plain_kernel == ""   # speculative rounds: not a plain decoding run


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape,prompt_len", [("default", 9), ("three_kv_heads", 150), ("three_kv_heads", 420)])
@pytest.mark.parametrize("mode", list(KERNEL_MODES))
@torch.inference_mode()
def test_cuda_launch_is_bitwise_the_per_op_plain_step(shape, prompt_len, mode, monkeypatch):
    """bf16: one launch leaves the per-op plain step's token and every layer's K/V, bit for bit, for short
    contexts and for contexts whose keys the attention plan splits over several blocks."""
    monkeypatch.delenv(SWITCH, raising=False)
    kw = {} if shape == "default" else dict(heads=6, kv_heads=3, hidden=384, inter=512)
    model = copy.deepcopy(eligible_model(**kw)).to(torch.bfloat16).cuda()
    engine = _after_prefill(model, prompt_len, capacity=512)
    with kernel_switches(mode):
        want, want_token, got, token = _per_op_then_kernel(engine, lambda s: s.launch())
        torch.cuda.synchronize()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs"
    assert torch.equal(token, want_token)


@pytest.mark.gpu
@needs_gpu
@torch.inference_mode()
def test_generation_with_the_persistent_plain_step_is_plain_generation(monkeypatch):
    """bf16, graphs mode: with the switch on every plain step is one launch (stats say so) and the tokens are
    the per-op plain decoding's."""
    model = copy.deepcopy(eligible_model()).to(torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        p = torch.randint(0, model.config.vocab_size, (1, 12), generator=g).cuda()
        monkeypatch.setenv(SWITCH, "0")
        per_op = kx.generate(model, p, max_new_tokens=40, eos_token_id=[])
        monkeypatch.setenv(SWITCH, "1")
        out = kx.generate(model, p, max_new_tokens=40, eos_token_id=[])
        assert out.stats.mode == "graphs" and out.stats.plain_kernel == "persistent", out.stats.plain_kernel_off
        assert per_op.stats.plain_kernel == "per-op"
        assert torch.equal(out.sequences, per_op.sequences)
