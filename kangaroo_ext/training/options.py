"""What a training run is told: TrainOptions (every knob, with its default and its checks) and the exit
layers to train."""
import dataclasses
from typing import List, Optional, Sequence

DEFAULT_EXIT_LAYERS = (1, 2, 3, 4, 6)
DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LABELS = ("soft", "hard")


@dataclasses.dataclass
class TrainOptions:
    out_dir: Optional[str] = None          # adapters, report.json, MODEL_CARD.md, checkpoints; None = write nothing
    num_prompts: int = 2000                # prompts answered by the target (held-out ones included)
    max_prompt_tokens: int = 512           # longer prompts (chat template included) are skipped and counted
    max_new_tokens: int = 256              # answer length
    gen_batch_size: Optional[int] = None   # None: 128 on a GPU, 8 on the CPU
    data_file: Optional[str] = None        # the generated answers (token ids); None: out_dir/distill_data.pt
    generate_only: bool = False            # answer the prompts (resumably) and stop: for time-limited machines
    generation_time_limit: Optional[float] = None  # seconds; no new generation batch starts after it
    teacher_tokens_per_batch: Optional[int] = None  # None: 32768 on a GPU, 4096 on the CPU
    top_k: int = 64                        # teacher targets: top-k + rest bucket; 0 = full softmax
    labels: str = "soft"                   # soft: the teacher's distribution (a full teacher pass; GPU);
                                           # hard: the answers' own next tokens (first ℓ layers only; CPU)
    cut_loops: int = 0                     # keep this many periods of an answer's looping suffix; 0 = keep all
    loss_on_prompt: bool = False           # also learn the prompt tokens' next-token distributions
    holdout_fraction: float = 0.05         # sequences held out for teacher-forced agreement
    architecture: str = "kangaroo"         # adapter.ARCHITECTURES: kangaroo, decoder, decoder2
    draft_vocab: int = 0                   # the draft's vocabulary: the N most frequent answer tokens; 0 = full
    steps: int = 1000                      # optimizer steps per exit layer
    batch_size: int = 16                   # sequences per step
    length_grouped: bool = False           # batches of similar-length sequences (less padding: the CPU route)
    lr: float = 3e-3                       # high for a small block: the next-layer init starts far off (CE ~15)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1              # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0              # on weight matrices only (never on the norms)
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    eval_every: int = 0                    # held-out loss/agreement every N steps (learning curves); 0 = at the end
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
        for name in ("gen_batch_size", "teacher_tokens_per_batch"):
            if getattr(self, name) is not None:
                positive(name)
        limit = self.generation_time_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0):
            raise ValueError(f"generation_time_limit must be a number of seconds >= 0 (0: generate nothing new, "
                             f"train on the answers already in the data file), got {limit!r}")
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
        if (self.resume or self.reuse_data) and not (self.out_dir or self.data_file):
            raise ValueError("resume / reuse_data need out_dir")
        from ..adapter import ARCHITECTURES
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if not isinstance(self.draft_vocab, int) or not 0 <= self.draft_vocab <= vocab_size:
            raise ValueError(f"draft_vocab must be an int in [0, {vocab_size}] (0 = the full vocabulary), "
                             f"got {self.draft_vocab!r}")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {self.labels!r}")
        if not isinstance(self.cut_loops, int) or isinstance(self.cut_loops, bool) or self.cut_loops < 0:
            raise ValueError(f"cut_loops must be an int >= 0 (periods of a loop kept; 0 = no cut), got {self.cut_loops!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every must be an int >= 0, got {self.eval_every!r}")

    def training_fingerprint(self) -> dict:
        """What a checkpoint or finished layer must agree on to be resumed."""
        keys = ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "top_k",
                "loss_on_prompt", "holdout_fraction", "seed", "architecture", "draft_vocab", "eval_every")
        out = {k: getattr(self, k) for k in keys}
        # Only when not the default, so runs and checkpoints made before these options still resume.
        out.update({k: getattr(self, k) for k, default in (("labels", "soft"), ("cut_loops", 0),
                                                                  ("length_grouped", False))
                    if getattr(self, k) != default})
        return out


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
