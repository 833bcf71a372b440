"""The Kangaroo adapter: the small trained block that turns the target's exit-layer state into a draft.

Architectures (config["architecture"]):

    kangaroo   h_exit ─RMSNorm─► attention ─+ h_exit─► RMSNorm ─► LM head           (the paper's block)
    decoder    h_exit ─► [attention + SwiGLU MLP, sized as a target layer] ─► RMSNorm ─► LM head
    decoder2   h_exit ─► two such blocks ─► RMSNorm ─► LM head

Every attention has the target's head layout and its own KV cache. The LM head is the target's; with a
reduced draft vocabulary (config["draft_vocab_size"] = N, the buffer `draft_vocab` [N] holding the token
ids) the draft scores only those N tokens through a contiguous [N, H] slice of the head, made when the
engine binds the adapter. Verification always uses the full head, so the output stays exactly the model's.

Saved as `adapter.safetensors` plus `adapter_config.json`, which records the architecture, the exit layer
and the target's shapes and weight fingerprint, so loading it into another model fails clearly.
"""
import json
import os
from types import SimpleNamespace
from typing import List, Optional

import torch
from torch import nn

from .engine.spec import LayerWeights, ModelSpec, model_spec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "kangaroo_ext-adapter"
VERSION = 1
ARCHITECTURES = {
    "kangaroo": "RMSNorm, attention, residual add, RMSNorm (Kangaroo's adapter)",
    "decoder": "one decoder block sized as the target's layer (attention + SwiGLU MLP), then RMSNorm",
    "decoder2": "two stacked decoder blocks, then RMSNorm",
}
BLOCKS = {"kangaroo": 1, "decoder": 1, "decoder2": 2}
MAX_BLOCKS = max(BLOCKS.values())  # the engine keeps this many KV-cache slots for the adapter


class AdapterBlock(nn.Module):
    """A decoder block in the target's layout: RMSNorm + attention, then (mlp) RMSNorm + SwiGLU MLP."""

    def __init__(self, t: dict, mlp: bool):
        super().__init__()
        H, Hq, Hkv, D = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
        self.input_norm = nn.Parameter(torch.ones(H))
        self.q_proj = nn.Linear(H, Hq * D, bias=t["qkv_bias"])
        self.k_proj = nn.Linear(H, Hkv * D, bias=t["qkv_bias"])
        self.v_proj = nn.Linear(H, Hkv * D, bias=t["qkv_bias"])
        self.o_proj = nn.Linear(Hq * D, H, bias=False)
        self.post_norm = self.gate_proj = self.up_proj = self.down_proj = None
        if mlp:
            inter = t["intermediate_size"]
            self.post_norm = nn.Parameter(torch.ones(H))
            self.gate_proj = nn.Linear(H, inter, bias=False)
            self.up_proj = nn.Linear(H, inter, bias=False)
            self.down_proj = nn.Linear(inter, H, bias=False)


