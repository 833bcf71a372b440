"""Device-side branches inside a CUDA graph being captured: CUDA conditional nodes.

    with if_any(flags, pool):                      # flags: bool [n] on the capturing device
        ...                                        # captured into an IF body: at replay it runs iff any(flags)

    with switch_max(index, num_branches, pool) as case:   # index: int64 [n]
        for i in range(num_branches):
            with case(i):
                ...                                # body i runs at replay iff max(index) == i

The condition is read on the GPU when the node runs, so a captured decode round can stop drafting at
the confidence exit and verify exactly the drafted positions without the host looking at anything.
Both only work inside `torch.cuda.graph(..., pool=pool)` with that same pool; a node nests inside
another's body (up to MAX_DEPTH levels). Each case is captured at most once; cases never entered are
empty. Code inside a switch but outside every case runs unconditionally, in the enclosing graph.
`unsupported_reason(device)` says why nodes cannot be used, or "" where they can.

Two implementations ("paths") capture the nodes; which one is used depends on the running torch
(choose_path, a pure function of the versions):
  "torch"     torch's own API (torch.cuda.CUDAGraph.begin_capture_to_if_node / end_capture_to_conditional_node),
              for torch >= 2.14, the release whose implementation was read for this: a fresh stream per
              node, allocations inside a body routed to the graph's pool by torch itself, the enclosing
              capture's routing restored when a body ends. It offers IF nodes only, so a SWITCH over n
              bodies is n IF nodes in a row, body k conditioned on `max(index) == k`. All n conditions are
              computed once, before the first body, so a body that changes `index` cannot start a later
              one. (Nested IFs would need up to n levels of nesting, or a binary tree of log2 n levels
              whose bodies no longer sit side by side; side-by-side IFs keep every body at the depth a
              SWITCH body has and cost n one-thread condition kernels per replay.)
  "kangaroo"  csrc/graph_branch.cu: one real SWITCH node, and torch's allocator redirected through its
              internal calls, whose meaning changes between releases. Only for torch 2.11.x, the version
              every GPU test of it ran on, and only from an extension built for that torch.
Anywhere else (another torch, a build without conditional support, CUDA < 12.8) unsupported_reason()
names the torch and CUDA and says why, and the engine decodes without conditional nodes (host-side
draft budget).

Failures. If capturing a node fails after unsupported_reason() returned "" (for example under
PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync), the call raises ConditionalCaptureError with the cause
chained, and the failure is remembered: unsupported_reason() reports it for that device from then on.
Callers capture through `capture(graph, pool, stream)` (torch.cuda.graph, plus: a failure to END a capture
that holds nodes, as under cudaMallocAsync, is a ConditionalCaptureError too) and catch it around the whole
capture -- whose exit may replace it by its own error about the now invalid capture, so test with
is_capture_error(e) --
discard the graph, and capture again without conditional nodes on a fresh stream (torch.cuda.graph(...,
stream=torch.cuda.Stream())). Exceptions raised by the code inside a
body are not wrapped; either way every node opened is closed, torch's current stream is restored, and
a later capture on the thread starts clean.
"""
import ctypes
import functools
import re
import threading
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

from .. import _extension, config

DISABLE_ENV = "KANGAROO_DISABLE_CONDITIONAL_GRAPHS"

TORCH_PATH = "torch"
OWN_PATH = "kangaroo"
OWN_PATH_TORCH = (2, 11)      # kangaroo_ext's own capture: the torch every GPU test of it ran on
TORCH_PATH_SINCE = (2, 14)    # torch's API, as implemented from this release on
MIN_CUDA = (12, 8)            # SWITCH nodes; the oldest CUDA these captures ran with
MAX_DEPTH = 64                # γ may be 32 and the draft round nests one IF per draft step
MAX_BRANCHES = 64


class ConditionalCaptureError(RuntimeError):
    """Capturing a conditional node failed although unsupported_reason() said it could work; the cause
    is chained (__cause__). Catch it around the whole capture (see is_capture_error), discard the graph
    and capture again without conditional nodes, on a fresh capture stream (the failed capture's stream
    may still be capturing): unsupported_reason() reports the failure from now on."""


