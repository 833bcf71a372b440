"""The student's side of self-distillation: its logits through the (possibly reduced) draft head, the
loss against the teacher's cached targets, and its teacher-forced agreement.

    vocab = DraftVocab.most_frequent(answers, size=8192, vocab_size=V)   # or None: the full vocabulary
    logits = student_logits(adapter, spec, batch, rope, head)           # [n, N] over the draft's tokens
    loss = distill_loss(logits, cache, batch.target_rows, spec.lm_head, vocab, weight)

With a reduced vocabulary the draft can only propose its N tokens. Positions whose teacher top-1 token
lies outside are skipped (weight 0: no draft from this vocabulary could be accepted there), and the
teacher's distribution is renormalised over what the draft can express.
"""
import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F

from ..ops import reference
from . import data


@dataclass
class DraftVocab:
    ids: torch.Tensor        # [N] int64 token ids, most frequent first (ties: smaller id first)
    inv: torch.Tensor        # [V] int64: token id -> its index in ids, -1 outside

    @classmethod
    def most_frequent(cls, answers: Iterable[List[int]], size: int, vocab_size: int, device="cpu",
                      also: Iterable[List[int]] = ()) -> "DraftVocab":
        """The `size` most frequent tokens of the answers (the tokens the draft will be asked to predict).
        Tokens the answers never use are ranked by their frequency in `also` (say, the prompts), then by id."""
        counts = Counter(t for a in answers for t in a)
        second = Counter(t for a in also for t in a)
        order = sorted(range(vocab_size), key=lambda t: (-counts.get(t, 0), -second.get(t, 0), t))[:size]
        return cls.from_ids(torch.tensor(order, dtype=torch.int64), vocab_size, device)

    @classmethod
    def from_ids(cls, ids: torch.Tensor, vocab_size: int, device="cpu") -> "DraftVocab":
        ids = ids.to(device=device, dtype=torch.int64)
        inv = torch.full((vocab_size,), -1, dtype=torch.int64, device=device)
        inv[ids] = torch.arange(len(ids), device=device)
        return cls(ids=ids, inv=inv)

    def covers(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool, per token id: inside the vocabulary."""
        return self.inv[tokens.to(self.inv.device)] >= 0


def autocast(spec):
    # bf16 matmuls on the GPU, fp32 master weights; on the CPU, plain fp32 (exact, deterministic tests).
    return torch.autocast("cuda", dtype=torch.bfloat16) if spec.device.type == "cuda" else contextlib.nullcontext()


def draft_head(spec, vocab: Optional[DraftVocab]) -> torch.Tensor:
    """The frozen head the student scores with: [N, H] rows of the LM head (the [V, H] head itself for the
    full vocabulary), as autograd may save it (a model loaded under inference_mode holds inference tensors,
    which backward cannot keep; a copy of the head, tens of MB, can)."""
    head = spec.lm_head if vocab is None else spec.lm_head.index_select(0, vocab.ids.to(spec.lm_head.device))
    return head.clone() if head.is_inference() else head


def student_logits(adapter, spec, batch: data.Batch, rope, head: torch.Tensor) -> torch.Tensor:
    """[n, N] logits of the loss positions (batch.loss_mask), through the frozen draft head."""
    y = adapter(batch.exit_hidden, batch.positions, *rope, scale=spec.attn_scale, window=spec.sliding_window or 0)
    return F.linear(y[batch.loss_mask], head)


def distill_loss(logits: torch.Tensor, cache: data.DistillCache, rows: torch.Tensor, lm_head: torch.Tensor,
                 vocab: Optional[DraftVocab] = None) -> torch.Tensor:
    """Soft cross-entropy of the student's logits [n, N] against the teacher's targets at cache rows `rows`,
    averaged over the positions whose teacher top-1 token the draft vocabulary holds (all, without one).
    lm_head: the full [V, H] head (recomputes the teacher's softmax when the cache holds its states)."""
    if getattr(cache, "hard_labels", False):  # duck-typed caches (tests) are soft
        return hard_label_loss(logits, cache.teacher_top1[rows], vocab)
    logits = logits.float()
    log_z = torch.logsumexp(logits, -1)
    if cache.top_k > 0:
        idx, p = cache.target_idx[rows].long(), cache.target_prob[rows]
        rest = (1 - p.sum(-1)).clamp_min(0)                                    # the teacher's mass outside top-k
        valid = torch.ones_like(idx, dtype=torch.bool)
        if vocab is not None:  # keep what the draft can express, renormalised
            idx = vocab.inv[idx]
            valid = idx >= 0
            p = p * valid
            z = (p.sum(-1) + rest).clamp_min(1e-12)
            p, rest, idx = p / z[:, None], rest / z, idx.clamp_min(0)
        listed = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(1, idx, valid.int()) > 0
        log_rest = torch.logsumexp(logits.masked_fill(listed, float("-inf")), -1) - log_z
        ce = -(p * (logits.gather(-1, idx) - log_z[:, None])).sum(-1) - rest * torch.nan_to_num(log_rest, neginf=0.0)
    else:
        p = torch.softmax(F.linear(cache.target_hidden[rows], lm_head).float(), -1)
        if vocab is not None:
            p = p[:, vocab.ids]
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        ce = log_z - (p * logits).sum(-1)
    if vocab is None:
        return ce.mean()
    weight = vocab.covers(cache.teacher_top1[rows]).float()                    # no sync: a weighted mean
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, vocab: Optional[DraftVocab] = None) -> torch.Tensor:
    """Cross-entropy of logits [n, N] against token ids labels [n] (the teacher's argmax), averaged over the
    labels the draft vocabulary holds (all, without one): the soft loss with a one-hot teacher."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"hard_label_loss: logits must be [n, N] and labels [n], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.to(logits.device)
    if vocab is None:
        return F.cross_entropy(logits.float(), labels)
    idx = vocab.inv[labels]
    weight = (idx >= 0).float()
    ce = F.cross_entropy(logits.float(), idx.clamp_min(0), reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def proposed(logits: torch.Tensor, vocab: Optional[DraftVocab]) -> torch.Tensor:
    """The token ids the draft proposes from its logits [n, N]."""
    top = logits.argmax(-1)
    return top if vocab is None else vocab.ids[top]


@torch.no_grad()
def teacher_forced_metrics(adapter, spec, cache, ell, seq_ids, batch_size, rope,
                           vocab: Optional[DraftVocab] = None) -> dict:
    """On held-out sequences: the adapter's loss and top-1 agreement with the teacher at the first draft
    position (teacher-forced = the engine's first draft of a round), the raw-exit baseline's (final norm +
    LM head on hidden_states[ℓ]) and, with a reduced vocabulary, the share of targets it covers."""
    n, loss, agree, raw, covered = 0, 0.0, 0, 0, 0
    split = {True: [0, 0], False: [0, 0]}  # looping text or not (cache.repeated): [tokens, agreed]
    head = draft_head(spec, vocab)
    for lo in range(0, len(seq_ids), batch_size):
        batch = cache.batch(seq_ids[lo:lo + batch_size], ell)
        top1 = cache.teacher_top1[batch.target_rows]
        with autocast(spec):
            logits = student_logits(adapter, spec, batch, rope, head)
            loss += distill_loss(logits, cache, batch.target_rows, spec.lm_head, vocab).item() * len(top1)
            normed, _ = reference.fused_add_rms_norm(batch.exit_hidden[batch.loss_mask], None, spec.final_norm,
                                                     spec.rms_norm_eps)
            raw += int((F.linear(normed, spec.lm_head).argmax(-1) == top1).sum())
        hits = proposed(logits, vocab) == top1
        agree += int(hits.sum())
        if getattr(cache, "repeated", None) is not None:
            rep = cache.repeated[batch.target_rows.to(cache.repeated.device)].to(hits.device)
            for flag, where in ((True, rep), (False, ~rep)):
                split[flag][0] += int(where.sum())
                split[flag][1] += int(hits[where].sum())
        covered += len(top1) if vocab is None else int(vocab.covers(top1).sum())
        n += len(top1)
    if n == 0:
        return {"tokens": 0, "loss": None, "top1_agreement": None, "raw_exit_top1_agreement": None,
                "vocab_coverage": None}
    out = {"tokens": n, "loss": round(loss / n, 4), "top1_agreement": round(agree / n, 4),
           "raw_exit_top1_agreement": round(raw / n, 4), "vocab_coverage": round(covered / n, 4)}
    if getattr(cache, "repeated", None) is not None:
        out["by_text"] = {name: {"tokens": t, "top1_agreement": round(a / t, 4) if t else None}
                          for name, (t, a) in (("looping", split[True]), ("not_looping", split[False]))}
    return out