class Adapter(nn.Module):
    """A Kangaroo adapter for one target model and exit layer ℓ (1 <= ℓ < num_layers).

    Parameters, "kangaroo": norm1 [H], q_proj [Hq*D, H], k_proj / v_proj [Hkv*D, H] (with bias where the
    target's q/k/v have one), o_proj [H, Hq*D], norm2 [H]. "decoder"/"decoder2": blocks.i.{input_norm,
    q/k/v/o_proj, post_norm, gate/up/down_proj} and final_norm [H]. Buffer: draft_vocab [N] int64 when
    the draft vocabulary is reduced.
    """

    def __init__(self, config: dict):
        super().__init__()
        t = config["target"]
        arch = config.get("architecture", "kangaroo")
        if arch not in ARCHITECTURES:
            raise ValueError(f"adapter: unknown architecture {arch!r} in its config; known: "
                             + "; ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items()))
        if arch != "kangaroo" and "intermediate_size" not in t:
            raise ValueError(f"adapter: architecture {arch!r} needs target.intermediate_size in its config")
        self.config = dict(config, architecture=arch)
        self.architecture = arch
        self.exit_layer = int(config["exit_layer"])
        self.rms_norm_eps = float(config["rms_norm_eps"])
        H = t["hidden_size"]
        if arch == "kangaroo":  # flat parameter names: the format adapters have been saved in since v1
            block = AdapterBlock(t, mlp=False)
            self.norm1, self.q_proj, self.k_proj = block.input_norm, block.q_proj, block.k_proj
            self.v_proj, self.o_proj = block.v_proj, block.o_proj
            self.norm2 = nn.Parameter(torch.ones(H))
        else:
            self.blocks = nn.ModuleList(AdapterBlock(t, mlp=True) for _ in range(BLOCKS[arch]))
            self.final_norm = nn.Parameter(torch.ones(H))
        n = config.get("draft_vocab_size")
        if n is not None:
            _check_draft_vocab_size(n, t["vocab_size"])
            self.register_buffer("draft_vocab", torch.arange(n, dtype=torch.int64))

    # ---- structure -------------------------------------------------------------------------------

    def block_modules(self) -> List:
        """The blocks in order, each with input_norm, q/k/v/o_proj and (or None) post_norm, gate/up/down_proj."""
        if self.architecture == "kangaroo":
            return [SimpleNamespace(input_norm=self.norm1, q_proj=self.q_proj, k_proj=self.k_proj,
                                    v_proj=self.v_proj, o_proj=self.o_proj, post_norm=None, gate_proj=None,
                                    up_proj=None, down_proj=None)]
        return list(self.blocks)

    @property
    def head_norm(self) -> torch.Tensor:
        """The RMSNorm weight before the LM head."""
        return self.norm2 if self.architecture == "kangaroo" else self.final_norm

    def layer_weights(self) -> List[LayerWeights]:
        """The blocks as the engine runs them (references to the parameters, no copies)."""
        def w(lin):
            return None if lin is None else lin.weight.detach()

        def b(lin):
            return None if lin is None or lin.bias is None else lin.bias.detach()
        out = []
        for blk in self.block_modules():
            out.append(LayerWeights(
                input_norm=blk.input_norm.detach(), q=w(blk.q_proj), k=w(blk.k_proj), v=w(blk.v_proj),
                o=w(blk.o_proj), q_bias=b(blk.q_proj), k_bias=b(blk.k_proj), v_bias=b(blk.v_proj), o_bias=None,
                post_norm=None if blk.post_norm is None else blk.post_norm.detach(), gate=w(blk.gate_proj),
                up=w(blk.up_proj), down=w(blk.down_proj)))
        return out

    @property
    def draft_vocab_ids(self) -> Optional[torch.Tensor]:
        """[N] int64 token ids the draft may propose, or None for the full vocabulary."""
        return getattr(self, "draft_vocab", None)

    def with_draft_vocab(self, ids: Optional[torch.Tensor]) -> "Adapter":
        """Restrict the draft to the token ids `ids` ([N], distinct, in [0, V)); None restores the full
        vocabulary. Lossless: verification keeps the full head. Returns self."""
        V = self.config["target"]["vocab_size"]
        if ids is None:
            if hasattr(self, "draft_vocab"):
                del self.draft_vocab
            self.config.pop("draft_vocab_size", None)
            return self
        ids = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
        _check_draft_vocab_size(len(ids), V)
        _check_draft_vocab(ids, V)
        device = self.head_norm.device
        if hasattr(self, "draft_vocab"):
            del self.draft_vocab
        self.register_buffer("draft_vocab", ids.to(device))
        self.config["draft_vocab_size"] = len(ids)
        return self

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model, exit_layer: int, init: str = "next_layer", seed: int = 0,
                  architecture: str = "kangaroo") -> "Adapter":
        """A fresh adapter on the model's device and dtype.

        init="next_layer" copies the target's layers from ℓ on (block i from layer ℓ+i; "kangaroo" takes
        layer ℓ's attention and input norm) and its final norm: the training start. init="random" draws
        seeded random weights (an untrained draft, for tests and baselines).
        """
        spec = model if isinstance(model, ModelSpec) else model_spec(model)
        _check_exit_layer(exit_layer, spec.num_layers)
        config = {"format": FORMAT, "version": VERSION, "architecture": architecture, "exit_layer": int(exit_layer),
                  "rms_norm_eps": spec.rms_norm_eps, "target": spec.describe(), "trained": False,
                  "init": init, "seed": seed}
        adapter = cls(config)
        with torch.no_grad():
            if init == "next_layer":
                for i, blk in enumerate(adapter.block_modules()):
                    _copy_layer(blk, spec.layers[min(exit_layer + i, spec.num_layers - 1)])
                adapter.head_norm.copy_(spec.final_norm)
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
        window: the target's sliding window (0 = none). Returns y [B, T, H], normed by the head norm: the
        input of the LM head. Op for op the engine's cached path (Engine.adapter_forward, reference
        rounding), so training optimises exactly what the engine drafts with.
        """
        from .ops import reference  # the definitions the engine's cached path is built from
        F = torch.nn.functional
        mask = self._attention_mask(positions, attention_mask, window)       # [B, T, T]
        x, res = exit_hidden, None
        for blk in self.block_modules():
            normed, res = reference.fused_add_rms_norm(x, res, blk.input_norm, self.rms_norm_eps)
            x = blk.o_proj(self._attention(blk, normed, positions, rope_cos, rope_sin, mask, scale))
            if blk.gate_proj is not None:
                normed, res = reference.fused_add_rms_norm(x, res, blk.post_norm, self.rms_norm_eps)
                x = blk.down_proj(F.silu(blk.gate_proj(normed)) * blk.up_proj(normed))
        y, _ = reference.fused_add_rms_norm(x, res, self.head_norm, self.rms_norm_eps)
        return y

    def _attention(self, blk, normed, positions, rope_cos, rope_sin, mask, scale):
        """Causal attention of one block over the whole sequence: [B, T, H] -> [B, T, Hq*D]."""
        from .ops import reference
        t = self.config["target"]
        Hq, Hkv, D = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
        B, T, _ = normed.shape
        q = blk.q_proj(normed).view(B, T, Hq, D)
        k = blk.k_proj(normed).view(B, T, Hkv, D)
        v = blk.v_proj(normed).view(B, T, Hkv, D)
        cos = rope_cos[positions].to(q.dtype)[:, :, None, :]                 # [B, T, 1, D]
        sin = rope_sin[positions].to(q.dtype)[:, :, None, :]
        q = q * cos + reference.rotate_half(q) * sin
        k = k * cos + reference.rotate_half(k) * sin
        G = Hq // Hkv
        qg = q.transpose(1, 2).reshape(B, Hkv, G * T, D)                     # GQA grouping as the engine's
        o = torch.nn.functional.scaled_dot_product_attention(
            qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.repeat(1, G, 1)[:, None],
            scale=scale if scale else D ** -0.5)
        return o.reshape(B, Hq, T, D).transpose(1, 2).reshape(B, T, Hq * D)

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
        if self.architecture != "kangaroo" and t.get("intermediate_size") != mine["intermediate_size"]:
            raise ValueError(f"adapter: its MLP has intermediate_size={t.get('intermediate_size')!r}, the model's "
                             f"layers have {mine['intermediate_size']}")
        if t.get("fingerprint") and t["fingerprint"] != mine["fingerprint"]:
            raise ValueError(f"adapter: trained for another checkpoint of this architecture (weight fingerprint "
                             f"{t['fingerprint']}, this model's is {mine['fingerprint']})")
        _check_exit_layer(self.exit_layer, spec.num_layers)
        p = self.head_norm
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
        os.chmod(tmp, 0o644)  # an ordinary file's mode: adapters ship as package data, read by every user
        os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
        tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(directory, CONFIG_NAME))

    @staticmethod
    def read_config(directory: str) -> dict:
        """The config of the adapter saved in `directory`, checked without loading any weights (fast: the
        command line calls it before loading the model). Raises FileNotFoundError / ValueError."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"adapter: no such folder: {directory!r}")
        cfg_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"adapter: no {CONFIG_NAME} in {directory!r}")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"adapter: {cfg_path} is not valid JSON ({e})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            got = config.get("format") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"adapter: {cfg_path} is not a kangaroo_ext adapter config (format={got!r})")
        for key in ("exit_layer", "rms_norm_eps", "target"):
            if key not in config:
                raise ValueError(f"adapter: {cfg_path} has no {key!r}")
        arch = config.get("architecture", "kangaroo")
        if arch not in ARCHITECTURES:
            raise ValueError(f"adapter: {cfg_path} names an unknown architecture {arch!r}; known: "
                             f"{', '.join(ARCHITECTURES)}")
        if config.get("draft_vocab_size") is not None:
            _check_draft_vocab_size(config["draft_vocab_size"], config["target"].get("vocab_size"))
        if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
            raise FileNotFoundError(f"adapter: no {WEIGHTS_NAME} in {directory!r}")
        return config

    @classmethod
    def from_pretrained(cls, directory: str, device=None, dtype: Optional[torch.dtype] = None) -> "Adapter":
        from safetensors.torch import load_file
        config = cls.read_config(directory)
        adapter = cls(config)
        path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error types for a truncated or corrupt file
            raise ValueError(f"adapter: {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
        missing, unexpected = adapter.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"adapter: {directory!r} does not match its config (missing {missing}, unexpected {unexpected})")
        if adapter.draft_vocab_ids is not None:
            _check_draft_vocab(adapter.draft_vocab_ids, config["target"]["vocab_size"])
        dtype = dtype or next(v.dtype for v in state.values() if v.is_floating_point())  # as saved
        return adapter.to(device or "cpu", dtype)

    def extra_repr(self) -> str:
        t = self.config["target"]
        vocab = self.config.get("draft_vocab_size") or "full"
        return (f"architecture={self.architecture}, exit_layer={self.exit_layer}, draft_vocab={vocab}, "
                f"target={t.get('architecture')}, trained={self.config.get('trained')}")


