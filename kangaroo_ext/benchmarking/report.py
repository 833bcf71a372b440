"""Benchmark results into numbers and text: summarize (tok/s, speedups, τ, acceptance, identical-to-plain
rate per method and category), the summary JSON (bench/results/latest.json form) and the Markdown report
(results.md, the table format BENCHMARKS.md holds). The plots are in plots.py."""
import os
import statistics
from typing import Callable, List, Optional

from ..decoding import DecodeStats


# ---- numbers -------------------------------------------------------------------------------------

def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _key(t):
    return (str(t["question_id"]), t["turn"])


def _common(turns, base):
    keys = {_key(t) for t in turns} & {_key(t) for t in base}
    return [t for t in turns if _key(t) in keys], [t for t in base if _key(t) in keys]


def _tok_per_s(t) -> float:
    return t["tok_per_s"]


def decode_tok_per_s(t) -> float:
    """A turn's tok/s without its prefill (the engine's clock of it, stats.prefill_s)."""
    seconds = t["seconds"] - t["prefill_s"]
    return t["new_tokens"] / seconds if seconds > 0 else 0.0


def speedup(turns: List[dict], base: List[dict], rate: Callable[[dict], float] = _tok_per_s) -> Optional[float]:
    """Spec-Bench speedup: mean tok/s of the method / mean tok/s of the baseline, on their common turns
    (rate: a turn's tok/s; decode_tok_per_s leaves the prefill out)."""
    a, b = _common(turns, base)
    ma, mb = _mean(rate(t) for t in a), _mean(rate(t) for t in b)
    return ma / mb if ma is not None and mb else None


def identical_rate(turns: List[dict], base: List[dict]) -> Optional[float]:
    a, b = _common(turns, base)
    ref = {_key(t): t["output_sha1"] for t in b}
    return _mean(1.0 if t["output_sha1"] == ref[_key(t)] else 0.0 for t in a)


def acceptance(turns: List[dict]) -> Optional[dict]:
    """Pooled over turns: τ, P(draft i accepted | proposed) and the histogram of accepted drafts/round."""
    if not turns or "accepted_hist" not in turns[0]:
        return None
    size = len(turns[0]["accepted_hist"])
    hist = [sum(t["accepted_hist"][i] for t in turns) for i in range(size)]
    drafted = [sum(t["drafted_hist"][i] for t in turns) for i in range(size)]
    stats = DecodeStats(rounds=sum(t["rounds"] for t in turns),
                        accepted=[a for a, n in enumerate(hist) for _ in range(n)],
                        drafted=[d for d, n in enumerate(drafted) for _ in range(n)])
    by_pos = [None if p != p else p for p in stats.acceptance_by_position(size - 1)]  # NaN -> null
    return {"mean_accepted": stats.mean_accepted, "acceptance_by_position": by_pos, "accepted_histogram": hist,
            "rounds": stats.rounds}


def _block(turns, all_results, speculative) -> dict:
    new, secs = sum(t["new_tokens"] for t in turns), sum(t["seconds"] for t in turns)
    block = {"questions": len({str(t["question_id"]) for t in turns}), "turns": len(turns), "new_tokens": new,
             "seconds": secs, "tok_per_s": _mean(t["tok_per_s"] for t in turns),
             "tok_per_s_total": new / secs if secs else None}
    for base in ("plain", "hf-eager"):
        if base in all_results:
            block[f"speedup_vs_{base.replace('-', '_')}"] = speedup(turns, all_results[base])
    if "plain" in all_results:
        block["identical_to_plain"] = identical_rate(turns, all_results["plain"])
    if turns and all("prefill_s" in t for t in turns):  # the engine's methods: where a turn's time went
        block["prefill_ms_median"] = 1000 * statistics.median(t["prefill_s"] for t in turns)
        plain = all_results.get("plain", [])
        if plain and all("prefill_s" in t for t in plain):
            block["speedup_vs_plain_decode_only"] = speedup(turns, plain, decode_tok_per_s)
    if speculative:
        block.update(acceptance(turns) or {})
    return block


