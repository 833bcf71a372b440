"""Hard-label training data, for training without a GPU (`kangaroo train --labels hard`).

The answers are the target's own greedy tokens, so at every answer position the teacher's argmax is the
next token of the answer itself. Training then needs no teacher pass through all the target's layers:
only the first ℓ layers, once, for the exit states the adapter reads (`exit_pass`), kept in a cache that
the optimisation loop reads like the soft-label DistillCache.

    cache = build_cache(model, sequences, [1, 2], loss_on_prompt=False, tokens_per_batch=4096,
                        cache_dir="out/exit_cache")        # float16 files on disk, memory-mapped; resumable
    loss = distill_loss(logits, cache, rows, lm_head, vocab)   # hard-label cross-entropy (draft.py)

The labels of prompt positions (loss_on_prompt) are the prompt's own next tokens: there the hard label is
not the teacher's argmax, but what the text says.
"""
import hashlib
import json
import os
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import io
from .data import Batch, DistillCache, length_batches

CACHE_FORMAT = 1


class HardLabelCache(DistillCache):
    """Per sequence, exit states at every position ([n_tok, H] per ℓ, float32 in memory or float16
    memory-mapped from disk), and one label per loss position: the sequence's next token (teacher_top1)."""
    hard_labels = True

    def __init__(self, sequences: List[Tuple[List[int], List[int]]], exit_layers: Sequence[int],
                 loss_on_prompt: bool, hidden_size: int, storage: Optional[dict] = None):
        """storage: {ℓ: [n_tok, H] tensor} to read exit states from (the disk cache); None: float32 in memory."""
        self._layout(sequences, loss_on_prompt, "cpu")
        self.top_k = 0
        n_tok = int(self.seq_len.sum())
        first_target = self.seq_start + self.loss_first + 1                  # [S]: token index of each first label
        within = torch.arange(int(self.loss_count.sum())) - torch.repeat_interleave(self.loss_start, self.loss_count)
        self.teacher_top1 = self.tokens[torch.repeat_interleave(first_target, self.loss_count) + within]  # [n_loss]
        self.exit_states = storage if storage is not None else \
            {ell: torch.zeros(n_tok, hidden_size, dtype=torch.float32) for ell in exit_layers}

    def describe_targets(self) -> str:
        return "hard labels: the answers' own next tokens (the teacher's greedy argmax)"

    def batch(self, seq_ids: torch.Tensor, exit_layer: int) -> Batch:
        rows, positions, loss_mask, target_rows = self._index(seq_ids)
        states = self.exit_states[exit_layer][rows.reshape(-1)].reshape(*rows.shape, -1)
        return Batch(states.to(torch.float32), positions, loss_mask, target_rows)


class _Stop(Exception):
    """Raised by the last exit layer's hook: the layers above it are not needed."""


@torch.no_grad()
def exit_states(model, input_ids: torch.Tensor, exit_layers: Sequence[int]) -> dict:
    """{ℓ: [B, T, H]} the residual stream after the first ℓ decoder layers (= HF's hidden_states[ℓ], the
    exit state the engine feeds the adapter), running only max(exit_layers) layers. input_ids: [B, T]."""
    layers = model.model.layers
    deepest = max(exit_layers)
    if not 1 <= min(exit_layers) or deepest >= len(layers):
        raise ValueError(f"exit_layers must lie in [1, {len(layers) - 1}], got {list(exit_layers)}")
    captured = {}

    def hook_for(ell):
        def hook(module, args, output):
            captured[ell] = output[0] if isinstance(output, tuple) else output
            if ell == deepest:
                raise _Stop
        return hook
    handles = [layers[ell - 1].register_forward_hook(hook_for(ell)) for ell in exit_layers]
    try:
        model.model(input_ids=input_ids, use_cache=False)
        raise RuntimeError("exit_states: the last exit layer's hook never ran (is this an HF Llama-like model?)")
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return {ell: captured[ell] for ell in exit_layers}


