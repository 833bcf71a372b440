"""Test setup. On a machine without a GPU, Triton kernels run under the CPU interpreter, which must be
switched on before any Triton kernel is defined."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run many tiny ops: one thread is several times faster than two fighting over CI's two
# cores (measured: a 64-token speculative run on the test model, 3.0 s vs 24-44 s under load).
torch.set_num_threads(1)

import pytest  # noqa: E402

import kangaroo_ext.ops as kops  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_params():
    """"cpu", and "cuda" marked `gpu` (scripts/gpu_check.sh runs `pytest -m gpu`) and skipped without one."""
    return ["cpu", pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")])]


def backend_params():
    """Every backend, each skipped with its reason where it cannot run on this machine; the CUDA
    backend's cases are marked `gpu`."""
    out = []
    for b in kops.ORDER:
        why = kops.available_backends()[b]
        marks = [pytest.mark.skipif(bool(why), reason="; ".join(why))] + ([pytest.mark.gpu] if b == "cuda" else [])
        out.append(pytest.param(b, marks=marks, id=b))
    return out


def device_for(backend: str) -> str:
    """The device a backend's kernels run on here: CUDA where there is one, else the CPU."""
    return "cuda" if (backend == "cuda" or torch.cuda.is_available()) else "cpu"


def skip_unsupported(backend: str, device: str, dtype: torch.dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter reads bf16 wrongly (shared/ENVIRONMENT.md): bf16 runs on the GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """cli.main sets torch's CPU threads for the commands that decode (config.apply_cpu_threads); a test
    that calls it must not change the threads of the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def skip_missing_kernel(backend: str, op: str):
    """Skip (with the reason) where this install's backend has no kernel for the op at all."""
    from kangaroo_ext.ops.schemas import MISSING_FROM_EXTENSION
    if backend == "cuda" and op in MISSING_FROM_EXTENSION:
        pytest.skip(f"this build of the extension has no kernel for {op}")
    if backend == "triton" and not hasattr(kops.triton_module(), op):
        pytest.skip(f"kangaroo_ext.triton_kernels has no kernel for {op}")


def tensor_core_gemv(enabled: bool):
    """The 16-bit decode GEMVs on tensor cores (True) or CUDA cores (False) inside the block, as before after
    it; no-op where the extension is not loaded (then no CUDA kernel runs at all)."""
    from kangaroo_ext import _extension
    return _extension.launch_switches(tensor_core_gemv=enabled)
