"""Loads the compiled extension `kangaroo_ext._C` if this install has one, and only if it was built for
the torch that is running.

Importing it runs csrc/registration.cpp's TORCH_LIBRARY(kangaroo, m), which defines the op schemas
and registers the CUDA kernels. A missing extension is normal on CPU-only installs. An extension built
for another torch is refused before it is loaded: under another torch it either fails to load
("undefined symbol") or, worse, loads and calls torch through a different C++ ABI. The build records
the torch version, its CUDA version and the C++ ABI flag in the library (csrc/module.cpp,
`kangaroo_build_info`); they are read from the file's bytes, so checking never loads the library.
A refused or broken extension is reported once, as a warning at import, and in LOAD_ERROR (which
`kangaroo info` and the backends' reasons show); the CUDA backend is then unavailable.
"""
import contextlib
import importlib
import importlib.util
import mmap
import warnings
from typing import Dict, Optional, Tuple

REBUILD_HINT = "rebuild with pip install --no-build-isolation -e ."
_BUILD_INFO_MARKER = b"KANGAROO_BUILD_INFO{"
_BUILD_INFO_MAX_BYTES = 512  # the record is ~100 bytes; a longer match is not ours


class ExtensionMismatchWarning(RuntimeWarning):
    """kangaroo_ext._C was built for another torch and is not used."""


def running_torch() -> Dict[str, str]:
    """The facts a build is checked against, from the torch that is running."""
    import torch
    return {"torch": torch.__version__, "cuda": torch.version.cuda or "",
            "cxx11_abi": str(int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))))}


def _unhex(token: str) -> str:
    """'0x322e3131' -> '2.11' (setup.py and CMake record versions as hex tokens); '' if not decodable."""
    if not token.startswith("0x"):
        return ""
    try:
        return bytes.fromhex(token[2:]).decode()
    except ValueError:
        return ""


