"""setup.py's build decision, without a compiler: a machine with no visible GPU gets the pure-Python
install unless the user asks for the extension (TORCH_CUDA_ARCH_LIST, KANGAROO_FORCE_CUDA_BUILD=1 or
KANGAROO_FORCE_CUDA=1), and CI's settings still build it. Importing setup.py runs no setup()."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_VARIABLES = ("KANGAROO_SKIP_CUDA_BUILD", "KANGAROO_FORCE_CUDA", "KANGAROO_FORCE_CUDA_BUILD",
                   "TORCH_CUDA_ARCH_LIST")


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module, with none of the build variables set."""
    for name in BUILD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("kangaroo_setup_under_test", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _facts(setup_py, cuda="13.0", device_visible=False, version="2.11.0+cu130"):
    return lambda: setup_py.TorchFacts(version, cuda, device_visible)


def _toolkit():
    return "/usr/local/cuda-13.0"


def _no_toolkit():
    return None


def test_no_visible_gpu_skips_the_build_and_says_how_to_ask(setup_py):
    build, reason = setup_py._decide(_facts(setup_py), _toolkit)
    assert not build
    assert "no CUDA device is visible" in reason and "KANGAROO_FORCE_CUDA_BUILD=1" in reason
    assert "TORCH_CUDA_ARCH_LIST" in reason


def test_a_visible_gpu_builds(setup_py):
    build, reason = setup_py._decide(_facts(setup_py, device_visible=True), _toolkit)
    assert build and reason.startswith("a CUDA device is visible") and "/usr/local/cuda-13.0" in reason


@pytest.mark.parametrize("name,value", [("TORCH_CUDA_ARCH_LIST", "9.0a"), ("KANGAROO_FORCE_CUDA_BUILD", "1"),
                                        ("KANGAROO_FORCE_CUDA", "1")])
def test_asking_builds_without_a_visible_gpu(setup_py, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    build, reason = setup_py._decide(_facts(setup_py), _toolkit)
    assert build and f"{name}={value}" in reason, reason


def test_ci_settings_build_the_extension(setup_py, monkeypatch):
    """.ci/run on a CPU-only machine: TORCH_CUDA_ARCH_LIST=9.0a and KANGAROO_FORCE_CUDA=1."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.setenv("KANGAROO_FORCE_CUDA", "1")
    assert setup_py._decide(_facts(setup_py), _toolkit)[0]
    assert setup_py._arch_list() == "9.0a"
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"' in ci and "KANGAROO_FORCE_CUDA=1" in ci


def test_skip_wins_over_every_request(setup_py, monkeypatch):
    monkeypatch.setenv("KANGAROO_SKIP_CUDA_BUILD", "1")
    monkeypatch.setenv("KANGAROO_FORCE_CUDA_BUILD", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")

    def never():
        raise AssertionError("torch was probed although the build is skipped")
    assert setup_py._decide(never, _toolkit) == (False, "KANGAROO_SKIP_CUDA_BUILD=1")


@pytest.mark.parametrize("facts,toolkit,expected", [
    (dict(version=None, cuda=None), _toolkit, "torch is not importable"),
    (dict(cuda=None, version="2.13.0+cpu"), _toolkit, "torch 2.13.0+cpu is a CPU-only build"),
    (dict(device_visible=True), _no_toolkit, "no CUDA toolkit found"),
])
def test_what_cannot_be_built_is_named(setup_py, facts, toolkit, expected):
    build, reason = setup_py._decide(_facts(setup_py, **facts), toolkit)
    assert not build and expected in reason, reason


def test_force_cuda_fails_loudly_when_it_cannot_build(setup_py, monkeypatch):
    monkeypatch.setenv("KANGAROO_FORCE_CUDA", "1")
    monkeypatch.setattr(setup_py, "_decide", lambda: (False, "no CUDA toolkit found"))
    with pytest.raises(RuntimeError, match="KANGAROO_FORCE_CUDA=1 but the CUDA extension cannot be built"):
        setup_py._extensions()


def test_the_skip_is_said_in_one_line(setup_py, monkeypatch, capsys):
    monkeypatch.setattr(setup_py, "_decide", lambda: (False, "no CUDA device is visible, ..."))
    assert setup_py._extensions() == ([], {})
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["kangaroo_ext build: pure Python (no compiled extension): no CUDA device is visible, ..."]


def test_a_bad_flag_value_fails_loudly(setup_py, monkeypatch):
    monkeypatch.setenv("KANGAROO_FORCE_CUDA_BUILD", "please")
    with pytest.raises(ValueError, match="KANGAROO_FORCE_CUDA_BUILD='please' is not a boolean"):
        setup_py._decide(_facts(setup_py), _toolkit)


def test_the_probe_on_this_machine_is_cheap_and_consistent(setup_py):
    """The real probe: no CUDA context is needed to answer, and it agrees with torch."""
    import torch
    facts = setup_py._probe_torch()
    assert facts.version == torch.__version__ and facts.cuda == torch.version.cuda
    assert facts.device_visible == (torch.version.cuda is not None and torch.cuda.is_available())


def test_importing_setup_py_runs_no_setup():
    code = ("import importlib.util, sys, setuptools\n"
            "setuptools.setup = lambda **kw: sys.exit('setup() ran')\n"
            f"spec = importlib.util.spec_from_file_location('s', {os.path.join(ROOT, 'setup.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
