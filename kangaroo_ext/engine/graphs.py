"""CUDA graphs for the decode steps: the draft phase, the verify phase and the plain step.

Each phase is a fixed sequence of kernels over the engine's static buffers, so it is captured once per
(engine buffers, γ, adapter) and replayed; the host only launches and, once per round, reads the report.
"""
import time

import torch


class CudaGraphs:
    def __init__(self, engine, gamma: int, speculative: bool):
        self.engine = engine
        self.gamma = gamma
        self.speculative = speculative
        self.pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        if speculative:
            self.draft = self._capture(self._draft_phase)
            self.verify = self._capture(self._verify_phase)
        else:
            self.plain = self._capture(engine.plain_step)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0

    def _draft_phase(self):
        e = self.engine
        e.begin_round()
        for j in range(self.gamma + 1):
            e.draft_step(j, self.gamma)

    def _verify_phase(self):
        self.engine.verify(self.gamma + 1)

    def _reset_state(self):
        # Warm-up runs really execute: start them from an empty cache so every index stays in bounds.
        e = self.engine
        e.cache_len.zero_()
        e.out_len.zero_()
        e.tokens_in.zero_()

    def _capture(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles, autotuning, allocations
            for _ in range(2):
                self._reset_state()
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self._reset_state()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph
