"""accept_commit: greedy accept and the engine's commit in one launch. The reference is accept_greedy followed by
Engine._commit; the CUDA kernel must write exactly the same buffers."""
import copy

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import ops
from kangaroo_ext.engine.engine import engine_for

from models import tiny_model

CUDA = torch.cuda.is_available() and kx._extension.loaded()
BUFFERS = ("cache_len", "tokens_in", "history", "report")


def _case(B, k, seed, device="cpu", capacity=40, gamma=8):
    """Random drafts that agree with the target for a random prefix, and random engine-shaped buffers."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 9, (B, k + 1), generator=g)
    drafts = target[:, :k].clone()
    for b in range(B):  # break the agreement at a random place (or never)
        cut = int(torch.randint(0, k + 2, (1,), generator=g))
        if cut < k:
            drafts[b, cut] = (drafts[b, cut] + 1) % 9
    num_drafted = torch.randint(0, k + 1, (B,), generator=g)
    state = dict(cache_len=torch.randint(0, capacity - gamma - 2, (B,), generator=g),
                 tokens_in=torch.randint(0, 9, (B, gamma + 1), generator=g),
                 history=torch.randint(0, 9, (B, capacity), generator=g),
                 report=torch.randint(-1, 9, (B, gamma + 4), generator=g))
    move = lambda t: t.to(device)
    return move(drafts), move(target), move(num_drafted), {n: move(t) for n, t in state.items()}


@pytest.mark.parametrize("B,k", [(1, 0), (1, 1), (1, 6), (3, 4), (2, 8)])
@torch.inference_mode()
def test_reference_is_accept_greedy_then_the_engines_commit(B, k):
    model = copy.deepcopy(tiny_model("llama", layers=2))   # an engine of its own: B rows
    engine = engine_for(model)
    engine.ROWS = B
    engine.reserve(32, 8)
    for seed in range(6):
        drafts, target, nd, state = _case(B, k, seed, capacity=engine.history.shape[1], gamma=8)
        for name, t in state.items():
            getattr(engine, name).copy_(t)
        start = {n: getattr(engine, n).clone() for n in BUFFERS}
        engine.num_drafted.copy_(nd)
        if k:
            engine._commit(*ops.accept_greedy(drafts, target, nd))
        else:  # a plain step's commit: no drafts, the target's token
            engine._commit(torch.zeros_like(nd), target)
        want = {n: getattr(engine, n).clone() for n in BUFFERS}
        got = {n: t.clone() for n, t in start.items()}
        ops.accept_commit(drafts, target, nd, got["cache_len"], got["tokens_in"], got["history"], got["report"],
                          backend="reference")
        for n in BUFFERS:
            assert torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("B,k", [(1, 0), (1, 1), (1, 6), (3, 4), (2, 8), (1, 63)])
def test_triton_kernel_writes_what_the_reference_writes(B, k):
    """On the CPU under TRITON_INTERPRET=1 (tests/conftest.py), on a GPU where there is one."""
    if ops.triton_module() is None:
        pytest.skip("Triton kernels are not importable here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in range(5):
        drafts, target, nd, state = _case(B, k, seed, device=device, capacity=k + 80, gamma=max(k, 1))
        want = {n: t.clone() for n, t in state.items()}
        ops.accept_commit(drafts, target, nd, *(want[n] for n in BUFFERS), backend="reference")
        ops.accept_commit(drafts, target, nd, *(state[n] for n in BUFFERS), backend="triton")
        for n in BUFFERS:
            assert torch.equal(state[n], want[n]), (n, seed)


def test_bad_arguments_are_named():
    drafts, target, nd, s = _case(1, 3, 0)
    with pytest.raises(ValueError, match="draft_tokens must be int64 of shape"):
        ops.accept_commit(drafts[:, :2], target, nd, s["cache_len"], s["tokens_in"], s["history"], s["report"])
    with pytest.raises(ValueError, match="report must be int64"):
        ops.accept_commit(drafts, target, nd, s["cache_len"], s["tokens_in"], s["history"], s["report"][:, :5])
    with pytest.raises(ValueError, match="target_tokens must be int64"):
        ops.accept_commit(drafts, target.float(), nd, s["cache_len"], s["tokens_in"], s["history"], s["report"])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the extension")
@pytest.mark.parametrize("B,k", [(1, 0), (1, 1), (1, 6), (3, 4), (2, 8), (1, 63)])
def test_cuda_kernel_writes_what_the_reference_writes(B, k):
    for seed in range(20):
        drafts, target, nd, state = _case(B, k, seed, device="cuda", capacity=k + 80, gamma=max(k, 1))
        want = {n: t.clone() for n, t in state.items()}
        ops.accept_commit(drafts, target, nd, *(want[n] for n in BUFFERS), backend="reference")
        ops.accept_commit(drafts, target, nd, *(state[n] for n in BUFFERS), backend="cuda")
        for n in BUFFERS:
            assert torch.equal(state[n], want[n]), (n, seed)


# Generation with the fused commit: tests/test_verify_tail.py, test_generation_with_a_fused_end_is_unchanged.
