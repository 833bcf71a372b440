"""The engine on a CUDA device: CUDA-graph decoding is lossless in fp32 and keeps one host sync per round."""
import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext.engine import conditional

from models import prompts, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_model():
    import copy
    return copy.deepcopy(tiny_model("llama", layers=6)).cuda()


@pytest.mark.parametrize("eta,gamma,ell", [(0.0, 6, 3), (0.6, 3, 2), (1.0, 1, 1), (0.3, 6, 5)])
@torch.inference_mode()
def test_cuda_graphs_are_lossless_fp32(cuda_model, eta, gamma, ell):
    adapter = kx.Adapter.for_model(cuda_model, exit_layer=ell, init="next_layer")
    for p in prompts(5, seed=11):
        p = p.cuda()
        ref = kx.generate(cuda_model, p, max_new_tokens=48, eos_token_id=[], mode="device").sequences
        assert torch.equal(kx.generate(cuda_model, p, max_new_tokens=48, eos_token_id=[]).sequences, ref)
        out = kx.speculative_generate(cuda_model, p, adapter=adapter, max_new_tokens=48, threshold=eta,
                                      max_draft=gamma, eos_token_id=[])
        assert out.stats.mode == "graphs"
        assert out.stats.device_exit == (conditional.unsupported_reason("cuda") == ""), out.stats.device_exit_off
        assert torch.equal(out.sequences, ref)
        assert out.stats.host_syncs == out.stats.rounds, "exactly one host sync per round"


@torch.inference_mode()
def test_graph_capture_is_fast_and_reused(cuda_model):
    adapter = kx.Adapter.for_model(cuda_model, exit_layer=2, init="random")
    p = prompts(2, seed=12)[1].cuda()
    first = kx.speculative_generate(cuda_model, p, adapter=adapter, max_new_tokens=16, max_draft=5, eos_token_id=[])
    again = kx.speculative_generate(cuda_model, p, adapter=adapter, max_new_tokens=16, max_draft=5, eos_token_id=[])
    assert first.stats.capture_s < 10.0
    assert again.stats.capture_s == 0.0, "same shapes: the captured graphs are replayed, not re-captured"


@torch.inference_mode()
def test_without_conditional_nodes_the_adaptive_budget_is_lossless(cuda_model, monkeypatch):
    """KANGAROO_DISABLE_CONDITIONAL_GRAPHS: every captured step runs, the host-side draft budget applies."""
    monkeypatch.setenv(conditional.DISABLE_ENV, "1")
    adapter = kx.Adapter.for_model(cuda_model, exit_layer=2, init="next_layer")
    for p in prompts(3, seed=13):
        p = p.cuda()
        ref = kx.generate(cuda_model, p, max_new_tokens=40, eos_token_id=[]).sequences
        out = kx.speculative_generate(cuda_model, p, adapter=adapter, max_new_tokens=40, threshold=0.3,
                                      max_draft=4, eos_token_id=[])
        assert not out.stats.device_exit and conditional.DISABLE_ENV in out.stats.device_exit_off
        assert torch.equal(out.sequences, ref)
        assert out.stats.host_syncs == out.stats.rounds


@torch.inference_mode()
def test_graph_decoding_stops_right_after_eos(cuda_model):
    """Plain decoding in graphs is pipelined (a round is queued before the last report is read): the output
    must still end at the first EOS, for plain and speculative decoding, at every max_new_tokens."""
    p = prompts(2, seed=4)[1].cuda()
    free = kx.generate(cuda_model, p, max_new_tokens=64, eos_token_id=[]).sequences[0, len(p):].tolist()
    eos = free[17]
    first = free.index(eos)
    adapter = kx.Adapter.for_model(cuda_model, exit_layer=3, init="next_layer")
    for n in (1, 2, first + 1, 63):
        plain = kx.generate(cuda_model, p, max_new_tokens=n, eos_token_id=eos).sequences[0, len(p):].tolist()
        assert plain == free[:min(n, first + 1)], f"plain, max_new_tokens={n}"
        spec = kx.speculative_generate(cuda_model, p, adapter=adapter, max_new_tokens=n, threshold=0.0,
                                       max_draft=6, eos_token_id=eos)
        assert spec.stats.mode == "graphs"
        assert spec.sequences[0, len(p):].tolist() == free[:min(n, first + 1)], f"speculative, max_new_tokens={n}"


