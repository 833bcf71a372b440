"""Backend registry: `cuda` (compiled extension), `triton`, `reference` (PyTorch), in that order.

Each backend says, for a given call, every reason it cannot run it (an empty list means it can).
Auto-selection takes the first backend with no reasons, quietly; for Triton, a launch configuration
that would need more shared memory than the device has is such a reason (triton_kernels.resource_reasons).
A forced backend (the `backend=` argument, else the KANGAROO_BACKEND environment variable) that cannot
run raises BackendUnavailable listing all its reasons, so nobody benchmarks the reference while
believing it is the kernel.
"""
import importlib
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import _extension, config
from .schemas import MISSING_FROM_EXTENSION

ORDER = ("cuda", "triton", "reference")

# Ops without a Triton version, and why (the Triton backend gives this as its reason).
NO_TRITON = {
    "persistent_draft": "no Triton version: the persistent draft kernel orders its stages with grid-wide barriers "
                        "over a cooperative launch and calls the CUDA ops' own kernel bodies for their bits",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call; the message lists why."""


triton_interpreting = config.triton_interpreting


_triton_error: Optional[str] = None
_triton_module = None


def triton_module():
    """kangaroo_ext.triton_kernels, imported on first use (importing triton costs ~1 s)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("kangaroo_ext.triton_kernels")
        except Exception as e:  # ImportError, or triton failing to find a driver
            _triton_error = f"{type(e).__name__}: {e}"
    return _triton_module


# ---- what each backend can run -------------------------------------------------------------------

def _global_reasons(backend: str) -> List[str]:
    if backend == "cuda":
        if not _extension.loaded():
            return [f"the compiled extension is not loaded ({_extension.LOAD_ERROR})"]
        if not torch.cuda.is_available():
            return ["no CUDA device is available"]
    elif backend == "triton":
        if triton_module() is None:
            return [f"Triton kernels are not importable ({_triton_error})"]
    elif backend != "reference":
        return [f"unknown backend '{backend}' (choose one of {', '.join(ORDER)})"]
    return []


def tensor_reasons(backend: str, tensors: Dict[str, Optional[torch.Tensor]],
                   float_dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> List[str]:
    """Device and dtype rules shared by all ops. `tensors` maps argument names to tensors (or None)."""
    reasons = []
    for name, t in tensors.items():
        if t is None or backend == "reference":
            continue
        if backend == "cuda" and t.device.type != "cuda":
            reasons.append(f"{name} is on {t.device}, the CUDA kernels need a CUDA tensor")
        if backend == "triton":
            if t.device.type == "cpu" and not triton_interpreting():
                reasons.append(f"{name} is on the CPU and TRITON_INTERPRET=1 is not set")
            elif t.device.type not in ("cuda", "cpu"):
                reasons.append(f"{name} is on {t.device}, Triton needs a CUDA tensor (or the CPU interpreter)")
            elif t.device.type == "cpu" and t.dtype == torch.bfloat16:
                # Measured: the interpreter returns garbage (~1e36) for bf16 loads (shared/ENVIRONMENT.md).
                reasons.append(f"{name} is bf16 on the CPU, which Triton's interpreter reads wrongly")
        if t.is_floating_point() and t.dtype not in float_dtypes:
            reasons.append(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in float_dtypes]}")
    return reasons


# ---- the registry --------------------------------------------------------------------------------

# op name -> backend -> (reasons(*args) -> list[str], run(*args))
_IMPLS: Dict[str, Dict[str, tuple]] = {}


def register(op: str, backend: str, run: Callable, reasons: Callable[..., List[str]]):
    _IMPLS.setdefault(op, {})[backend] = (reasons, run)


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend a call forces: the argument, else KANGAROO_BACKEND; None means automatic selection."""
    if backend is None:
        return config.backend()
    b = backend.strip().lower()
    return None if b in ("", "auto") else b


def _auto_only_reasons(backend: str, args) -> List[str]:
    """Reasons auto-selection passes a backend over that a forced backend ignores."""
    if backend == "triton" and any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args):
        # The interpreter is for testing kernels on machines without a GPU, ~1000x slower than PyTorch.
        return ["auto-selection never uses Triton's CPU interpreter (force backend='triton' to test it)"]
    return []


def reasons_against(op: str, backend: str, *args, auto: bool = False) -> List[str]:
    """Every reason `backend` cannot run `op` on these arguments ([] if it can). With auto=True, also
    the reasons auto-selection passes a backend over."""
    g = _global_reasons(backend)
    if g:
        return g
    if auto:
        why = _auto_only_reasons(backend, args)
        if why:
            return why
    if backend == "cuda" and op in MISSING_FROM_EXTENSION:
        return [f"this build of the extension has no kernel for {op} (rebuild it)"]
    if backend == "triton" and op in NO_TRITON:
        return [NO_TRITON[op]]
    if backend == "triton" and not hasattr(triton_module(), op):
        return [f"kangaroo_ext.triton_kernels has no kernel for {op}"]
    entry = _IMPLS.get(op, {}).get(backend)
    if entry is None:
        return [f"backend '{backend}' has no implementation of {op}"]
    why = entry[0](*args)
    resource_reasons = getattr(triton_module(), "resource_reasons", None) if backend == "triton" else None
    if resource_reasons is not None and not why:
        # The launch configuration these arguments get must fit the device (shared memory).
        why = list(resource_reasons(op, *args))
    return why


def select(op: str, backend: Optional[str], *args) -> Callable:
    """The implementation to run: the forced backend (or an error listing its reasons), else the first
    backend in ORDER that can run these arguments."""
    forced = requested_backend(backend)
    if forced is not None:
        why = reasons_against(op, forced, *args)
        if why:
            raise BackendUnavailable(f"backend '{forced}' cannot run {op}: " + "; ".join(why))
        return _IMPLS[op][forced][1]
    for b in ORDER:
        if not reasons_against(op, b, *args, auto=True):
            return _IMPLS[op][b][1]
    raise BackendUnavailable(f"no backend can run {op}")  # unreachable: reference runs everything


def available_backends() -> Dict[str, List[str]]:
    """Backend name -> reasons it is unavailable on this machine ([] = available)."""
    return {b: _global_reasons(b) for b in ORDER}
