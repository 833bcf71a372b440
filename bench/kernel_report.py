"""Kernel and decode report: the measurements of `pytest bench/`, outside pytest, into one JSON file.

    python bench/kernel_report.py                      # writes bench/results/kernels.json
    python bench/kernel_report.py --out /tmp/k.json

Needs a CUDA device. About a minute on an H100, half of it loading the default model. Sections:
  copy_GBps  device-to-device copy of 1 GiB, bytes read + written, median of 10 (CUDA events)
  ops        "<op>/<backend>/<shape>": µs per launch (CUDA graph of N launches), GB/s, fraction of copy_GBps
  verify_tail         per backend: the fused greedy tail against its three ops in a row (7 rows)
  sampling_vs_greedy  per backend: speculative_sample_accept (plain and filtered sampling) against the
             greedy verify tail the engine runs at the default model's verify shape (V = 49152, k+1 = 7,
             bf16): lm_head_argmax over the 7 rows + accept_greedy. (The sampled path also needs the
             [7, V] logits from the LM head GEMM, not included; verify_accept on logits stays listed.)
  engine     one draft round / one verify step of the default model, as the engine's own CUDA graphs
  round      the price of a round against a plain step, by draft steps and by positions verified, and
             the kernels a round launches (bench/round_price.py; issue 21's targets)
  round_1b   the same at Llama-3.2-1B's shape, random weights, 8k draft vocabulary (--no-1b skips it)
  decode     kx.generate vs kx.speculative_generate, default model and adapter, chat prompts,
             256 new tokens, after warm-up; host syncs per round (1 = the design: one report read)
"""
import argparse
import os
import sys
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import bench_cases  # noqa: E402
import bench_timing  # noqa: E402
import round_price  # noqa: E402
import kangaroo_ext.ops as kops  # noqa: E402
from kangaroo_ext import io  # noqa: E402

DEFAULT_OUT = os.path.join(BENCH_DIR, "results", "kernels.json")
DECODE_NEW_TOKENS = 256


def measure_ops(copy_GBps: float):
    ops, skipped = {}, {}
    available = bench_cases.backends()
    for op in bench_cases.registered_ops():
        for case in bench_cases.OP_CASES.get(op, []):
            for backend in kops.ORDER:
                key = case.key(backend)
                if available[backend]:
                    skipped[key] = "; ".join(available[backend])
                    continue
                try:
                    fn = case.make(backend)
                except kops.BackendUnavailable as e:
                    skipped[key] = str(e)
                    continue
                try:
                    graph = bench_timing.capture_burst(fn, case.launches)
                except RuntimeError as e:  # one op that cannot be captured must not end the report
                    torch.cuda.synchronize()
                    skipped[key] = f"capture failed: {str(e).splitlines()[0][:200]}"
                    print(f"  {key:45s} capture failed: {skipped[key]}", flush=True)
                    continue
                info = bench_timing.bandwidth_info(bench_timing.us_per_launch(graph, case.launches), case.nbytes,
                                                   copy_GBps)
                ops[key] = {"backend": backend, "us": info["us"], "GBps": info["GBps"],
                            "fraction_of_copy": info["fraction_of_copy"], "bytes": case.nbytes,
                            "launches_per_graph": case.launches}
                print(f"  {key:45s} {info['us']:9.2f} us  {info['GBps']:8.1f} GB/s  "
                      f"{100 * info['fraction_of_copy']:5.1f}% of copy", flush=True)
                del graph, fn
                torch.cuda.empty_cache()
    return ops, skipped


GREEDY_TAIL = ("lm_head_argmax/{backend}/7x576-V49152", "accept_greedy/{backend}/B1-k6")
SAMPLED_VERIFY = "speculative_sample_accept/{backend}/B1-k6-V49152-{setting}"


def sampling_vs_greedy(ops: dict) -> dict:
    """What sampled verification costs over greedy: µs of both and their ratio, per backend and setting."""
    out = {}
    for backend in kops.ORDER:
        parts = [ops.get(name.format(backend=backend)) for name in GREEDY_TAIL]
        greedy = {"us": sum(p["us"] for p in parts)} if all(parts) else None
        for setting in bench_cases.SAMPLING_SETTINGS:
            sampled = ops.get(SAMPLED_VERIFY.format(backend=backend, setting=setting))
            if greedy and sampled:
                out[f"{backend}/{setting}"] = {"greedy_us": greedy["us"], "sampled_us": sampled["us"],
                                               "ratio": sampled["us"] / greedy["us"]}
                print(f"  sampled/greedy verify {backend}/{setting}: {sampled['us']:.2f} vs {greedy['us']:.2f} us "
                      f"({sampled['us'] / greedy['us']:.1f}x)", flush=True)
    return out


PER_OP_TAIL = ("fused_add_rms_norm/{backend}/7x576", "lm_head_argmax/{backend}/7x576-V49152",
               "accept_commit/{backend}/B1-k6")
FUSED_TAIL = "verify_tail/{backend}/7x576-V49152"


