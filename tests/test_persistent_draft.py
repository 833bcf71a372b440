"""The persistent draft kernel (ops.persistent_draft; csrc/kernels/persistent_draft.cuh): a whole draft phase in
one launch. Its reference is the engine's per-op draft steps written out; the CUDA kernel must give bitwise the
per-op path's tokens, exit states and caches; a call the kernel cannot take says why."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kangaroo_ext as kx
from kangaroo_ext import ops
from kangaroo_ext.engine.engine import engine_for
from kangaroo_ext.ops import BackendUnavailable, persistent_kernel_limits

from models import tiny_model

CUDA = torch.cuda.is_available() and kx._extension.loaded()


def eligible_model(layers=4, hidden=256, heads=4, kv_heads=1, inter=512, vocab=320, seed=0):
    """A random Llama whose shapes the CUDA kernel takes (widths % 32, rows % 8, head dim 64, group 4)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=kv_heads, max_position_embeddings=1024))
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model.eval()


def _prepared(model, ell, gamma, eta, prompt_len=9, seed=0, capacity=64):
    """An engine after prefill of a random prompt with an adapter at exit ℓ, ready for a draft phase."""
    adapter = kx.Adapter.for_model(model, exit_layer=ell, init="next_layer")
    engine = engine_for(model)
    engine.reserve(capacity, gamma)
    engine.bind_adapter(adapter)
    engine.set_sampling(None)
    engine.threshold.fill_(eta)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(engine.spec.device)
    engine.prefill(prompt, speculative=True)
    engine.begin_round()
    return engine


STATE = ("tokens_in", "draft_tokens", "num_drafted", "active", "exit_states", "k_cache", "v_cache")


def _snapshot(engine):
    return {name: getattr(engine, name).clone() for name in STATE}


def _restore(engine, snap):
    for name, t in snap.items():
        getattr(engine, name).copy_(t)


def _per_op_phase(engine, gamma, stop_at_exit):
    """The engine's draft steps, as the captured graph runs them (the IF on `active` made a host check)."""
    for j in range(gamma + 1):
        if j and stop_at_exit and not bool(engine.active[0]):
            break
        engine.draft_step(j, gamma)


def _assert_same_state(a, b, gamma):
    for name in STATE:
        x, y = a[name], b[name]
        if name == "exit_states":  # rows past the last step hold whatever the buffer held before
            x, y = x[:, :gamma + 1], y[:, :gamma + 1]
        assert torch.equal(x, y), f"{name} differs"


@pytest.mark.parametrize("ell,gamma,eta,stop", [(1, 1, 0.0, True), (2, 3, 0.3, True), (2, 3, 1.0, True),
                                                (3, 6, 0.3, False), (1, 6, 0.0, True)])
@torch.inference_mode()
def test_reference_is_the_engines_per_op_draft_phase(ell, gamma, eta, stop):
    """fp32 on the CPU: reference.persistent_draft leaves the round's state exactly as Engine.draft_step does
    for steps 0..γ (tokens, counts, exit states, every cache slot), with and without the confidence exit."""
    model = tiny_model("llama", layers=4)
    engine = _prepared(model, ell, gamma, eta)
    start = _snapshot(engine)
    _per_op_phase(engine, gamma, stop)
    want = _snapshot(engine)
    _restore(engine, start)
    ops.persistent_draft(*engine._persistent_args(gamma, stop), backend="reference")
    _assert_same_state(_snapshot(engine), want, gamma)
    if eta == 1.0:  # no draft is confident enough: the exit comes at the first proposal
        assert int(want["num_drafted"][0]) == 0


def test_the_kernel_limits_name_what_they_miss():
    model = tiny_model("llama", layers=4)  # fp32, head dim 16, intermediate 136
    engine = engine_for(model)
    engine.reserve(32, 3)
    engine.bind_adapter(kx.Adapter.for_model(model, exit_layer=2, init="next_layer"))
    args = engine._persistent_args(3, True)
    why = " | ".join(persistent_kernel_limits(args[0], args[1], args[2][0]))
    assert "16-bit" in why and "head dim 16" in why and "GEMV shapes" in why
    bf16 = copy.deepcopy(eligible_model()).to(torch.bfloat16)
    e2 = engine_for(bf16)
    e2.reserve(32, 3)
    e2.bind_adapter(kx.Adapter.for_model(bf16, exit_layer=2, init="next_layer"))
    a2 = e2._persistent_args(3, True)
    why2 = persistent_kernel_limits(a2[0], a2[1], a2[2][0])
    assert all("16-bit" not in w and "head dim" not in w and "GEMV" not in w for w in why2), why2
    for layers in (32, 33):   # up to 32: a whole plain step of a 30-layer model fits one launch
        many = (list(a2[1]) * 40)[:layers * 14]
        said = [w for w in persistent_kernel_limits(a2[0], many, a2[2][0]) if "layers" in w]
        assert said == ([] if layers == 32 else ["33 layers (at most 32: exit layers and adapter blocks)"]), said