def _copy_layer(blk, w: LayerWeights):
    """Block <- a target layer's weights (its attention, and its MLP where the block has one)."""
    blk.input_norm.copy_(w.input_norm)
    for name in ("q", "k", "v", "o"):
        getattr(blk, f"{name}_proj").weight.copy_(getattr(w, name))
        bias = getattr(w, f"{name}_bias")
        if bias is not None and getattr(blk, f"{name}_proj").bias is not None:
            getattr(blk, f"{name}_proj").bias.copy_(bias)
    if blk.gate_proj is not None:
        blk.post_norm.copy_(w.post_norm)
        for name in ("gate", "up", "down"):
            getattr(blk, f"{name}_proj").weight.copy_(getattr(w, name))


def _check_exit_layer(exit_layer, num_layers):
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < num_layers:
        raise ValueError(f"exit_layer must be an int in [1, {num_layers - 1}] for a {num_layers}-layer model, "
                         f"got {exit_layer!r}")


def _check_draft_vocab_size(n, vocab_size):
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= (vocab_size or n):
        raise ValueError(f"adapter: draft vocabulary size must be an int in [1, {vocab_size}] (the model's "
                         f"vocabulary), got {n!r}")


def _check_draft_vocab(ids: torch.Tensor, vocab_size: int):
    ids = ids.cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"adapter: draft vocabulary ids must lie in [0, {vocab_size}) (the model's vocabulary), "
                         f"got [{int(ids.min())}, {int(ids.max())}]")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError("adapter: draft vocabulary ids must be distinct")
