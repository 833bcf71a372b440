"""`kangaroo info`: what this install can run, and why not."""
import platform

import torch

from . import __version__, _extension, config
from .engine import conditional
from .ops import available_backends, schemas


def collect() -> dict:
    info = {
        "kangaroo_ext": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # ImportError, or a broken install
        info["triton"] = f"unavailable ({type(e).__name__})"
    info["extension"] = _extension.library_path() or f"not loaded ({_extension.LOAD_ERROR})"
    info["built for"] = _extension.built_for() or "unknown (the build recorded no torch version)"
    info["compiled archs"] = ", ".join(_extension.compiled_archs()) or "none"
    if schemas.SCHEMA_CHECK_NOTE:
        info["schema check"] = schemas.SCHEMA_CHECK_NOTE
    cond_path, cond_why = conditional.capture_path("cuda")
    policy_path, policy_why = conditional.policy()
    if cond_path:
        info["conditional nodes"] = f"captured by the {cond_path!r} path"
    else:
        info["conditional nodes"] = f"unavailable: {cond_why}" + (
            f" (this torch captures them with the {policy_path!r} path where it can)" if policy_path else "")
    info["backends"] = {b: ("available" if not why else "unavailable: " + "; ".join(why))
                        for b, why in available_backends().items()}
    if info["backends"].get("triton") == "available" and not torch.cuda.is_available():
        info["backends"]["triton"] = _triton_without_gpu()
    try:
        threads, why = config.cpu_threads()
        info["CPU threads"] = (f"{threads} when decoding ({why}; --threads N changes it); torch alone would "
                               f"use {torch.get_num_threads()}")
    except ValueError as e:
        info["CPU threads"] = f"invalid: {e}"
    try:
        info["run switches"] = {name.removeprefix("KANGAROO_").lower(): ("on" if on else "off")
                                for name, on in config.run_flags().items()}
    except ValueError as e:  # a flag set to something unrecognised: "environment" below names it
        info["run switches"] = f"invalid: {e}"
    try:
        config.check_all()
        info["environment"] = "every KANGAROO_* variable that is set has a valid value"
    except ValueError as e:
        info["environment"] = f"invalid: {e}"
    return info


def _triton_without_gpu() -> str:
    """Triton without a GPU runs nothing natively: at most its CPU interpreter, a testing tool."""
    if config.triton_interpreting():
        return ("interpreter only (TRITON_INTERPRET=1, no GPU): its kernels run on the CPU, for testing; "
                "decoding on the CPU uses the reference backend")
    return "installed, but no GPU to run on (TRITON_INTERPRET=1 would run its kernels under the CPU interpreter)"


def print_info():
    for key, value in collect().items():
        if isinstance(value, dict):
            print(f"{key}:")
            width = max(10, *(len(k) for k in value))
            for k, v in value.items():
                print(f"  {k:<{width}} {v}")
        else:
            print(f"{key:<17} {value}")
