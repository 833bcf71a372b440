"""verify_tail: a greedy step's end (final norm, the target's argmax at each position, accept_commit) in two CUDA
launches. The reference is the three ops in a row; the CUDA kernel must give bitwise the per-op CUDA path's tokens
(fused_add_rms_norm, lm_head_argmax) and write exactly accept_commit's buffers."""
import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import ops

from test_accept_commit import BUFFERS, _case

CUDA = torch.cuda.is_available() and kx._extension.loaded()


def _rows(B, T, H, V, dtype, device, seed, near_ties=False):
    """x, residual [B, T, H], norm weight [H], head [V, H]. near_ties: head rows that nearly repeat each other,
    so that a norm rounded differently would change argmaxes (the bitwise check is then a real one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    res = torch.randn(B, T, H, generator=g) * 4
    w = 1 + 0.1 * torch.randn(H, generator=g)
    head = torch.randn(V, H, generator=g) / H ** 0.5
    if near_ties:
        head[1::2] = head[0::2][: V // 2] + 1e-3 * torch.randn(V // 2, H, generator=g) / H ** 0.5
    return tuple(t.to(device=device, dtype=dtype) for t in (x, res, w, head))


def _drafts_agreeing_with(targets, k, seed):
    """Drafts equal to the per-op targets up to a random place (so some rounds accept several)."""
    g = torch.Generator().manual_seed(seed)
    drafts = targets[:, :k].clone()
    for b in range(drafts.shape[0]):
        cut = int(torch.randint(0, k + 2, (1,), generator=g))
        if cut < k:
            drafts[b, cut] = (drafts[b, cut] + 1) % 7
    return drafts


def _per_op(x, res, w, head, eps, drafts, nd, state, backend):
    y, _ = ops.fused_add_rms_norm(x, res, w, eps, backend=backend)
    targets = ops.lm_head_argmax(y, head, backend=backend)[0]
    ops.accept_commit(drafts, targets, nd, *(state[n] for n in BUFFERS), backend=backend)
    return targets


@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (2, 4)])
def test_reference_is_norm_head_then_accept_commit(B, T):
    x, res, w, head = _rows(B, T, 48, 37, torch.float32, "cpu", 0)
    _, target, nd, state = _case(B, T - 1, 1)
    ref_targets = ops.lm_head_argmax(ops.fused_add_rms_norm(x, res, w, 1e-5)[0], head)[0]
    drafts = _drafts_agreeing_with(ref_targets, T - 1, 2)
    want = {n: t.clone() for n, t in state.items()}
    ops.accept_commit(drafts, ref_targets, nd, *(want[n] for n in BUFFERS), backend="reference")
    got = ops.verify_tail(x, res, w, 1e-5, head, drafts, nd, *(state[n] for n in BUFFERS), backend="reference")
    assert torch.equal(got, ref_targets)
    for n in BUFFERS:
        assert torch.equal(state[n], want[n]), n


def test_bad_arguments_are_named():
    x, res, w, head = _rows(1, 3, 16, 11, torch.float32, "cpu", 0)
    drafts, _, nd, s = _case(1, 2, 0)
    args = lambda **kw: dict(dict(x=x, residual=res, norm_weight=w, eps=1e-5, lm_head=head, draft_tokens=drafts,
                                  num_drafted=nd, **s), **kw)
    with pytest.raises(ValueError, match="x must be"):
        ops.verify_tail(**args(x=x[0]))
    with pytest.raises(ValueError, match="residual must"):
        ops.verify_tail(**args(residual=None))
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        ops.verify_tail(**args(norm_weight=w[:5]))
    with pytest.raises(ValueError, match="lm_head must have shape"):
        ops.verify_tail(**args(lm_head=head[:, :5]))
    with pytest.raises(ValueError, match="draft_tokens must be int64 of shape"):
        ops.verify_tail(**args(draft_tokens=drafts[:, :1]))
    with pytest.raises(ValueError, match="report must be int64"):
        ops.verify_tail(**args(report=s["report"][:, :4]))


@pytest.mark.parametrize("B,T,H,V", [(1, 1, 48, 37), (1, 7, 40, 301), (3, 4, 24, 129)])
def test_triton_version_is_the_reference(B, T, H, V):
    """On the CPU under TRITON_INTERPRET=1 (fp32), on a GPU where there is one."""
    if ops.triton_module() is None:
        pytest.skip("Triton kernels are not importable here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, res, w, head = _rows(B, T, H, V, torch.float32, device, 3)
    _, _, nd, state = _case(B, T - 1, 4, device=device, capacity=T + 80, gamma=max(T - 1, 1))
    ref = ops.lm_head_argmax(ops.fused_add_rms_norm(x, res, w, 1e-6, backend="reference")[0], head,
                             backend="reference")[0]
    drafts = _drafts_agreeing_with(ref, T - 1, 5)
    want = {n: t.clone() for n, t in state.items()}
    ref_targets = ops.verify_tail(x, res, w, 1e-6, head, drafts, nd, *(want[n] for n in BUFFERS), backend="reference")
    got = ops.verify_tail(x, res, w, 1e-6, head, drafts, nd, *(state[n] for n in BUFFERS), backend="triton")
    assert torch.equal(got, ref_targets)
    for n in BUFFERS:
        assert torch.equal(state[n], want[n]), n


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the extension")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,T,H,V", [(1, 1, 576, 49152), (1, 7, 576, 49152), (1, 10, 576, 8191), (2, 4, 2048, 3001),
                                     (3, 9, 40, 777), (1, 16, 64, 130), (1, 64, 128, 1000)])
def test_cuda_kernel_is_the_per_op_cuda_path_bitwise(dtype, B, T, H, V):
    """Tokens and the commit's buffers equal fused_add_rms_norm + lm_head_argmax + accept_commit on the GPU,
    bitwise, on near-tie heads; H = 40 takes the scalar path (not a multiple of 16 bytes in 16-bit types)."""
    for seed in range(3):
        x, res, w, head = _rows(B, T, H, V, dtype, "cuda", seed, near_ties=True)
        _, _, nd, state = _case(B, T - 1, seed, device="cuda", capacity=T + 80, gamma=max(T - 1, 1))
        nd.fill_(T - 1)
        probe = {n: t.clone() for n, t in state.items()}
        ref = _per_op(x, res, w, head, 1e-5, torch.zeros(B, T - 1, dtype=torch.int64, device="cuda"), nd, probe,
                      "cuda")
        drafts = _drafts_agreeing_with(ref, T - 1, seed)
        want = {n: t.clone() for n, t in state.items()}
        want_targets = _per_op(x, res, w, head, 1e-5, drafts, nd, want, "cuda")
        got = ops.verify_tail(x, res, w, 1e-5, head, drafts, nd, *(state[n] for n in BUFFERS), backend="cuda")
        assert torch.equal(got, want_targets), (seed, (got != want_targets).sum().item())
        for n in BUFFERS:
            assert torch.equal(state[n], want[n]), (n, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the extension")
def test_cuda_kernel_in_a_cuda_graph_replays_the_eager_result():
    x, res, w, head = _rows(1, 7, 576, 49152, torch.bfloat16, "cuda", 0)
    drafts, _, nd, state = _case(1, 6, 0, device="cuda", capacity=90, gamma=6)
    start = {n: t.clone() for n, t in state.items()}
    eager = ops.verify_tail(x, res, w, 1e-5, head, drafts, nd, *(state[n] for n in BUFFERS), backend="cuda")
    eager_state = {n: t.clone() for n, t in state.items()}
    for n in BUFFERS:
        state[n].copy_(start[n])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
        ops.verify_tail(x, res, w, 1e-5, head, drafts, nd, *(state[n] for n in BUFFERS), backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.verify_tail(x, res, w, 1e-5, head, drafts, nd, *(state[n] for n in BUFFERS), backend="cuda")
    for n in BUFFERS:
        state[n].copy_(start[n])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    for n in BUFFERS:
        assert torch.equal(state[n], eager_state[n]), n


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the extension")
@pytest.mark.parametrize("switch", ["KANGAROO_FUSED_COMMIT", "KANGAROO_FUSED_VERIFY_TAIL"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_generation_with_a_fused_end_is_unchanged(monkeypatch, switch, dtype):
    """With the fused commit (accept_commit) or the fused tail (verify_tail) switched on, plain and Kangaroo
    decoding (adapter and copy rounds) give the tokens they give without it (in bf16 too: the tokens are the
    per-op path's bitwise), and Kangaroo equals plain decoding in fp32, with one host sync per round."""
    import copy

    from models import prompts, tiny_model
    model = copy.deepcopy(tiny_model("llama", layers=6)).to("cuda", dtype)
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    for p in prompts(4, seed=5):
        p = p.cuda()
        runs = {}
        for on in ("0", "1"):
            monkeypatch.setenv(switch, on)
            plain = kx.generate(model, p, max_new_tokens=40, eos_token_id=[])
            spec = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=40, threshold=0.3, max_draft=5,
                                           eos_token_id=[])
            assert spec.stats.host_syncs == spec.stats.rounds
            if switch == "KANGAROO_FUSED_VERIFY_TAIL":
                assert spec.stats.verify_tail == ("fused" if on == "1" else "per-op"), spec.stats.verify_tail_off
            runs[on] = (plain.sequences, spec.sequences, spec.stats.accepted)
        assert torch.equal(runs["0"][0], runs["1"][0]) and torch.equal(runs["0"][1], runs["1"][1])
        assert runs["0"][2] == runs["1"][2]
        if dtype == torch.float32:
            assert torch.equal(runs["1"][1], runs["1"][0])


def test_stats_say_why_the_fused_tail_did_not_run(monkeypatch):
    """On the CPU (or with the switch off) greedy steps end per op, and the stats say why."""
    import copy

    from models import prompts, tiny_model
    model = copy.deepcopy(tiny_model("llama", layers=4))
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    p = prompts(1, seed=2)[0]
    monkeypatch.setenv("KANGAROO_FUSED_VERIFY_TAIL", "0")
    out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=6, eos_token_id=[])
    assert out.stats.verify_tail == "per-op" and "KANGAROO_FUSED_VERIFY_TAIL=0" in out.stats.verify_tail_off
    monkeypatch.delenv("KANGAROO_FUSED_VERIFY_TAIL", raising=False)   # on by default
    out = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=6, eos_token_id=[])
    if not torch.cuda.is_available():
        assert out.stats.verify_tail == "per-op" and "not on a GPU" in out.stats.verify_tail_off
