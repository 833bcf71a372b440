"""Adapter training by self-distillation, its evaluation, and the `kangaroo train` command.

    adapter, report = kx.train_adapter(model, tokenizer, "prompts.jsonl", exit_layer=[1, 2, 3, 4, 6],
                                       out_dir="out/adapters", mt_bench="mt_bench_question.jsonl")

Phases: the target answers the prompts (training_data.generate_answers); one teacher pass caches exit
states and targets for every requested ℓ (training_data.teacher_pass); per ℓ, the adapter learns the
teacher's next-token distribution through the target's frozen LM head (soft cross-entropy, AdamW,
warm-up + cosine, bf16 autocast on GPU with fp32 weights, checkpoints, resumable); then held-out
teacher-forced agreement and an MT-bench sweep over η measured by speculative_generate against generate.
The best (ℓ, η) is the one with the highest measured speedup; `ship_adapter` installs it as the default.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .adapter import Adapter
from .engine.engine import Engine
from .engine.spec import model_spec
from .ops import reference
from . import training_data as data

DEFAULT_EXIT_LAYERS = (1, 2, 3, 4, 6)
DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CHECKPOINT_DIR = "checkpoint"


@dataclasses.dataclass
class TrainOptions:
    out_dir: Optional[str] = None          # adapters, report.json, MODEL_CARD.md, checkpoints; None = write nothing
    num_prompts: int = 2000                # prompts answered by the target (held-out ones included)
    max_prompt_tokens: int = 512           # longer prompts (chat template included) are skipped and counted
    max_new_tokens: int = 256              # answer length
    gen_batch_size: Optional[int] = None   # None: 128 on a GPU, 8 on the CPU
    generation_time_limit: Optional[float] = None  # seconds; no new generation batch starts after it
    teacher_tokens_per_batch: Optional[int] = None  # None: 32768 on a GPU, 4096 on the CPU
    top_k: int = 64                        # teacher targets: top-k + rest bucket; 0 = full softmax
    loss_on_prompt: bool = False           # also learn the prompt tokens' next-token distributions
    holdout_fraction: float = 0.05         # sequences held out for teacher-forced agreement
    steps: int = 1000                      # optimizer steps per exit layer
    batch_size: int = 16                   # sequences per step
    lr: float = 3e-3                       # high for a small block: the next-layer init starts far off (CE ~15)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1              # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0              # on weight matrices only (never on the norms)
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    resume: bool = False                   # continue from out_dir: its data, finished layers and checkpoints
    reuse_data: bool = False               # reuse out_dir's generated answers, but train afresh
    seed: int = 0
    mt_bench: Optional[str] = None         # MT-bench .jsonl; None = no speed sweep
    eval_questions: int = 8
    eval_max_new_tokens: int = 128
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    max_draft: int = 6                     # γ in the sweep
    eval_warmup: int = 1                   # untimed runs before each method's timed runs
    progress: bool = True                  # tqdm bars
    verbose: bool = True                   # phase lines on stdout
    run_info: Optional[dict] = None        # extra facts for report.json (the CLI records model loading time)

    def check(self, num_layers: int, vocab_size: int):
        def positive(name, integer=True):
            v = getattr(self, name)
            if (integer and (not isinstance(v, int) or isinstance(v, bool))) or not v > 0:
                raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {v!r}")
        for name in ("num_prompts", "max_prompt_tokens", "max_new_tokens", "steps", "batch_size",
                     "checkpoint_every", "max_draft", "eval_max_new_tokens"):
            positive(name)
        for name in ("gen_batch_size", "teacher_tokens_per_batch", "generation_time_limit"):
            if getattr(self, name) is not None:
                positive(name, integer=name != "generation_time_limit")
        positive("lr", integer=False)
        if not 0 <= self.top_k < vocab_size:
            raise ValueError(f"top_k must be in [0, {vocab_size}) (0 = full softmax), got {self.top_k}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps >= 0, min_lr_ratio in [0, 1], grad_clip > 0 and weight_decay >= 0 please")
        if self.eval_questions < 0 or self.eval_warmup < 0:
            raise ValueError("eval_questions and eval_warmup must be >= 0")
        if not self.thresholds or not all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be numbers in [0, 1], got {list(self.thresholds)!r}")
        if (self.resume or self.reuse_data) and not self.out_dir:
            raise ValueError("resume / reuse_data need out_dir")

    def training_fingerprint(self) -> dict:
        """What a checkpoint or finished layer must agree on to be resumed."""
        keys = ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "top_k",
                "loss_on_prompt", "holdout_fraction", "seed")
        return {k: getattr(self, k) for k in keys}


# ---- the public entry point ------------------------------------------------------------------------

def train_adapter(model, tokenizer, prompts: Union[str, os.PathLike, Sequence], exit_layer=DEFAULT_EXIT_LAYERS[1],
                  **options):
    """Train Kangaroo adapters for `model` by self-distillation. Returns (best adapter, report dict).

    prompts: a .jsonl path (a "prompt" field per line) or a list of strings / {"prompt": ...} records.
    exit_layer: an int or a list of ints (one adapter each, from one generation and teacher pass).
    options: the fields of TrainOptions. The adapter returned is the best by measured speedup (with
    config["recommended_threshold"]) when mt_bench is given, else by held-out agreement; it is on the
    model's device and dtype. With out_dir, every layer's adapter lands in out_dir/layer-<ℓ>/.
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
              "device": device_name(spec.device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "seed": opts.seed, "exit_layers": layers, "run_info": opts.run_info or {},
              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()
                          if k != "run_info"}}
    torch.manual_seed(opts.seed)
    checksum = _param_checksum(model)
    with _frozen(model):
        sequences, report["data"], report["generation"] = data.distill_sequences(
            model, tokenizer, prompts, opts, spec.fingerprint(), say)
        timings["generation_s"] = 0.0 if report["generation"].get("reused") else report["generation"]["seconds"]
        t0 = _now(cuda)
        cache = data.teacher_pass(model, sequences, layers, opts.top_k, opts.loss_on_prompt,
                                  opts.teacher_tokens_per_batch, opts.progress)
        timings["teacher_s"] = _now(cuda) - t0
        train_ids, hold_ids = data.split_holdout(cache.num_sequences, opts.holdout_fraction, opts.seed)
        report["teacher"] = {"targets": cache.describe_targets(), "target_positions": cache.num_targets,
                             "loss_on": "prompt and answer tokens" if opts.loss_on_prompt else "answer tokens",
                             "train_sequences": len(train_ids), "holdout_sequences": len(hold_ids),
                             "seconds": round(timings["teacher_s"], 2)}
        say(f"[train] teacher pass: {cache.num_sequences} sequences, {cache.num_targets} target positions "
            f"({cache.describe_targets()}) in {timings['teacher_s']:.1f} s")
        rope = rope_tables(spec, int(cache.seq_len.max()))
        adapters, report["training"], report["holdout"] = {}, {}, {}
        for ell in layers:
            t0 = _now(cuda)
            adapter, report["training"][ell], report["holdout"][ell] = _train_or_load_layer(
                model, spec, cache, ell, train_ids, hold_ids, rope, opts, report, say)
            timings[f"train_layer_{ell}_s"] = _now(cuda) - t0
            adapters[ell] = adapter
        if any(p.grad is not None for p in model.parameters()) or not torch.equal(checksum, _param_checksum(model)):
            raise RuntimeError("training changed the target model or gave it gradients: only the adapter may train")
        del cache  # the exit states and targets (GB on the GPU) are not needed by the sweep

    report["eval"] = None
    if opts.mt_bench and opts.eval_questions > 0:
        t0 = _now(cuda)
        texts = data.read_mt_bench_first_turns(opts.mt_bench, opts.eval_questions)
        report["eval"] = measure_speed(model, tokenizer, adapters, texts, opts, say)
        report["eval"]["mt_bench"] = os.fspath(opts.mt_bench)
        timings["eval_s"] = _now(cuda) - t0
    report["best"] = choose_best(report)
    timings["total_s"] = time.perf_counter() - t_run
    report["timings"] = {k: round(v, 2) for k, v in timings.items()}
    report = json.loads(json.dumps(report))  # the form report.json has (str keys): what model_card reads
    best = report["best"]
    adapter = adapters[best["exit_layer"]]
    if best.get("threshold") is not None:
        adapter.config["recommended_threshold"] = best["threshold"]
    if opts.out_dir:
        _write_json(os.path.join(opts.out_dir, "report.json"), report)
        with open(os.path.join(opts.out_dir, "MODEL_CARD.md"), "w") as f:
            f.write(model_card(report))
    load = (opts.run_info or {}).get("model_load_s")
    say("[train] timings: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in
                                        ([("model_load_s", load)] if load is not None else []) + list(timings.items())))
    say(f"[train] done in {timings['total_s']:.1f} s; best: exit layer {best['exit_layer']}"
        + (f", η={best['threshold']}, τ={best['tau']:.2f}, speedup {best['speedup']:.2f}x"
           if best.get("speedup") is not None else ""))
    return adapter.to(spec.device, spec.dtype), report


