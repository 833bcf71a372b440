"""Issue 24's launcher crash, outside pytest: call a compiled op directly (torch.ops.kangaroo.*) with an
argument its C++ launcher refuses, so TORCH_CHECK_VALUE throws inside the extension, and report whether
the ValueError reaches Python. Run by `scripts/gpu_stage_b_and_test.sh probe` under several process
set-ups (see there). Prints one line: "raised ValueError: ..." or nothing at all if the process dies.

    python scripts/launcher_crash_probe.py [sampling|accept|attention] [--import-triton]
"""
import sys

import torch

import kangaroo_ext  # noqa: F401  (loads the extension, registers torch.ops.kangaroo)

if "--import-triton" in sys.argv:
    import triton  # noqa: F401

which = next((a for a in sys.argv[1:] if not a.startswith("--")), "sampling")
ops = torch.ops.kangaroo
dev = "cuda"
try:
    if which == "sampling":      # the test's first call: temperature 0 is refused by check_filter
        ops.sampling_probs(torch.randn(2, 10, device=dev), 0.0, 0, 1.0)
    elif which == "accept":      # a 1-D draft_tokens is refused by checks.h
        ops.accept_greedy(torch.zeros(3, dtype=torch.int64, device=dev),
                          torch.zeros(1, 4, dtype=torch.int64, device=dev), None)
    else:                        # an int64 query is refused by the attention launcher's dtype check
        q = torch.zeros(1, 1, 9, 64, dtype=torch.int64, device=dev)
        ops.rope_append_attention(q, q, q, q, q, q, q, q, 1.0, 0)
    print(f"{which}: no error raised (unexpected)")
except ValueError as e:
    print(f"{which}: raised ValueError: {str(e).splitlines()[0][:120]}")
except Exception as e:  # noqa: BLE001  (another type is a finding too)
    print(f"{which}: raised {type(e).__name__}: {str(e).splitlines()[0][:120]}")
sys.stdout.flush()
