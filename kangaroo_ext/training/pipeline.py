"""Adapter training by self-distillation: `train_adapter`, the whole run.

    adapter, report = kx.train_adapter(model, tokenizer, "prompts.jsonl", exit_layer=[1, 2, 3, 4, 6],
                                       out_dir="out/adapters", mt_bench="mt_bench_question.jsonl")

Phases: the target answers the prompts (data.generate_answers); one teacher pass caches exit states and
targets for every requested ℓ (data.teacher_pass); per ℓ, the adapter learns the teacher's next-token
distribution through the target's frozen LM head (loop.train_layer: soft cross-entropy, AdamW, warm-up +
cosine, bf16 autocast on GPU with fp32 weights, checkpoints, resumable); then held-out teacher-forced
agreement and an MT-bench sweep over η measured against plain decoding (evaluation.py). The best (ℓ, η) is
the one with the highest measured speedup; card.ship_adapter installs it as the default.

Without a GPU, labels="hard" replaces the teacher pass: the answers are the target's own greedy tokens, so
the labels are their next tokens and only the first ℓ layers run, once (hard_labels.build_cache, float16
on disk under out_dir/exit_cache). cut_loops=k keeps k periods of an answer's repetition loop (loops.py).
"""
import contextlib
import dataclasses
import datetime
import json
import os
import time
from typing import Sequence, Union

import torch

from .. import io
from ..adapter import Adapter
from ..engine.spec import model_spec
from . import data, hard_labels, loops
from .card import fmt, model_card, write_curves
from .draft import DraftVocab, teacher_forced_metrics
from .evaluation import choose_best, measure_speed
from .loop import now, rope_tables, train_layer
from .options import DEFAULT_EXIT_LAYERS, TrainOptions, parse_exit_layers

CHECKPOINT_DIR = "checkpoint"
EXIT_CACHE_DIR = "exit_cache"   # hard labels: the first ℓ layers' outputs, float16 on disk, reused across runs


