"""Training one adapter: the optimisation loop with deterministic, resumable checkpoints.

The batch of step s is a function of (seed, s) alone and the checkpoint holds the adapter, optimizer,
scheduler and RNG states, so a run killed at any point and resumed from its last checkpoint ends with
the same adapter as an uninterrupted one (tests/test_training.py checks it bitwise on the CPU)."""
import math
import os
import time
from typing import Optional

import torch

from ..adapter import Adapter
from ..engine.engine import Engine
from ..io import progress_bar
from . import data
from .draft import DraftVocab, autocast, distill_loss, draft_head, proposed, student_logits, teacher_forced_metrics
from .options import TrainOptions


def now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_layer(spec, cache, ell, train_ids, rope, opts: TrainOptions, ckpt: Optional[str], fingerprint: dict,
                hold_ids: Optional[torch.Tensor] = None, vocab: Optional[DraftVocab] = None):
    """Train one adapter (fp32 weights, opts.architecture) from init="next_layer"; with `vocab`, its draft
    head covers only those tokens. Every opts.eval_every steps (and at the end) the held-out sequences
    hold_ids are scored, for the learning curves. Returns (adapter, run statistics)."""
    adapter = Adapter.for_model(spec, ell, init="next_layer", seed=opts.seed,
                                architecture=opts.architecture).float().train()
    if vocab is not None:
        adapter.with_draft_vocab(vocab.ids)
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
    tokens_seen = torch.tensor(history[-1]["tokens_seen"] if history else 0, device=spec.device)
    bar = progress_bar(opts.progress, total=opts.steps, initial=step, desc=f"train ℓ={ell}", unit="step")
    head = draft_head(spec, vocab)
    t0 = now(spec.device.type == "cuda")
    while step < opts.steps:
        seq_ids = data.batch_sequences(train_ids, opts.batch_size, opts.seed, step,
                                       lengths=cache.seq_len if opts.length_grouped else None)
        batch = cache.batch(seq_ids, ell)
        tokens_seen += cache.loss_count[seq_ids.to(cache.loss_count.device)].sum()
        with autocast(spec):
            logits = student_logits(adapter, spec, batch, rope, head)
            loss = distill_loss(logits, cache, batch.target_rows, spec.lm_head, vocab)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), opts.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        window_loss += loss.detach()
        window_agree += (proposed(logits.detach(), vocab) == cache.teacher_top1[batch.target_rows]).float().mean()
        window_steps += 1
        evaluate = hold_ids is not None and len(hold_ids) > 0 and (
            step == opts.steps or (opts.eval_every > 0 and step % opts.eval_every == 0))
        if step % log_every == 0 or step == opts.steps or evaluate:
            history.append({"step": step, "tokens_seen": int(tokens_seen), "loss": round(window_loss.item() / window_steps, 4),
                            "agreement": round(window_agree.item() / window_steps, 4),
                            "lr": scheduler.get_last_lr()[0]})
            if evaluate:  # the learning curve: held-out loss and agreement against tokens seen
                adapter.eval()
                held = teacher_forced_metrics(adapter, spec, cache, ell, hold_ids, opts.batch_size, rope, vocab)
                adapter.train()
                history[-1].update(heldout_loss=held["loss"], heldout_agreement=held["top1_agreement"])
            window_loss.zero_()
            window_agree.zero_()
            window_steps = 0
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", agree=f"{history[-1]['agreement']:.3f}")
        bar.update(1)
        if ckpt and step % opts.checkpoint_every == 0 and step < opts.steps:
            save_checkpoint(ckpt, adapter, optimizer, scheduler, step,
                            elapsed + now(spec.device.type == "cuda") - t0, history, fingerprint)
    bar.close()
    elapsed += now(spec.device.type == "cuda") - t0
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


def rope_tables(spec, length: int):
    """(cos, sin) [S, D] float32 for positions < length, built by the engine itself (Engine.reserve), so the
    training forward uses the very tables the engine drafts with."""
    engine = Engine(spec)
    engine.reserve(length + 1, 1)
    return engine.rope_cos, engine.rope_sin