def test_off_by_default_and_reasons(monkeypatch):
    model = tiny_model("llama", layers=4)
    engine = engine_for(model)
    engine.reserve(32, 3)
    engine.bind_adapter(kx.Adapter.for_model(model, exit_layer=2, init="next_layer"))
    monkeypatch.delenv("KANGAROO_PERSISTENT_DRAFT", raising=False)
    assert "KANGAROO_PERSISTENT_DRAFT is off" in engine.persistent_draft_off(3)
    monkeypatch.setenv("KANGAROO_PERSISTENT_DRAFT", "1")
    why = engine.persistent_draft_off(3)
    assert any(w in why for w in ("CUDA", "16-bit", "extension is not loaded")), why  # a CPU fp32 model
    with pytest.raises(BackendUnavailable) as raised:
        ops.persistent_draft(*engine._persistent_args(3, True), backend="triton")
    if ops.triton_module() is not None:
        assert "no Triton version" in str(raised.value)


def test_bad_arguments_are_named():
    model = tiny_model("llama", layers=4)
    engine = engine_for(model)
    engine.reserve(32, 3)
    engine.bind_adapter(kx.Adapter.for_model(model, exit_layer=2, init="next_layer"))
    args = list(engine._persistent_args(3, True))
    cases = ((1, args[1][:20], r"14 entries \(tensor or None\) per layer"), (4, 0, "num_exit_layers"),
             (4, 3, "num_exit_layers"), (18, 0, "gamma"), (17, torch.zeros(3, dtype=torch.int32), "barrier"),
             (10, torch.zeros(1), "threshold"), (13, engine.draft_tokens[:, :1], "draft_tokens"))
    for index, value, match in cases:
        bad = list(args)
        bad[index] = value
        with pytest.raises(ValueError, match=match):
            ops.persistent_draft(*bad)


# ---- on a GPU -----------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the extension")
# The kernel's launch settings by mode (kangaroo_ext._extension.launch_switches' arguments; what a mode leaves out
# is off). None may change a bit: the split barrier, the L2 prefetch, and a grid of 7 blocks (fewer than the GEMV
# tiles, the attention's key splits and the head's rows ask for: every block loops over several). Interleaved
# key splits (attention's, key_split.h) change bits past 512 keys, in both paths alike: the per-op path's
# reference runs under the same switches. (The split barrier hung until its named barrier counted threads one by
# one: common.cuh's NamedBarrier; scripts/gpu_stage_b_and_test.sh persan runs its cases under synccheck.)
KERNEL_MODES = {"barrier": {}, "split-barrier": dict(persistent_split_barrier=True),
                "l2-prefetch": dict(persistent_l2_prefetch=True), "7-blocks": dict(persistent_max_blocks=7),
                "interleaved-splits": dict(interleaved_key_splits=True)}


def kernel_switches(mode):
    """The persistent kernel's settings as KERNEL_MODES[mode] says, restored after."""
    settings = dict(persistent_split_barrier=False, persistent_l2_prefetch=False, persistent_max_blocks=0,
                    interleaved_key_splits=False)
    return kx._extension.launch_switches(**{**settings, **KERNEL_MODES[mode]})


def split_barrier(mode) -> bool:
    return KERNEL_MODES[mode].get("persistent_split_barrier", False)




@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("ell", [1, 2, 3])
@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("stop", [True, False])
@pytest.mark.parametrize("mode", list(KERNEL_MODES))
@torch.inference_mode()
def test_cuda_kernel_is_bitwise_the_per_op_path(ell, gamma, eta, stop, mode):
    """bf16: one launch leaves exactly the state the per-op draft steps leave (tokens, counts, exit states,
    caches of the exit layers and the adapter), exits at the first step (η = 1) or never (η = 0), and
    leaves its barrier counters at zero for the next launch; with the grid barrier whole or split
    (KANGAROO_PERSISTENT_SPLIT_BARRIER: GEMV stages wait inside their tiles), and with the L2 prefetch of the
    next stage's weights (KANGAROO_PERSISTENT_L2_PREFETCH), and on a grid of 7 blocks."""
    with kernel_switches(mode):
        _bitwise_case(ell, gamma, eta, stop, split_barrier(mode))


