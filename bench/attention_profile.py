"""Where the attention op's time goes at decode and verify sizes, on a GPU (issue 21).

Attention is the largest stage of a decode layer: 9.6 of the per-op layer's ~21.6 µs at 1,024 cached
positions (kernels.json, H100, 3c49d82), 18.8 µs for a 7-position verify, and 10.0 of the persistent plain
step's ~31 µs a layer at 160 (bench/results/gpu_h100_71757c1/). This script times the CUDA op in bursts of
back-to-back launches (a CUDA graph, programmatic dependent launch as the engine uses it) at SmolLM2-135M's
heads for T new positions after a context of cached ones, with the batch-invariant PV order on and off (and,
with --max-tile-rows, the invariant order again with verify tiles cut into q-tiles of at most that many rows:
_C.set_attention_max_tile_rows; and the warp-chunk kernel, KANGAROO_WARP_CHUNK_ATTENTION), then the Triton
kernel (KANGAROO_TRITON_ATTENTION's); or runs a few launches of one case for Nsight Compute to profile:

    python bench/attention_profile.py --out attention_profile.json --max-tile-rows 6,12
    ncu --clock-control none -k regex:attention_kernel -s 3 -c 1 --section WarpStateStats \\
        python bench/attention_profile.py --tokens 7 --context 160 --launches 4
    (KANGAROO_WARP_CHUNK_ATTENTION=1 profiles the warp-chunk kernel there)
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cases  # noqa: E402
import bench_timing  # noqa: E402

CASES = [(1, 160), (7, 160), (1, 1024), (7, 1024)]   # (new positions T, cached positions)
CAPACITY = 2048
BURST = 100


def settings(tile_caps=(), warp_chunk: bool = False) -> dict:
    """The launch settings each timing runs under, by name: the tiled kernel's invariant order, its default one, the
    invariant order with each q-tile row cap, and (warp_chunk) the warp-chunk kernel (KANGAROO_WARP_CHUNK_ATTENTION)."""
    tiled = dict(warp_chunk_attention=False) if warp_chunk else {}
    out = {"invariant": dict(batch_invariant_attention=True, attention_max_tile_rows=0, **tiled),
           "default": dict(batch_invariant_attention=False, attention_max_tile_rows=0, **tiled)}
    for cap in tile_caps:
        out[f"invariant-q{cap}"] = dict(batch_invariant_attention=True, attention_max_tile_rows=cap, **tiled)
    if warp_chunk:
        out["warp-chunk"] = dict(warp_chunk_attention=True)
    return out


def timings(cases=CASES, capacity: int = CAPACITY, tile_caps=()) -> dict:
    """µs per launch of each case under each of settings(tile_caps, warp_chunk where the extension has it), with the
    bytes it must move; then the Triton kernel's (the engine's attention under KANGAROO_TRITON_ATTENTION), where
    Triton is importable."""
    import kangaroo_ext as kx
    from kangaroo_ext.ops import backends
    out = {}

    def time_case(tokens, context, backend, name):
        case = bench_cases._attention_case(tokens, context, capacity, BURST)
        graph = bench_timing.capture_burst(case.make(backend), BURST)
        us = bench_timing.us_per_launch(graph, BURST)
        key = f"T{tokens}-ctx{context}-{name}"
        out[key] = {"us": us, "bytes": case.nbytes, "GBps": case.nbytes / us / 1e3}
        print(f"{key:28s} {us:7.2f} us  ({case.nbytes / us / 1e3:6.1f} GB/s)", flush=True)

    warp_chunk = hasattr(kx._extension._C, "set_warp_chunk_attention")
    for name, switches in settings(tile_caps, warp_chunk).items():
        with kx._extension.launch_switches(**switches):
            for tokens, context in cases:
                time_case(tokens, context, "cuda", name)
    if backends.triton_module() is not None:
        for tokens, context in cases:
            time_case(tokens, context, "triton", "triton")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the timings here (JSON)")
    ap.add_argument("--tokens", type=int, help="profile mode: new positions T of the one case to launch")
    ap.add_argument("--context", type=int, help="profile mode: cached positions of that case")
    ap.add_argument("--launches", type=int, default=4, help="profile mode: launches of the case (warm-up first)")
    ap.add_argument("--max-tile-rows", default="", help="comma-separated q-tile row caps to time the invariant order "
                                                         "at too, e.g. 6,12 (whole tokens: multiples of 3 here)")
    args = ap.parse_args()
    try:
        tile_caps = [int(c) for c in args.max_tile_rows.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--max-tile-rows: comma-separated ints expected, got {args.max_tile_rows!r}")
    if any(c < 1 for c in tile_caps):
        ap.error(f"--max-tile-rows: caps must be >= 1, got {tile_caps}")
    if not torch.cuda.is_available():
        sys.exit("attention_profile: needs a CUDA device (the op's CUDA kernel)")
    if (args.tokens is None) != (args.context is None):
        ap.error("--tokens and --context go together (profile mode)")
    if args.tokens is not None:
        if args.tokens < 1 or args.context < 0 or args.tokens + args.context > CAPACITY:
            ap.error(f"--tokens >= 1 and --context >= 0 with tokens + context <= {CAPACITY}")
        call = bench_cases._attention_case(args.tokens, args.context, CAPACITY, 1).make("cuda")  # one launch
        for _ in range(args.launches - 1):
            call()
        torch.cuda.synchronize()
        return
    from kangaroo_ext.io import git_commit
    result = {"device": torch.cuda.get_device_name(), "commit": git_commit()[0],
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "capacity": CAPACITY, "burst": BURST,
              "cases": timings(tile_caps=tile_caps)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
