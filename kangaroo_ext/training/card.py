"""A finished run's outputs: MODEL_CARD.md from report.json, and shipping the best adapter as the
default model's."""
import json
import os
import shutil
from typing import Optional

import torch

from ..adapter import Adapter


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def model_card(report: dict) -> str:
    """MODEL_CARD.md from a report as report.json holds it."""
    best, ev, d, g, opts = report["best"], report.get("eval"), report["data"], report["generation"], report["options"]
    hold = report["holdout"][str(best["exit_layer"])]
    load = report["run_info"].get("model_load_s")
    lines = [f"# Kangaroo adapter for {report['model']['name']}", "",
             f"Exit layer ℓ = {best['exit_layer']}" + (f", recommended threshold η = {best['threshold']}, "
                                                      f"γ = {ev['max_draft']}" if ev else "") + ".",
             f"Trained {report['date']} on {report['device']} ({report['model']['dtype']}); whole run "
             f"{report['timings']['total_s']:.0f} s" + (f" after {load:.0f} s of model loading" if load else "")
             + f", seed {report['seed']}.", "",
             "## Data", "",
             f"Self-distillation: {d['used']} prompts from {_source_name(d['source'])} "
             f"(skipped: {d['skipped'] or 'none'}), answered by the target itself (greedy, chat template, at most "
             f"{g['max_new_tokens']} new tokens): {g['sequences']} answers, {g['new_tokens']} tokens, "
             f"{g['tokens_per_s']} tok/s. Targets: {report['teacher']['targets']}, on "
             f"{report['teacher']['loss_on']}; {report['teacher']['holdout_sequences']} sequences held out.", "",
             "## Training", "",
             f"Architecture `{opts.get('architecture', 'kangaroo')}`; draft vocabulary: "
             + (f"the {report['draft_vocab']['size']} most frequent answer tokens "
                f"({100 * report['draft_vocab']['targets_outside']:.1f}% of the teacher's top-1 targets fall outside "
                "and are skipped)" if report.get("draft_vocab") else "the full vocabulary") + ". "
             f"{opts['steps']} steps x {opts['batch_size']} sequences per exit layer; AdamW lr {opts['lr']} "
             f"(warm-up {opts['warmup_steps']}, cosine to {opts['min_lr_ratio']}x), grad clip {opts['grad_clip']}; "
             "init from the target's layers after the exit; only the adapter trains (target frozen, LM head "
             "shared). Learning curves: curves.png.", "",
             "| ℓ | steps | time (s) | loss | held-out top-1 agreement (1st draft) | raw exit (no adapter) "
             "| best η | τ | speedup |", "|---|---|---|---|---|---|---|---|---|"]
    for ell, run in report["training"].items():
        h = report["holdout"][ell]
        rows = [r for r in (ev["table"] if ev else []) if str(r["exit_layer"]) == ell]
        top = max(rows, key=lambda r: (r["speedup"], r["tau"])) if rows else None
        lines.append(f"| {ell} | {run['steps']} | {run['seconds']:.0f} | {run['final_loss']:.3f} | "
                     f"{fmt(h['top1_agreement'])} | {fmt(h['raw_exit_top1_agreement'])} | "
                     + (f"{top['threshold']} | {top['tau']:.2f} | {top['speedup']:.2f}x |" if top else "- | - | - |"))
    if ev:
        lines += ["", f"## Speed sweep (MT-bench, {ev['questions']} first turns, {ev['max_new_tokens']} new tokens, "
                      f"batch 1, greedy, γ = {ev['max_draft']}, mode {ev['mode']})", "",
                  f"Plain decoding on the same engine: {ev['plain_tokens_per_s']} tok/s (before and after the sweep: "
                  f"{ev['plain_tokens_per_s_before_after']}). 'Same as plain' counts answers identical to plain "
                  "decoding's (all of them in fp32; bf16 may differ at near-ties).", "",
                  "| ℓ | η | τ | acceptance by draft position | tok/s | speedup | same as plain |",
                  "|---|---|---|---|---|---|---|"]
        for r in ev["table"]:
            acc = " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_by_position"])
            lines.append(f"| {r['exit_layer']} | {r['threshold']} | {r['tau']:.2f} | {acc} | {r['tokens_per_s']} | "
                         f"{r['speedup']:.2f}x | {r['identical_to_plain']}/{ev['questions']} |")
    agree_ok = hold["top1_agreement"] is not None and hold["top1_agreement"] >= 0.70
    tau = best.get("tau")
    lines += ["", "## Choice", "", f"ℓ = {best['exit_layer']}" + (f", η = {best['threshold']}" if ev else "") +
              f": {best['reason']}.", "",
              f"Quality targets: top-1 agreement >= 70%: {'met' if agree_ok else 'NOT met'} "
              f"({fmt(hold['top1_agreement'])}); τ >= 3.0: {'met' if tau is not None and tau >= 3.0 else 'NOT met'} "
              f"({'not measured' if tau is None else tau}).", ""]
    return "\n".join(lines)


