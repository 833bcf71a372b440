"""GPU timing for the microbenchmarks; shared by the pytest-benchmark suite and kernel_report.py (and a CPU
twin for engine steps timed on the CPU, cpu_seconds_each).

Every number is GPU time from CUDA events, after a warm-up, as the median of repeats:
  - an op: a CUDA graph holding N back-to-back launches, timed per replay, divided by N (per launch,
    free of Python and launch overhead, as the op runs inside the engine's decode graphs);
  - an engine phase: the engine's own captured graph, one replay at a time, state restored between.
"""
import collections
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import torch

GB = 1e9


def _median_ms(pairs) -> float:
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in pairs)


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def copy_bandwidth_GBps(nbytes: int = 1 << 30, warmup: int = 3, repeats: int = 10) -> float:
    """Device-to-device copy of `nbytes`: (bytes read + bytes written) / median time, in GB/s.
    The practical ceiling for a memory-bound kernel; fractions of it are reported beside each op."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    pairs = []
    for _ in range(repeats):
        a, b = _events()
        a.record()
        dst.copy_(src)
        b.record()
        pairs.append((a, b))
    ms = _median_ms(pairs)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3) / GB


def capture_burst(fn: Callable[[], object], launches: int) -> torch.cuda.CUDAGraph:
    """fn() `launches` times back to back, as one CUDA graph. Warm-up runs on a side stream first
    (Triton JIT, cuBLAS handles, allocator), as torch.cuda.graphs requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    torch.cuda.synchronize()
    return graph


def us_per_launch(graph: torch.cuda.CUDAGraph, launches: int, warmup: int = 3, repeats: int = 25) -> float:
    """Median GPU time of one replay of a `launches`-launch graph, per launch, in µs."""
    for _ in range(warmup):
        graph.replay()
    pairs = []
    for _ in range(repeats):
        a, b = _events()
        a.record()
        graph.replay()
        b.record()
        pairs.append((a, b))
    return _median_ms(pairs) * 1e3 / launches


def us_each(fn: Callable[[], object], setup: Optional[Callable[[], object]] = None, warmup: int = 3,
            repeats: int = 50) -> float:
    """Median GPU time of fn() alone, in µs; setup() runs before each call, outside the events."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    pairs = []
    for _ in range(repeats):
        if setup:
            setup()
        a, b = _events()
        a.record()
        fn()
        b.record()
        pairs.append((a, b))
    return _median_ms(pairs) * 1e3


def cpu_seconds_each(fn: Callable[[], object], setup: Optional[Callable[[], object]] = None, warmup: int = 2,
                     repeats: int = 15) -> float:
    """us_each's CPU twin: median wall time of fn() alone, in seconds; setup() runs before each call, untimed."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class BurstTarget:
    """A pytest-benchmark target whose per-iteration time is a per-launch time.

    Use with benchmark.pedantic(target, iterations=N): pytest-benchmark times N calls per round and
    divides by N. The first call of every N replays the N-launch graph, the last synchronizes, and
    the calls between do nothing, so round / N = GPU time per launch plus (replay + sync) / N."""

    def __init__(self, graph: torch.cuda.CUDAGraph, launches: int):
        self.graph, self.launches, self.calls = graph, launches, 0

    def __call__(self):
        i = self.calls % self.launches
        self.calls += 1
        if i == 0:
            self.graph.replay()
        if i == self.launches - 1:
            torch.cuda.synchronize()


def bandwidth_info(us: float, nbytes: int, copy_GBps: float) -> dict:
    """What goes in extra_info / kernels.json beside a time."""
    gbps = nbytes / (us / 1e6) / GB if us > 0 else 0.0
    return {"us": us, "bytes": nbytes, "GBps": gbps, "fraction_of_copy": gbps / copy_GBps if copy_GBps else None,
            "copy_GBps": copy_GBps}



def kernel_times(fn: Callable[[], object], setup: Callable[[], object],
                 replays: int = 20) -> Dict[str, Tuple[float, float]]:
    """{kernel name: (calls, µs)} per fn() call, from a profiler trace of `replays` calls after 3 warm-up
    ones (CUPTI sees the kernels inside graph replays); memcpy / memset nodes are left out."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        setup()
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            setup()
            fn()
        torch.cuda.synchronize()
    totals = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in ev.name and "Memset" not in ev.name:
            totals[ev.name][0] += 1
            totals[ev.name][1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return {name: (c / replays, us / replays) for name, (c, us) in totals.items()}


def kernels_per_replay(fn: Callable[[], object], setup: Callable[[], object], replays: int = 5) -> float:
    """Kernels one fn() launches (kernel_times' calls, summed)."""
    return sum(calls for calls, _ in kernel_times(fn, setup, replays).values())
