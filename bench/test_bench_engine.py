"""The engine's decode phases on the default model, as the CUDA graphs it captured itself: one draft
round (γ+1 shallow steps with the adapter and γ LM-head reads) and one verify step (the deep layers over
γ+1 positions, LM head, accept and commit). The decode state is restored before every replay (untimed),
so each replay does the same work at the same cache length.

pytest-benchmark's time is host wall time of replay + synchronize (includes ~10 µs of launch and sync);
extra_info["us"] is the CUDA-event median of the replay alone."""
import pytest
import torch

import bench_timing


@pytest.mark.parametrize("phase", ["draft_round", "verify_step"])
def test_engine_phase(benchmark, copy_GBps, default_engine, phase):
    graph = default_engine.graphs.draft if phase == "draft_round" else default_engine.graphs.verify
    us = bench_timing.us_each(graph.replay, setup=default_engine.restore)
    benchmark.group = "engine (SmolLM2-135M, bf16)"
    benchmark.extra_info.update(bench_timing.bandwidth_info(us, default_engine.phase_bytes()[phase], copy_GBps),
                                **default_engine.describe(), timing="CUDA events around one graph replay")

    def replay():
        graph.replay()
        torch.cuda.synchronize()
    benchmark.pedantic(replay, setup=default_engine.restore_and_sync, rounds=50, warmup_rounds=3)
    default_engine.restore_and_sync()