def ship_adapter(out_dir: str, destination: Optional[str] = None, dtype: Optional[torch.dtype] = torch.bfloat16
                 ) -> str:
    """Install the best adapter of a finished run (by measured speedup) as the default model's adapter:
    adapter.safetensors, adapter_config.json (with recommended_threshold) and MODEL_CARD.md. The weights are
    stored as `dtype` (bf16: half the package size; GPU decoding runs in bf16, and loading casts to the
    model's dtype); None keeps the run's."""
    from ..default_model import ADAPTER_DIR
    report_path = os.path.join(out_dir, "report.json")
    if not os.path.isfile(report_path):
        raise FileNotFoundError(f"no report.json in {out_dir}: run `kangaroo train` there first")
    with open(report_path) as f:
        best = json.load(f)["best"]
    if best.get("speedup") is None:
        raise ValueError("the run has no speed sweep (give --mt-bench): shipping is chosen by measured speedup")
    adapter = Adapter.from_pretrained(os.path.join(out_dir, f"layer-{best['exit_layer']}"), dtype=dtype)
    adapter.config["recommended_threshold"] = best["threshold"]
    destination = destination or ADAPTER_DIR
    adapter.save_pretrained(destination)
    os.chmod(os.path.join(destination, "adapter.safetensors"), 0o644)  # package data: readable by all users
    shutil.copyfile(os.path.join(out_dir, "MODEL_CARD.md"), os.path.join(destination, "MODEL_CARD.md"))
    if best["speedup"] < 1.0:
        print(f"[ship] WARNING: the best adapter is slower than plain decoding ({best['speedup']:.2f}x)")
    print(f"[ship] exit layer {best['exit_layer']}, η={best['threshold']} -> {destination}")
    return destination


def write_curves(report: dict, path: str) -> Optional[str]:
    """curves.png: per exit layer, held-out loss and first-draft agreement against tokens seen (the points
    train_layer scored with eval_every), with the training agreement for comparison. None without
    matplotlib or without held-out points."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    runs = {ell: [h for h in run.get("history", []) if h.get("heldout_loss") is not None]
            for ell, run in report.get("training", {}).items()}
    if not any(runs.values()):
        return None
    fig = Figure(figsize=(11, 4), dpi=120)
    FigureCanvasAgg(fig)
    loss_ax, agree_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for ell, points in runs.items():
        if not points:
            continue
        seen = [h["tokens_seen"] / 1e6 for h in points]
        loss_ax.plot(seen, [h["heldout_loss"] for h in points], marker="o", label=f"ℓ={ell}")
        agree_ax.plot(seen, [h["heldout_agreement"] for h in points], marker="o", label=f"ℓ={ell} held out")
        train = [h for h in report["training"][ell]["history"] if "agreement" in h]
        agree_ax.plot([h["tokens_seen"] / 1e6 for h in train], [h["agreement"] for h in train], alpha=0.35,
                      label=f"ℓ={ell} train")
    loss_ax.set(xlabel="answer tokens seen (millions)", ylabel="held-out distillation loss",
                title="Held-out loss")
    agree_ax.set(xlabel="answer tokens seen (millions)", ylabel="first-draft agreement with the target",
                 title="Top-1 agreement", ylim=(0, 1))
    loss_ax.legend()
    agree_ax.legend(fontsize=7)
    fig.tight_layout()
    from ..io import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
    return path


def _source_name(source: dict) -> str:
    """The prompt file as a data report identifies it: by content (sha256), or the records given in memory."""
    if "sha256" in source:
        return f"a prompt file of {source['bytes']} bytes (sha256 {source['sha256'][:12]}…)"
    return source.get("file", f"memory ({source.get('in_memory_records', '?')} records)")
