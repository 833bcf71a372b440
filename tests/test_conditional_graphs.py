"""CUDA-graph conditional nodes on a GPU (kangaroo_ext/engine/conditional.py, csrc/graph_branch.cu): bodies
run at replay exactly when the device-side condition says, nest 32 deep, keep their memory in the
graph's pool (checked against the allocator's own segment map after empty_cache), hold our kernels,
survive an error inside a body, and a capture failure falls back; and the engine's draft/verify graphs
skip exactly the work after the exit. Each node test runs on every path this machine can capture with
(the one chosen for this torch, and the other where it is available). CPU-side logic:
tests/test_conditional_capture.py."""
import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import ops
from kangaroo_ext.engine import conditional
from kangaroo_ext.engine.engine import engine_for
from kangaroo_ext.engine.rounds import Report

from models import prompts, tiny_model

REASON = conditional.unsupported_reason("cuda") if torch.cuda.is_available() else "needs a CUDA device"
needs_conditionals = pytest.mark.skipif(bool(REASON), reason=REASON or "-")
gpu = pytest.mark.gpu


def _paths():
    """Every path that can capture here, each skipped with its reason where it cannot."""
    out = []
    for path in (conditional.TORCH_PATH, conditional.OWN_PATH):
        why = REASON or conditional._path_unavailable(path, torch.cuda.current_device())
        out.append(pytest.param(path, marks=pytest.mark.skipif(bool(why), reason=why or "-"), id=path))
    return out


PATHS = _paths()


def test_unsupported_reason_names_the_cause():
    assert "CUDA device" in conditional.unsupported_reason("cpu")


@gpu
@needs_conditionals
def test_outside_a_capture_is_an_error():
    with pytest.raises(RuntimeError, match="inside torch.cuda.graph"):
        with conditional.if_any(torch.ones(1, dtype=torch.bool, device="cuda"), pool=(0, 0)):
            pass


def _capture(fn, pool=None):
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn(pool)
    return graph


@gpu
@pytest.mark.parametrize("path", PATHS)
def test_nested_if_runs_each_level_iff_its_flags(path):
    flags = torch.zeros(3, 2, dtype=torch.bool, device="cuda")   # level i runs iff any(flags[i])
    x = torch.randn(257, device="cuda")
    out = torch.zeros(3, 257, device="cuda")

    def body(pool):
        with conditional.if_any(flags[0], pool, path=path):
            out[0].copy_(x * 2 + 1)                              # allocates inside the body
            with conditional.if_any(flags[1], pool, path=path):
                out[1].copy_(x.exp())
                with conditional.if_any(flags[2], pool, path=path):
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


@gpu
@pytest.mark.parametrize("path", PATHS)
def test_switch_runs_body_max_index_and_none_out_of_range(path):
    index = torch.zeros(3, dtype=torch.int64, device="cuda")
    out = torch.zeros(5, device="cuda")

    def body(pool):
        with conditional.switch_max(index, 4, pool, path=path) as case:
            for i in range(4):
                with case(i):
                    out[i].fill_(10.0 + i)
                    index.fill_(0)    # a body changing the index must not start another body
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


@gpu
@pytest.mark.parametrize("path", PATHS)
def test_nesting_32_deep(path):
    """γ may be 32: the draft round then nests 32 IF nodes."""
    depth = 32
    levels = torch.zeros(depth, dtype=torch.bool, device="cuda")
    ran = torch.zeros(depth, dtype=torch.int32, device="cuda")

    def body(pool):
        with contextlib.ExitStack() as stack:
            for i in range(depth):
                stack.enter_context(conditional.if_any(levels[i:i + 1], pool, path=path))
                ran[i:i + 1].add_(1)
    graph = _capture(body)
    for open_levels in (0, 1, 17, 32):
        levels.zero_()
        levels[:open_levels] = True
        ran.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert ran.tolist() == [1] * open_levels + [0] * (depth - open_levels)


# ---- memory: bodies allocate from the graph's private pool ----------------------------------------

def _pool_of(address: int):
    """The pool id of the allocator segment holding `address`: (0, 0) for the general pool, the graph's
    handle for its private pool, None where no segment holds it (returned to the driver)."""
    for segment in torch.cuda.memory_snapshot():
        if segment["address"] <= address < segment["address"] + segment["total_size"]:
            return tuple(segment["segment_pool_id"])
    return None


@gpu
@needs_conditionals
def test_the_pool_check_sees_general_pool_memory():
    """The check below can fail: memory from the general pool is seen as such, and gone after empty_cache."""
    t = torch.empty(1 << 20, device="cuda")
    address = t.data_ptr()
    assert _pool_of(address) == (0, 0)
    del t
    torch.cuda.empty_cache()
    assert _pool_of(address) is None


