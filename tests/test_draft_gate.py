"""The draft gate (engine/draft_gate.py): the policy alone (rests where drafts do not pay, probes with growing
gaps, drafts again where they pay), then end to end on the CPU: greedy output equals plain decoding whatever
the gate decides, resting rounds alone sample exactly as plain decoding does (same seed, same tokens), a
gated sampled run still draws the target's distribution (chi-square; the planted-bug test beside it in
test_sampling.py shows the test's power), a seed reproduces gated tokens, and the stats say which rounds
rested."""
import copy

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import decoding
from kangaroo_ext.engine import draft_gate
from kangaroo_ext.engine.draft_gate import DraftCosts, DraftGate

from models import prompts, tiny_model
from test_sampling import PROMPT, SAMPLES, P_VALUE, VOCAB, chi_square_three_tokens

COSTS = DraftCosts(head=0.05, step=0.1, row=0.1)


def run_gate(gate: DraftGate, outcome, rounds: int, rest_seconds: float = 1.0):
    """Drive the policy for `rounds` rounds; outcome(i) -> (accepted, drafted[, seconds]) of the i-th speculative
    round; a resting round takes rest_seconds. Returns the choices (True: speculative)."""
    choices = []
    for _ in range(rounds):
        speculate = gate.speculate()
        if speculate:
            gate.record(*outcome(sum(choices)))
        else:
            gate.record_rest(rest_seconds)
        choices.append(speculate)
    return choices


# ---- the policy -------------------------------------------------------------------------------------------

def test_the_gate_keeps_drafting_while_drafts_pay():
    gate = DraftGate(COSTS)
    # 1 accepted of 2 drafted: gains 1 against 0.05 + 2 * 0.2 = 0.45
    assert all(run_gate(gate, lambda i: (1, 2), 200))


def test_the_gate_rests_where_drafts_do_not_pay_and_probes_with_growing_gaps():
    gate = DraftGate(COSTS)
    choices = run_gate(gate, lambda i: (0, 1), 400)   # nothing accepted: drafting only costs
    assert all(choices[:DraftGate.WARMUP]), "no decision before WARMUP speculative rounds"
    assert not choices[DraftGate.WARMUP]
    # the gaps between probes: FIRST_GAP, doubling up to MAX_GAP
    probes = [i for i, c in enumerate(choices) if c][DraftGate.WARMUP - 1:]
    gaps = [b - a - 1 for a, b in zip(probes, probes[1:])]
    expected = [DraftGate.FIRST_GAP]
    while len(expected) < len(gaps):
        expected.append(min(2 * expected[-1], DraftGate.MAX_GAP))
    assert gaps == expected
    assert sum(choices) < 0.1 * len(choices)


def test_the_gate_drafts_again_once_a_probe_pays():
    gate = DraftGate(COSTS)
    choices = run_gate(gate, lambda i: (0, 1) if i < 10 else (4, 5), 300)
    assert not all(choices[:100])
    assert all(choices[-100:]), "drafts that pay again must end the rest"
    assert gate.gap == DraftGate.FIRST_GAP


def test_the_break_even_follows_the_costs():
    """1 accepted of 4 drafted: pays at a GPU's greedy prices (extra 0.015 + 4 * 0.177 = 0.72 plain steps),
    not at a CPU's sampled ones (0.054 + 4 * 0.29 = 1.21)."""
    gpu, cpu = DraftGate(draft_gate.costs_for("cuda", False)), DraftGate(draft_gate.costs_for("cpu", True))
    assert all(run_gate(gpu, lambda i: (1, 4), 300))
    assert sum(run_gate(cpu, lambda i: (1, 4), 300)) < 30


def test_timed_the_gate_follows_the_rounds_own_times():
    """Greedy (timed): once a resting round has been timed, the measured times decide, whatever the table says.
    1 accepted of 4 drafted in 1.5 s against 1 s a resting round: 2 tokens / 1.5 s beat 1 / 1 s, so it drafts
    although a CPU's sampled prices (extra 1.21 plain steps) would rest; at 2.5 s a round it rests."""
    costs = draft_gate.costs_for("cpu", True)
    fast, slow = DraftGate(costs, timed=True), DraftGate(costs, timed=True)
    fast_choices = run_gate(fast, lambda i: (1, 4, 1.5), 300)
    assert not all(fast_choices[:20]), "the table decides until a resting round is timed"
    assert all(fast_choices[-250:])
    assert sum(run_gate(slow, lambda i: (1, 4, 2.5), 300)) < 30
    untimed = DraftGate(costs)
    assert sum(run_gate(untimed, lambda i: (1, 4, 1.5), 300)) < 30, "sampled: counts alone"


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_costs_are_named(bad):
    with pytest.raises(ValueError, match="DraftCosts.step must be a finite number >= 0"):
        DraftCosts(head=0.0, step=bad, row=0.0)


