"""Copied drafts in the engine (engine/copy_rounds.py): greedy output equals plain decoding in fp32 for
copied, adapter and mixed rounds, every source is exercised, and the stats say which source each round
used."""
import pytest
import torch

import kangaroo_ext as kx

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
                                          max_draft=gamma, eos_token_id=[], mode=mode, copy_draft=copy_draft)
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
def test_copy_draft_off_says_why_in_graphs_mode_and_rejects_bad_values():
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
        assert not out.stats.copy_draft and out.stats.draft_sources == []