def is_capture_error(error: BaseException) -> bool:
    """True if `error`, or an exception it was raised from or while handling, is a ConditionalCaptureError
    (torch.cuda.graph's exit raises its own error about the broken capture on top of ours)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConditionalCaptureError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


# ---- which path, and whether it can run ----------------------------------------------------------

def _major_minor(version: Optional[str]) -> Tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def choose_path(torch_version: str, cuda_version: Optional[str], torch_has_api: bool,
                hip_version: Optional[str] = None) -> Tuple[str, str]:
    """(path, "") for the torch described, or ("", why no path may capture conditional nodes there)."""
    where = f"torch {torch_version} (CUDA {cuda_version or 'none'})"
    if hip_version:
        return "", f"{where} is a ROCm build (HIP {hip_version}): conditional nodes are captured only on CUDA"
    if not cuda_version:
        return "", f"{where} is a CPU-only build"
    if _major_minor(cuda_version) < MIN_CUDA:
        return "", f"{where}: conditional graph nodes need CUDA >= {MIN_CUDA[0]}.{MIN_CUDA[1]}"
    version = _major_minor(torch_version)
    if version == OWN_PATH_TORCH:
        return OWN_PATH, ""
    if version >= TORCH_PATH_SINCE:
        if torch_has_api:
            return TORCH_PATH, ""
        return "", f"{where} lacks torch.cuda.CUDAGraph.begin_capture_to_if_node (torch's conditional-node API)"
    return "", (f"{where}: conditional nodes are captured only with torch {OWN_PATH_TORCH[0]}.{OWN_PATH_TORCH[1]}.x "
                f"(kangaroo_ext's own capture, GPU-tested) or torch >= {TORCH_PATH_SINCE[0]}.{TORCH_PATH_SINCE[1]} "
                "(torch's own API); this version was checked for neither")


def policy() -> Tuple[str, str]:
    """choose_path() for the running torch: the path this torch takes where a device supports it."""
    return choose_path(torch.__version__, torch.version.cuda, _torch_has_api(), torch.version.hip)


def _torch_has_api() -> bool:
    graph = getattr(torch.cuda, "CUDAGraph", None)
    return all(hasattr(graph, name) for name in
               ("get_currently_capturing_graph", "begin_capture_to_if_node", "end_capture_to_conditional_node"))


@functools.lru_cache(maxsize=1)
def _driver_version() -> Optional[int]:
    """The CUDA driver's version (12080 = 12.8), or None if it cannot be asked (then capture will tell)."""
    try:
        version = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    except (OSError, AttributeError):
        pass
    return None


