"""KANGAROO_TRITON_ATTENTION: the engine's attention on the Triton kernel (triton_kernels/attention.py, tensor-core
dots) instead of the CUDA one, for every step. What it relies on: a decode step and a verify step of up to
invariant_max_tokens(G) tokens run one compiled kernel (one row block), so a verified row is bitwise the decode
step's row. CPU: the switch's reasons and that output does not change; GPU: routing by kernel name, verified rows
against decode rows at every context, and bf16 Kangaroo equal to plain decoding end to end."""
import copy
import importlib

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext.engine.copy_rounds import copy_policy_for
from kangaroo_ext.engine.engine import engine_for

from models import tiny_model
from test_ops_decode import INVARIANCE_CASES, LONG_INVARIANCE_CASES, _rows_differing
from test_ops_warp_chunk_attention import _kernels_run

SWITCH = "KANGAROO_TRITON_ATTENTION"


def test_the_switch_says_why_it_is_off_and_changes_nothing_on_the_cpu(monkeypatch):
    """Unset: off, and the stats say so. Set on a CPU model: still off (it serves CUDA devices), with that reason;
    the tokens are the same either way."""
    model = tiny_model("llama", layers=4)
    prompt = torch.tensor([[1, 5, 9, 2, 7]])
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    monkeypatch.delenv(SWITCH, raising=False)
    off = kx.speculative_generate(model, prompt, adapter=adapter, max_new_tokens=12, eos_token_id=[])
    assert off.stats.attention_kernel == "auto" and f"{SWITCH} is off" in off.stats.attention_kernel_off
    monkeypatch.setenv(SWITCH, "1")
    on = kx.speculative_generate(model, prompt, adapter=adapter, max_new_tokens=12, eos_token_id=[])
    assert on.stats.attention_kernel == "auto" and "not on a CUDA device" in on.stats.attention_kernel_off
    assert torch.equal(on.sequences, off.sequences)
    assert engine_for(model).triton_attention_off() == on.stats.attention_kernel_off


def _needs_gpu_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("kangaroo_ext.triton_kernels")


def _bf16_model(kv_heads=1, head_dim=64):
    heads = 3 * kv_heads
    model = copy.deepcopy(tiny_model("llama", layers=4, hidden=heads * head_dim, heads=heads, kv_heads=kv_heads))
    return model.to(torch.bfloat16).cuda()


@pytest.mark.gpu
@torch.inference_mode()
def test_the_switch_routes_the_engines_attention_to_triton(monkeypatch):
    """With the switch on, the engine's steps launch the Triton attention kernels (by name) and its stats say
    "triton"; off, none; the copy rounds keep their copied slots within the Triton kernel's invariant width."""
    _needs_gpu_triton()
    model = _bf16_model()
    prompt = torch.tensor([[1, 5, 9, 2, 7, 3, 8]], device="cuda")
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    run = lambda: kx.speculative_generate(model, prompt, adapter=adapter, max_new_tokens=24,  # noqa: E731
                                          eos_token_id=[], mode="host")
    monkeypatch.setenv(SWITCH, "1")
    on = _kernels_run(run)
    assert "_attn_split_kernel" in on, on
    assert run().stats.attention_kernel == "triton"
    attention = importlib.import_module("kangaroo_ext.triton_kernels.attention")
    policy = copy_policy_for(engine_for(model))
    assert policy.rows + 1 <= attention.invariant_max_tokens(3), policy
    monkeypatch.setenv(SWITCH, "0")
    assert "_attn_split_kernel" not in _kernels_run(run)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(INVARIANCE_CASES) + list(LONG_INVARIANCE_CASES))
def test_triton_verified_rows_are_the_decode_steps_rows(dtype, case):
    """T tokens attended in one Triton call give, row for row, bitwise what T one-token calls give, at any
    context, up to invariant_max_tokens(G) tokens (the widest cases take exactly that many)."""
    _needs_gpu_triton()
    attention = importlib.import_module("kangaroo_ext.triton_kernels.attention")
    Hq, Hkv, D, start, T = {**INVARIANCE_CASES, **LONG_INVARIANCE_CASES}[case]
    widest = attention.invariant_max_tokens(Hq // Hkv)
    T = min(T or widest, widest)
    differ = _rows_differing(case, Hq, Hkv, D, start, T, dtype, backend="triton")
    assert differ == 0, f"{differ} of {T * Hq} verified rows differ from the decode step's"


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads, head_dim", [(1, 64), (2, 128)])
@torch.inference_mode()
def test_bf16_speculative_decoding_equals_plain_with_triton_attention(monkeypatch, kv_heads, head_dim):
    """End to end with the switch on: bf16 Kangaroo (graphs, adapter drafts, copied drafts) gives plain decoding's
    tokens over 950 new tokens, past 512 keys too; GQA 3 at head dims 64 and 128."""
    _needs_gpu_triton()
    from test_copy_draft import repetitive_prompts
    model = _bf16_model(kv_heads, head_dim)
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    monkeypatch.setenv(SWITCH, "1")
    for p in repetitive_prompts(2, seed=5):
        p = p.cuda()
        plain = kx.generate(model, p, max_new_tokens=950, eos_token_id=[]).sequences
        spec = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=950, threshold=0.3, max_draft=6,
                                       eos_token_id=[])
        assert spec.stats.attention_kernel == "triton", spec.stats.attention_kernel_off
        first = int((spec.sequences != plain).nonzero()[0, 1]) if not torch.equal(spec.sequences, plain) else None
        assert first is None, f"bf16 output differs from plain decoding from position {first}"
