"""Who is right when the engine and transformers disagree in fp32 on the GPU (issue 16, item 1).

For each prompt: greedy continuations by transformers (fp32), the engine (fp32) and the same model in
float64 (the arbiter); at the first difference, the float64 logits of both candidates. Then, on one
prompt, where the two fp32 forwards part from float64, component by component: the RoPE tables, the
embedding, every layer's hidden state, the final norm and the logits, each as max |x - x64| / max |x64|.
The fp32 matmul settings (TF32) in force are recorded, since a TF32 product anywhere explains errors of
1e-3 relative.

    python bench/fp32_arbiter.py [--device cuda] [--prompts 15] [--new 32] [--out bench/results/fp32_arbiter.json]
        [--prompt-file long.jsonl --min-prompt-tokens 1000 --max-prompt-tokens 2000]

transformers runs before and after the engine on the same model object, so state the engine leaves
behind would show as a difference between the two (`transformers_changed_by_the_engine`).
"""
import argparse
import copy
import os
import sys

import torch

import kangaroo_ext as kx
from kangaroo_ext import io
from kangaroo_ext.benchmarking.arbiter import arbitrate
from kangaroo_ext.engine.engine import Engine
from kangaroo_ext.engine.spec import model_spec

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def engine_states(model, ids):
    """The engine's prefill path over ids [1, T]: per layer residual stream, final normed state, logits."""
    engine = Engine(model_spec(model))
    engine.reserve(ids.shape[1] + 8, 1)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    h = torch.nn.functional.embedding(ids, engine.spec.embed)
    states = [h]
    x, res = h, None
    for i in range(engine.spec.num_layers):
        x, res = engine.run_layers(states[-1], pos, i, i + 1)
        states.append(x + res)
    logits = engine.logits(x, res)
    return engine, states, logits


def matmul_settings() -> dict:
    out = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
    for name in ("fp32_precision",):
        for where, obj in (("cuda.matmul", torch.backends.cuda.matmul), ("cudnn", torch.backends.cudnn)):
            if hasattr(obj, name):
                out[f"{where}.{name}"] = str(getattr(obj, name))
    return out


def load_texts(args, tokenizer) -> list:
    """First turns of --prompt-file (Spec-Bench jsonl; default: the packaged MT-bench), keeping those whose
    chat-templated length is within [--min-prompt-tokens, --max-prompt-tokens], at most --prompts."""
    texts = []
    for q in io.load_questions(args.prompt_file):
        n = len(io.chat_ids(tokenizer, q["turns"][0]))
        if args.min_prompt_tokens <= n <= args.max_prompt_tokens:
            texts.append(q["turns"][0])
        if len(texts) == args.prompts:
            break
    return texts


@torch.inference_mode()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=15)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--prompt-file", default=None, help="Spec-Bench-format jsonl (default: the packaged MT-bench)")
    p.add_argument("--min-prompt-tokens", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=1 << 30)
    p.add_argument("--out", default=os.path.join(HERE, "results", "fp32_arbiter.json"))
    args = p.parse_args(argv)
    result = {**io.provenance(args.device), "matmul_settings": matmul_settings(), "prompts": [],
              "prompt_file": args.prompt_file or "packaged MT-bench", "new_tokens": args.new}
    model, tok = kx.load_default_model(device=args.device, dtype=torch.float32)
    model64 = copy.deepcopy(model).double()
    adapter = kx.load_default_adapter(model)
    texts = load_texts(args, tok)

    def hf(m, ids):
        return m.generate(ids, max_new_tokens=args.new, do_sample=False, attention_mask=torch.ones_like(ids),
                          pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    verdicts = {"identical": 0, "engine_right": 0, "transformers_right": 0, "neither": 0}
    leaks = 0
    for text in texts:
        ids = torch.tensor([io.chat_ids(tok, text)], device=args.device)
        # transformers before and after the engine, on the same model object: a difference would be state
        # the engine left behind (global settings, buffers, the model's modules).
        before = hf(model, ids)
        ours = kx.generate(model, ids, max_new_tokens=args.new).sequences[0, ids.shape[1]:].tolist()
        spec = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=args.new).sequences[0, ids.shape[1]:].tolist()
        after = hf(model, ids)
        truth = hf(model64, ids)
        leaks += before != after
        row = {"prompt": text[:60], "prompt_tokens": ids.shape[1], "engine_equals_transformers": ours == before,
               "transformers_before_equals_after": before == after, "speculative_equals_engine": spec == ours,
               "engine_equals_fp64": ours == truth, "transformers_equals_fp64": before == truth}
        diff = arbitrate(model64, ids, ours, before)
        if diff is None:
            verdicts["identical"] += 1
        else:
            verdicts[diff["verdict"]] += 1
            row["first_difference"] = diff
        result["prompts"].append(row)
        print(row, flush=True)
    result["verdicts"] = verdicts
    result["transformers_changed_by_the_engine"] = leaks
    result["matmul_settings_after"] = matmul_settings()

    # Component by component, on the first prompt.
    ids = torch.tensor([io.chat_ids(tok, texts[0])], device=args.device)
    engine, states, logits = engine_states(model, ids)
    out64 = model64(ids, output_hidden_states=True)
    out32 = model(ids, output_hidden_states=True)
    pos = torch.arange(ids.shape[1], device=args.device)[None]
    cos64, sin64 = model64.model.rotary_emb(out64.hidden_states[0], pos)
    cos32, sin32 = model.model.rotary_emb(out32.hidden_states[0], pos)
    T = ids.shape[1]
    comp = {"rope_cos": {"engine": rel(engine.rope_cos[:T], cos64[0]), "transformers": rel(cos32[0], cos64[0])},
            "rope_sin": {"engine": rel(engine.rope_sin[:T], sin64[0]), "transformers": rel(sin32[0], sin64[0])},
            "logits": {"engine": rel(logits, out64.logits), "transformers": rel(out32.logits, out64.logits)}}
    # HF's hidden_states[i] is the residual stream after layer i-1 (the last one after the final norm).
    for i in range(1, len(states) - 1):
        comp[f"layer_{i - 1}"] = {"engine": rel(states[i], out64.hidden_states[i]),
                                  "transformers": rel(out32.hidden_states[i], out64.hidden_states[i])}
    result["components_first_prompt"] = comp
    for name, v in comp.items():
        print(f"{name:>10}: engine {v['engine']:.2e}  transformers {v['transformers']:.2e}", flush=True)
    io.write_json(args.out, result)
    print(f"verdicts {verdicts}; transformers changed by the engine on {leaks}/{len(texts)}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
