"""Copied drafts in the engine (engine/copy_rounds.py): greedy output equals plain decoding in fp32 for
copied, adapter and mixed rounds, every source is exercised, and the stats say which source each round
used."""
import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import decoding
from kangaroo_ext.engine.copy_rounds import CapturedCopyRounds, CopyPolicy
from kangaroo_ext.engine.engine import engine_for
from kangaroo_ext.engine.rounds import Rounds

from models import prompts, tiny_model


def repetitive_prompts(n, seed=0, vocab=111):
    """Prompts that repeat spans of themselves (what copying is for), beside random ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        span = torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        noise = torch.randint(0, vocab, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g)
        out.append(torch.cat([span, noise, span, noise[:2], span[:4]]))
    return out + prompts(n, seed=seed)


@pytest.mark.parametrize("mode", ["host", "device"])
@torch.inference_mode()
def test_copy_draft_is_lossless_and_uses_every_source(mode):
    model = tiny_model("llama", layers=6)
    sources, copied_accepted = {}, 0
    for i, p in enumerate(repetitive_prompts(6, seed=1)):
        plain = kx.generate(model, p, max_new_tokens=48, eos_token_id=[]).sequences
        for copy_draft, init, eta, gamma in ((True, "next_layer", 0.3, 4), (True, "random", 0.0, 6),
                                             (True, "next_layer", 0.0, 12), ("only", "random", 0.5, 3)):
            adapter = kx.Adapter.for_model(model, exit_layer=1 + i % 4, init=init, seed=i)
            out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=48, threshold=eta,
                                          max_draft=gamma, eos_token_id=[], mode=mode, copy_draft=copy_draft,
                                          draft_gate=False)
            case = f"prompt {i} copy_draft={copy_draft} init={init} η={eta} γ={gamma}"
            assert torch.equal(out.sequences, plain), case
            s = out.stats
            assert s.copy_draft and s.copy_draft_off == ""
            assert len(s.draft_sources) == len(s.copied) == s.rounds == len(s.accepted), case
            for src, k, d, a in zip(s.draft_sources, s.copied, s.drafted, s.accepted):
                assert 0 <= a <= d, case
                if src == "copy":
                    assert d == k >= 1
                    copied_accepted += a
                elif src == "mixed":
                    assert k >= 1 and k <= d <= gamma
                else:
                    assert k == 0 and (d == 0 if src == "plain" else d <= gamma)
                if copy_draft == "only":
                    assert src in ("copy", "plain")
            for src, row in s.by_source().items():
                sources[src] = sources.get(src, 0) + row["rounds"]
    assert set(sources) == {"copy", "mixed", "adapter", "plain"}, sources
    assert copied_accepted > 0, "no copied draft was ever accepted: the copy path went untested"


@torch.inference_mode()
def test_copy_draft_defaults_and_bad_values():
    model = tiny_model("llama", layers=6)
    adapter = kx.Adapter.for_model(model, exit_layer=2)
    with pytest.raises(ValueError, match="copy_draft"):
        kx.speculative_generate(model, [1, 2, 3], adapter=adapter, copy_draft="yes")
    with pytest.raises(ValueError, match="copy_draft"):
        kx.speculative_generate(model, [1, 2, 3], adapter=adapter, copy_draft=1)
    out = kx.speculative_generate(model, [1, 2, 3], adapter=adapter, max_new_tokens=4, eos_token_id=[])
    assert out.stats.copy_draft and out.stats.mode == "host"          # the default: on in host mode
    for mode, copy_draft in (("device", None), ("host", False)):
        out = kx.speculative_generate(model, [1, 2, 3], adapter=adapter, max_new_tokens=4, eos_token_id=[],
                                      mode=mode, copy_draft=copy_draft)
        assert not out.stats.copy_draft and "copy" not in out.stats.draft_sources


class CapturedCopyRoundsOnTheHost(Rounds):
    """What a captured copy round (engine/graphs.py, CudaGraphs with `copy`) runs, in the same engine calls
    and order, with each conditional node's choice made by the host instead: the SWITCH on "a match was
    found", the IF per adapter draft step on "some row still drafts", the verify SWITCH on the number of
    drafts. The captures themselves need a GPU (tests/test_gpu_engine.py)."""
    mode, pipelined = "device", False

    def __init__(self, engine, gamma: int, policy: CopyPolicy):
        super().__init__(engine, max(gamma, policy.rows))
        self.adapter_gamma, self.policy, self.sources = gamma, policy, []

    def draft(self):
        e = self.engine
        e.begin_round()
        tokens, k = e.copy_lookup(self.policy)
        if int(k.max()) > 0:
            e.draft_copied_rows(tokens, k, self.policy.rows)
            return
        for j in range(self.adapter_gamma + 1):
            keep = e.draft_step(j, self.adapter_gamma)
            if keep is None or not bool(keep.any()):
                break

    def verify(self):
        self.engine.verify(int(self.engine.num_drafted.max()) + 1)

    def observe(self, result):
        self.sources.append("copy" if result.copied else "adapter")


@pytest.mark.parametrize("rows", [10, 3])
@torch.inference_mode()
def test_the_captured_copy_round_is_lossless(rows):
    """The captured copy round's engine steps (copy_lookup, draft_copied_rows with its static rows and
    padding slots, verification of up to max(γ, rows) drafts) give plain decoding's tokens, fp32, CPU, and
    both branches run; the report's `copied` slot names the copy rounds."""
    model = tiny_model("llama", layers=6)
    policy, gamma, n_new = CopyPolicy(rows=rows), 4, 40
    seen = set()
    for i, p in enumerate(repetitive_prompts(4, seed=5)):
        plain = kx.generate(model, p, max_new_tokens=n_new, eos_token_id=[]).sequences[0, len(p):].tolist()
        adapter = kx.Adapter.for_model(model, exit_layer=1 + i % 3, init="next_layer", seed=i)
        e = engine_for(model)
        with e.request():
            e.reserve(decoding._capacity(len(p), n_new, max(gamma, rows)), max(gamma, rows))
            e.bind_adapter(adapter)
            e.threshold.fill_(0.3)
            e.set_sampling(None)
            rounds = CapturedCopyRoundsOnTheHost(e, gamma, policy)
            new, stats = decoding._decode(e, rounds, p[None], n_new, set(), None)
        assert new == plain, f"prompt {i}"
        for src, d in zip(rounds.sources, stats.drafted):
            assert d <= (rows if src == "copy" else gamma)
        seen.update(rounds.sources)
    assert seen == {"copy", "adapter"}, seen