def summarize(results: dict) -> dict:
    """Per method: overall and per-category tok/s, speedups, τ, acceptance, identical-to-plain rate."""
    turns_of = {m: r["turns"] for m, r in results["methods"].items()}
    out = {}
    for m, turns in turns_of.items():
        speculative = m.startswith("kangaroo") or m == "pld"
        overall = _block(turns, turns_of, speculative)
        if "hf-eager" in turns_of:  # the naive ratio, each method's own question set (differs if fewer)
            hf = _mean(t["tok_per_s"] for t in turns_of["hf-eager"])
            overall["speedup_vs_hf_eager_own_questions"] = overall["tok_per_s"] / hf if hf else None
            common, _ = _common(turns, turns_of["hf-eager"])
            overall["common_questions_with_hf_eager"] = len({_key(t)[0] for t in common})
        cats = list(dict.fromkeys(t["category"] for t in turns))
        out[m] = {"overall": overall, "per_category": {
            c: _block([t for t in turns if t["category"] == c], {b: [t for t in v if t["category"] == c]
                                                                 for b, v in turns_of.items()}, speculative)
            for c in cats}}
    return out


def latest_summary(results: dict, summary: dict) -> dict:
    """The bench/results/latest.json form; headline numbers are kangaroo's."""
    meta, cfg = results.get("meta", {}), results.get("config", {})
    k = summary.get("kangaroo", {})
    ko = k.get("overall", {})
    methods = {}
    for m, s in summary.items():
        o = s["overall"]
        methods[m] = {"tok_per_s": o["tok_per_s"], "tok_per_s_total": o["tok_per_s_total"],
                      "questions": o["questions"], "turns": o["turns"]}
        for key in ("mean_accepted", "prefill_ms_median"):
            if key in o:
                methods[m][key] = o[key]
    return {
        "device": meta.get("device"), "date": meta.get("date"), "commit": meta.get("commit"),
        "dirty": meta.get("dirty"), "code_trees": meta.get("code_trees"), "run_flags": meta.get("run_flags"),
        "questions": cfg.get("questions"), "max_new_tokens": cfg.get("max_new_tokens"),
        "dtype": cfg.get("dtype"), "threshold": cfg.get("threshold"), "max_draft": cfg.get("max_draft"),
        "adapter": cfg.get("adapter"), "methods": methods,
        "speedup_vs_plain": ko.get("speedup_vs_plain"),
        "speedup_vs_plain_decode_only": ko.get("speedup_vs_plain_decode_only"),  # each turn less its prefill
        "speedup_vs_hf_eager": ko.get("speedup_vs_hf_eager"),  # on the questions both ran
        "speedup_vs_hf_eager_questions": ko.get("common_questions_with_hf_eager"),
        "speedup_vs_hf_eager_own_questions": ko.get("speedup_vs_hf_eager_own_questions"),
        "identical_to_plain": ko.get("identical_to_plain"),
        "per_category": {c: {"speedup_vs_plain": b.get("speedup_vs_plain"), "mean_accepted": b.get("mean_accepted"),
                             "speedup_vs_hf_eager": b.get("speedup_vs_hf_eager"), "tok_per_s": b.get("tok_per_s")}
                         for c, b in k.get("per_category", {}).items()},
    }


# ---- Markdown ------------------------------------------------------------------------------------

def _num(x, fmt="{:.1f}"):
    return "—" if x is None else fmt.format(x)


def _times(x):
    return _num(x, "{:.2f}×")


def _pct(x):
    return _num(None if x is None else 100 * x, "{:.1f}%")


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows, left=1) -> List[str]:
    return [_row(header), _row(["---"] * left + ["---:"] * (len(header) - left))] + [_row(r) for r in rows]