def cache_key(model_fingerprint: str, sequences, exit_layers: Sequence[int], loss_on_prompt: bool) -> str:
    """What names a disk cache: the model, the exact token sequences, the exit layers and the format."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, model_fingerprint, sorted(exit_layers),
                                        bool(loss_on_prompt)]).encode())
    for p, a in sequences:
        digest.update(np.asarray([len(p), len(a)] + p + a, dtype=np.int32).tobytes())
    return digest.hexdigest()[:20]


def build_cache(model, sequences, exit_layers: Sequence[int], loss_on_prompt: bool, tokens_per_batch: int,
                cache_dir: Optional[str] = None, model_fingerprint: str = "", progress: bool = True,
                say=lambda *a: None) -> Tuple[HardLabelCache, dict]:
    """The hard-label cache of `sequences` and statistics of the exit pass (tokens/s).

    cache_dir: exit states go to float16 files there (cache_dir/<key>/layer-<ℓ>.f16, memory-mapped), kept
    across runs and resumed batch by batch after an interruption; None: float32 in memory (tests)."""
    hidden = model.config.hidden_size
    storage, maps, done_batches, meta_path = None, {}, 0, None
    n_tok = sum(len(p) + len(a) for p, a in sequences)
    if cache_dir:
        key = cache_key(model_fingerprint, sequences, exit_layers, loss_on_prompt)
        folder = os.path.join(cache_dir, key)
        os.makedirs(folder, exist_ok=True)
        meta_path = os.path.join(folder, "meta.json")
        meta = None
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        fresh = meta is None
        maps = {ell: np.memmap(os.path.join(folder, f"layer-{ell}.f16"), dtype=np.float16,
                               mode="w+" if fresh else "r+", shape=(n_tok, hidden)) for ell in exit_layers}
        storage = {ell: torch.from_numpy(m) for ell, m in maps.items()}
        done_batches = 0 if fresh else meta["batches_done"]
    cache = HardLabelCache(sequences, exit_layers, loss_on_prompt, hidden, storage)
    batches = length_batches(cache.seq_len.tolist(), tokens_per_batch)
    if done_batches:
        say(f"[train] exit cache: {done_batches} of {len(batches)} batches already in {os.path.dirname(meta_path)}")
    device = model.get_input_embeddings().weight.device
    tokens = cache.tokens.to(device)
    t0, computed = time.perf_counter(), 0
    for b, seq_ids in enumerate(io.progress_bar(progress, iterable=batches, desc=f"exit pass ℓ≤{max(exit_layers)}",
                                                unit="batch")):
        if b < done_batches:
            continue
        seq_ids = torch.tensor(seq_ids)
        rows, _, _, _ = cache._index(seq_ids)
        real = torch.arange(rows.shape[1])[None, :] < cache.seq_len[seq_ids][:, None]
        states = exit_states(model, tokens[rows.to(device)], exit_layers)
        for ell in exit_layers:
            dest = cache.exit_states[ell]
            dest[rows[real]] = states[ell][real.to(device)].to("cpu", dest.dtype)
        computed += int(real.sum())
        if meta_path:  # the states first, then the count that vouches for them
            for m in maps.values():
                m.flush()
            io.write_json(meta_path, {"format": CACHE_FORMAT, "batches_done": b + 1, "batches": len(batches),
                                      "tokens": n_tok, "hidden_size": hidden, "exit_layers": sorted(exit_layers)})
    seconds = time.perf_counter() - t0
    stats = {"tokens": n_tok, "computed_tokens": computed, "seconds": round(seconds, 2),
             "tokens_per_s": round(computed / seconds, 1) if computed and seconds else None,
             "layers_run": max(exit_layers),
             "storage": "float16 memory-mapped files" if cache_dir else "float32 memory",
             "reused_batches": done_batches}
    return cache, stats

