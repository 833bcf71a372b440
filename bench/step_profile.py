"""Where a decode step's time goes: per-kernel GPU time inside the engine's captured graphs.

    python bench/step_profile.py                     # writes bench/results/step_profile.json

For the default model (bf16, CUDA) it replays the plain step, one full draft round (γ = 6) and one
verify step (7 positions), and the rounds MT-bench runs most: with conditional graph nodes the same
graphs with no draft proposed (step 0 only) and verifying 1 or 2 positions, without them the adaptive
budget-1 graphs. Each is the engine's own CUDA graph, under torch.profiler (CUPTI records the kernels
inside graph replays), and reports per phase: wall time per replay (CUDA events, median), kernel count,
summed kernel time, the gap between them (launch latency and dependencies inside the graph), and the
kernels grouped by name with their share. Needs a CUDA device.

With programmatic dependent launch (the default) a kernel starts before its predecessor ends and its
recorded duration includes that wait, so per-kernel times overlap and add up to more than the step.
Run with KANGAROO_DISABLE_PDL=1 (and --out ...) for a breakdown whose parts add up; the difference
between the two runs' per-replay times is what PDL saves.
"""
import argparse
import collections
import os
import sys

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import bench_cases  # noqa: E402
import bench_timing  # noqa: E402
from kangaroo_ext import config, io  # noqa: E402

REPLAYS = 20


def _short(name: str) -> str:
    for key in ("gemv_kernel", "attention_kernel", "combine_kernel", "partial_kernel", "fused_add_rms_norm",
                "verify_accept", "accept_greedy", "take_draft", "gemm", "gemv", "elementwise", "reduce", "index",
                "scatter", "gather", "copy"):
        if key in name:
            mode = ""
            if key == "gemv_kernel":
                mode = ("<gate_up>" if "kNormGateUp" in name or "(kangaroo::gemv::Mode)2" in name else
                        "<norm_linear>" if "kNormLinear" in name or "(kangaroo::gemv::Mode)1" in name else "<linear>")
            return key + mode
    return name[:60]


def profile_phase(name: str, replay, setup) -> dict:
    wall = bench_timing.us_each(replay, setup=setup)
    kernels = bench_timing.kernel_times(replay, setup, REPLAYS)
    grouped = collections.defaultdict(lambda: [0.0, 0.0])
    for k, (calls, us) in kernels.items():
        g = grouped[_short(k)]
        g[0] += calls
        g[1] += us
    busy = sum(us for _, us in grouped.values())
    launches = sum(c for c, _ in grouped.values())
    rows = sorted(grouped.items(), key=lambda kv: -kv[1][1])
    print(f"{name}: {wall:8.1f} us per replay, {launches:.0f} kernels, {busy:8.1f} us in kernels "
          f"({wall - busy:7.1f} us between them)")
    for k, (calls, us) in rows:
        print(f"    {k:40s} {calls:6.0f} x {us / max(calls, 1):6.2f} us = {us:8.1f} us ({100 * us / wall:4.1f}%)")
    return {"us_per_replay": wall, "kernels": launches, "kernel_us": busy, "gap_us": wall - busy,
            "by_kernel": {k: {"calls": c, "us": us} for k, (c, us) in rows}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "step_profile.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_profile: needs a CUDA device", file=sys.stderr)
        return 2
    import kangaroo_ext as kx
    meta = io.provenance("cuda")
    de = bench_cases.DefaultEngine()
    eng = de.engine
    # The plain step's graph: one kx.generate call captures it (same engine, same buffers).
    kx.generate(de.model, io.chat_ids(de.tokenizer, bench_cases.CHAT_PROMPTS[0]), max_new_tokens=8)
    plain, _ = eng.graphs_for(1, False, device_exit=False)
    de._saved = {n: getattr(eng, n).clone() for n in ("cache_len", "tokens_in")}
    phases = {"plain_step": profile_phase("plain_step", plain.plain.replay, de.restore),
              "draft_round_gamma6": profile_phase("draft_round_gamma6", de.graphs.draft.replay, de.restore),
              "verify_step_gamma6": profile_phase("verify_step_gamma6", de.graphs.verify.replay, de.restore)}
    if de.graphs.device_exit:
        # The GPU applies the confidence exit: the same graphs at the round sizes MT-bench runs most
        # (no draft proposed: step 0 only, verify 1 position; one draft: verify 2 positions).
        phases["draft_round_k0"] = profile_phase("draft_round_k0", de.graphs.draft.replay, lambda: de.restore(0))
        for k in (0, 1):
            phases[f"verify_step_k{k}"] = profile_phase(f"verify_step_k{k}", de.graphs.verify.replay,
                                                        lambda k=k: de.restore(k))
    small = eng.cached_graphs(1, True, device_exit=False)
    if small is not None and small is not de.graphs:
        # Without conditional nodes: the adaptive draft budget's smallest graphs (one draft, verify
        # over 2 positions), which most MT-bench rounds run.
        phases["draft_round_budget1"] = profile_phase("draft_round_budget1", small.draft.replay, de.restore)
        phases["verify_step_budget1"] = profile_phase("verify_step_budget1", small.verify.replay, de.restore)
    result = {**meta, "pdl": not config.flag("KANGAROO_DISABLE_PDL"), "device_exit": de.graphs.device_exit,
              **de.describe(), "phases": phases}
    io.write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
