"""kangaroo_ext: lossless Kangaroo self-speculative decoding (double early exit) for Hugging Face
causal LMs, with fused CUDA and Triton kernels.

    import kangaroo_ext as kx
    model, tokenizer = kx.load_default_model()
    out = kx.speculative_generate(model, input_ids, adapter=kx.load_default_adapter(model))
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers torch.ops.kangaroo.*)
from .adapter import Adapter  # noqa: E402,F401
from .default_model import check_load_arguments, load_default_adapter, load_default_model  # noqa: E402,F401
from .decoding import DecodeStats, GenerationOutput, generate, speculative_generate  # noqa: E402,F401
from .engine.draft_gate import DraftCosts  # noqa: E402,F401
from .training import TrainOptions, train_adapter  # noqa: E402,F401