def parse_exit_layers(exit_layer, num_layers: int) -> List[int]:
    """An int, a list of ints or a string "1,2,3" -> a sorted list of distinct layers in [1, num_layers)."""
    items = exit_layer.split(",") if isinstance(exit_layer, str) else \
        [exit_layer] if isinstance(exit_layer, int) else list(exit_layer)
    try:
        layers = sorted({int(str(x).strip()) for x in items})
    except ValueError:
        raise ValueError(f"exit layers must be integers, got {exit_layer!r}") from None
    bad = [ell for ell in layers if not 1 <= ell < num_layers]
    if not layers or bad:
        raise ValueError(f"exit layers must lie in [1, {num_layers - 1}] for this {num_layers}-layer model, "
                         f"got {exit_layer!r}")
    return layers


# ---- one exit layer: train (or resume, or load when finished) and score it ---------------------------

def _train_or_load_layer(model, spec, cache, ell, train_ids, hold_ids, rope, opts, report, say):
    fingerprint = dict(opts.training_fingerprint(), exit_layer=ell, data=report["data"]["source"])
    layer_dir = os.path.join(opts.out_dir, f"layer-{ell}") if opts.out_dir else None
    if layer_dir and opts.resume and os.path.isfile(os.path.join(layer_dir, "adapter_config.json")):
        done = Adapter.from_pretrained(layer_dir, device=spec.device, dtype=torch.float32)
        if done.config.get("training", {}).get("fingerprint") == fingerprint:
            say(f"[train] layer {ell}: finished earlier, loaded from {layer_dir}")
            t = done.config["training"]
            return done, t["run"], t["holdout"]
    ckpt = os.path.join(opts.out_dir, CHECKPOINT_DIR, f"layer-{ell}.pt") if opts.out_dir else None
    adapter, run = train_layer(spec, cache, ell, train_ids, rope, opts, ckpt, fingerprint)
    hold = teacher_forced_metrics(adapter, spec, cache, ell, hold_ids, opts.batch_size, rope)
    say(f"[train] layer {ell}: {opts.steps} steps in {run['seconds']:.1f} s; loss {run['final_loss']:.3f}, "
        f"train agreement {run['final_train_agreement']:.3f}; held-out top-1 agreement (1st draft) "
        f"{_fmt(hold['top1_agreement'])}, raw exit {_fmt(hold['raw_exit_top1_agreement'])}")
    adapter.config.update(trained=True, training={
        "data": {"source": report["data"]["source"], "sequences": len(train_ids),
                 "answers_by": "the target itself (greedy, chat template)", "targets": cache.describe_targets()},
        "steps": opts.steps, "time_s": run["seconds"], "device": report["device"], "seed": opts.seed,
        "loss": run["final_loss"], "agreement": hold["top1_agreement"],
        "train_agreement": run["final_train_agreement"], "raw_exit_agreement": hold["raw_exit_top1_agreement"],
        "fingerprint": fingerprint, "run": run, "holdout": hold})
    if layer_dir:
        adapter.save_pretrained(layer_dir)
    return adapter, run, hold


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _student_logits(adapter, spec, batch: data.Batch, rope, lm_head):
    y = adapter(batch.exit_hidden, batch.positions, *rope, scale=spec.attn_scale, window=spec.sliding_window or 0)
    return F.linear(y[batch.loss_mask], lm_head)                             # the target's frozen LM head


