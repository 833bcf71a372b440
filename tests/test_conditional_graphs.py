"""CUDA-graph conditional nodes (kangaroo_ext/engine/conditional.py, csrc/graph_branch.cu): bodies run at
replay exactly when the device-side condition says, nest, keep their memory in the graph's pool, hold
our PDL-launched kernels; and the engine's draft/verify graphs skip exactly the work after the exit."""
import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import ops
from kangaroo_ext.engine import conditional
from kangaroo_ext.engine.rounds import Report

from models import prompts, tiny_model

REASON = conditional.unsupported_reason("cuda") if torch.cuda.is_available() else "needs a CUDA device"
needs_conditionals = pytest.mark.skipif(bool(REASON), reason=REASON or "-")


def test_unsupported_reason_names_the_cause():
    assert "CUDA device" in conditional.unsupported_reason("cpu")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="flags"):
        with conditional.if_any(torch.ones(2, dtype=torch.bool), pool=(0, 0)):
            pass
    with pytest.raises(ValueError, match="index"):
        with conditional.switch_max(torch.zeros(1, dtype=torch.int32), 2, pool=(0, 0)):
            pass


@needs_conditionals
def test_outside_a_capture_is_an_error():
    with pytest.raises(RuntimeError, match="inside torch.cuda.graph"):
        with conditional.if_any(torch.ones(1, dtype=torch.bool, device="cuda"), pool=(0, 0)):
            pass


def _capture(fn):
    pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn(pool)
    return graph


@needs_conditionals
def test_nested_if_runs_each_level_iff_its_flags():
    flags = torch.zeros(3, 2, dtype=torch.bool, device="cuda")   # level i runs iff any(flags[i])
    x = torch.randn(257, device="cuda")
    out = torch.zeros(3, 257, device="cuda")

    def body(pool):
        with conditional.if_any(flags[0], pool):
            out[0].copy_(x * 2 + 1)                              # allocates inside the body
            with conditional.if_any(flags[1], pool):
                out[1].copy_(x.exp())
                with conditional.if_any(flags[2], pool):
                    out[2].copy_(x - 3)
    graph = _capture(body)
    want = torch.stack([x * 2 + 1, x.exp(), x - 3])
    for bits in range(8):
        f = [(bits >> i) & 1 for i in range(3)]
        flags.zero_()
        for i, on in enumerate(f):
            flags[i, i % 2] = bool(on)                           # "any": one true element is enough
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        runs = [f[0], f[0] and f[1], f[0] and f[1] and f[2]]
        for i in range(3):
            if runs[i]:
                torch.testing.assert_close(out[i], want[i], rtol=0, atol=0)
            else:
                assert torch.isnan(out[i]).all(), f"level {i} ran with flags {f}"


@needs_conditionals
def test_switch_runs_body_max_index_and_none_out_of_range():
    index = torch.zeros(3, dtype=torch.int64, device="cuda")
    out = torch.zeros(5, device="cuda")

    def body(pool):
        with conditional.switch_max(index, 4, pool) as case:
            for i in range(4):
                with case(i):
                    out[i].fill_(10.0 + i)
    graph = _capture(body)
    for values, ran in (([0, 0, 0], 0), ([1, 3, 2], 3), ([2, -5, 1], 2), ([4, 0, 0], None), ([-1, -1, -1], None)):
        index.copy_(torch.tensor(values))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        expect = torch.zeros(5, device="cuda")
        if ran is not None:
            expect[ran] = 10.0 + ran
        assert torch.equal(out, expect), (values, out)


@needs_conditionals
def test_body_memory_stays_in_the_graph_pool():
    """Temporaries made inside bodies belong to the graph: tensors allocated after the capture must not
    share their memory (else a replay would overwrite them)."""
    flag = torch.ones(1, dtype=torch.bool, device="cuda")
    x = torch.randn(4096, device="cuda")
    out = torch.zeros(4096, device="cuda")

    def body(pool):
        with conditional.if_any(flag, pool):
            tmp = x * 3.0
            out.copy_(tmp.sin() + tmp)
    graph = _capture(body)
    others = [torch.full((4096,), 7.0, device="cuda") for _ in range(64)]
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, (x * 3).sin() + x * 3)
    assert all(bool((t == 7.0).all()) for t in others), "a replay wrote into memory allocated after the capture"


