"""Loads the compiled extension `kangaroo_ext._C` if this install has one.

Importing it runs csrc/registration.cpp's TORCH_LIBRARY(kangaroo, m), which defines the op schemas
and registers the CUDA kernels. A missing extension is normal on CPU-only installs; a present but
broken one is reported, not hidden.
"""
import importlib

_C = None
LOAD_ERROR = None  # why the extension is not loaded, for `kangaroo info` and backend reasons

try:
    _C = importlib.import_module("kangaroo_ext._C")
except ImportError as e:  # not built (pure-Python install) or built against another torch
    LOAD_ERROR = f"{type(e).__name__}: {e}"


def loaded() -> bool:
    return _C is not None


def library_path():
    return getattr(_C, "__file__", None)


def compiled_archs():
    """The CUDA architectures the extension was compiled for, e.g. ['9.0a']; [] if not built.

    csrc/module.cpp exposes the TORCH_CUDA_ARCH_LIST that setup.py/CMake compiled with (nvcc's own
    __CUDA_ARCH_LIST__ cannot tell sm_90 from sm_90a).
    """
    if _C is None:
        return []
    return [a for a in getattr(_C, "CUDA_ARCH_LIST", "").split("_") if a]


def expected() -> bool:
    """True where CI or the user demanded a CUDA build (then a missing extension is an error)."""
    from . import config
    return config.flag("KANGAROO_FORCE_CUDA")
