"""The price of one Kangaroo round against a plain step: the `round` object of kernels.json (issue 21).

    from round_price import measure_round, summarize_round
    kernels_json["round"] = measure_round(default_engine)     # needs a CUDA device

Every time is one replay of the engine's own captured CUDA graph (bench_timing.us_each: CUDA events after
warm-up, median of 50, decode state restored between replays), at the cache length a real generation left:

  plain_step_us        the plain decoding step (kx.generate's graph)
  draft_round_us       {drafts proposed: µs} for the draft graph, which runs steps 0..γ (step j: the exit
                       layers and the adapter on token j; steps below γ also the draft head and its
                       bookkeeping). With conditional nodes the GPU applies the confidence exit, so the round
                       can be made to propose nothing (η = 2: step 0 alone) or all γ drafts (η = 0: every
                       step); counts between cannot be forced.
  draft_step_us        the price of each step after the first: (γ drafts - none) / γ (an average: the last
                       of those γ steps has no head)
  verify_us            {positions verified: µs}, 1 .. γ + 1 (the verify graph with num_drafted = 0 .. γ)
  launches_per_round   kernels launched by a full round (γ drafts + γ + 1 positions verified), counted by the
                       profiler inside the graph replays; per_phase splits it
  ratios               verify_us[γ+1] / verify_us[1], (γ drafts + verify γ+1) / plain step,
                       draft_step_us / plain step: the issue's targets in its own terms

summarize_round is the arithmetic, apart from the GPU, so a CPU test can check it. measure_round_1b does
the same for a random-weight model of Llama-3.2-1B's shape (bench/shaped_models.py): the `round_1b` object.
"""
from typing import Dict, Optional

import bench_timing


def summarize_round(plain_step_us: float, draft_round_us: Dict[int, float], verify_us: Dict[int, float],
                    gamma: int, launches: Optional[Dict[str, float]] = None) -> dict:
    """The `round` object from measured times.

    draft_round_us: {drafts proposed: µs}, holding 0 and gamma; verify_us: {positions: µs}, holding 1 and
    gamma + 1.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    for name, table, keys in (("draft_round_us", draft_round_us, (0, gamma)),
                              ("verify_us", verify_us, (1, gamma + 1))):
        missing = [k for k in keys if k not in table]
        if missing:
            raise ValueError(f"{name} lacks entries {missing} (has {sorted(table)})")
    if plain_step_us <= 0:
        raise ValueError(f"plain_step_us must be > 0, got {plain_step_us}")
    full = draft_round_us[gamma] + verify_us[gamma + 1]
    step = (draft_round_us[gamma] - draft_round_us[0]) / gamma
    out = {
        "gamma": gamma,
        "plain_step_us": plain_step_us,
        "first_draft_step_us": draft_round_us[0],
        "draft_step_us": step,
        "draft_round_us": {str(k): v for k, v in sorted(draft_round_us.items())},
        "verify_us": {str(k): v for k, v in sorted(verify_us.items())},
        f"round_{gamma}_drafts_us": full,
        "ratios": {
            f"verify_{gamma + 1}_over_1": verify_us[gamma + 1] / verify_us[1],
            f"round_{gamma}_drafts_over_plain_step": full / plain_step_us,
            "draft_step_over_plain_step": step / plain_step_us,
            "verify_1_over_plain_step": verify_us[1] / plain_step_us,
        },
    }
    if launches is not None:
        out["launches_per_round"] = sum(launches.values())
        out["launches_per_phase"] = dict(launches)
    return out


def measure_round(de) -> dict:
    """The round object for a bench_cases.DefaultEngine `de` (CUDA). Needs the GPU confidence exit
    (conditional graph nodes); without it only the full round is measurable, and that is said."""
    import torch

    import kangaroo_ext as kx
    eng, graphs, gamma = de.engine, de.graphs, de.graphs.gamma
    # The plain step's graph: one kx.generate call captures it in the same engine, at the same buffers;
    # generate moves the engine's lengths, so the saved decode state is put back before timing.
    # (de.prompt is the chat prompt's id list for the default model, a [1, L] tensor for a shaped one.)
    saved = {n: t.clone() for n, t in de._saved.items()}
    first_ids = torch.as_tensor(de.prompt, device=de.model.device).reshape(1, -1)[:, :8]
    kx.generate(de.model, first_ids, max_new_tokens=4)
    plain, _ = eng.graphs_for(1, False, device_exit=False)
    de._saved = saved
    plain_us = bench_timing.us_each(plain.plain.replay, setup=de.restore)
    if not graphs.device_exit:
        full_draft = bench_timing.us_each(graphs.draft.replay, setup=de.restore)
        full_verify = bench_timing.us_each(graphs.verify.replay, setup=de.restore)
        return {"gamma": gamma, "plain_step_us": plain_us, "device_exit": False,
                "note": "no conditional graph nodes: a round always runs all γ draft steps and verifies γ+1 "
                        "positions, so per-size prices cannot be measured",
                f"round_{gamma}_drafts_us": full_draft + full_verify,
                "ratios": {f"round_{gamma}_drafts_over_plain_step": (full_draft + full_verify) / plain_us}}
    draft = {0: bench_timing.us_each(graphs.draft.replay, setup=lambda: de.restore(0)),
             gamma: bench_timing.us_each(graphs.draft.replay, setup=de.restore)}
    verify = {k + 1: bench_timing.us_each(graphs.verify.replay, setup=lambda k=k: de.restore(k))
              for k in range(gamma + 1)}
    launches = {"draft_round": bench_timing.kernels_per_replay(graphs.draft.replay, de.restore),
                "verify_step": bench_timing.kernels_per_replay(graphs.verify.replay, de.restore)}
    plain_launches = bench_timing.kernels_per_replay(plain.plain.replay, de.restore)
    de.restore_and_sync()
    out = summarize_round(plain_us, draft, verify, gamma, launches)
    out["plain_step_launches"] = plain_launches
    out["device_exit"] = True
    return out


def measure_round_1b(prompt_tokens: int = 160, new_tokens: int = 128, exit_layer: int = 2,
                     draft_vocab: int = 8192) -> dict:
    """The round object at Llama-3.2-1B's shape: random weights (bf16, CUDA), an untrained `decoder`
    adapter after layer `exit_layer` drafting over `draft_vocab` tokens, a random prompt, then the same
    measurements as measure_round. Frees the model before returning."""
    import torch

    import bench_cases
    import shaped_models
    model = shaped_models.random_llama(shaped_models.LLAMA_3_2_1B, "cuda", bench_cases.DTYPE)
    adapter = shaped_models.random_adapter(model, exit_layer, draft_vocab)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, shaped_models.LLAMA_3_2_1B["vocab_size"], (1, prompt_tokens), generator=g)
    de = bench_cases.DefaultEngine(new_tokens=new_tokens, model=model, adapter=adapter, prompt=prompt.cuda())
    out = measure_round(de)
    out["model"] = {"shape": "Llama-3.2-1B (random weights, no RoPE scaling)",
                    "parameters": shaped_models.parameter_count(shaped_models.LLAMA_3_2_1B),
                    "exit_layer": exit_layer, "draft_vocab": draft_vocab, "adapter": "decoder, random",
                    "cache_len": int(de._saved["cache_len"][0])}
    del de, model, adapter
    torch.cuda.empty_cache()
    return out
