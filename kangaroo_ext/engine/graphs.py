"""CUDA graphs for the decode steps: the draft phase, the verify phase and the plain step.

Each phase is a fixed sequence of kernels over the engine's static buffers, so it is captured once per
(engine buffers, γ, adapter) and replayed; the host only launches and, once per round, reads the report.

The adapter's draft steps may instead be one launch of the persistent draft kernel (Engine.draft_phase_persistent,
behind KANGAROO_PERSISTENT_DRAFT): the same stop at the confidence exit, decided inside the kernel.

With conditional nodes (`device_exit`, see conditional.py) the GPU applies Kangaroo's draft early exit
itself: draft step j is nested in an IF on "some row still drafts", so once the confidence falls below
η the remaining steps cost one untaken node, and the verify step is a SWITCH on the number of drafts
k whose body k runs layers ℓ..N over exactly k + 1 positions. Without them every captured step runs
(the confidence exit only limits what is proposed) and verification covers γ + 1 positions.

Captured copy rounds (`copy`, a copy_rounds.CopyPolicy; conditional nodes required): the draft phase first
looks the sequence's last tokens up on the device (Engine.copy_lookup), then a SWITCH on "a match was found"
runs either the copy branch (Engine.draft_copied_rows: copy.rows slots in one multi-row shallow step, k of
them drafts) or the adapter's draft loop above. Verification is the same SWITCH on the number of drafts,
with bodies up to max(γ, copy.rows). The host still reads one report per round.
"""
import contextlib
import time

import torch

from . import conditional


class CudaGraphs:
    def __init__(self, engine, gamma: int, speculative: bool, device_exit: bool = False, copy=None):
        if copy is not None and not (device_exit and speculative):
            raise ValueError("captured copy rounds need conditional nodes (device_exit) and a speculative round")
        self.engine = engine
        self.adapter_gamma = gamma                                     # the adapter's draft steps
        self.copy = copy
        self.gamma = max(gamma, copy.rows) if copy is not None else gamma   # the most drafts a round verifies
        self.speculative = speculative
        self.device_exit = bool(device_exit and speculative)
        # The adapter's draft phase as one persistent kernel where the engine can (engine.persistent_draft_off)
        self.draft_kernel_off = engine.persistent_draft_off(gamma) if speculative and gamma > 0 else "no draft phase"
        self.persistent = not self.draft_kernel_off
        self.pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        if speculative:
            self.draft = self._capture(self._draft_phase)
            self.verify = self._capture(self._verify_phase)
        else:
            self.plain = self._capture(lambda capturing: engine.plain_step())
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0

    def _draft_phase(self, capturing: bool):
        e = self.engine
        e.begin_round()
        if self.copy is None:
            self._adapter_drafts(capturing)
            return
        tokens, k = e.copy_lookup(self.copy)
        if not capturing:  # warm-up: each branch once (the state is reset before the capture)
            self._adapter_drafts(capturing)
            e.draft_copied_rows(tokens, k, self.copy.rows)
            return
        with conditional.switch_max((k > 0).long(), 2, self.pool) as case:
            with case(0):
                self._adapter_drafts(capturing)
            with case(1):
                e.draft_copied_rows(tokens, k, self.copy.rows)

    def _adapter_drafts(self, capturing: bool):
        e = self.engine
        if self.persistent:  # one launch: steps 0..γ, the confidence exit on the device when device_exit
            e.draft_phase_persistent(self.adapter_gamma, stop_at_exit=self.device_exit)
            return
        with contextlib.ExitStack() as rest:
            for j in range(self.adapter_gamma + 1):
                if j and capturing and self.device_exit:
                    # Step j only serves draft j (its exit state, the next proposal): it and every
                    # later step sit inside "draft j was proposed by some row".
                    rest.enter_context(conditional.if_any(e.active, self.pool))
                e.draft_step(j, self.adapter_gamma)

    def _verify_phase(self, capturing: bool):
        e = self.engine
        if not self.device_exit:
            e.verify(self.gamma + 1)
        elif not capturing:  # warm-up: every body once (the state is reset before the capture)
            for n in range(1, self.gamma + 2):
                e.verify(n)
        else:
            with conditional.switch_max(e.num_drafted, self.gamma + 1, self.pool) as case:
                for k in range(self.gamma + 1):
                    with case(k):
                        e.verify(k + 1)

    def _reset_state(self):
        # Warm-up runs really execute: start them from an empty cache so every index stays in bounds.
        e = self.engine
        e.cache_len.zero_()
        e.tokens_in.zero_()

    def _capture(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles, autotuning, allocations
            for _ in range(2):
                self._reset_state()
                fn(capturing=False)
        torch.cuda.current_stream().wait_stream(stream)
        self._reset_state()
        graph = torch.cuda.CUDAGraph()
        # A fresh capture stream each time: after a failed capture, its stream may still be capturing.
        with conditional.capture(graph, self.pool, torch.cuda.Stream()):
            fn(capturing=True)
        return graph
