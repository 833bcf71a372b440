"""The capture logic of kangaroo_ext/engine/conditional.py, on the CPU: which path each torch takes, and
that every node is closed whatever fails (exceptions in bodies, capture failures, KeyboardInterrupt),
with capture failures raised as ConditionalCaptureError and remembered. The two paths' native calls are
replaced by fakes with the same contract (csrc/graph_branch.h; torch.cuda.CUDAGraph's conditional-node
methods); tests/test_conditional_graphs.py runs the real ones on a GPU."""
import contextlib

import pytest
import torch

from kangaroo_ext import _extension
from kangaroo_ext.engine import conditional
from kangaroo_ext.engine.conditional import OWN_PATH, TORCH_PATH, ConditionalCaptureError


# ---- which torch takes which path ----------------------------------------------------------------

@pytest.mark.parametrize("torch_version,cuda,has_api,path", [
    ("2.11.0+cu130", "13.0", True, OWN_PATH),        # the GPU-tested version keeps our capture
    ("2.11.2", "12.8", False, OWN_PATH),
    ("2.14.1+cu130", "13.0", True, TORCH_PATH),
    ("2.15.0.dev20260101+cu130", "13.0", True, TORCH_PATH),
    ("3.0.0", "13.2", True, TORCH_PATH),
])
def test_supported_versions_choose_a_path(torch_version, cuda, has_api, path):
    assert conditional.choose_path(torch_version, cuda, has_api) == (path, "")


@pytest.mark.parametrize("torch_version,cuda,has_api,hip,words", [
    ("2.12.0+cu130", "13.0", True, None, ["torch 2.12.0+cu130", "CUDA 13.0", "2.11.x", ">= 2.14"]),
    ("2.10.1", "12.8", True, None, ["torch 2.10.1", "checked for neither"]),
    ("2.14.1+cu130", "13.0", False, None, ["torch 2.14.1+cu130", "begin_capture_to_if_node"]),
    ("2.11.0+cu126", "12.6", True, None, ["CUDA 12.6", "need CUDA >= 12.8"]),
    ("2.14.1+cpu", None, False, None, ["CPU-only"]),
    ("2.14.1+rocm7.0", None, True, "7.0", ["ROCm"]),
])
def test_other_versions_say_which_torch_and_why(torch_version, cuda, has_api, hip, words):
    path, why = conditional.choose_path(torch_version, cuda, has_api, hip)
    assert path == ""
    for word in words:
        assert word in why, (word, why)


def test_the_running_torch_has_a_policy():
    path, why = conditional.policy()
    assert bool(path) != bool(why)
    assert "CUDA device" in conditional.unsupported_reason("cpu")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="flags"):
        with conditional.if_any(torch.ones(2, dtype=torch.bool), pool=(0, 0)):
            pass
    with pytest.raises(ValueError, match="index"):
        with conditional.switch_max(torch.zeros(1, dtype=torch.int32), 2, pool=(0, 0)):
            pass


def test_is_capture_error_looks_through_chained_errors():
    try:
        try:
            raise ConditionalCaptureError("node") from RuntimeError("cuda")
        except ConditionalCaptureError:
            raise RuntimeError("capture_end: the capture was invalidated")
    except RuntimeError as e:
        assert conditional.is_capture_error(e)
    assert not conditional.is_capture_error(RuntimeError("unrelated"))


# ---- fakes of the two paths ----------------------------------------------------------------------

class FakeOwnCapture:
    """kangaroo_ext._C's branch_* calls with csrc/graph_branch.cu's frame semantics; `fail` maps a call
    name to the exception it raises (before changing anything, as the C++ calls do)."""

    def __init__(self, **fail):
        self.frames = []          # one dict per open node: {"body_open": bool}
        self.fail = fail
        self.begun = []           # (n, is_bool, num_branches) of every node

    def _check(self, name):
        if name in self.fail:
            raise self.fail[name]

    def branch_depth(self):
        return len(self.frames)

    def branch_begin(self, ptr, n, is_bool, num_branches, device, pool):
        self._check("branch_begin")
        self.begun.append((n, is_bool, num_branches))
        self.frames.append({"body_open": False})

    def branch_select(self, index):
        self._check("branch_select")
        assert self.frames and not self.frames[-1]["body_open"]
        self.frames[-1]["body_open"] = True

    def branch_end_body(self):
        self._check("branch_end_body")
        if not (self.frames and self.frames[-1]["body_open"]):
            raise RuntimeError("branch_end_body: no body is open on this thread")
        self.frames[-1]["body_open"] = False

    def branch_close(self, depth, raise_errors):
        del self.frames[depth:]   # popped whatever happens, then the first error
        if raise_errors:
            self._check("branch_close")


