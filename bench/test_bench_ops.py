"""Every op in kangaroo_ext.ops, every backend, at decode shapes. Reported times are per launch:
one round replays a CUDA graph of N launches and pytest-benchmark divides by N (see BurstTarget);
extra_info holds the CUDA-event median (us), bytes moved, GB/s and the fraction of copy bandwidth."""
import pytest
import torch

import bench_cases
import bench_timing
import kangaroo_ext.ops as kops


def _cases():
    params = []
    for op in bench_cases.registered_ops():
        if op not in bench_cases.OP_CASES:  # a new op: fail loudly rather than go unmeasured
            params.append(pytest.param(op, None, None, id=f"{op}/no-case"))
        for case in bench_cases.OP_CASES.get(op, []):
            params += [pytest.param(op, case, b, id=case.key(b)) for b in kops.ORDER]
    return params


@pytest.mark.parametrize("op, case, backend", _cases())
def test_op(benchmark, copy_GBps, op, case, backend):
    if case is None:
        pytest.fail(f"op {op} has no benchmark case: add one to OP_CASES in bench/bench_cases.py")
    why = bench_cases.backends()[backend]
    if why:
        pytest.skip(f"backend {backend} unavailable: {'; '.join(why)}")
    try:
        fn = case.make(backend)
    except kops.BackendUnavailable as e:
        pytest.skip(str(e))
    graph = bench_timing.capture_burst(fn, case.launches)
    us = bench_timing.us_per_launch(graph, case.launches)
    benchmark.group = f"{op}/{case.shape}"
    benchmark.extra_info.update(bench_timing.bandwidth_info(us, case.nbytes, copy_GBps),
                                backend=backend, shape=case.shape, dtype=str(bench_cases.DTYPE),
                                launches_per_graph=case.launches, timing="CUDA graph of back-to-back launches")
    benchmark.pedantic(bench_timing.BurstTarget(graph, case.launches), iterations=case.launches, rounds=20,
                       warmup_rounds=2)
    torch.cuda.synchronize()