def _path_unavailable(path: str, index: int) -> str:
    """Why `path` cannot capture on CUDA device `index` in this process ('' if it can)."""
    where = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    if path == TORCH_PATH:
        if not _torch_has_api():
            return f"{where} lacks torch's conditional-node API"
        driver = _driver_version()
        if driver is not None and (driver // 1000, driver % 1000 // 10) < MIN_CUDA:
            return (f"{where}: the CUDA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}; conditional "
                    f"graph nodes need {MIN_CUDA[0]}.{MIN_CUDA[1]}")
        return ""
    if path == OWN_PATH:
        if not _extension.loaded():
            return (f"{where} captures conditional nodes with kangaroo_ext's own capture, which needs the "
                    f"extension kangaroo_ext._C: it is not loaded ({_extension.LOAD_ERROR})")
        if not hasattr(_extension._C, "branch_close"):
            return f"kangaroo_ext._C predates this package's conditional-node calls: {_extension.REBUILD_HINT}"
        why = _extension._C.branch_unsupported_reason(index)
        return f"{where}: {why}" if why else ""
    return f"unknown conditional-node path {path!r} (choose {TORCH_PATH!r} or {OWN_PATH!r})"


_failures: Dict[int, str] = {}     # CUDA device index -> why capturing a node failed there
_failures_lock = threading.Lock()


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def capture_path(device) -> Tuple[str, str]:
    """(path, "") that captures conditional nodes on `device` here, or ("", why none can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "", f"conditional graph nodes need a CUDA device, got {device}"
    if config.flag(DISABLE_ENV):
        return "", f"{DISABLE_ENV} is set"
    if device.index is not None or torch.cuda.is_available():
        with _failures_lock:
            failure = _failures.get(_device_index(device))
        if failure:
            return "", failure
    if not torch.cuda.is_available():
        return "", "torch sees no CUDA device"
    index = _device_index(device)
    path, why = policy()
    if why:
        return "", why
    why = _path_unavailable(path, index)
    return ("", why) if why else (path, "")


def unsupported_reason(device) -> str:
    """'' if conditional nodes can be captured on `device`, else why not (one line)."""
    return capture_path(device)[1]


def forget_capture_failures():
    """Forget remembered capture failures (tests; or after changing what made the capture fail)."""
    with _failures_lock:
        _failures.clear()


def _failure(index: int, what: str, cause: BaseException) -> ConditionalCaptureError:
    message = (f"capturing a conditional graph node failed ({what}: {type(cause).__name__}: {cause}); "
               "capture without conditional nodes")
    with _failures_lock:
        _failures.setdefault(index, f"capturing a conditional graph node failed earlier in this process ({what}: "
                                    f"{type(cause).__name__}: {cause})")
    return ConditionalCaptureError(message)


def _attempt(index: int, what: str, fn, *args):
    """fn(*args); a failure is a capture failure (KeyboardInterrupt and the like are not: they pass)."""
    try:
        return fn(*args)
    except Exception as e:
        raise _failure(index, what, e) from e


def _quietly(fn, *args):
    """Cleanup on an error path: the error being raised is the one to report."""
    try:
        fn(*args)
    except Exception:
        pass


# ---- per-thread bookkeeping ----------------------------------------------------------------------

_thread = threading.local()   # .open: the paths of the nodes open on this thread, innermost last


def _open_paths() -> list:
    if not hasattr(_thread, "open"):
        _thread.open = []
    return _thread.open


def _nodes_opened() -> int:
    """How many nodes this thread has opened so far (a capture compares it before and after)."""
    return getattr(_thread, "opened", 0)


@contextmanager
def _node_scope(path: str):
    """Tracks the node for nesting checks; its entry is removed whatever happens."""
    open_paths = _open_paths()
    if open_paths and open_paths[-1] != path:
        raise RuntimeError(f"a conditional node captured by the {path!r} path cannot sit inside a body captured by "
                           f"the {open_paths[-1]!r} path")
    if len(open_paths) >= MAX_DEPTH:
        raise RuntimeError(f"conditional nodes nest at most {MAX_DEPTH} deep")
    depth = len(open_paths)
    open_paths.append(path)
    _thread.opened = _nodes_opened() + 1
    try:
        yield
    finally:
        del open_paths[depth:]


@contextmanager
def capture(graph: "torch.cuda.CUDAGraph", pool, stream: Optional["torch.cuda.Stream"] = None):
    """torch.cuda.graph(graph, pool=pool, stream=stream) for a capture that may hold conditional nodes.

    Ending a capture can fail although every node in it was captured without an error: under
    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, cudaStreamEndCapture answers 'invalid argument'
    (seen on an H100, torch 2.11, CUDA 13.0) for graphs whose conditional bodies allocate. If the body
    ran to its end, nodes were opened in it and ending the capture raises, that failure is a
    ConditionalCaptureError (remembered, so unsupported_reason() reports it) and callers fall back as
    for any capture failure. An exception raised by the body itself passes unchanged. Either way the caller's stream is
    current again afterwards."""
    index = torch.cuda.current_device()
    caller_stream = torch.cuda.current_stream()
    opened_before = _nodes_opened()
    body_finished = False
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            yield
            body_finished = True
    except Exception as e:
        # torch.cuda.graph's exit leaves the capture stream current when ending the capture raises.
        torch.cuda.set_stream(caller_stream)
        if body_finished and _nodes_opened() > opened_before and not is_capture_error(e):
            raise _failure(index, "ending a capture that holds conditional nodes", e) from e
        raise


# ---- argument checks -----------------------------------------------------------------------------

def _validate(values: torch.Tensor, dtype: torch.dtype, name: str, pool, path: Optional[str]) -> Tuple[int, str]:
    """(device index, path) for a node on `values`, or a ValueError / RuntimeError naming the problem."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_cuda or values.dtype != dtype or values.dim() != 1 or not values.is_contiguous() \
            or values.numel() == 0 or values.numel() > 1024:
        raise ValueError(f"{name} must be a contiguous 1-D {dtype} CUDA tensor of 1 to 1024 elements, got "
                         f"{values.dtype} shape {tuple(values.shape)} on {values.device}")
    if not (isinstance(pool, tuple) and len(pool) == 2 and all(isinstance(p, int) for p in pool)):
        raise ValueError(f"pool must be the capture's pool handle, a tuple of two ints "
                         f"(torch.cuda.graph_pool_handle()), got {pool!r}")
    if not torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"conditional graph nodes are captured only inside torch.cuda.graph; {name} was given "
                           "outside a capture")
    index = _device_index(values.device)
    if path is None:
        path, why = capture_path(values.device)
    else:  # forced (tests): the version policy is skipped, not the path's own requirements
        why = _path_unavailable(path, index)
    if why:
        raise RuntimeError(f"conditional graph nodes are not available: {why}")
    return index, path