def _frozen_head(spec) -> torch.Tensor:
    """The LM head as autograd may save it: a model loaded under torch.inference_mode holds inference
    tensors, which backward cannot keep; a copy of the head (tens of MB) can."""
    return spec.lm_head.clone() if spec.lm_head.is_inference() else spec.lm_head


def _autocast(spec):
    # bf16 matmuls on the GPU, fp32 master weights; on the CPU, plain fp32 (exact, deterministic tests).
    return torch.autocast("cuda", dtype=torch.bfloat16) if spec.device.type == "cuda" else contextlib.nullcontext()


def train_layer(spec, cache, ell, train_ids, rope, opts: TrainOptions, ckpt: Optional[str], fingerprint: dict):
    """Train one adapter (fp32 weights) from init="next_layer". Returns (adapter, run statistics)."""
    adapter = Adapter.for_model(spec, ell, init="next_layer", seed=opts.seed).float().train()
    matrices = [p for p in adapter.parameters() if p.dim() >= 2]
    vectors = [p for p in adapter.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": opts.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opts.warmup_steps, opts.steps,
                                                                                 opts.min_lr_ratio))
    step, elapsed, history = 0, 0.0, []
    if ckpt and opts.resume and os.path.isfile(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt} was made with other training options ({state['fingerprint']}); "
                             "use another --out or drop --resume")
        adapter.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step, elapsed, history = state["step"], state["elapsed_s"], state["history"]
    log_every = max(1, min(25, opts.steps // 20))
    window_loss = torch.zeros((), device=spec.device)  # summed on the device: no host sync per step
    window_agree = torch.zeros((), device=spec.device)
    window_steps = 0
    bar = data.progress_bar(opts.progress, total=opts.steps, initial=step, desc=f"train ℓ={ell}", unit="step")
    lm_head = _frozen_head(spec)
    t0 = _now(spec.device.type == "cuda")
    while step < opts.steps:
        batch = cache.batch(data.batch_sequences(train_ids, opts.batch_size, opts.seed, step), ell)
        with _autocast(spec):
            logits = _student_logits(adapter, spec, batch, rope, lm_head)
            loss = data.distill_loss(logits, cache, batch.target_rows, lm_head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), opts.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        window_loss += loss.detach()
        window_agree += (logits.detach().argmax(-1) == cache.teacher_top1[batch.target_rows]).float().mean()
        window_steps += 1
        if step % log_every == 0 or step == opts.steps:
            history.append({"step": step, "loss": round(window_loss.item() / window_steps, 4),
                            "agreement": round(window_agree.item() / window_steps, 4),
                            "lr": scheduler.get_last_lr()[0]})
            window_loss.zero_()
            window_agree.zero_()
            window_steps = 0
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", agree=f"{history[-1]['agreement']:.3f}")
        bar.update(1)
        if ckpt and step % opts.checkpoint_every == 0 and step < opts.steps:
            save_checkpoint(ckpt, adapter, optimizer, scheduler, step,
                            elapsed + _now(spec.device.type == "cuda") - t0, history, fingerprint)
    bar.close()
    elapsed += _now(spec.device.type == "cuda") - t0
    if ckpt and os.path.isfile(ckpt):
        os.remove(ckpt)  # the finished adapter replaces it
    adapter.eval()
    last = history[-1] if history else {"loss": float("nan"), "agreement": float("nan")}
    return adapter, {"steps": opts.steps, "seconds": round(elapsed, 2), "final_loss": last["loss"],
                     "final_train_agreement": last["agreement"], "history": history}


def save_checkpoint(path, adapter, optimizer, scheduler, step, elapsed, history, fingerprint):
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"step": step, "adapter": {k: v.detach().cpu() for k, v in adapter.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
             "elapsed_s": elapsed, "history": history, "fingerprint": fingerprint}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write leaves the previous checkpoint intact


@torch.no_grad()
def teacher_forced_metrics(adapter, spec, cache, ell, seq_ids, batch_size, rope) -> dict:
    """On held-out sequences: the adapter's loss and top-1 agreement with the teacher at the first draft
    position (teacher-forced = the engine's first draft of a round), and the raw-exit baseline's
    (final norm + LM head on hidden_states[ℓ])."""
    n, loss, agree, raw = 0, 0.0, 0, 0
    for lo in range(0, len(seq_ids), batch_size):
        batch = cache.batch(seq_ids[lo:lo + batch_size], ell)
        top1 = cache.teacher_top1[batch.target_rows]
        with _autocast(spec):
            logits = _student_logits(adapter, spec, batch, rope, spec.lm_head)
            loss += data.distill_loss(logits, cache, batch.target_rows, spec.lm_head).item() * len(top1)
            normed, _ = reference.fused_add_rms_norm(batch.exit_hidden[batch.loss_mask], None, spec.final_norm,
                                                     spec.rms_norm_eps)
            raw += int((F.linear(normed, spec.lm_head).argmax(-1) == top1).sum())
        agree += int((logits.argmax(-1) == top1).sum())
        n += len(top1)
    if n == 0:
        return {"tokens": 0, "loss": None, "top1_agreement": None, "raw_exit_top1_agreement": None}
    return {"tokens": n, "loss": round(loss / n, 4), "top1_agreement": round(agree / n, 4),
            "raw_exit_top1_agreement": round(raw / n, 4)}


def rope_tables(spec, length: int):
    """(cos, sin) [S, D] float32 for positions < length, built by the engine itself (Engine.reserve), so the
    training forward uses the very tables the engine drafts with."""
    engine = Engine(spec)
    engine.reserve(length + 1, 1)
    return engine.rope_cos, engine.rope_sin


# ---- evaluation: speculative_generate vs generate on MT-bench -----------------------------------------

def measure_speed(model, tokenizer, adapters: Dict[int, Adapter], texts: List[str], opts: TrainOptions, say) -> dict:
    """τ, acceptance per draft position and tokens/s for every (ℓ, η), by kx.speculative_generate itself,
    and plain kx.generate's tokens/s on the same prompts (greedy, batch 1, prefill included). Plain decoding
    runs before and after the sweep and speedups use both, so a drifting clock does not favour either side."""
    from .generation import DecodeStats, _engine_for, generate, speculative_generate
    spec = model_spec(model)
    prompts = data.chat_token_ids(tokenizer, texts)
    eos = data.eos_token_ids(model, tokenizer)
    new, gamma = opts.eval_max_new_tokens, opts.max_draft
    engine = _engine_for(model)  # the engine generate() uses: sized once per γ so no timed call regrows it
    bound = max(len(p) for p in prompts) + new + gamma + 1

    def run(fn, draft_len, **kw):
        engine.reserve(bound, draft_len)
        for _ in range(opts.eval_warmup):  # untimed: graph capture, allocator, autotuning
            fn(model, prompts[0], max_new_tokens=min(new, 32), eos_token_id=eos, **kw)
        outs = [fn(model, p, max_new_tokens=new, eos_token_id=eos, **kw) for p in prompts]
        total = DecodeStats(rounds=sum(o.stats.rounds for o in outs), mode=outs[0].stats.mode,
                            new_tokens=sum(o.stats.new_tokens for o in outs),
                            total_s=sum(o.stats.total_s for o in outs),
                            drafted=[d for o in outs for d in o.stats.drafted],
                            accepted=[a for o in outs for a in o.stats.accepted])
        return total, [o.sequences.cpu() for o in outs]

    before, plain_out = run(generate, 1)
    say(f"[eval] plain decoding: {before.tokens_per_second:.1f} tok/s over {len(prompts)} MT-bench first turns")
    rows = []
    for ell, adapter in adapters.items():
        draft = Adapter(adapter.config).to(spec.device, spec.dtype)   # the trained weights in the model's dtype
        draft.load_state_dict(adapter.state_dict())
        for eta in opts.thresholds:
            total, outs = run(speculative_generate, gamma, adapter=draft, threshold=float(eta), max_draft=gamma)
            rows.append({"exit_layer": ell, "threshold": float(eta), "tau": round(total.mean_accepted, 3),
                         "acceptance_by_position": [None if math.isnan(a) else round(a, 3)
                                                    for a in total.acceptance_by_position(gamma)],
                         "drafts_per_round": round(sum(total.drafted) / max(1, total.rounds), 3),
                         "tokens_per_s": round(total.tokens_per_second, 1),
                         "identical_to_plain": sum(torch.equal(o, p) for o, p in zip(outs, plain_out))})
            say(f"[eval] ℓ={ell} η={eta:.2f}: τ={rows[-1]['tau']:.2f}, {rows[-1]['tokens_per_s']:.1f} tok/s")
    after, _ = run(generate, 1)
    plain_tps = (before.new_tokens + after.new_tokens) / (before.total_s + after.total_s)
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / plain_tps, 3)
    say(f"[eval] plain decoding after the sweep: {after.tokens_per_second:.1f} tok/s; speedups against "
        f"{plain_tps:.1f} tok/s (both runs)")
    return {"questions": len(prompts), "max_new_tokens": new, "max_draft": gamma, "warmup_runs": opts.eval_warmup,
            "mode": before.mode, "plain_tokens_per_s": round(plain_tps, 1),
            "plain_tokens_per_s_before_after": [round(before.tokens_per_second, 1), round(after.tokens_per_second, 1)],
            "timing": "tokens / seconds summed over prompts, each timed by the engine (prefill included)",
            "table": rows}


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


# ---- outputs ----------------------------------------------------------------------------------------

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
             f"Self-distillation: {d['used']} prompts from {d['source'].get('file', 'memory')} "
             f"(skipped: {d['skipped'] or 'none'}), answered by the target itself (greedy, chat template, at most "
             f"{g['max_new_tokens']} new tokens): {g['sequences']} answers, {g['new_tokens']} tokens, "
             f"{g['tokens_per_s']} tok/s. Targets: {report['teacher']['targets']}, on "
             f"{report['teacher']['loss_on']}; {report['teacher']['holdout_sequences']} sequences held out.", "",
             "## Training", "",
             f"{opts['steps']} steps x {opts['batch_size']} sequences per exit layer; AdamW lr {opts['lr']} "
             f"(warm-up {opts['warmup_steps']}, cosine to {opts['min_lr_ratio']}x), grad clip {opts['grad_clip']}; "
             "init from the next layer's attention; only the adapter trains (target frozen, LM head shared).", "",
             "| ℓ | steps | time (s) | loss | held-out top-1 agreement (1st draft) | raw exit (no adapter) "
             "| best η | τ | speedup |", "|---|---|---|---|---|---|---|---|---|"]
    for ell, run in report["training"].items():
        h = report["holdout"][ell]
        rows = [r for r in (ev["table"] if ev else []) if str(r["exit_layer"]) == ell]
        top = max(rows, key=lambda r: (r["speedup"], r["tau"])) if rows else None
        lines.append(f"| {ell} | {run['steps']} | {run['seconds']:.0f} | {run['final_loss']:.3f} | "
                     f"{_fmt(h['top1_agreement'])} | {_fmt(h['raw_exit_top1_agreement'])} | "
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
              f"({_fmt(hold['top1_agreement'])}); τ >= 3.0: {'met' if tau is not None and tau >= 3.0 else 'NOT met'} "
              f"({'not measured' if tau is None else tau}).", ""]
    return "\n".join(lines)