def read_build_info(path: str) -> Dict[str, str]:
    """What the library file at `path` says it was built for: {'torch', 'cuda', 'cxx11_abi'} ('' where
    unknown), or {} if it holds no record (built before builds recorded one). Reads, never loads."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(_BUILD_INFO_MARKER)
            if start < 0:
                return {}
            start += len(_BUILD_INFO_MARKER)
            end = data.find(b"}", start, start + _BUILD_INFO_MAX_BYTES)
            if end < 0:
                return {}
            record = data[start:end].decode("ascii", "replace")
    except (OSError, ValueError):  # unreadable, or empty (mmap of 0 bytes)
        return {}
    fields = dict(item.split("=", 1) for item in record.split(";") if "=" in item)
    abi = fields.get("cxx11_abi", "")
    return {"torch": _unhex(fields.get("torch", "")), "cuda": _unhex(fields.get("cuda", "")),
            "cxx11_abi": abi if abi in ("0", "1") else ""}


def mismatch(built: Dict[str, str], running: Dict[str, str]) -> str:
    """One line saying why a library built for `built` must not run under `running`, '' if it may.
    Facts the build did not record are not compared."""
    if built.get("torch") and built["torch"] != running["torch"]:
        return (f"kangaroo_ext._C was built for torch {built['torch']} but torch {running['torch']} is running: "
                f"{REBUILD_HINT}")
    if built.get("cuda") and built["cuda"] != running["cuda"]:
        return (f"kangaroo_ext._C was built for torch {built['torch'] or running['torch']} with CUDA {built['cuda']} "
                f"but the running torch has CUDA {running['cuda'] or 'none'}: {REBUILD_HINT}")
    if built.get("cxx11_abi") and built["cxx11_abi"] != running["cxx11_abi"]:
        return (f"kangaroo_ext._C was built with _GLIBCXX_USE_CXX11_ABI={built['cxx11_abi']} but torch "
                f"{running['torch']} uses {running['cxx11_abi']}: {REBUILD_HINT}")
    return ""


def _import_error_message(error: ImportError, built: Dict[str, str], running: Dict[str, str]) -> Tuple[str, bool]:
    """(LOAD_ERROR, whether to warn) for a library that failed to load."""
    text = f"{type(error).__name__}: {error}"
    if "undefined symbol" not in str(error):
        return text, False
    # The signature of a library built against another torch (or a stale build of ours).
    built_for = f"torch {built['torch']}" if built.get("torch") else "another torch (its build recorded none)"
    return (f"kangaroo_ext._C does not match the running torch {running['torch']} (built for {built_for}; "
            f"{text}): {REBUILD_HINT}"), True


def load(running: Dict[str, str]) -> Tuple[Optional[object], Optional[str], Dict[str, str], bool]:
    """(module or None, LOAD_ERROR or None, the library's build record, whether the error needs a warning)."""
    try:
        spec = importlib.util.find_spec("kangaroo_ext._C")
    except (ImportError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}", {}, False
    if spec is None or not spec.origin:  # not built (pure-Python install): normal, no warning
        return None, "not built: this install has no kangaroo_ext._C", {}, False
    built = read_build_info(spec.origin)
    why = mismatch(built, running)
    if why:
        return None, why, built, True
    try:
        return importlib.import_module("kangaroo_ext._C"), None, built, False
    except ImportError as e:
        message, warn = _import_error_message(e, built, running)
        return None, message, built, warn


_C, LOAD_ERROR, BUILD_INFO, _warn = load(running_torch())
if _warn:
    warnings.warn(LOAD_ERROR, ExtensionMismatchWarning, stacklevel=2)


def apply_launch_settings():
    """Hand the launchers their switches (the kernel headers read no environment): programmatic
    dependent launch unless KANGAROO_DISABLE_PDL; attention's batch-invariant order unless
    KANGAROO_BATCH_INVARIANT_ATTENTION=0; tensor-core GEMVs with KANGAROO_TENSOR_CORE_GEMV; the persistent draft
    kernel's split barrier with KANGAROO_PERSISTENT_SPLIT_BARRIER and its L2 prefetch with
    KANGAROO_PERSISTENT_L2_PREFETCH; the GEMVs' deeper weight prefetch with KANGAROO_GEMV_DEEP_PREFETCH; attention's
    interleaved key splits with KANGAROO_INTERLEAVED_KEY_SPLITS; the warp-chunk attention kernel with
    KANGAROO_WARP_CHUNK_ATTENTION. Called at import; call again after changing them."""
    from . import config
    settings = {"set_pdl_launches": not config.flag("KANGAROO_DISABLE_PDL"),
                "set_batch_invariant_attention": config.flag("KANGAROO_BATCH_INVARIANT_ATTENTION"),
                "set_tensor_core_gemv": config.flag("KANGAROO_TENSOR_CORE_GEMV"),
                "set_persistent_split_barrier": config.flag("KANGAROO_PERSISTENT_SPLIT_BARRIER"),
                "set_gemv_deep_prefetch": config.flag("KANGAROO_GEMV_DEEP_PREFETCH"),
                "set_persistent_l2_prefetch": config.flag("KANGAROO_PERSISTENT_L2_PREFETCH"),
                "set_interleaved_key_splits": config.flag("KANGAROO_INTERLEAVED_KEY_SPLITS"),
                "set_warp_chunk_attention": config.flag("KANGAROO_WARP_CHUNK_ATTENTION")}
    for setter, value in settings.items():
        if _C is not None and hasattr(_C, setter):  # an extension older than the switch lacks its setter
            getattr(_C, setter)(value)


apply_launch_settings()


@contextlib.contextmanager
def launch_switches(**enabled):
    """The launchers' switches and settings named by their getters (e.g. persistent_split_barrier=True,
    persistent_max_blocks=33) set for the block and restored after it, whatever the environment says; a no-op
    without the extension (then no CUDA kernel runs at all). For tests and benchmarks that compare a switch's
    paths in one process."""
    if _C is None:
        yield
        return
    before = {name: getattr(_C, name)() for name in enabled}
    try:
        for name, on in enabled.items():
            getattr(_C, "set_" + name)(on)
        yield
    finally:
        for name, on in before.items():
            getattr(_C, "set_" + name)(on)


def loaded() -> bool:
    return _C is not None


def tensor_core_gemv() -> bool:
    """Whether the launchers run the tensor-core GEMVs (the switch as the extension holds it)."""
    return bool(_C is not None and hasattr(_C, "tensor_core_gemv") and _C.tensor_core_gemv())


def attention_invariant_max_tokens(group: int, head_dim: int, elem_size: int, device_index: int) -> Optional[int]:
    """The most query tokens one CUDA attention call may carry in the batch-invariant order (csrc/ops.h), for
    this GQA group, head dim and element size (bytes) on this device: 0 where no call does (the switch off,
    fp32); None where the extension is missing or predates the query."""
    if _C is None or not hasattr(_C, "attention_invariant_max_tokens"):
        return None
    return int(_C.attention_invariant_max_tokens(group, head_dim, elem_size, device_index))


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


def built_for() -> str:
    """'torch 2.14.1+cu130, CUDA 13.0, C++11 ABI 1' as the library records it; '' if it records nothing."""
    if not BUILD_INFO.get("torch"):
        return ""
    return (f"torch {BUILD_INFO['torch']}, CUDA {BUILD_INFO.get('cuda') or 'none'}, "
            f"C++11 ABI {BUILD_INFO.get('cxx11_abi') or '?'}")


def expected() -> bool:
    """True where CI or the user demanded a CUDA build (then a missing extension is an error)."""
    from . import config
    return config.flag("KANGAROO_FORCE_CUDA")
