"""The prompt's prefill: eager in one pass, or in fixed-size chunks that are captured CUDA graphs
(KANGAROO_PREFILL_GRAPHS).

Why chunks in graphs: an eager prefill launches about a dozen ops per layer from Python, and on a GPU the host
is the bottleneck. On the H100 at 15ee133 a prefill took 7 to 43 ms whatever the prompt's length (40 to 1,376
tokens), while the arithmetic of 400 tokens through the default model is well under a millisecond; Spec-Bench
times a turn with its prefill, so short answers paid it in full (translation: 23% of a Kangaroo turn).

    plan = chunk_plan(n, start=0, capacity=S)    # [(size, real)]: full chunks, then one padded chunk
    for size, real in plan: copy `real` tokens into the chunk buffer; replay graph[size]   # cache_len += size
    cache_len = n                                                    # drop the padding (the host knows n)

A chunk of `size` rows embeds tokens[:, :size] of a static buffer at positions cache_len + [0, size) (read on
the device), runs the layers (and, for Kangaroo, the adapter between layers ℓ - 1 and ℓ, as the eager prefill
does) and advances cache_len by size. The padded rows of the last chunk write cache rows past the prompt;
they are harmless: every decode or verify step writes a position's row before any query attends to it, and
no query attends past its own position. Plain decoding and Kangaroo cut a prompt the same way, so their
caches stay equal bit for bit (bf16 output equal to plain's depends on that).
"""
import time
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .. import config
from . import conditional

SWITCH = "KANGAROO_PREFILL_GRAPHS"
CHUNK_SIZES = (16, 64, 256)  # one graph each; ceil(n / 256) replays a prompt where the cache has room past it
# Longer prompts go eager: one pass's GEMMs cost about the same at 256 and 1,024 rows, captured chunks a replay
# each (H100, b3cd0f3, bench/prefill_price.py: 256 tokens 2.5 ms captured, 7.8 eager; 1,024 tokens 11.0 ms
# captured, 7.6 eager); up to 640 tokens (two full chunks and a padded one) they still cost no more.
MAX_CAPTURED_TOKENS = 640


def chunk_plan(n: int, start: int, capacity: int, sizes: Tuple[int, ...] = CHUNK_SIZES) -> List[Tuple[int, int]]:
    """How to feed n prompt tokens from position `start` in chunks: [(size, real)] with real <= size real
    tokens each. Full chunks of the largest size, then the rest in the smallest size that holds it (its
    padding rows must stay inside the cache: start + size <= capacity); a rest that no size can hold that way
    goes in full chunks of smaller sizes and, last, one unpadded chunk (size == real) that runs eagerly."""
    if n < 0 or start < 0 or capacity < start + n:
        raise ValueError(f"chunk_plan: need 0 <= n, 0 <= start and start + n <= capacity, got n={n}, "
                         f"start={start}, capacity={capacity}")
    sizes = sorted(sizes)
    plan, pos = [], start
    while n >= sizes[-1]:
        plan.append((sizes[-1], sizes[-1]))
        n, pos = n - sizes[-1], pos + sizes[-1]
    if n == 0:
        return plan
    fitting = [s for s in sizes if s >= n and pos + s <= capacity]
    if fitting:
        return plan + [(fitting[0], n)]
    for s in reversed(sizes):  # near the cache's end: no padding past it
        while n >= s:
            plan.append((s, s))
            n, pos = n - s, pos + s
    return plan + ([(n, n)] if n else [])


def forward_prompt(engine, h: torch.Tensor, positions: torch.Tensor, speculative: bool):
    """The prompt's rows through the target (and the adapter, for Kangaroo), writing every KV cache slot:
    h [B, T, H] the embedded tokens at positions [B, T]."""
    if speculative:
        ell = engine.adapter.exit_layer
        x, res = engine.run_layers(h, positions, 0, ell)
        h, _ = engine.adapter_forward(x, res, positions, with_head=False)
        engine.run_layers(h, positions, ell, engine.spec.num_layers)
    else:
        engine.run_layers(h, positions, 0, engine.spec.num_layers)


def prefill_eager(engine, tokens: torch.Tensor, speculative: bool, start: int = 0):
    """tokens [B, n] at positions [start, start + n) in one pass."""
    B, n = tokens.shape
    pos = start + torch.arange(n, device=tokens.device)[None, :].expand(B, n)
    forward_prompt(engine, F.embedding(tokens, engine.spec.embed), pos, speculative)


