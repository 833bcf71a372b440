"""Linear layers for the CPU engine's multi-row steps (verify, prefill), with oneDNN and weights packed once.

Why: F.linear of a few rows on the CPU goes to a GEMM that repacks the whole weight matrix on every call,
so k+1 rows cost about k+1 times one row, and verifying drafts cost more than the drafts save. With the
weight packed once, a few rows cost about what one does. Measured on the 2-core development VM (1 thread,
fp32, torch 2.11, 2026-12-06), per call:

    weight               F.linear, M = 1 / 2 / 3 / 7 rows     packed oneDNN, M = 1 / 2 / 3 / 7
    [1536, 576]          73 / 138 / 206 / 292 us             70 / 75 / 77 / 144 us
    [49152, 576] (head)  10.3 / 23.5 / 34.2 / 21.5 ms        9.3 / 8.8 / 6.6 / 8.0 ms

One-row steps (plain decoding, draft steps) keep F.linear (a GEMV, no packing). The packed product sums in
another order than F.linear: the values agree to fp32 rounding, not bitwise, as F.linear's one-row and
many-row paths already do not. Memory: one packed copy of every weight used with more than one row (for the
default model in fp32, about the model's size again).
"""
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

PACKED_FOR_ROWS = 8  # oneDNN's layout hint: with 8, 4-7 rows cost less than with 1 (measured, [1536, 576])


def unavailable_reason() -> str:
    """'' if this torch can run packed oneDNN linears on the CPU, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn) CPU backend"
    ops = torch.ops.mkldnn
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        try:
            getattr(ops, name)
        except (AttributeError, RuntimeError):
            return f"this torch build lacks torch.ops.mkldnn.{name}"
    return ""


class PackedLinear:
    """linear(x, w, b) with F.linear's meaning: x [..., K] fp32 on the CPU, w [N, K], b [N] or None.

    Packs each weight on first use and packs it again when it changed in place (its version counter moved);
    one row, other dtypes or devices, autograd, and inference-mode weights (no version counter) go to
    F.linear."""

    INFERENCE_WEIGHTS = ("a weight used on several rows is an inference tensor (made under torch.inference_mode: "
                         "the model's or the adapter's), which has no version counter to notice an in-place change, "
                         "so it goes to F.linear; load the model outside inference_mode to pack it")

    def __init__(self):
        self._packed: Dict[int, Tuple[weakref.ref, int, torch.Tensor]] = {}  # id(w) -> (w, version, packed)
        self.packed_bytes = 0
        self.skipped = ""  # why a multi-row fp32 CPU call went to F.linear ('' until one does; it stays set)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (rows <= 1 or x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
                or w.device.type != "cpu" or (torch.is_grad_enabled() and w.requires_grad)):
            return F.linear(x, w, b)
        if w.is_inference():
            self.skipped = self.INFERENCE_WEIGHTS
            return F.linear(x, w, b)
        packed = self._weight(w)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(), packed, b,
                                               "none", [], "")
        return y.view(*x.shape[:-1], w.shape[0])

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        entry = self._packed.get(id(w))
        if entry is not None and entry[0]() is w and entry[1] == w._version:
            return entry[2]
        if entry is not None:
            self.packed_bytes -= entry[2].numel() * entry[2].element_size()
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACKED_FOR_ROWS)
        self._packed[id(w)] = (weakref.ref(w), w._version, packed)
        self.packed_bytes += packed.numel() * packed.element_size()
        return packed
