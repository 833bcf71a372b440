"""Build script: a CUDA extension where it can be built, pure Python elsewhere.

Knobs (environment variables):
  KANGAROO_SKIP_CUDA_BUILD=1   never build the extension (pure-Python install)
  KANGAROO_FORCE_CUDA=1        build it or fail loudly (no silent fallback)
  TORCH_CUDA_ARCH_LIST         e.g. "9.0a"; default: the GPU present, else "8.0;9.0a"
  MAX_JOBS                     parallel nvcc/c++ jobs (ninja)
  CUDA_HOME                    toolkit folder; found from nvcc when unset

The build chosen, and why, is printed on one line starting with "kangaroo_ext build:".
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["kangaroo_ext", "kangaroo_ext.ops", "kangaroo_ext.engine", "kangaroo_ext.training", "kangaroo_ext.benchmarking",
            "kangaroo_ext.triton_kernels"]
PACKAGE_DIR = {"kangaroo_ext.triton_kernels": "triton_kernels"}  # "triton_kernels" is taken on PyPI
PACKAGE_DATA = {"kangaroo_ext": ["adapters/*/*", "data/*"]}


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg):
    # pip hides stdout of successful builds unless -v; stderr shows with -v too.
    print(f"kangaroo_ext build: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """CUDA_HOME, or the toolkit behind `nvcc` (which may be a wrapper script that execs the real one)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
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


def _decide():
    """Returns (build_cuda: bool, reason: str)."""
    if _flag("KANGAROO_SKIP_CUDA_BUILD"):
        return False, "KANGAROO_SKIP_CUDA_BUILD=1"
    try:
        import torch  # noqa: F401
    except ImportError:
        return False, ("torch is not importable in the build environment (build isolation?); "
                       "use `pip install --no-build-isolation .` to build the CUDA extension")
    import torch
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit {cuda_home}"


def _arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
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
        if _flag("KANGAROO_FORCE_CUDA"):
            raise RuntimeError(f"KANGAROO_FORCE_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"pure Python (no compiled extension): {reason}")
        return [], {}
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
                    + (["-Xptxas=-v"] if _flag("KANGAROO_PTXAS_VERBOSE") else []),
        },
    )
    # A runpath to torch's libraries, so `_C` loads even before `import torch` (CMake does the same).
    import torch
    ext.extra_link_args = [f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]
    _say(f"CUDA extension for arch {arch_list}: {reason}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


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
