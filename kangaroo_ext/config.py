"""Every environment variable kangaroo_ext reads, in one place, with one parser.

    from kangaroo_ext import config
    config.flag("KANGAROO_DISABLE_CONDITIONAL_GRAPHS")   # False unless set to a true value
    config.backend()                                     # "cuda" / "triton" / "reference" / None (auto)

A variable is read when asked for (not cached at import), so a test can set it with monkeypatch. A value
that is not recognised raises ValueError naming the variable and what it accepts: `...=flase` must not
quietly mean "off". The README's table of variables is `markdown_table()`, and a test keeps them equal.

This module imports nothing of the package (setup.py loads it by path, before anything is built).
"""
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")
BACKENDS = ("auto", "cuda", "triton", "reference")
# CPU threads for decoding when neither --threads nor OMP_NUM_THREADS says otherwise. One thread, because
# decoding a small model is a stream of small ops, each a rendezvous of torch's threads: on 2 cores with one
# busy-loop process beside it, 2 threads fell to 14-16% of their idle speed, while 1 thread lost 4-6%
# against 2 on a quiet machine. BENCHMARKS.md, "CPU threads", has the measurements (bench/threads.py).
DEFAULT_CPU_THREADS = 1


@dataclass(frozen=True)
class Knob:
    name: str
    kind: str          # "flag" (boolean), "choice" (one of `choices`), "text" (free text, e.g. a path)
    when: str          # "build" (setup.py), "run" (import / call time), "test" (the test suite)
    doc: str
    choices: Tuple[str, ...] = ()
    on_by_default: bool = False   # a flag's value when unset or empty


