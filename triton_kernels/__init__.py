"""Triton kernels of kangaroo_ext (installed as kangaroo_ext.triton_kernels; see setup.py).

Each op is a Triton kernel plus a thin launcher that validates its arguments (ValueError naming the
argument), allocates outputs with torch on the input's device and launches without a host sync, so
the launchers can be captured in a CUDA graph. Semantics: kangaroo_ext/ops/reference.py.

On a machine without a GPU, set TRITON_INTERPRET=1 before importing this package.
"""
from typing import List

from . import attention as _attention
from . import lm_head as _lm_head
from .accept_commit import accept_commit
from .accept_greedy import accept_greedy
from .attention import rope_append_attention
from .decode_linear import decode_linear, rms_norm_gate_up, rms_norm_linear
from .lm_head import lm_head_argmax
from .rms_norm import fused_add_rms_norm
from .sampling import sample_logits, sampling_probs, speculative_sample_accept
from .take_draft import take_draft
from .verify_accept import verify_accept
from .verify_tail import verify_tail

__all__ = ["accept_commit", "accept_greedy", "decode_linear", "fused_add_rms_norm", "lm_head_argmax",
           "resource_reasons", "rms_norm_gate_up", "rms_norm_linear", "rope_append_attention", "sample_logits",
           "sampling_probs", "speculative_sample_accept", "take_draft", "verify_accept", "verify_tail"]

# The ops whose launch configuration can need more shared memory than a device has (resources.py);
# the others use at most ~1 KB whatever their inputs.
_SHARED_MEMORY_REASONS = {
    "rope_append_attention": _attention.shared_memory_reasons,
    "lm_head_argmax": _lm_head.shared_memory_reasons,
}


def resource_reasons(op: str, *args) -> List[str]:
    """Why the device cannot run `op`'s kernels on these arguments ([] if it can), e.g. "the attention
    kernel needs 1,323,008 bytes of shared memory per block, the device allows 232,448"."""
    check = _SHARED_MEMORY_REASONS.get(op)
    return check(*args) if check is not None else []
