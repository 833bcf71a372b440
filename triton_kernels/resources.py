"""Shared memory of the Triton kernels' launch configurations, and the device limit they must fit.

Triton keeps the operands of tl.dot, and the tiles it pipelines over num_stages, in shared memory, so
a block size that grows with the input can outgrow the device. It did: the fp32 attention split
kernel took one program per (batch row, kv head, key split) over all G x T query rows of a prefill, and
a 700-token prompt on SmolLM2 (G = 3) gave BLOCK_R = 4096 rows, 1,323,008 bytes of shared memory against
an H200's 232,448 (Triton's OutOfResources). The launchers now size their blocks to fit (attention.py,
lm_head.py) and ops/backends.py asks resource_reasons() before choosing Triton, so a configuration that
still cannot fit makes the backend "cannot run" with the numbers instead of failing at launch.

The estimates are pure functions of the block sizes, fitted to what Triton 3.8 allocates for sm_90a
(each kernel compiled offline with triton.compile(..., target=GPUTarget("cuda", 90, 32)) and its
metadata.shared read) and rounded up so that they are upper bounds:

  attention split, fp32 (exact dots: FMA, both operands staged)   4 R (D + N) + 8 N D + 4 R
      R = 256 / 1024 rows, D = 64, N = 16: 91,136 / 339,968 bytes, exactly as measured;
      R = 4096: 1,335,296 for 1,323,008 measured; D = 128, R = 16 / 64: exact.
  attention split, fp16/bf16 (tensor cores)                     2 (R D + R N + 2 N D) + 4 R
      measured 12,288 (R = 16) to 139,264 (R = 1024) at D = 64, N = 64; the estimate stays above, by up
      to 2x at large R (the probability tile is not always staged).
  attention merge                                               4 R  (row statistics)
  lm_head partial (tl.dot over a BV x BH weight tile)            max(1, stages - 1) (BV BH + BH BR) e
      fp32, 128 x 64 x 16: 36,864 / 73,728 / 110,592 bytes at 2 / 3 / 4 stages, exactly as measured;
      16-bit measured 18,432 at any stage count.
The other kernels (RMSNorm, verify_accept, the decode GEMVs, RoPE/append) use at most 1 KB, for
cross-warp reductions, whatever their block sizes; they are not checked.
"""
import functools
from typing import Optional

import torch


def attention_split_bytes(block_r: int, block_n: int, block_d: int, element_size: int, exact_fp32: bool) -> int:
    """Upper bound of the attention split kernel's shared memory (two pipeline stages, as launched)."""
    if exact_fp32:
        return 4 * block_r * (block_d + block_n) + 8 * block_n * block_d + 4 * block_r
    return element_size * (block_r * block_d + block_r * block_n + 2 * block_n * block_d) + 4 * block_r


def attention_merge_bytes(block_r: int) -> int:
    return 4 * block_r


def lm_head_partial_bytes(block_v: int, block_h: int, block_r: int, element_size: int, num_stages: int) -> int:
    """Upper bound of the LM-head partial kernel's shared memory: one weight and one hidden tile per
    pipelined stage beyond the first."""
    return max(1, num_stages - 1) * (block_v * block_h + block_h * block_r) * element_size


@functools.lru_cache(maxsize=None)
def _cuda_limit(index: int) -> int:
    # The opt-in maximum: Triton raises a kernel's dynamic shared memory up to it.
    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def shared_memory_limit(device: torch.device) -> Optional[int]:
    """Bytes of shared memory one block may use on `device`; None off CUDA (the CPU interpreter has no limit)."""
    if device.type != "cuda":
        return None
    return _cuda_limit(device.index if device.index is not None else torch.cuda.current_device())


def shortfall(needed: int, limit: int) -> str:
    """'' if `needed` bytes fit in `limit`, else the reason, with both numbers."""
    if needed <= limit:
        return ""
    return f"needs {needed:,} bytes of shared memory per block, the device allows {limit:,}"
