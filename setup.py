"""Build script: the CUDA extension where it can be built and is wanted, pure Python elsewhere.

Knobs (environment variables; kangaroo_ext/config.py reads them all):
  KANGAROO_SKIP_CUDA_BUILD=1   never build the extension (pure-Python install)
  KANGAROO_FORCE_CUDA=1        build it or fail loudly (no silent fallback); CI sets it
  KANGAROO_FORCE_CUDA_BUILD=1  build it even though no CUDA device is visible
  TORCH_CUDA_ARCH_LIST         e.g. "9.0a"; default: the GPU present, else "8.0;9.0a". Setting it also
                               asks for the build on a machine with no visible GPU (CI does)
  MAX_JOBS                     parallel nvcc/c++ jobs (ninja)
  CUDA_HOME                    toolkit folder; found from nvcc when unset

Without a visible CUDA device, and unless asked, the extension is not built: it could never run there, and
compiling it costs minutes. The build chosen, and why, is printed on one line starting with
"kangaroo_ext build:". Importing this file (tests/test_setup_decision.py does) runs no setup().
"""
import glob
import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["kangaroo_ext", "kangaroo_ext.ops", "kangaroo_ext.engine", "kangaroo_ext.training", "kangaroo_ext.benchmarking",
            "kangaroo_ext.triton_kernels"]
PACKAGE_DIR = {"kangaroo_ext.triton_kernels": "triton_kernels"}  # "triton_kernels" is taken on PyPI
PACKAGE_DATA = {"kangaroo_ext": ["adapters/*/*", "data/*"]}


def _load_config():
    """kangaroo_ext/config.py by path: the package itself cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("_kangaroo_build_config",
                                                  os.path.join(ROOT, "kangaroo_ext", "config.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


config = _load_config()


def _say(msg):
    # pip hides stdout of successful builds unless -v; stderr shows with -v too.
    print(f"kangaroo_ext build: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """CUDA_HOME, or the toolkit behind `nvcc` (which may be a wrapper script that execs the real one)."""
    if config.cuda_home():
        return config.cuda_home()
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, "r", errors="ignore") as f:
                head = f.read(4096)
            m = re.search(r"exec\s+(\S*/bin/nvcc)", head)  # e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            if m:
                real = m.group(1)
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.isdir(os.path.join(c, "include")):
            return c
    return None


@dataclass(frozen=True)
class TorchFacts:
    """What the build decision needs to know about the torch in the build environment."""
    version: Optional[str]        # None: torch is not importable (build isolation?)
    cuda: Optional[str]           # torch.version.cuda; None for a CPU-only build
    device_visible: bool          # a CUDA device can be used here (torch.cuda.is_available())


def _probe_torch() -> TorchFacts:
    try:
        import torch
    except ImportError:
        return TorchFacts(None, None, False)
    # is_available() asks the driver for a device count without creating a CUDA context: cheap, and safe
    # on a machine with no driver at all (it returns False).
    visible = torch.version.cuda is not None and torch.cuda.is_available()
    return TorchFacts(torch.__version__, torch.version.cuda, visible)


def _decide(probe: Callable[[], TorchFacts] = _probe_torch,
            find_toolkit: Callable[[], Optional[str]] = _find_cuda_home):
    """Returns (build_cuda: bool, reason: str). `probe` and `find_toolkit` give the facts about this
    machine (tests pass their own); the environment is read through config."""
    if config.flag("KANGAROO_SKIP_CUDA_BUILD"):
        return False, "KANGAROO_SKIP_CUDA_BUILD=1"
    torch_facts = probe()
    if torch_facts.version is None:
        return False, ("torch is not importable in the build environment (build isolation?); "
                       "use `pip install --no-build-isolation .` to build the CUDA extension")
    if torch_facts.cuda is None:
        return False, f"torch {torch_facts.version} is a CPU-only build"
    asked_by = [name for name, asked in (
        ("TORCH_CUDA_ARCH_LIST=" + (config.torch_cuda_arch_list() or ""), config.torch_cuda_arch_list()),
        ("KANGAROO_FORCE_CUDA_BUILD=1", config.flag("KANGAROO_FORCE_CUDA_BUILD")),
        ("KANGAROO_FORCE_CUDA=1", config.flag("KANGAROO_FORCE_CUDA"))) if asked]
    if not torch_facts.device_visible and not asked_by:
        return False, ("no CUDA device is visible, so the extension could never run here; set "
                       "KANGAROO_FORCE_CUDA_BUILD=1 or TORCH_CUDA_ARCH_LIST (e.g. 9.0a) to build it anyway")
    cuda_home = find_toolkit()
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    why = "a CUDA device is visible" if torch_facts.device_visible else \
        f"no CUDA device is visible, but the build is asked for ({', '.join(asked_by)})"
    return True, f"{why}; torch {torch_facts.version} (CUDA {torch_facts.cuda}), toolkit {cuda_home}"


def _arch_list():
    if config.torch_cuda_arch_list():
        return config.torch_cuda_arch_list()
    import torch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        # Hopper's wgmma/setmaxnreg need the arch-specific "a" target.
        return f"{major}.{minor}" + ("a" if major == 9 else "")
    return "8.0;9.0a"


def _arch_token(arch_list):
    """'8.0;9.0a' -> '8.0_9.0a': one preprocessor number, so csrc/module.cpp can stringify it
    without shell quoting (ninja runs the compile through a shell)."""
    return "_".join(re.sub(r"[^0-9A-Za-z.]", "", a) for a in re.split(r"[;\s,]+", arch_list) if a)


def _hex_token(text):
    """'2.14.1+cu130' -> '0x322e31342e312b6375313330': one preprocessor token whatever the text holds
    (csrc/module.cpp decodes it), so neither the shell ninja runs nor the preprocessor can alter it."""
    return "0x" + (text or "").encode().hex()


def _torch_build_defines():
    """The torch the extension is compiled against, recorded in the module (csrc/module.cpp) so that
    kangaroo_ext/_extension.py can refuse to load it under another torch."""
    import torch
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return [f"-DKANGAROO_TORCH_VERSION_HEX={_hex_token(torch.__version__)}",
            f"-DKANGAROO_TORCH_CUDA_HEX={_hex_token(torch.version.cuda)}",
            f"-DKANGAROO_TORCH_CXX11_ABI={abi}"]


def _extensions():
    build, reason = _decide()
    if not build:
        if config.flag("KANGAROO_FORCE_CUDA"):
            raise RuntimeError(f"KANGAROO_FORCE_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"pure Python (no compiled extension): {reason}")
        return [], {}
    os.environ["CUDA_HOME"] = _find_cuda_home()  # torch.utils.cpp_extension reads it at import
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch_list = _arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # torch turns this into -gencode flags
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(
        name="kangaroo_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # No -std flag: torch adds the standard its headers need (C++20 since torch 2.13).
            "cxx": ["-O3", f"-DKANGAROO_CUDA_ARCHS={_arch_token(arch_list)}"] + _torch_build_defines(),
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
                    + (["-Xptxas=-v"] if config.flag("KANGAROO_PTXAS_VERBOSE") else []),
        },
    )
    # A runpath to torch's libraries, so `_C` loads even before `import torch` (CMake does the same).
    import torch
    ext.extra_link_args = [f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]
    _say(f"CUDA extension for arch {arch_list}: {reason}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":  # setuptools runs this file as __main__; a test importing it builds nothing
    ext_modules, cmdclass = _extensions()
    setup(
        packages=PACKAGES,
        package_dir=PACKAGE_DIR,
        package_data=PACKAGE_DATA,
        include_package_data=True,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
