"""Self-distillation data for adapter training: prompts, the target's own answers, and the teacher cache.

    prompts (.jsonl) ──chat template──► HF model.generate (batched, greedy) ──► prompt + answer ids
    ──one teacher forward per batch──► DistillCache: exit states hidden_states[ℓ] for each requested ℓ,
                                        and the teacher's next-token targets (top-k + rest, or full)

The cache holds every sequence once, flat along the token axis, so one generation and one teacher pass
serve the training of any number of exit layers. Bad prompt records are skipped and counted, never silently.
"""
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import io

SKIP_REASONS = dict(io.SKIP_REASONS, too_long="prompt exceeds --max-prompt-tokens after the chat template")


# ---- tokens --------------------------------------------------------------------------------------

def encode_prompts(tokenizer, texts: Sequence[str], max_prompt_tokens: int, limit: int,
                   skipped: Counter) -> Tuple[List[List[int]], int]:
    """Token ids of the first `limit` prompts that fit max_prompt_tokens (templated), in file order.
    Returns (ids, prompts examined); over-long prompts are counted in skipped["too_long"]."""
    out, examined = [], 0
    while len(out) < limit and examined < len(texts):
        for ids in (io.chat_ids(tokenizer, t) for t in texts[examined:]):
            examined += 1
            if len(ids) > max_prompt_tokens:
                skipped["too_long"] += 1
                continue
            out.append(ids)
            if len(out) == limit:
                break
    return out, examined


# ---- generation: the target writes the answers -----------------------------------------------------

def generate_answers(model, prompts: List[List[int]], max_new_tokens: int, batch_size: int, eos_ids: List[int],
                     pad_id: int, time_limit: Optional[float] = None, seed: int = 0, progress: bool = True,
                     answers: Optional[Dict[int, List[int]]] = None,
                     on_batch: Optional[Callable[[Dict[int, List[int]]], None]] = None
                     ) -> Tuple[List[Tuple[List[int], List[int]]], dict]:
    """Greedy answers by HF `model.generate`, batched with left padding.

    Prompts are batched by length (little padding), and the batches run in a seeded random order, so a
    time limit drops a random subset rather than all the longest prompts. answers: {prompt index: answer}
    already made (an interrupted run's): their batches are skipped. on_batch(answers) after each batch
    (to save progress). Returns [(prompt ids, answer ids up to and including the first EOS)] in prompt
    order, and statistics of this call's generation."""
    from transformers import GenerationConfig
    device = model.get_input_embeddings().weight.device
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids or None,
                              pad_token_id=pad_id)  # explicit: the model's sampling defaults must not apply
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    answers = dict(answers or {})
    new_tokens, eos_ended, stopped = 0, 0, False
    eos = set(eos_ids)
    bar = io.progress_bar(progress, total=len(prompts), initial=len(answers), desc="generate", unit="prompt")
    t0 = time.perf_counter()
    for b in order:
        if all(i in answers for i in batches[b]):
            continue
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            stopped = True
            break
        rows = batches[b]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for r, new in enumerate(out[:, width:].tolist()):
            cut = next((j + 1 for j, t in enumerate(new) if t in eos), None)
            eos_ended += cut is not None
            answers[rows[r]] = new[:cut] if cut is not None else new
            new_tokens += len(answers[rows[r]])
        bar.update(len(rows))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
        if on_batch is not None:
            on_batch(answers)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    pairs = [(prompts[i], answers[i]) for i in sorted(answers)]
    stats = {"prompts_requested": len(prompts), "sequences": len(pairs), "new_tokens": new_tokens,
             "ended_with_eos": eos_ended, "seconds": round(seconds, 2),
             "tokens_per_s": round(new_tokens / seconds, 1) if seconds else 0.0, "batch_size": batch_size,
             "max_new_tokens": max_new_tokens, "stopped_by_time_limit": stopped,
             "prompts_not_generated": len(prompts) - len(pairs)}
    return pairs, stats


# ---- prompts -> the target's answers, kept in out_dir for --resume / --reuse-data ----------------------

DATA_FILE = "distill_data.pt"


def pack_sequences(sequences: List[Tuple[List[int], List[int]]]) -> Dict[str, torch.Tensor]:
    """(prompt, answer) pairs as two tensors: tokens int32 [sum of lengths], lengths int32 [n, 2] —
    a few bytes a token (5M answer tokens: ~25 MB), small enough to bring back from a GPU machine."""
    flat = [t for p, a in sequences for t in p + a]
    return {"tokens": torch.tensor(flat, dtype=torch.int32),
            "lengths": torch.tensor([[len(p), len(a)] for p, a in sequences], dtype=torch.int32).reshape(-1, 2)}