KNOBS: Dict[str, Knob] = {k.name: k for k in (
    Knob("KANGAROO_SKIP_CUDA_BUILD", "flag", "build",
         "never build the CUDA extension (pure-Python install: Triton and PyTorch backends only), even where a "
         "GPU is visible; without a visible GPU that is already the default"),
    Knob("KANGAROO_FORCE_CUDA", "flag", "build",
         "build the CUDA extension or fail (CI sets it); the test suite then also requires it to load"),
    Knob("KANGAROO_FORCE_CUDA_BUILD", "flag", "build",
         "build the CUDA extension even though no CUDA device is visible (as does setting "
         "TORCH_CUDA_ARCH_LIST); without either, a machine with no GPU gets the pure-Python install"),
    Knob("KANGAROO_PTXAS_VERBOSE", "flag", "build", "print ptxas register and shared-memory reports"),
    Knob("KANGAROO_BACKEND", "choice", "run",
         "force one backend for every op (a backend that cannot run a call raises, listing why); "
         "auto picks the first that can", BACKENDS),
    Knob("KANGAROO_DISABLE_CONDITIONAL_GRAPHS", "flag", "run",
         "capture decode rounds without conditional graph nodes (the adaptive draft-budget path)"),
    Knob("KANGAROO_DISABLE_PDL", "flag", "run",
         "launch kernels without programmatic dependent launch (for profiling: with PDL a kernel's "
         "recorded duration overlaps the previous one's tail)"),
    Knob("KANGAROO_BATCH_INVARIANT_ATTENTION", "flag", "run",
         "attention sums every query row's keys in the groups a one-token decode step uses, so a verified "
         "row is bitwise the decode step's row and bf16 speculative output equals plain decoding "
         "(csrc/kernels/attention.cuh). bf16 / fp16 only (fp32 keeps the old order until its GPU tests run with "
         "this one). On by default since its GPU tests passed (H100, 4d5b778); 0 restores the split order of "
         "earlier releases", on_by_default=True),
    Knob("KANGAROO_INTERLEAVED_KEY_SPLITS", "flag", "run",
         "attention deals each tile's keys to its key splits in fixed 64-key units, round-robin, instead of "
         "contiguous chunks that grow with the context (csrc/kernels/key_split.h), so a verified row is the decode "
         "step's row past 512 keys too: the long bf16 turns that differ from plain decoding (H100, 80eb2b7: 7 of "
         "160 MT-bench, 8 of 100 Spec-Bench turns) were verified there. On by default since its GPU tests passed "
         "(H100, 15ee133: bf16 identical to plain on 160 / 160 MT-bench and 100 / 100 Spec-Bench turns); 0 restores "
         "the contiguous splits (other bits past 512 keys)", on_by_default=True),
    Knob("KANGAROO_WARP_CHUNK_ATTENTION", "flag", "run",
         "attention runs the warp-chunk kernel (csrc/kernels/warp_chunk_attention.cuh: a warp per 32-key chunk, no "
         "block barrier in the key loop, the next chunk in flight) where it can take the launch: bf16 / fp16, head "
         "dim 64 or 128, at most 32 (64) or 16 (128) query rows per kv head; else the tiled kernel. Batch-invariant "
         "at any context by construction; other bits than the tiled kernel's. Off: its first GPU run (H100, 15ee133) "
         "failed its reference test (wrong rows when a chunk holds a new key near its end; BENCHMARKS.md)"),
    Knob("KANGAROO_PREFILL_GRAPHS", "flag", "run",
         "on a GPU with graphs, the prompt is fed in chunks of 256, 64 or 16 tokens (the last one padded), each a "
         "captured CUDA graph (kangaroo_ext/engine/prefill.py), instead of one eager pass whose ~12 launches a "
         "layer the host issues one by one: an eager prefill took 7 to 43 ms whatever the prompt's length (H100, "
         "15ee133). stats.prefill_kernel says which ran, stats.prefill_graphs_off why not. Its GPU tests pass (H100, "
         "b3cd0f3: 16 / 64 / 256 tokens 1.3 / 1.7 / 2.5 ms against 5.1 / 8.2 / 7.8 eager); prompts past 640 "
         "tokens stay eager (1,024: 11.0 against 7.6 ms); off until MT-bench has run with it on"),
    Knob("KANGAROO_TRITON_ATTENTION", "flag", "run",
         "on a GPU in bf16 / fp16, the engine's attention (decode, draft, verify and prefill steps) runs the Triton "
         "kernel (triton_kernels/attention.py: tensor-core dots, so a verify step's rows cost little more than one; "
         "H100, 3c49d82: 7 query tokens at 1,024 keys 12.1 us against the CUDA kernel's 18.8, 1 token 9.8 against "
         "9.6) with a query-row block that does not depend on the step's width up to 32 rows, so a verified row is "
         "the decode step's row. The other ops stay CUDA; stats.attention_kernel_off says why not where it is set. Its "
         "GPU tests pass (H100, b3cd0f3: verify 7 / 1 1.24 against 1.44); off: the plain step costs 741 against 666 "
         "us"),
    Knob("KANGAROO_TENSOR_CORE_GEMV", "flag", "run",
         "bf16 / fp16 decode GEMVs (q/k/v, O, gate/up, down) run on tensor cores where K % 32 == 0 and every "
         "weight's rows % 8 == 0 (csrc/kernels/decode_linear_mma.cuh): verify rows then cost about what one row "
         "costs. Plain and verify steps both switch, so they stay bitwise alike. On by default since its GPU "
         "tests passed (H100, a258f80 + 50fdea6: verify of 7 positions 1,130 -> 897 us on the default model); "
         "0 restores the CUDA-core kernels", on_by_default=True),
    Knob("KANGAROO_FUSED_COMMIT", "flag", "run",
         "greedy verify and plain steps on a GPU end with one accept_commit launch (csrc/kernels/accept_commit.cuh: "
         "the accept rule, the history, the cache length, the next input and the report) instead of ~10 small "
         "ones. Its GPU tests passed (H100, 71757c1) but it was not priced alone; the fused verify tail, on by "
         "default, already ends those steps with accept_commit, so this matters only with "
         "KANGAROO_FUSED_VERIFY_TAIL=0"),
    Knob("KANGAROO_FUSED_VERIFY_TAIL", "flag", "run",
         "greedy verify and plain steps on a GPU end with ops.verify_tail (csrc/kernels/verify_tail.cuh): the "
         "final norm, the target's argmax at every position and accept_commit in two launches instead of ~4 + "
         "the commit's, with no normed rows or logits in memory; tokens bitwise the per-op path's. On by default "
         "since its GPU tests passed (H100, 71757c1: plain step 674 -> 662 us, verify of 1 position 639 -> 620 us "
         "at the default model's shape); 0 restores the per-op end", on_by_default=True),
    Knob("KANGAROO_PERSISTENT_DRAFT", "flag", "run",
         "greedy draft phases on a GPU run as one persistent kernel (csrc/kernels/persistent_draft.cuh: the exit "
         "layers, the adapter, the draft head and the confidence exit of every step in one launch) instead of "
         "~23 launches a step; where a call cannot, the per-op graph runs and stats.draft_kernel_off says why. "
         "Off until its GPU tests pass"),
    Knob("KANGAROO_PERSISTENT_PLAIN_STEP", "flag", "run",
         "greedy batch-1 plain steps on a GPU run as one launch of the persistent draft kernel (every layer, the "
         "final norm and the full LM head's argmax; kangaroo_ext/engine/persistent_plain.py) instead of ~170 "
         "launches; the same token and cache bits. stats.plain_kernel_off says why not. Off until its GPU tests "
         "pass"),
    Knob("KANGAROO_PERSISTENT_SPLIT_BARRIER", "flag", "run",
         "with KANGAROO_PERSISTENT_DRAFT or _PLAIN_STEP: the persistent kernel's GEMV stages wait for the grid "
         "barrier inside their tiles, after issuing their weight loads, so the weights' latency overlaps the "
         "barrier (persistent_draft.cuh, GridBarrier). Bitwise the per-op path on the H100 (since its named barrier "
         "counts threads one by one), and no faster there"),
    Knob("KANGAROO_PERSISTENT_L2_PREFETCH", "flag", "run",
         "with KANGAROO_PERSISTENT_DRAFT or _PLAIN_STEP: while a block of the persistent kernel waits at a barrier "
         "it asks the L2 for the weight rows its tiles of the next GEMV stage read (a quarter of the L2 a stage), "
         "and the head stage for all of its head rows, so stages find their weights in the L2 instead of DRAM "
         "(persistent_draft.cuh, \"L2 prefetch\"); the same bits (GPU tests passed), but slower: the prefetches delay "
         "each barrier's arrivals (H100, 71757c1: plain step 952 -> 1,133 us)"),
    Knob("KANGAROO_GEMV_DEEP_PREFETCH", "flag", "run",
         "tensor-core GEMVs with long K on few blocks (K >= 2,048, fewer than 4 blocks an SM: Llama-3.2-1B's O and "
         "down projections) keep 8 weight chunks in flight per lane instead of 4, to cover DRAM latency "
         "(decode_linear_mma.cuh: deep_in_flight); the same bits. On by default since its GPU tests passed (H100, "
         "71757c1: Llama-3.2-1B's plain step 1,441 -> 1,276 us, draft step 265 -> 238 us); 0 restores 4",
         on_by_default=True),
    Knob("KANGAROO_DISABLE_CPU_PACKING", "flag", "run",
         "on the CPU, verify and prefill with F.linear instead of oneDNN linears on weights packed once "
         "(packing costs a second copy of the weights; see kangaroo_ext/engine/cpu_linear.py)"),
    Knob("KANGAROO_CACHE_DIR", "text", "run",
         "where the default model's dequantized copy is cached (default: $XDG_CACHE_HOME/kangaroo_ext "
         "or ~/.cache/kangaroo_ext)"),
    Knob("KANGAROO_COMMIT", "text", "run",
         "the commit recorded in benchmark results, for a copied checkout whose .git is stale"),
)}