class FakeTorchGraph:
    """torch.cuda.CUDAGraph's conditional-node methods: records each IF node's condition when opened."""

    def __init__(self, **fail):
        self.open = 0
        self.conditions = []
        self.fail = fail

    def begin_capture_to_if_node(self, pred):
        if "begin" in self.fail:
            raise self.fail["begin"]
        assert pred.dtype == torch.bool and pred.dim() == 0
        self.conditions.append(bool(pred))
        self.open += 1

    def end_capture_to_conditional_node(self):
        assert self.open > 0
        self.open -= 1
        if "end" in self.fail:
            raise self.fail["end"]


@pytest.fixture
def fake(monkeypatch):
    """Install a fake path: fake(OWN_PATH, **fail) or fake(TORCH_PATH, **fail). Tensors stay on the CPU."""
    def install(path, **fail):
        monkeypatch.setattr(conditional, "_validate", lambda values, dtype, name, pool, forced: (0, path))
        if path == OWN_PATH:
            native = FakeOwnCapture(**fail)
            monkeypatch.setattr(_extension, "_C", native)
        else:
            native = FakeTorchGraph(**fail)
            # raising=False: a torch without the API (2.11) gets the attribute for the duration of the test
            monkeypatch.setattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", lambda: native,
                                raising=False)
        return native
    yield install
    conditional.forget_capture_failures()
    assert conditional._open_paths() == [], "a node stayed open in the Python bookkeeping"


FLAGS = torch.tensor([False, True])
POOL = (0, 1)


class Boom(Exception):
    pass


def _remembered_failure() -> str:
    return conditional._failures.get(0, "")


# ---- kangaroo_ext's own capture ------------------------------------------------------------------

def test_exception_in_a_nested_body_closes_every_node_unwrapped(fake):
    native = fake(OWN_PATH)
    with pytest.raises(Boom):
        with conditional.if_any(FLAGS, POOL):
            with conditional.if_any(FLAGS, POOL):
                with conditional.if_any(FLAGS, POOL):
                    assert native.branch_depth() == 3
                    raise Boom()
    assert native.frames == []
    assert _remembered_failure() == "", "an error in the caller's code is not a capture failure"


