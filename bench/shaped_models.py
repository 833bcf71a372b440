"""Random-weight Llama models at published shapes, for engine prices that do not depend on the weights.

A step's time depends on the shapes (weights streamed, launches, attention length), not on the values.
So issue 21's `round_1b` measures a Llama-3.2-1B-shaped model with random weights, and a random adapter
with a reduced draft vocabulary. No weights are downloaded. Acceptance means nothing here: only prices.

    model = random_llama(LLAMA_3_2_1B, "cuda", torch.bfloat16)
    adapter = random_adapter(model, exit_layer=2, draft_vocab=8192)
"""
from typing import Dict

import torch

# meta-llama/Llama-3.2-1B's config.json, without its RoPE scaling ("llama3", factor 32). The scaling
# changes the RoPE tables' values, not the work, so the prices are the same.
LLAMA_3_2_1B: Dict[str, object] = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=131072)

# HuggingFaceTB/SmolLM2-135M-Instruct's config.json: the default model's shape, for prices without its weights.
SMOLLM2_135M: Dict[str, object] = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
    max_position_embeddings=8192)


def parameter_count(shape: Dict[str, object]) -> int:
    """Parameters of a Llama of this shape (no biases), from the shape alone."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h        # q, k, v, o; gate, up, down; two norms
    embed = shape["vocab_size"] * h
    return n * layer + embed * (1 if shape["tie_word_embeddings"] else 2) + h   # + the final norm


def random_llama(shape: Dict[str, object], device, dtype: torch.dtype, seed: int = 0):
    """A LlamaForCausalLM of `shape` with seeded random weights on `device` in `dtype`, with no EOS: a
    generation then always runs to max_new_tokens, so every measured run does the same work."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.device(device):          # initialised where it runs: a 1B model in seconds on a GPU
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def random_adapter(model, exit_layer: int = 2, draft_vocab: int = 8192, architecture: str = "decoder"):
    """An untrained adapter after `exit_layer`, drafting over the first `draft_vocab` token ids."""
    from kangaroo_ext import Adapter
    adapter = Adapter.for_model(model, exit_layer, init="random", architecture=architecture)
    return adapter.with_draft_vocab(torch.arange(draft_vocab)) if draft_vocab else adapter