def train_adapter(model, tokenizer, prompts: Union[str, os.PathLike, Sequence], exit_layer=DEFAULT_EXIT_LAYERS[1],
                  **options):
    """Train Kangaroo adapters for `model` by self-distillation. Returns (best adapter, report dict).

    prompts: a .jsonl path (a "prompt" field per line) or a list of strings / {"prompt": ...} records.
    exit_layer: an int or a list of ints (one adapter each, from one generation and teacher pass).
    options: the fields of TrainOptions. The adapter returned is the best by measured speedup (with
    config["recommended_threshold"]) when mt_bench is given, else by held-out agreement; it is on the
    model's device and dtype. With out_dir, every layer's adapter lands in out_dir/layer-<ℓ>/. With
    generate_only, only the answers are made (and saved): the adapter returned is None.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TrainOptions)})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; see kangaroo_ext.training.TrainOptions")
    opts = TrainOptions(**options)
    spec = model_spec(model)
    layers = parse_exit_layers(exit_layer, spec.num_layers)
    opts.check(spec.num_layers, spec.vocab_size)
    cuda = spec.device.type == "cuda"
    opts.gen_batch_size = opts.gen_batch_size or (128 if cuda else 8)
    opts.teacher_tokens_per_batch = opts.teacher_tokens_per_batch or (32768 if cuda else 4096)
    say = (lambda *a: print(*a, flush=True)) if opts.verbose else (lambda *a: None)
    if opts.out_dir:
        os.makedirs(opts.out_dir, exist_ok=True)
    t_run = time.perf_counter()
    timings = {}
    report = {"model": {"name": spec.name_or_path or spec.architecture, "fingerprint": spec.fingerprint(),
                        "layers": spec.num_layers, "dtype": str(spec.dtype).replace("torch.", "")},
              "device": io.device_name(spec.device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "seed": opts.seed, "exit_layers": layers, "run_info": opts.run_info or {},
              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()
                          if k != "run_info"}}
    torch.manual_seed(opts.seed)
    checksum = _param_checksum(model)
    with _frozen(model):
        sequences, report["data"], report["generation"] = data.distill_sequences(
            model, tokenizer, prompts, opts, spec.fingerprint(), say)
        if opts.generate_only:
            gen = report["generation"]
            left = gen.get("prompts_not_generated", 0)
            say(f"[train] generate-only: {len(sequences)} answers saved"
                + (f"; {left} prompts left: run again with --resume to continue" if left else "; complete"))
            return None, report
        timings["generation_s"] = 0.0 if report["generation"].get("reused") else report["generation"]["seconds"]
        if opts.cut_loops:
            sequences, removed, n_cut = loops.cut_loops(sequences, opts.cut_loops)
            report["loops"] = {"keep_periods": opts.cut_loops, "answers_cut": n_cut, "answer_tokens_removed": removed}
            say(f"[train] loops cut: {n_cut} answers end in a loop; {removed} repeated tokens dropped "
                f"({opts.cut_loops} period(s) kept)")
        t0 = now(cuda)
        if opts.labels == "hard":  # the first ℓ layers only: the labels are the answers' own next tokens
            cache, report["exit_pass"] = hard_labels.build_cache(
                model, sequences, layers, opts.loss_on_prompt, opts.teacher_tokens_per_batch,
                cache_dir=os.path.join(opts.out_dir, EXIT_CACHE_DIR) if opts.out_dir else None,
                model_fingerprint=spec.fingerprint(), progress=opts.progress, say=say)
        else:
            cache = data.teacher_pass(model, sequences, layers, opts.top_k, opts.loss_on_prompt,
                                      opts.teacher_tokens_per_batch, opts.progress)
        timings["teacher_s"] = now(cuda) - t0
        cache.repeated = loops.repeated_target_mask(sequences, opts.loss_on_prompt)
        train_ids, hold_ids = data.split_holdout(cache.num_sequences, opts.holdout_fraction, opts.seed)
        report["teacher"] = {"targets": cache.describe_targets(), "target_positions": cache.num_targets,
                             "loss_on": "prompt and answer tokens" if opts.loss_on_prompt else "answer tokens",
                             "train_sequences": len(train_ids), "holdout_sequences": len(hold_ids),
                             "seconds": round(timings["teacher_s"], 2)}
        rate = report["exit_pass"]["tokens_per_s"] if opts.labels == "hard" else None  # None: all reused
        phase = "exit pass (first ℓ layers)" if opts.labels == "hard" else "teacher pass"
        say(f"[train] {phase}: {cache.num_sequences} "
            f"sequences, {cache.num_targets} target positions ({cache.describe_targets()}) in "
            f"{timings['teacher_s']:.1f} s" + (f", {rate:.0f} tok/s" if rate else ""))
        rope = rope_tables(spec, int(cache.seq_len.max()))
        vocab = None
        if opts.draft_vocab:  # the most frequent tokens of the training answers (never the held-out ones)
            vocab = DraftVocab.most_frequent((sequences[i][1] for i in train_ids.tolist()), opts.draft_vocab,
                                             spec.vocab_size, spec.device,
                                             also=(sequences[i][0] for i in train_ids.tolist()))
            outside = 1 - float(vocab.covers(cache.teacher_top1).float().mean())
            report["draft_vocab"] = {"size": opts.draft_vocab, "source": "most frequent training-answer tokens",
                                     "targets_outside": round(outside, 4)}
            say(f"[train] draft vocabulary: {opts.draft_vocab} tokens; {100 * outside:.1f}% of the teacher's top-1 "
                "targets fall outside it (those positions are skipped)")
        adapters, report["training"], report["holdout"] = {}, {}, {}
        for ell in layers:
            t0 = now(cuda)
            adapter, report["training"][ell], report["holdout"][ell] = _train_or_load_layer(
                model, spec, cache, ell, train_ids, hold_ids, rope, opts, report, say, vocab)
            timings[f"train_layer_{ell}_s"] = now(cuda) - t0
            adapters[ell] = adapter
        if any(p.grad is not None for p in model.parameters()) or not torch.equal(checksum, _param_checksum(model)):
            raise RuntimeError("training changed the target model or gave it gradients: only the adapter may train")
        del cache  # the exit states and targets (GB on the GPU) are not needed by the sweep

    report["eval"] = None
    if opts.mt_bench and opts.eval_questions > 0:
        t0 = now(cuda)
        questions = io.select_questions(io.load_questions(opts.mt_bench), max_questions=opts.eval_questions)
        report["eval"] = measure_speed(model, tokenizer, adapters, questions, opts, say)
        report["eval"]["mt_bench"] = os.fspath(opts.mt_bench)
        timings["eval_s"] = now(cuda) - t0
    report["best"] = choose_best(report)
    timings["total_s"] = time.perf_counter() - t_run
    report["timings"] = {k: round(v, 2) for k, v in timings.items()}
    report = json.loads(json.dumps(report))  # the form report.json has (str keys): what model_card reads
    best = report["best"]
    adapter = adapters[best["exit_layer"]]
    if best.get("threshold") is not None:
        adapter.config["recommended_threshold"] = best["threshold"]
    if opts.out_dir:
        io.write_json(os.path.join(opts.out_dir, "report.json"), report, indent=2)
        card = model_card(report)
        io.atomic_write(os.path.join(opts.out_dir, "MODEL_CARD.md"), lambda f: f.write(card))
        write_curves(report, os.path.join(opts.out_dir, "curves.png"))
    load = (opts.run_info or {}).get("model_load_s")
    say("[train] timings: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in
                                        ([("model_load_s", load)] if load is not None else []) + list(timings.items())))
    say(f"[train] done in {timings['total_s']:.1f} s; best: exit layer {best['exit_layer']}"
        + (f", η={best['threshold']}, τ={best['tau']:.2f}, speedup {best['speedup']:.2f}x"
           if best.get("speedup") is not None else ""))
    return adapter.to(spec.device, spec.dtype), report


# ---- one exit layer: train (or resume, or load when finished) and score it ---------------------------

def _train_or_load_layer(model, spec, cache, ell, train_ids, hold_ids, rope, opts, report, say, vocab=None):
    fingerprint = dict(opts.training_fingerprint(), exit_layer=ell, data=report["data"]["source"])
    layer_dir = os.path.join(opts.out_dir, f"layer-{ell}") if opts.out_dir else None
    if layer_dir and opts.resume and os.path.isfile(os.path.join(layer_dir, "adapter_config.json")):
        done = Adapter.from_pretrained(layer_dir, device=spec.device, dtype=torch.float32)
        if done.config.get("training", {}).get("fingerprint") == fingerprint:
            say(f"[train] layer {ell}: finished earlier, loaded from {layer_dir}")
            t = done.config["training"]
            return done, t["run"], t["holdout"]
    ckpt = os.path.join(opts.out_dir, CHECKPOINT_DIR, f"layer-{ell}.pt") if opts.out_dir else None
    adapter, run = train_layer(spec, cache, ell, train_ids, rope, opts, ckpt, fingerprint, hold_ids, vocab)
    hold = teacher_forced_metrics(adapter, spec, cache, ell, hold_ids, opts.batch_size, rope, vocab)
    say(f"[train] layer {ell}: {opts.steps} steps in {run['seconds']:.1f} s; loss {run['final_loss']:.3f}, "
        f"train agreement {run['final_train_agreement']:.3f}; held-out top-1 agreement (1st draft) "
        f"{fmt(hold['top1_agreement'])}, raw exit {fmt(hold['raw_exit_top1_agreement'])}")
    adapter.config.update(trained=True, training={
        "data": {"source": report["data"]["source"], "sequences": len(train_ids),
                 "answers_by": "the target itself (greedy, chat template)", "targets": cache.describe_targets()},
        "architecture": opts.architecture, "draft_vocab": report.get("draft_vocab"),
        "steps": opts.steps, "time_s": run["seconds"], "device": report["device"], "seed": opts.seed,
        "loss": run["final_loss"], "agreement": hold["top1_agreement"],
        "train_agreement": run["final_train_agreement"], "raw_exit_agreement": hold["raw_exit_top1_agreement"],
        "fingerprint": fingerprint, "run": run, "holdout": hold})
    if layer_dir:
        adapter.save_pretrained(layer_dir)
    return adapter, run, hold


# ---- small helpers ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _frozen(model):
    """The target in eval mode without gradients for the duration; its own settings restored after.
    Inference tensors (a model made under torch.inference_mode) never get gradients and refuse the flag."""
    params = [p for p in model.parameters() if not p.is_inference()]
    flags, was_training = [p.requires_grad for p in params], model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _param_checksum(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
