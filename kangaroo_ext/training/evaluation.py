"""How good a trained adapter is: teacher-forced agreement on held-out sequences, and measured speed
for every (ℓ, η) on MT-bench first turns, by the benchmark harness itself (benchmarking/), so training
and `kangaroo bench` measure speed one way."""
import math
from typing import Dict, List

from ..adapter import Adapter
from ..benchmarking import report as bench_report
from ..benchmarking.harness import run_benchmark
from .draft import teacher_forced_metrics  # noqa: F401  (evaluation's other half, re-exported)
from .options import TrainOptions


def measure_speed(model, tokenizer, adapters: Dict[int, Adapter], questions: List[dict], opts: TrainOptions,
                  say) -> dict:
    """τ, acceptance per draft position and tokens/s for every (ℓ, η), and plain decoding's on the same
    first turns (greedy, batch 1, prefill included), each turn timed by the benchmark harness. Plain
    decoding runs before and after the sweep and speedups use both, so a drifting clock favours neither."""
    first = [dict(q, turns=q["turns"][:1]) for q in questions]
    gamma = opts.max_draft
    results = {"methods": {}}

    def run(method, key, **kw):
        run_benchmark(model, tokenizer, first, [method], max_new_tokens=opts.eval_max_new_tokens, max_draft=gamma,
                      warmup=opts.eval_warmup, progress=False, results=results, method_key=lambda m: key, **kw)
        if results.get("errors"):
            raise RuntimeError(f"the speed sweep failed: {results['errors']}")
        return results["methods"][key]["turns"]

    before = run("plain", "plain before")
    say(f"[eval] plain decoding: {_mean_tps(before):.1f} tok/s over {len(first)} MT-bench first turns")
    rows, param = [], model.get_input_embeddings().weight
    for ell, adapter in adapters.items():
        draft = Adapter(adapter.config).to(param.device, param.dtype)  # the trained weights in the model's dtype
        draft.load_state_dict(adapter.state_dict())
        for eta in opts.thresholds:
            # the adapter's own drafts: copied ones (on by default on a CPU) would blur what is compared
            turns = run("kangaroo", f"kangaroo l={ell} eta={eta}", adapter=draft, threshold=float(eta),
                        copy_draft=False)
            acc = bench_report.acceptance(turns)
            rows.append({"exit_layer": ell, "threshold": float(eta), "turns": turns,
                         "tau": round(acc["mean_accepted"], 3),
                         "acceptance_by_position": [None if a is None or math.isnan(a) else round(a, 3)
                                                    for a in acc["acceptance_by_position"]],
                         "drafts_per_round": round(sum(d * n for t in turns for d, n in enumerate(t["drafted_hist"]))
                                                   / max(1, acc["rounds"]), 3),
                         "tokens_per_s": round(_mean_tps(turns), 1),
                         "identical_to_plain": round(bench_report.identical_rate(turns, before) * len(turns))})
            say(f"[eval] ℓ={ell} η={eta:.2f}: τ={rows[-1]['tau']:.2f}, {rows[-1]['tokens_per_s']:.1f} tok/s")
    after = run("plain", "plain after")
    plain = before + after
    for r in rows:
        r["speedup"] = round(bench_report.speedup(r.pop("turns"), plain), 3)
    say(f"[eval] plain decoding after the sweep: {_mean_tps(after):.1f} tok/s; speedups against both runs")
    return {"questions": len(first), "max_new_tokens": opts.eval_max_new_tokens, "max_draft": gamma,
            "warmup_runs": opts.eval_warmup, "mode": before[0].get("mode", ""),
            "plain_tokens_per_s": round(_mean_tps(plain), 1),
            "plain_tokens_per_s_before_after": [round(_mean_tps(before), 1), round(_mean_tps(after), 1)],
            "timing": "Spec-Bench: mean over turns of tokens/s, each turn timed between device syncs, prefill "
                      "included; speedup = mean tok/s of kangaroo / mean tok/s of plain (before and after)",
            "table": rows}


def _mean_tps(turns: List[dict]) -> float:
    return sum(t["tok_per_s"] for t in turns) / len(turns) if turns else 0.0


def choose_best(report: dict) -> dict:
    """By measured speedup over plain decoding (ties: higher τ); without a sweep, by held-out agreement."""
    if report.get("eval") and report["eval"]["table"]:
        row = max(report["eval"]["table"], key=lambda r: (r["speedup"], r["tau"]))
        return dict(row, reason=f"highest measured speedup over plain decoding ({row['speedup']:.2f}x) on "
                                f"{report['eval']['questions']} MT-bench first turns")
    score = {ell: (h["top1_agreement"] or 0.0) for ell, h in report["holdout"].items()}
    ell = max(score, key=score.get)
    return {"exit_layer": ell, "threshold": None, "tau": None, "speedup": None,
            "reason": f"highest held-out top-1 agreement ({score[ell]:.3f}); no speed sweep was run"}
