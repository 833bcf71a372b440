"""Small random models of each supported family, for CPU tests."""
import functools

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

FAMILIES = ("llama", "mistral", "qwen2")
_V5 = int(transformers.__version__.split(".")[0]) >= 5


def _rope_kwargs(rope):
    """RoPE settings in the spelling of the installed transformers (rope_parameters in v5)."""
    if rope is None:
        return {}
    params = {"rope_type": rope, "rope_theta": 10000.0}
    if rope == "llama3":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    elif rope == "linear":
        params.update(factor=2.0)
    if _V5:
        return {"rope_parameters": params}
    theta = params.pop("rope_theta")
    return {"rope_scaling": params, "rope_theta": theta}


@functools.lru_cache(maxsize=None)
def tiny_model(family="llama", layers=6, hidden=64, heads=4, kv_heads=2, vocab=111, tied=False, rope=None,
               head_dim=None, seed=0):
    """A random model, float32, eval mode. Cached: tests must not modify it."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                  tie_word_embeddings=tied, **_rope_kwargs(rope))
    if head_dim is not None:
        common["head_dim"] = head_dim
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=False, **common))
    else:
        raise KeyError(family)
    with torch.no_grad():  # sharpen the output distribution so greedy text is not one repeated token
        model.lm_head.weight.mul_(4.0)
    return model.eval()


def prompts(n, vocab=111, seed=0, min_len=1, max_len=24):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    lengths[0] = 1  # a one-token prompt: nothing to prefill
    return [torch.randint(0, vocab, (int(t),), generator=g) for t in lengths]