@torch.inference_mode()
def test_captured_copy_rounds_are_lossless_fp32(cuda_model):
    """copy_draft=True in graphs mode: the captured copy round (lookup, copy-or-adapter SWITCH, verify
    SWITCH up to max(γ, rows)) gives plain decoding's tokens, with one host sync per round, and some rounds
    copy. Skipped where conditional nodes are unavailable (stats.copy_draft_off then says why)."""
    from test_copy_draft import repetitive_prompts
    conditional.forget_capture_failures()  # a failure remembered from another test must not skip this one
    if conditional.unsupported_reason("cuda"):
        pytest.skip(conditional.unsupported_reason("cuda"))
    adapter = kx.Adapter.for_model(cuda_model, exit_layer=2, init="next_layer")
    sources = set()
    for p in repetitive_prompts(4, seed=7):
        p = p.cuda()
        ref = kx.generate(cuda_model, p, max_new_tokens=48, eos_token_id=[]).sequences
        out = kx.speculative_generate(cuda_model, p, adapter=adapter, max_new_tokens=48, threshold=0.3,
                                      max_draft=4, eos_token_id=[], copy_draft=True)
        assert out.stats.mode == "graphs" and out.stats.copy_draft and out.stats.copy_draft_off == ""
        assert torch.equal(out.sequences, ref)
        assert out.stats.host_syncs == out.stats.rounds, "exactly one host sync per round"
        sources.update(out.stats.draft_sources)
    assert sources == {"copy", "adapter"}, sources


@torch.inference_mode()
def test_copied_drafts_are_the_greedy_graphs_default_and_bf16_stays_plain():
    """speculative_generate's defaults on a GPU: greedy decoding in graphs mode copies drafts (where
    conditional nodes allow), sampling and 'device' mode do not; in bf16 the copy rounds stay within the
    attention's batch-invariant width (copy_policy_for), so the tokens equal plain decoding's."""
    import copy
    from test_copy_draft import repetitive_prompts
    from kangaroo_ext.engine.copy_rounds import copy_policy_for
    from kangaroo_ext.engine.engine import engine_for
    conditional.forget_capture_failures()  # a failure remembered from another test must not skip this one
    if conditional.unsupported_reason("cuda"):
        pytest.skip(conditional.unsupported_reason("cuda"))
    # SmolLM2's attention shape (GQA group 3, head dim 64), where the invariant order exists: 10 positions
    model = copy.deepcopy(tiny_model("llama", layers=4, hidden=192, heads=3, kv_heads=1)).to(torch.bfloat16).cuda()
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    spec = engine_for(model).spec
    widest = kx._extension.attention_invariant_max_tokens(spec.num_heads // spec.num_kv_heads, spec.head_dim, 2,
                                                          torch.cuda.current_device())
    assert widest == 10 and copy_policy_for(engine_for(model)).rows == 9
    sources = set()
    for p in repetitive_prompts(4, seed=3):
        p = p.cuda()
        ref = kx.generate(model, p, max_new_tokens=64, eos_token_id=[]).sequences
        out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=64, threshold=0.3, max_draft=6,
                                      eos_token_id=[])
        assert out.stats.mode == "graphs" and out.stats.copy_draft and out.stats.copy_draft_off == ""
        assert torch.equal(out.sequences, ref)
        sources.update(out.stats.draft_sources)
    assert "copy" in sources, sources
    p = repetitive_prompts(1, seed=4)[0].cuda()
    sampled = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=8, do_sample=True, seed=1)
    on_device = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=8, mode="device")
    assert not sampled.stats.copy_draft and not on_device.stats.copy_draft
