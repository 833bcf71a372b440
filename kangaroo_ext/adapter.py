"""The Kangaroo adapter: the small trained block that turns the target's exit-layer state into a draft.

    h_exit ──RMSNorm──► attention (target's head layout, own KV cache) ──+ h_exit──► RMSNorm ──► target LM head

Saved as `adapter.safetensors` plus `adapter_config.json`, which records the exit layer and the target's
architecture, shapes and weight fingerprint, so loading it into another model fails clearly.
"""
import json
import os
from typing import Optional

import torch
from torch import nn

from .engine.spec import ModelSpec, model_spec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "kangaroo_ext-adapter"
VERSION = 1


class Adapter(nn.Module):
    """Kangaroo adapter for one target model and exit layer ℓ (1 <= ℓ < num_layers).

    Parameters: norm1 [H], q_proj [Hq*D, H], k_proj / v_proj [Hkv*D, H] (with bias where the target's
    q/k/v have one), o_proj [H, Hq*D], norm2 [H]. The LM head is the target's, not a parameter here.
    """

    def __init__(self, config: dict):
        super().__init__()
        t = config["target"]
        H, Hq, Hkv, D = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
        self.config = dict(config)
        self.exit_layer = int(config["exit_layer"])
        self.rms_norm_eps = float(config["rms_norm_eps"])
        self.norm1 = nn.Parameter(torch.ones(H))
        self.q_proj = nn.Linear(H, Hq * D, bias=t["qkv_bias"])
        self.k_proj = nn.Linear(H, Hkv * D, bias=t["qkv_bias"])
        self.v_proj = nn.Linear(H, Hkv * D, bias=t["qkv_bias"])
        self.o_proj = nn.Linear(Hq * D, H, bias=False)
        self.norm2 = nn.Parameter(torch.ones(H))

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model, exit_layer: int, init: str = "next_layer", seed: int = 0) -> "Adapter":
        """A fresh adapter on the model's device and dtype.

        init="next_layer" copies layer ℓ's attention and input norm and the final norm (the training
        start); init="random" draws seeded random weights (an untrained draft, for tests and baselines).
        """
        spec = model if isinstance(model, ModelSpec) else model_spec(model)
        _check_exit_layer(exit_layer, spec.num_layers)
        config = {"format": FORMAT, "version": VERSION, "exit_layer": int(exit_layer),
                  "rms_norm_eps": spec.rms_norm_eps, "target": spec.describe(), "trained": False,
                  "init": init, "seed": seed}
        adapter = cls(config)
        with torch.no_grad():
            if init == "next_layer":
                w = spec.layers[exit_layer]
                adapter.norm1.copy_(w.input_norm)
                adapter.norm2.copy_(spec.final_norm)
                for name in ("q", "k", "v"):
                    getattr(adapter, f"{name}_proj").weight.copy_(getattr(w, name))
                    bias = getattr(w, f"{name}_bias")
                    if bias is not None:
                        getattr(adapter, f"{name}_proj").bias.copy_(bias)
                adapter.o_proj.weight.copy_(w.o)
            elif init == "random":
                g = torch.Generator().manual_seed(seed)
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else
                            1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                raise ValueError(f"init must be 'next_layer' or 'random', got {init!r}")
        return adapter.to(spec.device, spec.dtype)

    # ---- training forward ------------------------------------------------------------------------

    def forward(self, exit_hidden: torch.Tensor, positions: torch.Tensor, rope_cos: torch.Tensor,
                rope_sin: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                scale: Optional[float] = None, window: int = 0) -> torch.Tensor:
        """The adapter over whole sequences at once, differentiable, without a KV cache (for training).

        exit_hidden: [B, T, H], the residual stream after layer ℓ (HF's hidden_states[ℓ], the engine's h_exit);
        positions: [B, T] int64, consecutive per row over its real tokens; rope_cos / rope_sin: [S, D] float32
        tables as Engine.reserve builds them; attention_mask: [B, T], 1 for real tokens, 0 for padding
        (left or right), None = all real; scale: the target's attention scale (default head_dim**-0.5);
        window: the target's sliding window (0 = none). Returns y [B, T, H], normed by norm2: the input of
        the target's LM head. Op for op the engine's cached path (Engine.adapter_forward, reference
        rounding), so training optimises exactly what the engine drafts with.
        """
        from .ops import reference  # the definitions the engine's cached path is built from
        t = self.config["target"]
        Hq, Hkv, D = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
        B, T, _ = exit_hidden.shape
        normed, _ = reference.fused_add_rms_norm(exit_hidden, None, self.norm1, self.rms_norm_eps)
        q = self.q_proj(normed).view(B, T, Hq, D)
        k = self.k_proj(normed).view(B, T, Hkv, D)
        v = self.v_proj(normed).view(B, T, Hkv, D)
        cos = rope_cos[positions].to(q.dtype)[:, :, None, :]                 # [B, T, 1, D]
        sin = rope_sin[positions].to(q.dtype)[:, :, None, :]
        q = q * cos + reference.rotate_half(q) * sin
        k = k * cos + reference.rotate_half(k) * sin
        G = Hq // Hkv
        qg = q.transpose(1, 2).reshape(B, Hkv, G * T, D)                     # GQA grouping as the engine's
        mask = self._attention_mask(positions, attention_mask, window)       # [B, T, T]
        mask = mask.repeat(1, G, 1)[:, None]                                 # [B, 1, G*T, T]
        o = torch.nn.functional.scaled_dot_product_attention(
            qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale if scale else D ** -0.5)
        o = o.reshape(B, Hq, T, D).transpose(1, 2).reshape(B, T, Hq * D)
        y, _ = reference.fused_add_rms_norm(self.o_proj(o), exit_hidden, self.norm2, self.rms_norm_eps)
        return y

    @staticmethod
    def _attention_mask(positions, attention_mask, window: int) -> torch.Tensor:
        """[B, Tq, Tk] bool: key s visible to query t iff s <= t, s is a real token and (window) within it.

        Every query also sees itself, so a padding row never has an empty softmax (NaN); real queries
        never see padding, so their outputs do not depend on it."""
        T = positions.shape[1]
        idx = torch.arange(T, device=positions.device)
        mask = (idx[None, :] <= idx[:, None])[None].expand(positions.shape[0], T, T)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
        if window > 0:
            mask = mask & (positions[:, None, :] > positions[:, :, None] - window)
        return mask | torch.eye(T, dtype=torch.bool, device=positions.device)[None]

    # ---- compatibility ---------------------------------------------------------------------------

    def check_compatible(self, spec: ModelSpec):
        """Raise ValueError if this adapter was made for another model, device or dtype."""
        t = self.config["target"]
        mine = spec.describe()
        for key in ("architecture", "num_hidden_layers", "hidden_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "qkv_bias"):
            if t.get(key) != mine[key]:
                raise ValueError(f"adapter: trained for a model with {key}={t.get(key)!r}, but this model has "
                                 f"{key}={mine[key]!r} (adapter target: {t.get('name_or_path') or t.get('architecture')})")
        if t.get("fingerprint") and t["fingerprint"] != mine["fingerprint"]:
            raise ValueError(f"adapter: trained for another checkpoint of this architecture (weight fingerprint "
                             f"{t['fingerprint']}, this model's is {mine['fingerprint']})")
        _check_exit_layer(self.exit_layer, spec.num_layers)
        p = self.norm1
        if p.device != spec.device or p.dtype != spec.dtype:
            raise ValueError(f"adapter: is on {p.device} / {p.dtype} but the model is on {spec.device} / "
                             f"{spec.dtype}; call adapter.to(device, dtype) first")

    # ---- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str):
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = os.path.join(directory, WEIGHTS_NAME + ".tmp")
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: str, device=None, dtype: Optional[torch.dtype] = None) -> "Adapter":
        from safetensors.torch import load_file
        cfg_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"adapter: no {CONFIG_NAME} in {directory!r}")
        with open(cfg_path) as f:
            config = json.load(f)
        if config.get("format") != FORMAT:
            raise ValueError(f"adapter: {cfg_path} is not a kangaroo_ext adapter config (format={config.get('format')!r})")
        adapter = cls(config)
        state = load_file(os.path.join(directory, WEIGHTS_NAME))
        missing, unexpected = adapter.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"adapter: {directory!r} does not match its config (missing {missing}, unexpected {unexpected})")
        dtype = dtype or state["norm1"].dtype
        return adapter.to(device or "cpu", dtype)

    def extra_repr(self) -> str:
        t = self.config["target"]
        return f"exit_layer={self.exit_layer}, target={t.get('architecture')}, trained={self.config.get('trained')}"


def _check_exit_layer(exit_layer, num_layers):
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < num_layers:
        raise ValueError(f"exit_layer must be an int in [1, {num_layers - 1}] for a {num_layers}-layer model, "
                         f"got {exit_layer!r}")