# ---- the two paths -------------------------------------------------------------------------------

@contextmanager
def _torch_if(pred: torch.Tensor, index: int, what: str):
    """An IF node through torch's API on the graph being captured; runs iff pred (a bool scalar on the GPU)."""
    graph = _attempt(index, what, torch.cuda.CUDAGraph.get_currently_capturing_graph)
    _attempt(index, what, graph.begin_capture_to_if_node, pred)
    try:
        yield
    except BaseException:
        _quietly(graph.end_capture_to_conditional_node)   # pops torch's node state and restores the stream
        raise
    _attempt(index, f"closing {what}", graph.end_capture_to_conditional_node)


@contextmanager
def _own_node(values: torch.Tensor, is_bool: bool, num_branches: int, index: int, pool, what: str):
    """branch_begin ... branch_close on csrc/graph_branch.cu; every frame opened here is closed on any exit."""
    C = _extension._C
    depth = C.branch_depth()
    closed = False
    try:
        _attempt(index, what, C.branch_begin, values.data_ptr(), values.numel(), is_bool, num_branches, index, pool)
        yield C
        closed = True
        _attempt(index, f"closing {what}", C.branch_close, depth, True)
    finally:
        if not closed:
            C.branch_close(depth, False)  # never raises: the exception on its way out is the one to report


def _single_or(values: torch.Tensor, reduce):
    """values as a 0-d tensor if it holds one element (no kernel), else reduce(values)."""
    return values.view(()) if values.numel() == 1 else reduce(values)


@contextmanager
def if_any(flags: torch.Tensor, pool, *, path: Optional[str] = None):
    """Capture the block into an IF node: at replay it runs iff any element of flags [n] (bool) is true.
    `path` forces "torch" or "kangaroo" (tests); None takes the one chosen for this torch."""
    index, path = _validate(flags, torch.bool, "flags", pool, path)
    with _node_scope(path):
        if path == TORCH_PATH:
            with _torch_if(_single_or(flags, torch.any), index, "an IF node"):
                yield
        else:
            with _own_node(flags, True, 1, index, pool, "an IF node") as C:
                _attempt(index, "opening the IF node's body", C.branch_select, 0)
                yield


@contextmanager
def switch_max(index: torch.Tensor, num_branches: int, pool, *, path: Optional[str] = None):
    """A SWITCH node over num_branches bodies; yields case(i), a context manager that captures body i.
    At replay body max(index) runs (none if that is outside [0, num_branches)).
    `path` forces "torch" or "kangaroo" (tests); None takes the one chosen for this torch."""
    device, path = _validate(index, torch.int64, "index", pool, path)
    if not isinstance(num_branches, int) or isinstance(num_branches, bool) or not 1 <= num_branches <= MAX_BRANCHES:
        raise ValueError(f"num_branches must be an int in [1, {MAX_BRANCHES}], got {num_branches!r}")
    captured = set()

    def claim(i):
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_branches:
            raise ValueError(f"case must be an int in [0, {num_branches}), got {i!r}")
        if i in captured:
            raise ValueError(f"case({i}) was captured already: each body is captured once")
        captured.add(i)

    with _node_scope(path):
        if path == TORCH_PATH:
            # Every condition before any body: bodies may change `index`.
            top = _single_or(index, torch.max)
            chosen = torch.arange(num_branches, device=index.device) == top          # [num_branches] bool

            @contextmanager
            def case(i: int):
                claim(i)
                with _torch_if(chosen[i], device, f"case {i} of a SWITCH node"):
                    yield

            yield case
        else:
            with _own_node(index, False, num_branches, device, pool, "a SWITCH node") as C:

                @contextmanager
                def case(i: int):
                    claim(i)
                    _attempt(device, f"opening case {i} of a SWITCH node", C.branch_select, i)
                    try:
                        yield
                    except BaseException:
                        _quietly(C.branch_end_body)
                        raise
                    _attempt(device, f"closing case {i} of a SWITCH node", C.branch_end_body)

                yield case