def test_every_measured_setting_has_costs():
    for device in ("cpu", "cuda"):
        for sampled in (False, True):
            c = draft_gate.costs_for(device, sampled)
            assert 0 < c.head < 1 and 0 < c.step < 1 and 0 < c.row < 1
    assert set(decoding.DRAFT_GATE_DEFAULT) == {(cuda, s) for cuda in (False, True) for s in (False, True)}


# ---- end to end (CPU, fp32) -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["host", "device"])
@torch.inference_mode()
def test_gated_greedy_output_equals_plain_decoding(mode):
    model = tiny_model("llama", layers=6)
    rested = speculated = 0
    for i, p in enumerate(prompts(6, seed=3)):
        plain = kx.generate(model, p, max_new_tokens=40, eos_token_id=[], mode=mode).sequences
        for copy_draft, init, eta in ((False, "random", 0.0), (True, "next_layer", 0.3), (False, "next_layer", 0.0)):
            adapter = kx.Adapter.for_model(model, exit_layer=1 + i % 4, init=init, seed=i)
            out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=40, threshold=eta, max_draft=4,
                                          eos_token_id=[], mode=mode, copy_draft=copy_draft, draft_gate=True)
            case = f"prompt {i} copy_draft={copy_draft} init={init} η={eta}"
            assert torch.equal(out.sequences, plain), case
            s = out.stats
            assert s.draft_gate and len(s.draft_sources) == len(s.copied) == len(s.drafted) == s.rounds, case
            assert s.rested == s.draft_sources.count("rest")
            for src, d, a in zip(s.draft_sources, s.drafted, s.accepted):
                assert src != "rest" or d == a == 0, case
            rested += s.rested
            speculated += s.rounds - s.rested
    assert rested > 0 and speculated > 0, "both kinds of round must have run"


@pytest.fixture(scope="module")
def small():
    model = tiny_model("llama", layers=2, vocab=VOCAB, hidden=32, heads=2, kv_heads=1, seed=4)
    return model, kx.Adapter.for_model(model, exit_layer=1, init="random", seed=5)


@pytest.mark.parametrize("mode", ["host", "device"])
@torch.inference_mode()
def test_resting_rounds_sample_exactly_as_plain_decoding(small, mode, monkeypatch):
    """Every round rests (no copied drafts either): the same seed gives plain decoding's tokens (the same random
    numbers, drawn from the same distribution). A resting round that skipped the exit state, or reused a
    round's random numbers, fails this."""
    model, adapter = small
    monkeypatch.setattr(DraftGate, "speculate", lambda self: False)
    kw = dict(max_new_tokens=24, eos_token_id=[], do_sample=True, temperature=1.3, mode=mode)
    for seed in range(4):
        plain = kx.generate(model, PROMPT, seed=seed, **kw).sequences
        out = kx.speculative_generate(model, PROMPT, adapter=adapter, seed=seed, draft_gate=True,
                                      copy_draft=False, **kw)
        assert torch.equal(out.sequences, plain), seed
        assert out.stats.rested == out.stats.rounds == 24


@pytest.mark.parametrize("mode", ["host", "device"])
@torch.inference_mode()
def test_resting_rounds_still_copy_where_the_lookup_matches(mode, monkeypatch):
    """With copied drafts on, a resting round is the copy-only round: a match is copied and verified, no match
    rests; the adapter never drafts. Greedy output stays plain decoding's."""
    from test_copy_draft import repetitive_prompts
    monkeypatch.setattr(DraftGate, "speculate", lambda self: False)
    model = tiny_model("llama", layers=6)
    sources = set()
    for i, p in enumerate(repetitive_prompts(3, seed=2)):
        plain = kx.generate(model, p, max_new_tokens=32, eos_token_id=[]).sequences
        adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer", seed=i)
        out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=32, threshold=0.0, max_draft=4,
                                      eos_token_id=[], mode=mode, copy_draft=True, draft_gate=True)
        assert torch.equal(out.sequences, plain), i
        sources |= set(out.stats.draft_sources)
    assert sources == {"copy", "rest"}, sources


def rest_every_other_round(monkeypatch):
    """A gate whose rounds alternate, resting first."""
    def alternate(self):
        self.issued_rounds = getattr(self, "issued_rounds", 0) + 1
        return self.issued_rounds % 2 == 0
    monkeypatch.setattr(DraftGate, "speculate", alternate)