def _raw(name: str) -> str:
    if name not in KNOBS:
        raise KeyError(f"{name} is not a kangaroo_ext environment variable (known: {', '.join(KNOBS)})")
    return os.environ.get(name, "").strip()


def parse_flag(name: str, text: str) -> bool:
    """The one boolean parser: 1/true/yes/on and 0/false/no/off (any case; empty = off)."""
    v = text.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"{name}={text!r} is not a boolean: use one of {', '.join(TRUE)} or {', '.join(FALSE[:-1])}")


def flag(name: str) -> bool:
    knob = KNOBS.get(name)
    if knob is not None and knob.kind != "flag":
        raise KeyError(f"{name} is not a boolean variable")
    raw = _raw(name)
    if raw == "" and knob is not None:
        return knob.on_by_default
    return parse_flag(name, raw)


def run_flags() -> Dict[str, bool]:
    """Every run-time flag's effective value (set or default): what a benchmark result records, so an A/B
    of a switch (e.g. KANGAROO_TENSOR_CORE_GEMV) says which side each number is."""
    return {k.name: flag(k.name) for k in KNOBS.values() if k.kind == "flag" and k.when == "run"}


def text(name: str) -> Optional[str]:
    """A free-text variable's value, or None when unset or empty."""
    return _raw(name) or None


