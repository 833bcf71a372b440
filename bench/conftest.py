"""GPU microbenchmarks (pytest-benchmark): `pytest bench/ --benchmark-only`.

Without a CUDA device every benchmark here is skipped, with the reason. The session measures the
device-to-device copy bandwidth once (fixture `copy_GBps`) and every benchmark reports its GB/s as a
fraction of it; the value also goes into the machine info of `--benchmark-json` output.
"""
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)  # bench/ is not a package: its helper modules are imported by name

import bench_timing  # noqa: E402

NO_GPU = "GPU microbenchmark: needs a CUDA device (torch.cuda.is_available() is False)"
try:
    import pytest_benchmark  # noqa: F401
    NO_PLUGIN = None
except ImportError:
    NO_PLUGIN = "needs pytest-benchmark: pip install 'kangaroo_ext[bench]'"

_measured = {}


def pytest_collection_modifyitems(config, items):
    reason = NO_GPU if not torch.cuda.is_available() else NO_PLUGIN
    if not reason:
        return
    for item in items:
        if str(item.fspath).startswith(BENCH_DIR + os.sep):  # only ours, if run beside tests/
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def copy_GBps() -> float:
    """Measured device-to-device copy bandwidth, bytes read + written, GB/s (1 GiB, median of 10)."""
    _measured["copy_GBps"] = bench_timing.copy_bandwidth_GBps()
    _measured["device"] = torch.cuda.get_device_name()
    return _measured["copy_GBps"]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(_measured)


@pytest.fixture(scope="session")
def default_engine():
    """The default model's engine with its captured graphs (loading the model takes ~30 s)."""
    import bench_cases
    try:
        return bench_cases.DefaultEngine()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"the default model cannot load here: {e}")
