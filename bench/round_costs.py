"""The draft gate's prices (kangaroo_ext/engine/draft_gate.py, DraftCosts) measured on this machine's CPU,
greedy and sampled: what a speculative round costs beyond a resting one, in plain steps. They vary between
machines (multi-row GEMMs above all); pass yours as speculative_generate(..., draft_gate=kx.DraftCosts(...)).

    python bench/round_costs.py [--threads 1] [--out bench/results/round_costs_cpu.json]

Each price is the median wall time of 15 eager calls of the engine's own steps (host mode, the CPU's;
bench_timing.cpu_seconds_each), after warm-up, at the cache length a real generation of the default model
left, the decode state restored before every call:

    plain      Engine.plain_step
    rest       a resting round: draft step 0 without the head, then verification of one position
    step0      draft step 0 with the draft head (and, sampling, its draw); head = step0 - its headless part
    step       draft step 1 (the shallow layers, the adapter and the head on the first draft)
    verify_n   verification of n positions, n = 1 .. GAMMA + 1; row = (verify_{γ+1} - verify_1) / γ

(A GPU's prices come from bench/round_price.py's captured graphs: see draft_gate.MEASURED_COSTS.)
"""
import argparse
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_timing  # noqa: E402
import kangaroo_ext as kx  # noqa: E402
from kangaroo_ext import io  # noqa: E402
from kangaroo_ext.engine.engine import Sampling, engine_for  # noqa: E402

GAMMA = 6
PROMPT = "Explain how a refrigerator keeps food cold, step by step."


@torch.inference_mode()
def measure(model, adapter, tokenizer, sampled: bool) -> dict:
    ids = io.chat_ids(tokenizer, [{"role": "user", "content": PROMPT}])
    kw = dict(do_sample=True, temperature=1.0, seed=0) if sampled else {}
    kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=96, max_draft=GAMMA, mode="host",
                            copy_draft=False, draft_gate=False, **kw)
    e = engine_for(model)
    e.set_sampling(Sampling() if sampled else None)
    saved = {n: getattr(e, n).clone() for n in ("cache_len", "tokens_in", "rng", "history")}

    def restore(drafts: int = 0):
        for n, t in saved.items():
            getattr(e, n).copy_(t)
        e.begin_round()
        e.num_drafted.fill_(drafts)
        e.draft_tokens[:, :drafts] = saved["tokens_in"][:, :1]  # any tokens: verification decides

    def rest():
        e.begin_round()
        e.draft_step(0, 0)
        e.verify(1)

    def step1_setup():
        restore()
        e.draft_step(0, GAMMA)

    each = bench_timing.cpu_seconds_each
    t = {"plain": each(e.plain_step, restore), "rest": each(rest, restore),
         "step0": each(lambda: e.draft_step(0, GAMMA), restore),
         "step0_headless": each(lambda: e.draft_step(0, 0), restore),
         "step": each(lambda: e.draft_step(1, GAMMA), step1_setup)}
    for n in (1, GAMMA + 1):
        t[f"verify_{n}"] = each(lambda n=n: e.verify(n), lambda n=n: restore(n - 1))
    p = t["plain"]
    return {"seconds": t, "cache_len": int(saved["cache_len"][0]),
            "costs_in_plain_steps": {"head": (t["step0"] - t["step0_headless"]) / p, "step": t["step"] / p,
                                     "row": (t[f"verify_{GAMMA + 1}"] - t["verify_1"]) / GAMMA / p,
                                     "rest_over_plain": t["rest"] / p}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/round_costs_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = kx.load_default_model()
    adapter = kx.load_default_adapter(model)
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"device": platform.processor() or platform.machine(), "threads": args.threads, "commit": commit,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dtype": "float32", "gamma": GAMMA,
           "greedy": measure(model, adapter, tokenizer, sampled=False),
           "sampled": measure(model, adapter, tokenizer, sampled=True)}
    io.write_json(args.out, out)
    for kind in ("greedy", "sampled"):
        c = out[kind]["costs_in_plain_steps"]
        print(f"{kind}: kx.DraftCosts(head={c['head']:.3f}, step={c['step']:.3f}, row={c['row']:.3f})  "
              f"(a resting round: {c['rest_over_plain']:.3f} plain steps)",
              {k: round(v * 1e3, 1) for k, v in out[kind]["seconds"].items()}, "ms")
    print("wrote", args.out, "· pass a DraftCosts as speculative_generate(..., draft_gate=...)")


if __name__ == "__main__":
    main()