def test_captured_copy_rounds_say_what_they_are():
    """CapturedCopyRounds (mode 'graphs'): verification covers max(γ, rows) drafts, a round's source comes
    from the report's `copied` slot, and describe() says copying is on."""
    from kangaroo_ext.engine.rounds import RoundResult
    r = CapturedCopyRounds(engine=None, gamma=6, policy=CopyPolicy(rows=10))
    assert (r.gamma, r.adapter_gamma, r.mode) == (10, 6, "graphs")
    r.observe(RoundResult(accepted=2, drafted=5, committed=[1, 2, 3], copied=5))
    r.observe(RoundResult(accepted=0, drafted=1, committed=[4], copied=0))
    assert (r.sources, r.copied) == (["copy", "adapter"], [5, 0])
    assert r.describe() == {"mode": "graphs", "device_exit": True, "copy_draft": True}
    only = CapturedCopyRounds(engine=None, gamma=0)            # copy_draft="only": no adapter drafting
    only.observe(RoundResult(accepted=0, drafted=0, committed=[4], copied=0))
    assert only.sources == ["plain"]


@pytest.mark.parametrize("device, dtype, widest, rows", [
    ("cuda", torch.bfloat16, 11, 10),     # wide enough: the measured default
    ("cuda", torch.bfloat16, 10, 9),      # the default model's width on the H100: 9 copied + 1 verified
    ("cuda", torch.float16, 2, 1),
    ("cuda", torch.bfloat16, 0, 10),      # the invariant order switched off: nothing to keep within
    ("cuda", torch.bfloat16, None, 10),   # no extension
    ("cuda", torch.float32, 10, 10),      # fp32: the order is not invariant anyway (never asked)
    ("cpu", torch.bfloat16, 10, 10),      # CPU: not the CUDA kernel (never asked)
])
def test_copy_policy_keeps_copy_rounds_within_the_invariant_width(monkeypatch, device, dtype, widest, rows):
    """A captured copy round verifies rows + 1 positions: on a GPU in 16 bits, no more than the attention
    kernel keeps batch-invariant (bf16 output equal to plain decoding), asked with the model's GQA group,
    head dim, element size and device."""
    from types import SimpleNamespace
    from kangaroo_ext import _extension
    from kangaroo_ext.engine import copy_rounds
    asked = []

    def widest_for(group, head_dim, elem_size, device_index):
        asked.append((group, head_dim, elem_size, device_index))
        return widest

    monkeypatch.setattr(_extension, "attention_invariant_max_tokens", widest_for)
    spec = SimpleNamespace(device=torch.device(device, 1) if device == "cuda" else torch.device("cpu"),
                           dtype=dtype, num_heads=9, num_kv_heads=3, head_dim=64)
    engine = SimpleNamespace(spec=spec, triton_attention_off=lambda: "KANGAROO_TRITON_ATTENTION is off")
    policy = copy_rounds.copy_policy_for(engine)
    assert policy == CopyPolicy(rows=rows)
    needs_asking = device == "cuda" and dtype != torch.float32
    assert asked == ([(3, 64, dtype.itemsize, 1)] if needs_asking else [])


def test_copy_policy_keeps_copy_rounds_within_the_triton_kernels_width(monkeypatch):
    """With the engine's attention on the Triton kernel (KANGAROO_TRITON_ATTENTION), the width is that kernel's
    (one row block for every launch of up to invariant_max_tokens(G) tokens), and the CUDA launcher is not asked."""
    from types import SimpleNamespace
    from kangaroo_ext import _extension
    from kangaroo_ext.engine import copy_rounds
    attention = pytest.importorskip("kangaroo_ext.triton_kernels.attention")
    monkeypatch.setattr(_extension, "attention_invariant_max_tokens", lambda *a: pytest.fail("CUDA launcher asked"))
    for heads, kv_heads in ((9, 3), (32, 8), (4, 4)):
        spec = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, num_heads=heads,
                               num_kv_heads=kv_heads, head_dim=64)
        policy = copy_rounds.copy_policy_for(SimpleNamespace(spec=spec, triton_attention_off=lambda: ""))
        widest = attention.invariant_max_tokens(heads // kv_heads)
        assert policy == CopyPolicy(rows=max(1, min(copy_rounds.DEFAULT_COPY_GAMMA, widest - 1))), (heads, policy)