def ship_adapter(out_dir: str, destination: Optional[str] = None) -> str:
    """Install the best adapter of a finished run (by measured speedup) as the default model's adapter:
    adapter.safetensors, adapter_config.json (with recommended_threshold) and MODEL_CARD.md."""
    from .default_model import ADAPTER_DIR
    report_path = os.path.join(out_dir, "report.json")
    if not os.path.isfile(report_path):
        raise FileNotFoundError(f"no report.json in {out_dir}: run `kangaroo train` there first")
    with open(report_path) as f:
        best = json.load(f)["best"]
    if best.get("speedup") is None:
        raise ValueError("the run has no speed sweep (give --mt-bench): shipping is chosen by measured speedup")
    adapter = Adapter.from_pretrained(os.path.join(out_dir, f"layer-{best['exit_layer']}"))
    adapter.config["recommended_threshold"] = best["threshold"]
    destination = destination or ADAPTER_DIR
    adapter.save_pretrained(destination)
    os.chmod(os.path.join(destination, "adapter.safetensors"), 0o644)  # package data: readable by all users
    shutil.copyfile(os.path.join(out_dir, "MODEL_CARD.md"), os.path.join(destination, "MODEL_CARD.md"))
    if best["speedup"] < 1.0:
        print(f"[ship] WARNING: the best adapter is slower than plain decoding ({best['speedup']:.2f}x)")
    print(f"[ship] exit layer {best['exit_layer']}, η={best['threshold']} -> {destination}")
    return destination


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