def unpack_sequences(packed: Dict[str, torch.Tensor]) -> List[Tuple[List[int], List[int]]]:
    tokens, out, at = packed["tokens"].tolist(), [], 0
    for p, a in packed["lengths"].tolist():
        out.append((tokens[at:at + p], tokens[at + p:at + p + a]))
        at += p + a
    return out


def prompt_file_identity(path) -> dict:
    """What a data file remembers of the prompt file it answers: its content (sha256) and size, not its
    path, so a moved or renamed copy is the same prompt file and an edited one is not."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": os.path.getsize(path)}


def check_same_settings(path: str, saved: dict, now: dict):
    """A ValueError unless the data file at `path` was made with the settings `now` (prompt file content
    included), naming what differs."""
    if saved == now:
        return
    if "sha256" not in saved.get("source", {}) and "file" in saved.get("source", {}):
        raise ValueError(f"{path} names its prompt file only by path ({saved['source']}); this version matches "
                         "prompt files by content: re-save it with the prompt file's sha256 "
                         "(kangaroo_ext.training.data.prompt_file_identity) or generate the answers again")
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    what = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in differ)
    hint = " (the prompt file's content changed)" if "source" in differ else ""
    raise ValueError(f"{path} was generated with other settings{hint}: {what}; use another --out / --data or drop "
                     "--resume / --reuse-data")


def distill_sequences(model, tokenizer, prompts, opts, model_fingerprint: str, say):
    """(prompt ids, answer ids) pairs, a report on the prompts (used, skipped by reason) and one on the
    generation. opts: a training.TrainOptions. Reuses out_dir's answers when asked and the settings match."""
    if isinstance(prompts, (str, os.PathLike)):
        texts, skipped = io.read_prompts(prompts, strict=False)
        source = prompt_file_identity(prompts)
    else:
        texts, skipped, source = [], Counter(), {"in_memory_records": len(prompts)}
        for record in prompts:
            text, reason = io.prompt_text(record)
            if reason:
                skipped[reason] += 1
            else:
                texts.append(text)
    settings = {"source": source, "num_prompts": opts.num_prompts, "max_prompt_tokens": opts.max_prompt_tokens,
                "max_new_tokens": opts.max_new_tokens, "model": model_fingerprint}
    path = opts.data_file or (os.path.join(opts.out_dir, DATA_FILE) if opts.out_dir else None)
    partial = {}
    if path and (opts.resume or opts.reuse_data) and os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        check_same_settings(path, saved["settings"], settings)
        if saved.get("complete", True):
            sequences = unpack_sequences(saved["sequences"])
            say(f"[train] reusing {len(sequences)} generated answers from {path}")
            return sequences, saved["data"], dict(saved["generation"], reused=True)
        partial = {int(i): a for i, (_, a) in zip(saved["answered"].tolist(), unpack_sequences(saved["sequences"]))}
        say(f"[train] resuming generation: {len(partial)} answers already in {path}")

    ids, examined = encode_prompts(tokenizer, texts, opts.max_prompt_tokens, opts.num_prompts, skipped)
    data_report = {"source": source, "records": len(texts) + sum(skipped.values()), "valid": len(texts),
                   "examined": examined, "used": len(ids), "skipped": dict(skipped),
                   "skip_reasons": {k: SKIP_REASONS[k] for k in skipped}}
    if skipped:
        say("[train] skipped prompt records: " + ", ".join(f"{n} {k} ({SKIP_REASONS[k]})"
                                                           for k, n in sorted(skipped.items())))
    if len(ids) < 2:
        raise ValueError(f"only {len(ids)} usable prompt(s) (skipped: {dict(skipped) or 'none'}); need at least 2")
    if len(ids) < opts.num_prompts:
        say(f"[train] note: only {len(ids)} usable prompts for num_prompts={opts.num_prompts}")
    eos = io.eos_ids(model, tokenizer=tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    def save_progress(answers):  # an interrupted generation resumes from here (--resume)
        done = sorted(answers)
        _save(path, {"settings": settings, "complete": False, "answered": torch.tensor(done, dtype=torch.int64),
                     "sequences": pack_sequences([(ids[i], answers[i]) for i in done])})
    sequences, gen = generate_answers(model, ids, opts.max_new_tokens, opts.gen_batch_size, eos, pad,
                                      opts.generation_time_limit, opts.seed, opts.progress, answers=partial,
                                      on_batch=save_progress if path else None)
    gen["resumed_answers"] = len(partial)
    say(f"[train] generation: {gen['sequences']} answers, {gen['new_tokens']} tokens in {gen['seconds']:.1f} s "
        f"= {gen['tokens_per_s']:.0f} tok/s (batch {opts.gen_batch_size}, <= {opts.max_new_tokens} new tokens"
        + (", stopped by the time limit" if gen["stopped_by_time_limit"] else "") + ")")
    if len(sequences) < 2 and not opts.generate_only:
        raise ValueError("fewer than 2 answers were generated; raise the generation time limit")
    # Stopped by the time limit (a generate-only call, or a training run told to train on what is there,
    # generation_time_limit=0): the last batch's save (complete=False) stands, so a later --resume still
    # answers the remaining prompts instead of taking the part for the whole.
    if path and not gen["stopped_by_time_limit"]:
        _save(path, {"settings": settings, "complete": True, "sequences": pack_sequences(sequences),
                     "data": data_report, "generation": gen})
    return sequences, data_report, gen


def _save(path: str, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous file


# ---- the teacher pass and its cache -----------------------------------------------------------------

@dataclass
class Batch:
    exit_hidden: torch.Tensor    # [B, T, H], right-padded (padding repeats a real row; never a loss position)
    positions: torch.Tensor      # [B, T]
    loss_mask: torch.Tensor      # [B, T] bool: positions whose next token is a target
    target_rows: torch.Tensor    # [n] int64, rows of the cache's targets for loss_mask's True entries, row-major


class DistillCache:
    """What training reads: per sequence, exit states at every position, and teacher targets at the loss
    positions (a contiguous range: the answer, or the whole sequence with loss_on_prompt).

    Position t's target is the teacher's distribution of token t+1, as the adapter at t drafts t+1.
    top_k > 0: target_idx [n, k] and target_prob [n, k], the rest of the mass one extra bucket;
    top_k == 0: target_hidden [n, H], the teacher's final normed state, its full softmax recomputed on use."""

    hard_labels = False  # soft targets; hard_labels.HardLabelCache holds the answers' next tokens instead
    repeated = None      # optional [n_loss] bool: the target token lies in looping text (evaluation splits on it)

    def __init__(self, sequences: List[Tuple[List[int], List[int]]], exit_layers: Sequence[int], top_k: int,
                 loss_on_prompt: bool, hidden_size: int, device, dtype):
        self._layout(sequences, loss_on_prompt, device)
        self.top_k = top_k
        n_tok, n_loss = int(self.seq_len.sum()), int(self.loss_count.sum())
        self.exit_states = {ell: torch.empty(n_tok, hidden_size, device=device, dtype=dtype) for ell in exit_layers}
        self.teacher_top1 = torch.empty(n_loss, dtype=torch.int64, device=device)
        if top_k > 0:
            self.target_idx = torch.empty(n_loss, top_k, dtype=torch.int32, device=device)
            self.target_prob = torch.empty(n_loss, top_k, dtype=torch.float32, device=device)
        else:
            self.target_hidden = torch.empty(n_loss, hidden_size, device=device, dtype=dtype)

    def _layout(self, sequences, loss_on_prompt: bool, device):
        """Where each sequence's tokens [seq_start, +seq_len) and loss positions [loss_start, +loss_count) lie."""
        lengths = torch.tensor([len(p) + len(a) for p, a in sequences], dtype=torch.int64)
        first = torch.zeros_like(lengths) if loss_on_prompt else \
            torch.tensor([len(p) - 1 for p, _ in sequences], dtype=torch.int64)
        count = lengths - 1 - first                       # targets t+1 for t in [first, L-2]
        self.tokens = torch.cat([torch.tensor(p + a, dtype=torch.int64) for p, a in sequences])
        self.seq_len, self.loss_first, self.loss_count = lengths.to(device), first.to(device), count.to(device)
        self.seq_start = (torch.cumsum(lengths, 0) - lengths).to(device)
        self.loss_start = (torch.cumsum(count, 0) - count).to(device)

    @property
    def num_sequences(self) -> int:
        return self.seq_len.shape[0]

    @property
    def num_targets(self) -> int:
        return self.teacher_top1.shape[0]

    def describe_targets(self) -> str:
        return (f"teacher top-{self.top_k} probabilities plus one bucket holding the remaining mass"
                if self.top_k > 0 else "the teacher's full softmax over the vocabulary")

    def _index(self, seq_ids: torch.Tensor):
        """Right-padded [B, T] token rows, positions and the loss mask / target rows of sequences seq_ids."""
        seq_ids = seq_ids.to(self.seq_len.device)
        L, first, count = self.seq_len[seq_ids], self.loss_first[seq_ids], self.loss_count[seq_ids]
        t = torch.arange(int(L.max()), device=L.device)[None, :]                 # [1, T]
        rows = self.seq_start[seq_ids][:, None] + torch.minimum(t, L[:, None] - 1)
        loss_mask = (t >= first[:, None]) & (t < (first + count)[:, None])
        target_rows = (self.loss_start[seq_ids][:, None] + t - first[:, None])[loss_mask]
        return rows, t.expand(len(seq_ids), -1), loss_mask, target_rows

    def batch(self, seq_ids: torch.Tensor, exit_layer: int) -> Batch:
        rows, positions, loss_mask, target_rows = self._index(seq_ids)
        return Batch(self.exit_states[exit_layer][rows], positions, loss_mask, target_rows)


@torch.no_grad()  # not inference_mode: the cache's tensors feed autograd later
def teacher_pass(model, sequences: List[Tuple[List[int], List[int]]], exit_layers: Sequence[int], top_k: int,
                 loss_on_prompt: bool, tokens_per_batch: int, progress: bool = True) -> DistillCache:
    """One forward of the frozen target per batch of full sequences (prompt + answer), right-padded:
    causal attention keeps padding out of every real position, and positions start at 0 as in the engine.
    hidden_states[ℓ] (the residual stream after layer ℓ-1) is the exit state the engine feeds the adapter."""
    head = model.get_output_embeddings().weight
    num_layers = model.config.num_hidden_layers
    cache = DistillCache(sequences, exit_layers, top_k, loss_on_prompt, head.shape[1], head.device, head.dtype)
    tokens = cache.tokens.to(head.device)
    batches = length_batches(cache.seq_len.tolist(), tokens_per_batch)
    for seq_ids in io.progress_bar(progress, iterable=batches, desc="teacher", unit="batch"):
        seq_ids = torch.tensor(seq_ids, device=cache.seq_len.device)
        rows, _, loss_mask, target_rows = cache._index(seq_ids)
        real = torch.arange(rows.shape[1], device=rows.device)[None, :] < cache.seq_len[seq_ids][:, None]
        out = model.model(input_ids=tokens[rows], output_hidden_states=True, use_cache=False)
        if len(out.hidden_states) != num_layers + 1:
            raise RuntimeError(f"teacher: expected {num_layers + 1} hidden states, got {len(out.hidden_states)}")
        for ell in exit_layers:
            cache.exit_states[ell][rows[real]] = out.hidden_states[ell][real]
        final = out.last_hidden_state[loss_mask]                              # [n, H], after the final norm
        for lo in range(0, final.shape[0], 8192):                             # [n, V] logits in slices
            h = final[lo:lo + 8192]
            r = target_rows[lo:lo + 8192]
            logits = torch.nn.functional.linear(h, head).float()              # = the model's logits, as HF rounds
            cache.teacher_top1[r] = logits.argmax(-1)
            if top_k > 0:
                prob, idx = torch.softmax(logits, -1).topk(top_k, dim=-1)
                cache.target_idx[r], cache.target_prob[r] = idx.int(), prob
            else:
                cache.target_hidden[r] = h
    return cache


def length_batches(lengths: List[int], tokens_per_batch: int) -> List[List[int]]:
    """Sequence ids in batches of similar length, each at most tokens_per_batch padded tokens (a longer
    sequence alone), longest first: the largest batch shows memory limits at once."""
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, width = [], [], 0
    for i in by_length:
        L = lengths[i]
        if cur and (len(cur) + 1) * max(width, L) > tokens_per_batch:
            batches.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, L)
    return batches + ([cur] if cur else [])


def split_holdout(num_sequences: int, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids): a seeded random `fraction` held out, at least one each when possible."""
    perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed + 7919))
    if fraction == 0 or num_sequences < 2:
        return perm.sort().values, perm[:0]
    n_hold = min(max(1, round(fraction * num_sequences)), num_sequences - 1)
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


def batch_sequences(train_ids: torch.Tensor, batch_size: int, seed: int, step: int,
                    lengths: Optional[torch.Tensor] = None, group: int = 64) -> torch.Tensor:
    """The sequences of step `step`: a function of (seed, step) alone, so resuming needs no sampler state.
    Each epoch is a fresh seeded permutation, cut into full batches.

    lengths: [num sequences] (a cache's seq_len) to group by length: each run of `group` batches of the
    epoch's permutation is sorted by length before it is cut, and the epoch's batches then run in a seeded
    random order. A batch is padded to its longest sequence, so on the CPU this halves the work per token."""
    n = len(train_ids)
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if lengths is None or n < batch_size:
        return train_ids[perm[k * batch_size:(k + 1) * batch_size]]
    order = perm[:per_epoch * batch_size]                                     # [per_epoch * B]
    seq_len = lengths.to("cpu")[train_ids[order]]
    chunk = group * batch_size
    for lo in range(0, len(order), chunk):                                    # sort within each group
        order[lo:lo + chunk] = order[lo:lo + chunk][torch.sort(seq_len[lo:lo + chunk], stable=True).indices]
    batch_order = torch.randperm(per_epoch, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7))
    b = int(batch_order[k])
    return train_ids[order[b * batch_size:(b + 1) * batch_size]]