def _bitwise_case(ell, gamma, eta, stop, split, model=None, prompt_len=9, capacity=64):
    model = copy.deepcopy(model or eligible_model()).to(torch.bfloat16).cuda()
    engine = _prepared(model, ell, gamma, eta, prompt_len=prompt_len, capacity=capacity)
    start = _snapshot(engine)
    _per_op_phase(engine, gamma, stop)
    want = _snapshot(engine)
    blocks = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    stamps = torch.full((400, blocks, 3), -1, dtype=torch.int64, device="cuda")
    for timed in (False, True):  # twice: the second launch starts from the counters the first one left
        _restore(engine, start)
        engine.draft_phase_persistent(gamma, stop, stamps=stamps if timed else None)
        torch.cuda.synchronize()
        _assert_same_state(_snapshot(engine), want, gamma)
        assert not engine.persistent_barrier.any()  # the grid barrier's counters and every tile's split counter
    # The timing names every barrier's stage, in the order the phase runs them (the barriers a step has).
    steps = gamma + 1 if not stop else min(gamma + 1, int(want["num_drafted"][0]) + 1)
    has_mlp = [w.gate is not None for w in list(engine.spec.layers[:ell]) + list(engine.adapter_weights)]
    kinds = stamps[:, 0, 0].tolist()
    kinds = kinds[:kinds.index(-1)] if -1 in kinds else kinds
    expect = [0]   # no merge barrier (3): the last key split of a tile merges it inside the attention stage
    for j in range(steps):
        for mlp in has_mlp:
            expect += [1, 2, 4] + ([5, 6] if mlp else [])
        expect += [7] if j < gamma else []
    assert kinds == expect
    ran = stamps[0, :, 0] >= 0
    arrival, departure = stamps[:len(kinds), ran, 1], stamps[:len(kinds), ran, 2]
    left = departure >= 0   # split: a block whose first tile body never ran has no departure for that barrier
    assert (arrival > 0).all() and (departure[left] >= arrival[left]).all() and (split or left.all())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("prompt_len", [150, 420, 700])
@pytest.mark.parametrize("mode", list(KERNEL_MODES))
@torch.inference_mode()
def test_cuda_kernel_is_bitwise_the_per_op_path_with_merged_key_splits(prompt_len, mode):
    """Contexts of several key tiles, three KV heads: the attention plan splits each head's keys over several
    blocks, and the last split of each head to finish merges them (per-head arrival counters); past 512 keys
    (700) every split holds several tiles, contiguous or interleaved."""
    with kernel_switches(mode):
        _bitwise_case(2, 6, 0.0, False, split_barrier(mode),
                      model=eligible_model(heads=6, kv_heads=3, hidden=384, inter=512), prompt_len=prompt_len,
                      capacity=512 if prompt_len + 8 <= 512 else 1024)


@pytest.mark.gpu
@needs_gpu
@torch.inference_mode()
def test_generation_with_the_persistent_kernel_is_the_per_op_generation(monkeypatch):
    """bf16, graphs mode: with KANGAROO_PERSISTENT_DRAFT=1 the draft phase is one launch (stats say so) and
    the tokens equal the per-op rounds' and plain decoding's, with one host sync per round."""
    model = copy.deepcopy(eligible_model()).to(torch.bfloat16).cuda()
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        p = torch.randint(0, model.config.vocab_size, (1, 12), generator=g).cuda()
        kw = dict(adapter=adapter, max_new_tokens=48, threshold=0.2, max_draft=6, eos_token_id=[], copy_draft=False)
        monkeypatch.setenv("KANGAROO_PERSISTENT_DRAFT", "0")
        per_op = kx.speculative_generate(model, p, **kw)
        monkeypatch.setenv("KANGAROO_PERSISTENT_DRAFT", "1")
        out = kx.speculative_generate(model, p, **kw)
        assert out.stats.draft_kernel == "persistent", out.stats.draft_kernel_off
        assert per_op.stats.draft_kernel == "per-op"
        assert torch.equal(out.sequences, per_op.sequences)
        assert out.stats.accepted == per_op.stats.accepted
        assert out.stats.host_syncs == out.stats.rounds

