"""Where batch invariance breaks: the first op whose rows differ between one multi-row step and the same rows
taken one at a time, on real text, op by op through every layer.

    python bench/invariance_probe.py --prompts 4 --tokens 192 --widths 2,4,7,10 --out bench/results/invariance.json

bf16 Kangaroo equals plain decoding token for token only if a verify step over n positions computes every
position's row bitwise as n one-token steps do. The op tests check each op on random inputs; this probe checks
the whole stack on the default model's real activations, with the engine's own ops and the current switches
(KANGAROO_TENSOR_CORE_GEMV, KANGAROO_BATCH_INVARIANT_ATTENTION): for windows [t, t + n) of a plain-decoded
sequence, the cache is filled up to t; then the n rows run as n one-row steps, and again (from the same cache)
as one n-row step. For each op of each layer (norm + QKV, attention, O, norm + gate/up, down, final norm) it
compares the rows; the report counts, per (op, layer), the windows whose first difference is there. Runs on a
GPU (bf16) or on the CPU (fp32, with KANGAROO_DISABLE_CPU_PACKING=1, or several-row steps take other kernels).
"""
import argparse
import json
import os
import sys
import time
from collections import Counter

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = ("qkv", "residual", "attention", "o", "gate_up", "residual2", "down")


def _layer_outputs(engine, x, res, positions, layer: int):
    """One layer on rows x (+ res) with the engine's fused decode ops: {op name: output}, and (x, res) out."""
    from kangaroo_ext import ops
    s, w = engine.spec, engine.spec.layers[layer]
    (q, k, v), res = ops.rms_norm_linear(x, res, w.input_norm, s.rms_norm_eps, [w.q, w.k, w.v],
                                         [w.q_bias, w.k_bias, w.v_bias])
    out = {"qkv": torch.cat([q, k, v], -1), "residual": res}
    attn = engine._attend(q, k, v, positions, slot=layer)
    out["attention"] = attn
    x = ops.decode_linear(attn, w.o, w.o_bias)
    out["o"] = x
    act, res = ops.rms_norm_gate_up(x, res, w.post_norm, s.rms_norm_eps, w.gate, w.up)
    out["gate_up"], out["residual2"] = act, res
    x = ops.decode_linear(act, w.down, w.down_bias)
    out["down"] = x
    return out, x, res


@torch.inference_mode()
def run_rows(engine, tokens: torch.Tensor, one_at_a_time: bool):
    """tokens [1, n] at positions cache_len, cache_len + 1, ...: {(layer, op): output rows [n, ...]}, in run order."""
    n = tokens.shape[1]
    chunks = [tokens[:, i:i + 1] for i in range(n)] if one_at_a_time else [tokens]
    rows = {}
    first = 0
    for chunk in chunks:
        m = chunk.shape[1]
        positions = engine.cache_len[:, None] + first + torch.arange(m, device=tokens.device)[None, :]
        x, res = torch.nn.functional.embedding(chunk, engine.spec.embed), None
        for layer in range(engine.spec.num_layers):
            out, x, res = _layer_outputs(engine, x, res, positions, layer)
            for name, t in out.items():
                rows.setdefault((layer, name), []).append(t.reshape(m, -1))
        y, _ = engine._norm(x, res, engine.spec.final_norm)
        rows.setdefault((engine.spec.num_layers, "final_norm"), []).append(y.reshape(m, -1))
        first += m
    return {key: torch.cat(parts) for key, parts in rows.items()}


def first_difference(a: dict, b: dict):
    """The first (layer, op) in run order whose rows differ, with the rows that differ; None if none."""
    for key in a:
        diff = (a[key] != b[key]).any(-1)
        if bool(diff.any()):
            return key, diff.nonzero()[:, 0].tolist()
    return None


@torch.inference_mode()
def probe(model, sequence: torch.Tensor, widths, starts) -> list:
    """For each start t and width n: (t, n, first difference or None)."""
    from kangaroo_ext.engine.engine import engine_for
    engine = engine_for(model)
    engine.reserve(sequence.shape[1] + 16, 1)
    results = []
    for t in starts:
        engine.prefill(sequence[:, :t + 1], speculative=False)   # cache holds positions < t; token t pending
        saved = (engine.k_cache.clone(), engine.v_cache.clone())
        for n in widths:
            if t + n > sequence.shape[1]:
                continue
            rows = sequence[:, t:t + n]
            single = run_rows(engine, rows, one_at_a_time=True)
            engine.k_cache.copy_(saved[0])
            engine.v_cache.copy_(saved[1])
            multi = run_rows(engine, rows, one_at_a_time=False)
            engine.k_cache.copy_(saved[0])
            engine.v_cache.copy_(saved[1])
            results.append((t, n, first_difference(single, multi)))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=192, help="plain-decoded tokens per prompt")
    ap.add_argument("--widths", default="2,4,7,10")
    ap.add_argument("--stride", type=int, default=9, help="window starts every this many positions")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "invariance_probe.json"))
    args = ap.parse_args(argv)
    import kangaroo_ext as kx
    from kangaroo_ext import config
    from kangaroo_ext.io import MT_BENCH_FILE, chat_ids, git_commit
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = kx.load_default_model(device=device, dtype=dtype)
    questions = [json.loads(line) for line in open(MT_BENCH_FILE)][:args.prompts]
    widths = [int(w) for w in args.widths.split(",")]
    counts, windows, details = Counter(), 0, []
    t0 = time.time()
    for q in questions:
        ids = torch.tensor([chat_ids(tokenizer, q["turns"][0])], device=device)
        seq = kx.generate(model, ids, max_new_tokens=args.tokens, eos_token_id=[]).sequences
        starts = range(ids.shape[1], seq.shape[1] - 1, args.stride)
        for t, n, diff in probe(model, seq, widths, starts):
            windows += 1
            key = "none" if diff is None else f"layer {diff[0][0]} {diff[0][1]}"
            counts[key] += 1
            if diff is not None and len(details) < 50:
                details.append({"start": t, "width": n, "layer": diff[0][0], "op": diff[0][1], "rows": diff[1]})
    switches = {k: v for k, v in config.run_flags().items()}
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
              "commit": git_commit()[0], "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "switches": switches, "windows": windows, "first_difference": dict(counts.most_common()),
              "examples": details, "seconds": round(time.time() - t0, 1)}
    print(json.dumps({k: result[k] for k in ("switches", "windows", "first_difference")}, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