@gpu
@pytest.mark.parametrize("path", PATHS)
def test_body_memory_is_in_the_graph_pool_after_empty_cache(path):
    """Every tensor made inside a body (IF, nested IF, SWITCH cases) lies in a segment of the graph's
    private pool. Without the redirect those temporaries come from the general pool: once freed, empty_cache
    returns them to the driver (or later tensors take them) and every replay writes there."""
    n = 1 << 20                                          # 4 MB: each temporary gets its own segment
    flag = torch.ones(1, dtype=torch.bool, device="cuda")
    index = torch.zeros(1, dtype=torch.int64, device="cuda")
    x = torch.randn(n, device="cuda")
    out = torch.zeros(4, n, device="cuda")
    made = []                                            # addresses of the body temporaries

    def temp(value):
        made.append(value.data_ptr())
        return value

    def body(pool):
        with conditional.if_any(flag, pool, path=path):
            a = temp(x * 3.0)
            out[0].copy_(temp(a.sin()) + a)
            with conditional.if_any(flag, pool, path=path):
                out[1].copy_(temp(x.exp()) - 1)
        with conditional.switch_max(index, 3, pool, path=path) as case:
            for k in range(3):
                with case(k):
                    out[2].copy_(temp(x + k))
                    out[3].copy_(temp(x * k).cos())
    pool = torch.cuda.graph_pool_handle()
    graph = _capture(body, pool)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    pools = {address: _pool_of(address) for address in made}
    assert all(p == tuple(pool) for p in pools.values()), f"body memory outside the graph's pool {pool}: {pools}"

    # Results stay right with the general pool's freed memory handed out again.
    others = [torch.full((n,), 7.0, device="cuda") for _ in range(24)]
    for k in (2, 0, 1):
        index.fill_(k)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        want = torch.stack([(x * 3).sin() + x * 3, x.exp() - 1, x + k, (x * k).cos()])
        torch.testing.assert_close(out, want)
    assert all(bool((t == 7.0).all()) for t in others), "a replay wrote into memory allocated after the capture"


@gpu
@pytest.mark.parametrize("path", PATHS)
def test_an_error_inside_a_body_leaves_the_thread_clean(path):
    flag = torch.ones(1, dtype=torch.bool, device="cuda")
    x = torch.randn(1 << 20, device="cuda")
    out = torch.zeros_like(x)

    def failing(pool):
        with conditional.if_any(flag, pool, path=path):
            with conditional.if_any(flag, pool, path=path):
                out.copy_(x + 1)
                raise KeyError("in a body")
    stream = torch.cuda.current_stream()
    with pytest.raises(KeyError):
        _capture(failing)
    torch.cuda.set_stream(stream)   # torch.cuda.graph restores it only when its capture_end succeeds
    assert conditional._open_paths() == []
    if path == conditional.OWN_PATH:
        from kangaroo_ext import _extension
        assert _extension._C.branch_depth() == 0
    assert conditional.unsupported_reason("cuda") == "", "an error in a body is not a capture failure"

    made = []

    def working(pool):
        with conditional.if_any(flag, pool, path=path):
            tmp = x * 2
            made.append(tmp.data_ptr())
            out.copy_(tmp + 1)
    pool = torch.cuda.graph_pool_handle()
    graph = _capture(working, pool)
    torch.cuda.empty_cache()
    assert _pool_of(made[0]) == tuple(pool), "the capture after the error lost the redirect"
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x * 2 + 1)


@gpu
@needs_conditionals
def test_capture_failure_falls_back_under_cuda_malloc_async():
    """Under backend:cudaMallocAsync a capture either works or raises ConditionalCaptureError, after which
    unsupported_reason() reports it and a capture without conditional nodes works (a fresh process:
    the allocator backend is chosen at start-up)."""
    script = textwrap.dedent("""
        import torch
        from kangaroo_ext.engine import conditional
        flag = torch.ones(1, dtype=torch.bool, device="cuda")
        x = torch.randn(4096, device="cuda")
        out = torch.zeros_like(x)
        pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with conditional.capture(graph, pool):
                with conditional.if_any(flag, pool):
                    out.copy_(x * 2)
            graph.replay(); torch.cuda.synchronize()
            assert torch.equal(out, x * 2)
            print("CAPTURED")
        except Exception as e:
            assert conditional.is_capture_error(e), repr(e)
            assert "failed earlier" in conditional.unsupported_reason("cuda"), conditional.unsupported_reason("cuda")
            torch.cuda.set_stream(torch.cuda.default_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream()):   # not the failed capture's stream
                out.copy_(x * 3)
            graph.replay(); torch.cuda.synchronize()
            assert torch.equal(out, x * 3)
            print("FELL BACK:", conditional.unsupported_reason("cuda"))
    """)
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CAPTURED" in run.stdout or "FELL BACK" in run.stdout


@gpu
@pytest.mark.parametrize("path", PATHS)
def test_our_kernels_inside_a_switch_match_eager(path):
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
        with conditional.switch_max(index, 2, pool, path=path) as case:
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
                                  max_draft=4, eos_token_id=[], copy_draft=False)   # the adapter's rounds
    engine = engine_for(model)
    graphs, _ = engine.graphs_for(4, True, device_exit=True)  # the cached graphs the run replayed
    return out, engine, graphs


@gpu
@needs_conditionals
def test_generation_uses_the_device_exit(engine_after_a_run):
    out, _, graphs = engine_after_a_run
    assert out.stats.device_exit and out.stats.device_exit_off == ""
    assert graphs.device_exit


@gpu
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


@gpu
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