@needs_conditionals
def test_our_kernels_inside_a_switch_match_eager():
    x = torch.randn(2, 1, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(576, 1536, device="cuda", dtype=torch.bfloat16) / 40
    res = torch.randn(2, 1, 1536, device="cuda", dtype=torch.bfloat16)
    norm = torch.rand(1536, device="cuda", dtype=torch.bfloat16) + 0.5
    index = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = torch.zeros(2, 1, 576, device="cuda", dtype=torch.bfloat16)
    want = [ops.decode_linear(x, w, None), ops.rms_norm_linear(x, res, norm, 1e-5, [w], [None])[0][0]]
    for fn in (lambda: ops.decode_linear(x, w, None), lambda: ops.rms_norm_linear(x, res, norm, 1e-5, [w], [None])):
        fn()  # load the kernels outside the capture

    def body(pool):
        with conditional.switch_max(index, 2, pool) as case:
            with case(0):
                out.copy_(ops.decode_linear(x, w, None))
            with case(1):
                out.copy_(ops.rms_norm_linear(x, res, norm, 1e-5, [w], [None])[0][0])
    graph = _capture(body)
    for i in (1, 0, 1):
        index.fill_(i)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want[i]), f"body {i}"


# ---- the engine's rounds ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_after_a_run():
    import copy
    model = copy.deepcopy(tiny_model("llama", layers=6)).cuda()
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    out = kx.speculative_generate(model, prompts(1, seed=21)[0].cuda(), adapter=adapter, max_new_tokens=24,
                                  max_draft=4, eos_token_id=[])
    engine = model.__dict__["_kangaroo_engine"][1]
    graphs, _ = engine.graphs_for(4, True, device_exit=True)  # the cached graphs the run replayed
    return out, engine, graphs


@needs_conditionals
def test_generation_uses_the_device_exit(engine_after_a_run):
    out, _, graphs = engine_after_a_run
    assert out.stats.device_exit and out.stats.device_exit_off == ""
    assert graphs.device_exit


@needs_conditionals
@pytest.mark.parametrize("threshold,steps_run", [(2.0, 1), (0.0, 5)])
@torch.inference_mode()
def test_draft_round_skips_the_steps_after_the_exit(engine_after_a_run, threshold, steps_run):
    """Exit states of the steps after the confidence exit are never written: those steps did not run."""
    _, e, graphs = engine_after_a_run
    e.threshold.fill_(threshold)
    e.exit_states.fill_(float("nan"))
    graphs.draft.replay()
    torch.cuda.synchronize()
    written = ~torch.isnan(e.exit_states[0]).all(dim=-1)            # [γ+1]
    assert written.tolist() == [True] * steps_run + [False] * (5 - steps_run)
    assert int(e.num_drafted[0]) == steps_run - 1


@needs_conditionals
@pytest.mark.parametrize("drafted", [0, 1, 4])
@torch.inference_mode()
def test_verify_commits_at_most_the_drafted_tokens_plus_one(engine_after_a_run, drafted):
    _, e, graphs = engine_after_a_run
    e.threshold.fill_(0.0)
    graphs.draft.replay()                                           # 4 drafts and their exit states
    e.num_drafted.fill_(drafted)
    e.report.fill_(-7)
    before = int(e.cache_len[0])
    graphs.verify.replay()
    torch.cuda.synchronize()
    row = e.report[0].tolist()
    result = Report.read(row)
    assert 0 <= result.accepted <= drafted and result.drafted == drafted
    assert int(e.cache_len[0]) == before + result.accepted + 1
    assert result.committed[:result.accepted] == e.draft_tokens[0, :result.accepted].tolist()
    assert all(t >= 0 for t in result.committed)
    first_unwritten = Report.COMMITTED + drafted + 1
    assert all(t == -7 for t in row[first_unwritten:]), "verify wrote past its k+1 positions"
