"""What the engine needs from a Hugging Face causal LM: shapes, and references to its weights (never copies).

Supported: the Llama family as transformers implements it (LlamaForCausalLM, incl. SmolLM2;
MistralForCausalLM; Qwen2ForCausalLM with q/k/v bias), with GQA, tied or untied embeddings and any
RoPE variant whose frequencies do not depend on the sequence length (default, linear, llama3, yarn).
"""
import hashlib
from dataclasses import dataclass, field
from typing import List, Optional

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_DYNAMIC_ROPE = ("dynamic", "longrope")  # inv_freq changes with the sequence length


@dataclass
class LayerWeights:
    """One decoder layer's tensors, as the model holds them. Biases are None where the model has none;
    an adapter block without an MLP has post_norm and gate/up/down None."""
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: Optional[torch.Tensor]
    k_bias: Optional[torch.Tensor]
    v_bias: Optional[torch.Tensor]
    o_bias: Optional[torch.Tensor]
    post_norm: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    gate_bias: Optional[torch.Tensor] = None
    up_bias: Optional[torch.Tensor] = None
    down_bias: Optional[torch.Tensor] = None


@dataclass
class ModelSpec:
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    attn_scale: float
    qkv_bias: bool
    inv_freq: torch.Tensor            # [head_dim/2] float32, as the model's rotary module holds it
    rope_scaling: float               # HF's attention_scaling (1.0 except yarn-like types)
    sliding_window: Optional[int]
    embed: torch.Tensor               # [V, H]
    lm_head: torch.Tensor             # [V, H]; the same tensor as embed when tied
    final_norm: torch.Tensor          # [H]
    layers: List[LayerWeights] = field(default_factory=list)
    name_or_path: str = ""

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def fingerprint(self) -> str:
        """Identifies the weights, not just the shapes: an adapter trained for another checkpoint of the
        same architecture is caught. bf16-rounded, so fp32 and bf16 loads of one model agree."""
        sample = torch.cat([self.embed[:4, :64].flatten(), self.final_norm[:64].flatten(),
                            self.layers[0].q[:4, :64].flatten()]).detach().to("cpu", torch.bfloat16)
        return hashlib.sha256(sample.view(torch.int16).numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict:
        """The target's identity as recorded in an adapter's config."""
        return {"architecture": self.architecture, "model_type": self.model_type,
                "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "vocab_size": self.vocab_size, "qkv_bias": self.qkv_bias,
                "intermediate_size": self.layers[0].gate.shape[0],
                "name_or_path": self.name_or_path, "fingerprint": self.fingerprint()}


def _bias(linear):
    return None if linear.bias is None else linear.bias.detach()


def model_spec(model) -> ModelSpec:
    """Reads a transformers causal LM. Raises ValueError for anything the engine would get wrong."""
    arch = type(model).__name__
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES or model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: unsupported architecture {arch} (model_type={model_type!r}); kangaroo_ext "
                         f"supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"model: hidden_act={act!r} is not supported (the Llama family uses 'silu')")
    base = model.model
    rotary = base.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _DYNAMIC_ROPE:
        raise ValueError(f"model: RoPE type {rope_type!r} changes with the sequence length and is not "
                         "supported (default, linear, llama3 and yarn are)")
    params = list(model.parameters())
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) > 1:
        raise ValueError(f"model: parameters span devices {sorted(map(str, devices))}; put the whole model "
                         "on one device (device_map sharding is not supported)")
    if len(dtypes) > 1:
        raise ValueError(f"model: parameters mix dtypes {sorted(map(str, dtypes))}; cast the model to one dtype")
    if next(iter(dtypes)) not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"model: dtype {next(iter(dtypes))} is not supported (float32, float16, bfloat16 are)")

    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    sliding = getattr(config, "sliding_window", None)
    if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        sliding = None
    layers = []
    for layer in base.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(),
            q=a.q_proj.weight.detach(), k=a.k_proj.weight.detach(), v=a.v_proj.weight.detach(),
            o=a.o_proj.weight.detach(), q_bias=_bias(a.q_proj), k_bias=_bias(a.k_proj),
            v_bias=_bias(a.v_proj), o_bias=_bias(a.o_proj),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate=m.gate_proj.weight.detach(), up=m.up_proj.weight.detach(), down=m.down_proj.weight.detach(),
            gate_bias=_bias(m.gate_proj), up_bias=_bias(m.up_proj), down_bias=_bias(m.down_proj)))
    first_attn = base.layers[0].self_attn
    return ModelSpec(
        architecture=arch, model_type=model_type, num_layers=len(layers), hidden_size=config.hidden_size,
        num_heads=num_heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim, vocab_size=model.get_output_embeddings().weight.shape[0],
        rms_norm_eps=float(getattr(base.norm, "variance_epsilon", config.rms_norm_eps)),
        max_positions=int(getattr(config, "max_position_embeddings", 1 << 20)),
        attn_scale=float(getattr(first_attn, "scaling", head_dim ** -0.5)),
        qkv_bias=layers[0].q_bias is not None,
        inv_freq=rotary.inv_freq.detach().float(), rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        sliding_window=int(sliding) if sliding else None,
        embed=model.get_input_embeddings().weight.detach(), lm_head=model.get_output_embeddings().weight.detach(),
        final_norm=base.norm.weight.detach(), layers=layers,
        name_or_path=str(getattr(config, "_name_or_path", "") or ""))