def _now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _write_json(path: str, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# ---- the command line -------------------------------------------------------------------------------

def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_arguments(p: argparse.ArgumentParser):
    d = TrainOptions()
    a = p.add_argument
    a("--prompts", required=True, help=".jsonl with a 'prompt' field per line")
    a("--out", required=True, help="output folder: layer-<ℓ>/ adapters, report.json, MODEL_CARD.md, checkpoint/")
    a("--exit-layer", default=",".join(map(str, DEFAULT_EXIT_LAYERS)), help="ℓ, or a list: 1,2,3,4,6")
    a("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local transformers model folder")
    a("--device", choices=["cpu", "cuda"], default=None)
    a("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    a("--num-prompts", type=int, default=d.num_prompts)
    a("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    a("--max-new-tokens", type=int, default=d.max_new_tokens, help="answer length in the generation phase")
    a("--gen-batch-size", type=int, default=None, help="default: 128 on GPU, 8 on CPU")
    a("--generation-time-limit", type=float, default=None, help="seconds; later batches are not generated")
    a("--teacher-tokens-per-batch", type=int, default=None)
    a("--top-k", type=int, default=d.top_k, help="teacher top-k + rest bucket; 0 = full softmax")
    a("--loss-on-prompt", action="store_true")
    a("--holdout-fraction", type=float, default=d.holdout_fraction)
    a("--steps", type=int, default=d.steps, help="optimizer steps per exit layer")
    a("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    a("--lr", type=float, default=d.lr)
    a("--warmup-steps", type=int, default=d.warmup_steps)
    a("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--grad-clip", type=float, default=d.grad_clip)
    a("--checkpoint-every", type=int, default=d.checkpoint_every)
    a("--resume", action="store_true", help="continue the run in --out")
    a("--reuse-data", action="store_true", help="reuse --out's generated answers, train afresh")
    a("--seed", type=int, default=d.seed)
    a("--mt-bench", default=None, help="MT-bench question.jsonl for the speed sweep (omit: no sweep)")
    a("--eval-questions", type=int, default=d.eval_questions)
    a("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens)
    a("--thresholds", type=_floats, default=list(d.thresholds), help="η values, e.g. 0.3,0.4,0.5")
    a("--max-draft", type=int, default=d.max_draft, help="γ in the sweep")
    a("--eval-warmup", type=int, default=d.eval_warmup)
    a("--no-progress", action="store_true", help="no progress bars")
    a("--ship", action="store_true", help="install the best adapter as the default model's shipped adapter")


def add_parser(subparsers):
    """Registers `kangaroo train`."""
    p = subparsers.add_parser("train", help="train Kangaroo adapters by self-distillation",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def load_model(name: str, device: Optional[str], dtype: Optional[str]):
    if name == "default":
        from .default_model import load_default_model
        return load_default_model(device=device, dtype=getattr(torch, dtype) if dtype else None)
    if not os.path.isdir(name):
        raise FileNotFoundError(f"--model: no such model folder: {name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(name)


def run_from_args(args) -> int:
    data.read_text_lines(args.prompts, "prompt file")          # fail in a second, not after loading the model
    if args.mt_bench:
        data.read_mt_bench_first_turns(args.mt_bench, 1)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not a folder")
    if args.ship and args.model != "default":
        raise ValueError("--ship installs the default model's adapter; it needs --model default")
    if args.ship and not args.mt_bench:
        raise ValueError("--ship chooses by measured speedup: give --mt-bench")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    load_s = time.perf_counter() - t0
    print(f"[train] model loaded in {load_s:.1f} s on {device_name(model.device)}", flush=True)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions) if hasattr(args, f.name)}
    options.update(out_dir=args.out, progress=not args.no_progress,
                   run_info={"model_load_s": round(load_s, 2), "command": " ".join(sys.argv)})
    train_adapter(model, tokenizer, args.prompts, exit_layer=args.exit_layer, **options)
    if args.ship:
        ship_adapter(args.out)
    return 0


def main(argv=None) -> int:
    """`python -m kangaroo_ext.training ...`: the same command without the `kangaroo` front end."""
    p = argparse.ArgumentParser(prog="python -m kangaroo_ext.training", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        print(f"kangaroo train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
