"""Device-side branches inside a CUDA graph being captured: CUDA conditional nodes (csrc/graph_branch.cu).

    with if_any(flags, pool):                      # flags: bool [n] on the capturing device
        ...                                        # captured into an IF body: at replay it runs iff any(flags)

    with switch_max(index, num_branches, pool) as case:   # index: int64 [n]
        for i in range(num_branches):
            with case(i):
                ...                                # body i runs at replay iff max(index) == i

The condition is read on the GPU when the node runs, so a captured decode round can stop drafting at
the confidence exit and verify exactly the drafted positions without the host looking at anything.
Both only work inside `torch.cuda.graph(..., pool=pool)` with that same pool; a node nests inside
another's body. `unsupported_reason(device)` says why they cannot be used, or "" where they can.
"""
from contextlib import contextmanager

import torch

from .. import _extension, config

DISABLE_ENV = "KANGAROO_DISABLE_CONDITIONAL_GRAPHS"


def unsupported_reason(device) -> str:
    """'' if conditional nodes can be captured on `device`, else why not (one line)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"conditional graph nodes need a CUDA device, got {device}"
    if config.flag(DISABLE_ENV):
        return f"{DISABLE_ENV} is set"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not _extension.loaded():
        return f"the CUDA extension kangaroo_ext._C is not loaded ({_extension.LOAD_ERROR})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _extension._C.branch_unsupported_reason(index)


def _check(values: torch.Tensor, dtype: torch.dtype, name: str):
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_cuda or values.dtype != dtype or values.dim() != 1 or not values.is_contiguous() \
            or values.numel() == 0:
        raise ValueError(f"{name} must be a non-empty contiguous 1-D {dtype} CUDA tensor, got {values.dtype} "
                         f"shape {tuple(values.shape)} on {values.device}")
    if not torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"conditional graph nodes are captured only inside torch.cuda.graph; {name} was given "
                           "outside a capture")
    reason = unsupported_reason(values.device)
    if reason:
        raise RuntimeError(f"conditional graph nodes are not available: {reason}")


def _pool(pool):
    if not (isinstance(pool, tuple) and len(pool) == 2 and all(isinstance(p, int) for p in pool)):
        raise ValueError(f"pool must be the capture's pool handle, a tuple of two ints "
                         f"(torch.cuda.graph_pool_handle()), got {pool!r}")
    return pool


@contextmanager
def if_any(flags: torch.Tensor, pool):
    """Capture the block into an IF node: at replay it runs iff any element of flags [n] (bool) is true."""
    _check(flags, torch.bool, "flags")
    _extension._C.branch_begin(flags.data_ptr(), flags.numel(), True, 1, flags.device.index, _pool(pool))
    try:
        _extension._C.branch_select(0)
        yield
    finally:
        _extension._C.branch_end()


@contextmanager
def switch_max(index: torch.Tensor, num_branches: int, pool):
    """A SWITCH node over num_branches bodies; yields case(i), a context manager that captures body i.
    At replay body max(index) runs (none if that is outside [0, num_branches))."""
    _check(index, torch.int64, "index")
    if not isinstance(num_branches, int) or not 1 <= num_branches <= 64:
        raise ValueError(f"num_branches must be an int in [1, 64], got {num_branches!r}")
    _extension._C.branch_begin(index.data_ptr(), index.numel(), False, num_branches, index.device.index, _pool(pool))

    @contextmanager
    def case(i: int):
        _extension._C.branch_select(i)  # ends the previous body's capture, if any
        yield

    try:
        yield case
    finally:
        _extension._C.branch_end()