def test_keyboard_interrupt_right_after_begin_leaves_nothing(fake):
    native = fake(OWN_PATH, branch_select=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        with conditional.if_any(FLAGS, POOL):
            pass
    assert native.frames == [] and _remembered_failure() == ""


@pytest.mark.parametrize("call", ["branch_begin", "branch_select", "branch_close"])
def test_capture_failure_raises_conditional_capture_error_and_is_remembered(fake, call):
    native = fake(OWN_PATH, **{call: RuntimeError("CUDA error: operation not permitted when stream is capturing")})
    with pytest.raises(ConditionalCaptureError, match="capture without conditional nodes") as caught:
        with conditional.if_any(FLAGS, POOL):
            pass
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert native.frames == []
    reason = conditional.unsupported_reason("cuda:0")
    assert "failed earlier in this process" in reason and "operation not permitted" in reason
    conditional.forget_capture_failures()
    # The bookkeeping, not unsupported_reason: on a machine with a GPU that would probe the (faked, failing)
    # native path again and remember a new failure (3 failures on the H100 at 2fd0d9c).
    assert _remembered_failure() == ""


def test_a_later_capture_after_an_error_starts_at_depth_zero(fake):
    native = fake(OWN_PATH)
    with pytest.raises(Boom):
        with conditional.switch_max(torch.tensor([1]), 3, POOL) as case:
            with case(0):
                with conditional.if_any(FLAGS, POOL):
                    raise Boom()
    assert native.frames == []
    with conditional.if_any(FLAGS, POOL):
        assert native.branch_depth() == 1 and native.frames[0]["body_open"]
    assert native.frames == []


def test_nodes_nest_32_deep_and_no_deeper_than_max_depth(fake):
    native = fake(OWN_PATH)
    with contextlib.ExitStack() as stack:
        for _ in range(32):
            stack.enter_context(conditional.if_any(FLAGS, POOL))
        assert native.branch_depth() == 32
    assert native.frames == []
    with pytest.raises(RuntimeError, match=f"at most {conditional.MAX_DEPTH} deep"):
        with contextlib.ExitStack() as stack:
            for _ in range(conditional.MAX_DEPTH + 1):
                stack.enter_context(conditional.if_any(FLAGS, POOL))
    assert native.frames == []


def test_switch_cases_are_captured_once_each(fake):
    native = fake(OWN_PATH)
    with conditional.switch_max(torch.tensor([2, 0]), 3, POOL) as case:
        for i in (2, 0):
            with case(i):
                assert native.frames[-1]["body_open"]
            assert not native.frames[-1]["body_open"], "a case's body ends with its block"
        with pytest.raises(ValueError, match="captured already"):
            with case(2):
                pass
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            with case(3):
                pass
    assert native.begun == [(2, False, 3)] and native.frames == []
    with pytest.raises(ValueError, match="num_branches"):
        with conditional.switch_max(torch.tensor([0]), 0, POOL):
            pass


def test_an_error_in_a_case_the_caller_catches_leaves_the_switch_usable(fake):
    native = fake(OWN_PATH)
    with conditional.switch_max(torch.tensor([0]), 2, POOL) as case:
        with pytest.raises(Boom):
            with case(0):
                raise Boom()
        with case(1):
            assert native.frames[-1]["body_open"]
    assert native.frames == []


# ---- torch's API ---------------------------------------------------------------------------------

def test_torch_path_if_reads_any_of_the_flags(fake):
    graph = fake(TORCH_PATH)
    with conditional.if_any(torch.tensor([False, False, True]), POOL):
        with conditional.if_any(torch.tensor([False]), POOL):
            assert graph.open == 2
    assert graph.open == 0 and graph.conditions == [True, False]


def test_torch_path_switch_is_side_by_side_ifs_on_conditions_fixed_before_the_bodies(fake):
    graph = fake(TORCH_PATH)
    index = torch.tensor([1, 3, 2])
    with conditional.switch_max(index, 5, POOL) as case:
        for i in range(5):
            with case(i):
                assert graph.open == 1, "each case is one IF node at the switch's level"
                index.fill_(i + 1)   # a body changing the index must not start a later case
    assert graph.conditions == [False, False, False, True, False]
    graph.conditions.clear()
    with conditional.switch_max(torch.tensor([7]), 5, POOL) as case:   # outside [0, 5): no body runs
        for i in range(5):
            with case(i):
                pass
    assert graph.conditions == [False] * 5


def test_torch_path_closes_the_node_on_an_error_and_wraps_only_capture_failures(fake):
    graph = fake(TORCH_PATH)
    with pytest.raises(Boom):
        with conditional.if_any(FLAGS, POOL):
            raise Boom()
    assert graph.open == 0 and _remembered_failure() == ""
    graph.fail["begin"] = RuntimeError("'graph_capture_record_stream_reuse:True' ...")
    with pytest.raises(ConditionalCaptureError) as caught:
        with conditional.if_any(FLAGS, POOL):
            pass
    assert "record_stream_reuse" in str(caught.value.__cause__) and "record_stream_reuse" in _remembered_failure()


def test_paths_do_not_mix_on_one_thread(fake, monkeypatch):
    fake(OWN_PATH)
    with conditional.if_any(FLAGS, POOL):
        monkeypatch.setattr(conditional, "_validate", lambda values, dtype, name, pool, forced: (0, TORCH_PATH))
        with pytest.raises(RuntimeError, match="cannot sit inside a body captured by the 'kangaroo' path"):
            with conditional.if_any(FLAGS, POOL):
                pass
