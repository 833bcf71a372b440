"""The price of a prefill, eager against captured chunks (KANGAROO_PREFILL_GRAPHS), by prompt length.

Spec-Bench times a turn with its prefill. On the H100 at 15ee133 an eager prefill cost 7 to 43 ms whatever the
prompt's length (40 to 1,376 tokens): the host issuing ~12 launches a layer, not the GPU. This measures, at
the default model's shape with random weights (bench/shaped_models.py; no model needed), plain and Kangaroo
prefill of prompts of several lengths, each as the engine's own clock reports it (stats.prefill_s: CUDA
events around the prefill), median of `repeats` requests after warm-up, with the switch off and on.

    python bench/prefill_price.py --out bench/results/prefill_price.json
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shaped_models import SMOLLM2_135M, random_adapter, random_llama  # noqa: E402

import kangaroo_ext as kx  # noqa: E402
from kangaroo_ext import io  # noqa: E402
from kangaroo_ext.engine.prefill import SWITCH  # noqa: E402

LENGTHS = (16, 64, 256, 1024)


def prefill_ms(model, adapter, length: int, repeats: int) -> dict:
    """Median prefill ms of a prompt of `length` tokens, plain and Kangaroo, and how the prompt was fed."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(length))
    out = {}
    for method in ("plain", "kangaroo"):
        def run():
            if method == "plain":
                return kx.generate(model, ids, max_new_tokens=1, eos_token_id=[])
            return kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=1, eos_token_id=[])
        for _ in range(3):  # capture, allocator and clock warm-up
            run()
        runs = [run() for _ in range(repeats)]
        out[method] = {"prefill_ms": round(1000 * statistics.median(r.stats.prefill_s for r in runs), 3),
                       "prefill_kernel": runs[-1].stats.prefill_kernel}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths, comma-separated")
    ap.add_argument("--repeats", type=int, default=10, help="timed requests per length and method (median)")
    ap.add_argument("--out", default="bench/results/prefill_price.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prefill_price needs a CUDA device")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    model = random_llama(SMOLLM2_135M, "cuda", torch.bfloat16)
    adapter = random_adapter(model, exit_layer=2, draft_vocab=8192)
    result = {**io.provenance("cuda"), "shape": "smollm2_135m", "dtype": "bfloat16", "repeats": args.repeats,
              "commit_env": os.environ.get("KANGAROO_COMMIT", ""), "by_switch": {}}
    for on in ("0", "1"):
        os.environ[SWITCH] = on
        result["by_switch"][on] = {str(n): prefill_ms(model, adapter, n, args.repeats) for n in lengths}
        print(f"{SWITCH}={on}: " + ", ".join(f"{n}: plain {v['plain']['prefill_ms']} / kangaroo "
                                             f"{v['kangaroo']['prefill_ms']} ms ({v['plain']['prefill_kernel']})"
                                             for n, v in result["by_switch"][on].items()), flush=True)
    io.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