class PrefillGraphs:
    """One captured chunk per size in `sizes` (those that fit the engine's cache), over a static token buffer.
    The engine keeps it with its decode graphs (graphs_for), so new buffers drop it."""

    def __init__(self, engine, speculative: bool, sizes: Tuple[int, ...] = CHUNK_SIZES):
        self.engine, self.speculative = engine, speculative
        self.sizes = tuple(s for s in sorted(sizes) if s <= engine.capacity)
        dev = engine.spec.device
        self.tokens = torch.zeros(engine.ROWS, max(self.sizes, default=1), dtype=torch.int64, device=dev)
        self.offsets = torch.arange(self.tokens.shape[1], device=dev)
        self.pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self.graphs = {}

    def chunk(self, size: int):
        """One chunk of `size` rows from the buffer at cache_len, then cache_len += size (on the device)."""
        e = self.engine
        pos = e.cache_len[:, None] + self.offsets[None, :size]                         # [B, size]
        forward_prompt(e, F.embedding(self.tokens[:, :size], e.spec.embed), pos, self.speculative)
        e.cache_len.add_(size)

    def capture(self):
        """Every size's graph. Warm-up runs (cuBLAS handles, autotuning, allocations) execute for real from
        an empty cache, so call this before the prompt's own chunks write the cache."""
        e = self.engine
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                for size in self.sizes:
                    e.cache_len.zero_()
                    self.chunk(size)
        torch.cuda.current_stream().wait_stream(stream)
        for size in self.sizes:
            e.cache_len.zero_()
            graph = torch.cuda.CUDAGraph()
            with conditional.capture(graph, self.pool, torch.cuda.Stream()):
                self.chunk(size)
            self.graphs[size] = graph
        e.cache_len.zero_()

    def run(self, tokens: torch.Tensor, replay=None):
        """Prefill tokens [B, n] from position 0 (cache_len must be 0): the chunks of chunk_plan, each a
        replay (`replay(size)`: a test's stand-in that runs the chunk eagerly), an unpadded last chunk eagerly."""
        e = self.engine
        replay = replay or (lambda size: self.graphs[size].replay())
        start = 0
        for size, real in chunk_plan(tokens.shape[1], 0, e.capacity, self.sizes):
            if size in self.sizes:
                self.tokens[:, :real].copy_(tokens[:, start:start + real])
                replay(size)
            else:
                prefill_eager(e, tokens[:, start:start + real], self.speculative, start)
            start += real
        e.cache_len.fill_(start)


def graphs_off(engine) -> str:
    """Why this engine's prefill does not run captured chunks ('' where it does)."""
    if not config.flag(SWITCH):
        return f"{SWITCH} is off (the default until its GPU tests pass)"
    if engine.spec.device.type != "cuda":
        return f"captured prefill chunks need a CUDA device, got {engine.spec.device}"
    if engine.capacity < min(CHUNK_SIZES):
        return f"the cache holds {engine.capacity} positions, fewer than the smallest chunk ({min(CHUNK_SIZES)})"
    return ""


def length_off(n_tokens: int) -> str:
    """Why a prompt of n_tokens (those prefill feeds: all but the last) goes eager ('' where chunks pay)."""
    if n_tokens > MAX_CAPTURED_TOKENS:
        return (f"a prompt of {n_tokens} tokens: past {MAX_CAPTURED_TOKENS}, one eager pass costs no more than "
                "captured chunks (MAX_CAPTURED_TOKENS)")
    return ""


def graphs_key(engine, speculative: bool) -> tuple:
    """Where the engine keeps the captured chunks for plain or Kangaroo prefill (the bound adapter's)."""
    return (id(engine.adapter) if speculative else None, "prefill", speculative,
            config.flag("KANGAROO_TRITON_ATTENTION"))  # the adapter first, as Engine._graphs_key


def graphs_for(engine, speculative: bool) -> Tuple[PrefillGraphs, float]:
    """The engine's captured prefill chunks, captured on first use and kept with its decode graphs (new
    buffers drop them all); (graphs, capture seconds)."""
    key = graphs_key(engine, speculative)
    graphs = engine._graphs.get(key)
    if graphs is not None:
        return graphs, 0.0
    t0 = time.perf_counter()
    graphs = PrefillGraphs(engine, speculative)
    graphs.capture()
    torch.cuda.synchronize()
    engine._graphs[key] = graphs
    return graphs, time.perf_counter() - t0


def prepare(engine, speculative: bool) -> Tuple[float, str]:
    """Capture the prefill chunks for the next captured prefill: (seconds spent, '' where they are ready, else
    why the prefill stays eager: graphs_off's reasons, or a capture that failed as conditional.py recognises)."""
    why = graphs_off(engine)
    if why:
        return 0.0, why
    try:
        return graphs_for(engine, speculative)[1], ""
    except Exception as e:  # noqa: BLE001  only a capture failure falls back; anything else re-raises
        if not conditional.is_capture_error(e):
            raise
        return 0.0, f"capturing the prefill chunks failed ({type(e).__name__}: {e})"
