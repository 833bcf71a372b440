"""A soak of the decoding API (issue 16): many calls of speculative_generate and generate, interleaved, with
random prompt lengths (1 to near the model's positions), random max_new_tokens, η, γ, EOS on and off and two
adapters; then no growth in allocated device memory, captured graphs or host memory beyond stated bounds,
and (fp32) every speculative output equal to plain decoding of the same request.

    python bench/soak.py                               # the default model on the GPU, fp32, 2,000 calls
    python bench/soak.py --device cpu --calls 40 --max-prompt 300 --max-new 24     # a quick check anywhere

Writes bench/results/soak.json: calls per second, peak device memory, the growth of each measure after the
warm-up calls and the bound it was held to. Exits 1 if any check fails.
"""
import argparse
import os
import random
import resource
import sys
import time

import torch

import kangaroo_ext as kx
from kangaroo_ext import io
from kangaroo_ext.engine.engine import engine_for

HERE = os.path.dirname(os.path.abspath(__file__))


def host_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def device_mb(device) -> float:
    return torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--calls", type=int, default=2000, help="speculative and plain calls together")
    p.add_argument("--max-prompt", type=int, default=None, help="longest prompt (default: near the positions)")
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host-bound-mb", type=float, default=256.0, help="allowed host memory growth after warm-up")
    p.add_argument("--out", default=os.path.join(HERE, "results", "soak.json"))
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    model, tok = kx.load_default_model(device=args.device, dtype=args.dtype)
    device = model.device
    adapters = [kx.load_default_adapter(model), kx.Adapter.for_model(model, exit_layer=2, init="next_layer")]
    limit = model.config.max_position_embeddings
    max_prompt = args.max_prompt or limit - args.max_new - 40
    eos = tok.eos_token_id
    warmup = max(4, args.calls // 20)
    mismatches, peak, t0 = [], 0.0, time.perf_counter()
    samples = {"device_mb": [], "graphs": [], "host_mb": []}
    pending = None  # the plain call a speculative call is checked against
    with torch.inference_mode():
        for i in range(args.calls):
            if pending is None:
                n = rng.choice([1, rng.randint(1, 64), rng.randint(1, max_prompt)])
                prompt = [rng.randrange(model.config.vocab_size) for _ in range(n)]
                request = dict(max_new_tokens=rng.randint(1, min(args.max_new, limit - n)),
                               eos_token_id=eos if rng.random() < 0.5 else [])
                ref = kx.generate(model, prompt, **request).sequences
                pending = (prompt, request, ref)
            else:
                prompt, request, ref = pending
                out = kx.speculative_generate(model, prompt, adapter=rng.choice(adapters),
                                              threshold=rng.choice([0.0, 0.2, 0.3, 0.6, 1.0]),
                                              max_draft=rng.choice([1, 2, 4, 6, 12, 32]), **request).sequences
                if args.dtype in ("fp32", "float32") and not torch.equal(out, ref):
                    mismatches.append({"call": i, "prompt_tokens": len(prompt), **request})
                pending = None
            if device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated(device) / 2 ** 20)
            if i >= warmup:
                samples["device_mb"].append(device_mb(device))
                samples["graphs"].append(engine_for(model).num_graphs)
                samples["host_mb"].append(host_rss_mb())
            if (i + 1) % 100 == 0:
                print(f"{i + 1} calls, {time.perf_counter() - t0:.0f} s, device {device_mb(device):.0f} MB, "
                      f"graphs {engine_for(model).num_graphs}, host {host_rss_mb():.0f} MB", flush=True)
    seconds = time.perf_counter() - t0
    engine = engine_for(model)
    cache_mb = engine.cache_bytes(engine.capacity) / 2 ** 20
    growth = {k: (v[-1] - v[0]) if v else 0.0 for k, v in samples.items()}
    # Bounds: buffers only grow to the largest request (one cache regrowth after warm-up at most), graphs
    # are one set per (γ, speculative, device exit, sampling) key (6 γ values x plain/speculative, x2 for
    # the budget path's per-budget graphs), host memory by a fixed allowance.
    bounds = {"device_mb": 2 * cache_mb + 64, "graphs": 2 * (6 + 1) * 32, "host_mb": args.host_bound_mb}
    checks = {k: growth[k] <= bounds[k] for k in bounds}
    checks["fp32_outputs_equal_plain"] = not mismatches
    result = {**io.provenance(device), "dtype": args.dtype, "calls": args.calls, "seconds": round(seconds, 1),
              "calls_per_s": round(args.calls / seconds, 2), "peak_device_mb": round(peak, 1),
              "cache_mb_at_end": round(cache_mb, 1), "growth_after_warmup": growth, "bounds": bounds,
              "checks": checks, "mismatches": mismatches[:20]}
    io.write_json(args.out, result)
    print(f"{args.calls} calls in {seconds:.0f} s ({result['calls_per_s']} calls/s); peak device "
          f"{peak:.0f} MB; growth {growth}; checks {checks}; wrote {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