def backend() -> Optional[str]:
    """KANGAROO_BACKEND as a backend name, or None for automatic selection."""
    v = _raw("KANGAROO_BACKEND").lower()
    if v not in BACKENDS and v != "":
        raise ValueError(f"KANGAROO_BACKEND={v!r} is not a backend: use one of {', '.join(BACKENDS)}")
    return None if v in ("", "auto") else v


def triton_interpreting() -> bool:
    """Triton's own switch (not ours, so not in KNOBS): kernels run on the CPU under its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


def torch_cuda_arch_list() -> Optional[str]:
    """torch's TORCH_CUDA_ARCH_LIST (not ours): the architectures to compile for, or None when unset."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or None


def cuda_home() -> Optional[str]:
    """CUDA_HOME (not ours): the CUDA toolkit folder, or None when unset."""
    return os.environ.get("CUDA_HOME", "").strip() or None


def cpu_threads(requested: Optional[int] = None) -> Tuple[int, str]:
    """(threads, why): the torch CPU threads the `kangaroo` commands decode with. `requested` (--threads)
    wins; else OMP_NUM_THREADS (not ours: the user's standing choice, which torch reads too); else
    DEFAULT_CPU_THREADS."""
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise ValueError(f"--threads must be an int >= 1, got {requested!r}")
        return requested, "--threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise ValueError(f"OMP_NUM_THREADS={omp!r} is not a thread count: use an int >= 1")
        return int(omp), "OMP_NUM_THREADS"
    return DEFAULT_CPU_THREADS, "the default: robust when other programs share the cores"


def apply_cpu_threads(requested: Optional[int] = None) -> None:
    """Sets torch's CPU threads to cpu_threads(requested) (what `kangaroo info` reports)."""
    import torch  # here, not at the top: setup.py loads this module before torch may be importable
    torch.set_num_threads(cpu_threads(requested)[0])


def user_cache_home() -> str:
    """The XDG cache folder (not ours either): $XDG_CACHE_HOME, else ~/.cache."""
    return os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")


def check_all():
    """Parse every variable that is set; raise on the first bad value (`kangaroo info` reports them)."""
    for knob in KNOBS.values():
        if knob.kind == "flag":
            flag(knob.name)
        elif knob.kind == "choice":
            backend()
    cpu_threads()


def markdown_table() -> str:
    rows = ["| variable | when | effect |", "|---|---|---|"]
    for k in KNOBS.values():
        if k.kind == "flag":
            values = "1/0, default 1" if k.on_by_default else "1/0"
        else:
            values = ", ".join(k.choices) if k.kind == "choice" else "text"
        rows.append(f"| `{k.name}` ({values}) | {k.when} | {k.doc} |")
    return "\n".join(rows)