def fused_vs_per_op_tail(ops: dict) -> dict:
    """A verify of 6 drafts ends (final norm, LM-head argmax, accept + commit): µs of the three ops in a row
    against verify_tail's two launches, per backend (microbenchmark medians, each op in a graph of its own)."""
    out = {}
    for backend in kops.ORDER:
        parts = [ops.get(name.format(backend=backend)) for name in PER_OP_TAIL]
        fused = ops.get(FUSED_TAIL.format(backend=backend))
        if all(parts) and fused:
            per_op = sum(p["us"] for p in parts)
            out[backend] = {"per_op_us": per_op, "fused_us": fused["us"], "ratio": fused["us"] / per_op}
            print(f"  verify tail {backend}: fused {fused['us']:.2f} vs per-op {per_op:.2f} us", flush=True)
    return out


def measure_engine(eng, copy_GBps: float) -> dict:
    out = {"model": "SmolLM2-135M-Instruct", "dtype": str(bench_cases.DTYPE), **eng.describe(),
           "device_exit": eng.graphs.device_exit}
    for phase, graph in (("draft_round", eng.graphs.draft), ("verify_step", eng.graphs.verify)):
        us = bench_timing.us_each(graph.replay, setup=eng.restore)
        out[phase] = bench_timing.bandwidth_info(us, eng.phase_bytes()[phase], copy_GBps)
        out[phase].pop("copy_GBps")
        print(f"  engine/{phase:38s} {us:9.2f} us  {out[phase]['GBps']:8.1f} GB/s", flush=True)
    if eng.graphs.device_exit:  # the same graphs when no draft is proposed (the GPU skips the rest)
        for phase, graph in (("draft_round_k0", eng.graphs.draft), ("verify_step_k0", eng.graphs.verify)):
            out[phase] = {"us": bench_timing.us_each(graph.replay, setup=lambda: eng.restore(0))}
            print(f"  engine/{phase:38s} {out[phase]['us']:9.2f} us", flush=True)
    eng.restore_and_sync()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"default: {os.path.relpath(DEFAULT_OUT)}")
    p.add_argument("--no-1b", action="store_true", help="skip round_1b (a 2.5 GB random-weight model)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_report: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    meta = io.provenance("cuda")
    print(f"kernel_report on {meta['device']}", flush=True)
    copy = bench_timing.copy_bandwidth_GBps()
    print(f"  copy bandwidth {copy:.0f} GB/s", flush=True)
    ops, skipped = measure_ops(copy)
    sampling = sampling_vs_greedy(ops)
    tails = fused_vs_per_op_tail(ops)
    engine = decode = round_ = None
    model_error = None
    try:
        eng = bench_cases.DefaultEngine()
    except (ImportError, FileNotFoundError) as e:  # e.g. no gguf package: still report the kernels
        model_error = f"{type(e).__name__}: {e}"
        print(f"  default model unavailable, no engine/decode numbers: {model_error}", file=sys.stderr)
    else:
        engine = measure_engine(eng, copy)
        try:
            round_ = round_price.measure_round(eng)
            print("  round: " + ", ".join(f"{k} {v:.3g}" for k, v in round_["ratios"].items()), flush=True)
        except Exception as e:  # noqa: BLE001  keep the rest of the report; the error is recorded in its place
            round_ = {"error": f"{type(e).__name__}: {e}"}
            print(f"  round: failed: {round_['error']}", file=sys.stderr, flush=True)
        speeds = bench_cases.decode_speeds(eng.model, eng.tokenizer, eng.adapter, max_new_tokens=DECODE_NEW_TOKENS)
        decode = {"plain_tok_per_s": speeds["plain"]["tok_per_s"],
                  "speculative_tok_per_s": speeds["speculative"]["tok_per_s"],
                  "host_syncs_per_round": speeds["speculative"]["host_syncs_per_round"],
                  "speedup": speeds["speculative"]["tok_per_s"] / speeds["plain"]["tok_per_s"],
                  "mean_accepted": speeds["speculative"]["mean_accepted"], "max_new_tokens": DECODE_NEW_TOKENS,
                  "prompts": len(bench_cases.CHAT_PROMPTS), "adapter_trained": eng.adapter.config.get("trained"),
                  "detail": speeds}
        if "error" not in round_:
            round_["host_syncs_per_round"] = decode["host_syncs_per_round"]
        print(f"  decode: plain {decode['plain_tok_per_s']:.0f} tok/s, speculative "
              f"{decode['speculative_tok_per_s']:.0f} tok/s (τ {decode['mean_accepted']:.2f}), "
              f"{decode['host_syncs_per_round']:.2f} host syncs/round", flush=True)
    round_1b = None
    if not args.no_1b:
        try:
            round_1b = round_price.measure_round_1b()
            print("  round_1b: " + ", ".join(f"{k} {v:.3g}" for k, v in round_1b.get("ratios", {}).items())
                  + f"; plain step {round_1b['plain_step_us']:.0f} us", flush=True)
        except Exception as e:  # noqa: BLE001  e.g. out of memory: the rest of the report still counts
            round_1b = {"error": f"{type(e).__name__}: {e}"}
            print(f"  round_1b: failed: {round_1b['error']}", file=sys.stderr, flush=True)
    report = {**meta, "copy_GBps": copy, "ops": ops, "sampling_vs_greedy": sampling, "verify_tail": tails,
              "skipped": skipped,
              "missing_cases": bench_cases.missing_cases(),
              "engine": engine, "round": round_, "round_1b": round_1b, "decode": decode,
              "default_model_error": model_error,
              "seconds": time.perf_counter() - t0}
    io.write_json(args.out, report)
    print(f"wrote {args.out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