def markdown_report(results: dict, summary: dict, latest: dict) -> str:
    """The report; BENCHMARKS.md pastes it verbatim between its results markers."""
    meta, cfg = results.get("meta", {}), results.get("config", {})
    commit = (meta.get("commit") or "unknown")[:12] + (" (dirty)" if meta.get("dirty") else "")
    n_q = len(cfg.get("question_ids", []))
    lines = [
        f"**{meta.get('device', '?')}** · commit `{commit}` · {meta.get('date', '?')} · {cfg.get('dtype', '?')} · "
        f"`{os.path.basename(str(cfg.get('questions', '?')))}` ({n_q} questions) · max {cfg.get('max_new_tokens')} "
        f"new tokens · η = {cfg.get('threshold')}, γ = {cfg.get('max_draft')} · adapter: {cfg.get('adapter')}",
        "",
    ]
    rows = []
    for m, s in summary.items():
        o = s["overall"]
        rows.append([m, o["questions"], o["turns"], _num(o["tok_per_s"]), _num(o["tok_per_s_total"]),
                     _times(o.get("speedup_vs_plain")), _times(o.get("speedup_vs_hf_eager")),
                     _num(o.get("mean_accepted"), "{:.2f}"), _pct(o.get("identical_to_plain"))])
    lines += _table(["method", "questions", "turns", "tok/s (mean of turns)", "tok/s (total)", "speedup vs plain",
                     "speedup vs hf-eager", "τ (mean accepted)", "identical to plain"], rows)

    kangaroo = summary.get("kangaroo")
    if kangaroo:
        plain = summary.get("plain", {}).get("per_category", {})
        rows = []
        for c, b in list(kangaroo["per_category"].items()) + [("**all**", kangaroo["overall"])]:
            p = summary.get("plain", {}).get("overall") if c == "**all**" else plain.get(c)
            rows.append([c, b["turns"], _num(b["tok_per_s"]), _num(p["tok_per_s"] if p else None),
                         _times(b.get("speedup_vs_plain")), _times(b.get("speedup_vs_hf_eager")),
                         _num(b.get("mean_accepted"), "{:.2f}"), _pct(b.get("identical_to_plain"))])
        lines += ["", "Per category, kangaroo:", ""]
        lines += _table(["category", "turns", "kangaroo tok/s", "plain tok/s", "speedup vs plain",
                         "speedup vs hf-eager", "τ", "identical to plain"], rows)
        o = kangaroo["overall"]
        by_pos, hist = o.get("acceptance_by_position") or [], o.get("accepted_histogram") or []
        if by_pos:
            lines += ["", "Kangaroo acceptance by draft position, P(draft i accepted | draft i proposed):", ""]
            lines += _table(["position"] + list(range(1, len(by_pos) + 1)),
                            [["acceptance"] + [_pct(p) for p in by_pos]])
        if hist and sum(hist):
            lines += ["", "Accepted drafts per round (tokens committed = accepted + 1):", ""]
            lines += _table(["accepted drafts"] + list(range(len(hist))),
                            [["share of rounds"] + [_pct(n / sum(hist)) for n in hist]])
    notes = ["Speedup = mean tok/s of the method / mean tok/s of the baseline over the turns both ran "
             "(Spec-Bench); each turn timed between device synchronisations, prefill included."]
    prefill = {m: s["overall"] for m, s in summary.items() if s["overall"].get("prefill_ms_median") is not None}
    if prefill:
        notes.append("Prefill, in every turn's time: median " + ", ".join(
            f"{m} {o['prefill_ms_median']:.1f} ms" for m, o in prefill.items()) + " a turn. Decoding alone "
            "(each turn's time less its prefill): " + ", ".join(
            f"{m} {_times(o['speedup_vs_plain_decode_only'])}" for m, o in prefill.items()
            if m != "plain" and o.get("speedup_vs_plain_decode_only") is not None) + " plain.")
    hf = [m for m in summary if m.startswith("hf-")]
    if hf and cfg.get("hf_max_questions"):
        counts = ", ".join(f"{m} {summary[m]['overall']['questions']}" for m in hf)
        notes.append(f"The hf-* methods ran fewer questions ({counts}, spread over the categories); speedups "
                     f"against them use only those questions. Kangaroo vs hf-eager over each method's own "
                     f"questions: {_times(latest.get('speedup_vs_hf_eager_own_questions'))}.")
    for m, error in results.get("errors", {}).items():
        notes.append(f"**{m} failed** and is missing: {error}")
    notes.append("Identical to plain: share of turns whose tokens equal plain's, token for token (in bf16, "
                 "numerical near-ties can flip a token; fp32 runs are exact).")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