@pytest.mark.slow
@torch.inference_mode()
def test_gated_sampling_draws_the_targets_distribution(small, monkeypatch):
    model, adapter = small
    rest_every_other_round(monkeypatch)
    s = dict(temperature=1.0, top_k=0, top_p=1.0, max_draft=4, threshold=0.0)
    samples, rested = [], 0
    for i in range(SAMPLES):
        out = kx.speculative_generate(model, PROMPT, adapter=adapter, max_new_tokens=3, eos_token_id=[],
                                      do_sample=True, seed=9000 + i, draft_gate=True, **s)
        samples.append(out.sequences[0, len(PROMPT):].tolist())
        rested += out.stats.rested
    assert rested >= SAMPLES, "the resting rounds went untested"
    assert chi_square_three_tokens(model, samples, s) > P_VALUE


@torch.inference_mode()
def test_a_seed_reproduces_gated_tokens(small, monkeypatch):
    model, adapter = small
    rest_every_other_round(monkeypatch)
    kw = dict(adapter=adapter, max_new_tokens=30, eos_token_id=[], do_sample=True, max_draft=3, threshold=0.0,
              draft_gate=True)
    a = kx.speculative_generate(model, PROMPT, seed=11, **kw)
    b = kx.speculative_generate(model, PROMPT, seed=11, **kw)
    assert torch.equal(a.sequences, b.sequences) and a.stats.draft_sources == b.stats.draft_sources
    assert 0 < a.stats.rested < a.stats.rounds


@torch.inference_mode()
def test_the_default_follows_the_measured_table(small, monkeypatch):
    model, adapter = small
    for sampled in (False, True):
        for on in (False, True):
            monkeypatch.setitem(decoding.DRAFT_GATE_DEFAULT, (False, sampled), on)
            kw = dict(do_sample=True, seed=0) if sampled else {}
            out = kx.speculative_generate(model, PROMPT, adapter=adapter, max_new_tokens=4, **kw)
            assert out.stats.draft_gate == on, (sampled, on)
    out = kx.speculative_generate(model, PROMPT, adapter=adapter, max_new_tokens=4, draft_gate=False)
    assert not out.stats.draft_gate and out.stats.rested == 0


def test_a_bad_draft_gate_is_named(small):
    model, adapter = small
    with pytest.raises(ValueError, match="draft_gate must be True, False, None .* or a DraftCosts"):
        kx.speculative_generate(model, PROMPT, adapter=adapter, draft_gate="yes")


@torch.inference_mode()
def test_draft_gate_takes_this_machines_costs(small, monkeypatch):
    """A DraftCosts turns the gate on with those prices: free drafts never rest (sampled: counts alone),
    drafts priced at a plain step each always do after the warm-up."""
    model, adapter = small
    kw = dict(adapter=adapter, max_new_tokens=40, eos_token_id=[], do_sample=True, seed=1, threshold=0.0,
              max_draft=3, copy_draft=False)
    free = kx.speculative_generate(model, PROMPT, draft_gate=DraftCosts(head=0.0, step=0.0, row=0.0), **kw)
    dear = kx.speculative_generate(model, PROMPT, draft_gate=DraftCosts(head=1.0, step=1.0, row=1.0), **kw)
    assert free.stats.draft_gate and dear.stats.draft_gate
    assert free.stats.rested == 0 and dear.stats.rested > dear.stats.rounds // 2


# ---- GPU: the resting round's graphs ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_gated_graph_rounds_equal_plain_decoding_on_the_gpu(dtype, monkeypatch):
    """Captured resting rounds beside the captured speculative ones, alternating (with copied drafts on, the
    resting round is the captured copy-only round): the tokens of plain decoding, fp32 and bf16 (a resting
    round is the one-position verification a round without drafts runs)."""
    rest_every_other_round(monkeypatch)
    model = copy.deepcopy(tiny_model("llama", layers=6, hidden=128, heads=4, kv_heads=2, vocab=300)).to(dtype).cuda()
    rested = 0
    for i, p in enumerate(prompts(4, vocab=300, seed=5)):
        plain = kx.generate(model, p, max_new_tokens=48, eos_token_id=[]).sequences
        adapter = kx.Adapter.for_model(model, exit_layer=2, init="random", seed=i)
        for copy_draft in (True, False):
            out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=48, threshold=0.0, max_draft=4,
                                          eos_token_id=[], draft_gate=True, copy_draft=copy_draft)
            assert out.stats.mode == "graphs" and out.stats.copy_draft == copy_draft
            assert torch.equal(out.sequences, plain), (i, copy_draft)
            rested += out.stats.rested
    assert rested > 0, "no resting round ran"
