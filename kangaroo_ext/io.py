"""Input and output shared by every layer: prompt and question files, chat encoding, EOS ids, atomic files,
device names and git provenance. One function per job; nothing here knows about decoding.

    texts, skipped = read_prompts("prompts.jsonl")          # "prompt" fields, MT-bench turns or strings
    questions = load_questions()                             # the shipped MT-bench (80 questions)
    ids = chat_ids(tokenizer, "Why is the sky blue?")        # one user turn, chat template, generation prompt
    write_json("out/results.json", obj)                      # atomically: readers never see half a file
    meta = provenance("cuda")                                # device, date, commit, code_trees, torch
"""
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import config

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
MT_BENCH_FILE = os.path.join(DATA_DIR, "mt_bench_question.jsonl")     # FastChat's MT-bench, Apache-2.0
LONG_CONTEXT_FILE = os.path.join(DATA_DIR, "long_context_dev.jsonl")  # issue 22's dev set, public domain
TRAIN_PROMPTS_FILE = os.path.join(DATA_DIR, "gsm8k_train_prompts.jsonl")  # GSM8K train questions, MIT
QUESTION_FIELDS = ("question_id", "category", "turns")
SKIP_REASONS = {
    "malformed_json": "line is not valid JSON",
    "not_an_object": "line is neither a JSON object nor a string",
    "missing_prompt": "no 'prompt' field (nor an MT-bench 'turns' list)",
    "prompt_not_a_string": "'prompt' is not a string",
    "empty_prompt": "'prompt' is empty or whitespace",
}


# ---- files of prompts and questions ----------------------------------------------------------------

def read_lines(path: Union[str, os.PathLike], what: str) -> List[str]:
    """All lines of a UTF-8 file; FileNotFoundError / ValueError with one clear line otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a .jsonl file")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]  # not splitlines(): JSON strings may hold U+2028
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None


def prompt_text(record) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) from a JSON string, a {"prompt": ...} record or an MT-bench record (first turn);
    (None, skip reason) otherwise."""
    if isinstance(record, str):
        text = record
    elif not isinstance(record, dict):
        return None, "not_an_object"
    elif "prompt" in record:
        text = record["prompt"]
    elif isinstance(record.get("turns"), list) and record["turns"]:
        text = record["turns"][0]
    else:
        return None, "missing_prompt"
    if not isinstance(text, str):
        return None, "prompt_not_a_string"
    if not text.strip():
        return None, "empty_prompt"
    return text, None


def read_prompts(path: Union[str, os.PathLike], strict: bool = True, what: str = "prompt file"
                 ) -> Tuple[List[str], Counter]:
    """Prompt texts of a .jsonl file in order, and the lines skipped per reason (SKIP_REASONS).

    strict: the first bad line raises ValueError naming the file and line (a user's prompt file for
    `kangaroo generate`); otherwise bad lines are skipped and counted (a large training set)."""
    texts, skipped = [], Counter()
    for n, line in enumerate(read_lines(path, what), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if strict:
                raise ValueError(f"{what} {os.fspath(path)} line {n} is not valid JSON ({e.msg})") from None
            skipped["malformed_json"] += 1
            continue
        text, reason = prompt_text(record)
        if reason is None:
            texts.append(text)
        elif strict:
            raise ValueError(f"{what} {os.fspath(path)} line {n}: {SKIP_REASONS[reason]} (expected a \"prompt\" "
                             "field, an MT-bench \"turns\" list or a JSON string)")
        else:
            skipped[reason] += 1
    if strict and not texts:
        raise ValueError(f"{what} {os.fspath(path)} holds no prompts")
    return texts, skipped


def load_questions(path: Optional[Union[str, os.PathLike]] = None) -> List[dict]:
    """Questions of a Spec-Bench / MT-bench .jsonl file (default: the shipped MT-bench), validated;
    errors name the file and line."""
    path = os.fspath(path or MT_BENCH_FILE)
    questions, seen = [], set()
    for lineno, line in enumerate(read_lines(path, "questions file"), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(q, dict):
            raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(q).__name__}")
        missing = [k for k in QUESTION_FIELDS if k not in q]
        if missing:
            raise ValueError(f"{path}: line {lineno}: missing field(s) {', '.join(missing)} "
                             f"(each question needs {', '.join(QUESTION_FIELDS)})")
        turns = q["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(f"{path}: line {lineno}: 'turns' must be a non-empty list of non-empty strings")
        if not isinstance(q["category"], str) or not q["category"]:
            raise ValueError(f"{path}: line {lineno}: 'category' must be a non-empty string")
        if q["question_id"] in seen:
            raise ValueError(f"{path}: line {lineno}: duplicate question_id {q['question_id']!r}")
        seen.add(q["question_id"])
        questions.append({"question_id": q["question_id"], "category": q["category"], "turns": turns})
    if not questions:
        raise ValueError(f"{path}: no questions (the file is empty)")
    return questions


def select_questions(questions: List[dict], categories: Optional[Sequence[str]] = None,
                     max_questions: Optional[int] = None) -> List[dict]:
    """Filter by category, then keep `max_questions` taken round-robin over categories, in file order.

    Round-robin because MT-bench is sorted by category: its first N questions would all be "writing".
    A smaller N picks a prefix of the same round-robin order, so a small subset lies inside a larger one."""
    present = list(dict.fromkeys(q["category"] for q in questions))
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"categories present: {', '.join(present)}")
        questions = [q for q in questions if q["category"] in categories]
    if max_questions is not None:
        if not isinstance(max_questions, int) or isinstance(max_questions, bool) or max_questions < 1:
            raise ValueError(f"max questions must be a positive int, got {max_questions!r}")
        queues = [[q for q in questions if q["category"] == c] for c in present]
        round_robin = []
        for i in range(max(map(len, queues), default=0)):
            round_robin += [queue[i] for queue in queues if i < len(queue)]
        keep = {id(q) for q in round_robin[:max_questions]}
        questions = [q for q in questions if id(q) in keep]
    return questions


def first_turns(questions: List[dict], n: int) -> List[str]:
    """The first turns of n questions picked round-robin over categories (select_questions)."""
    return [q["turns"][0] for q in select_questions(questions, max_questions=n)]


# ---- tokens -----------------------------------------------------------------------------------------

def chat_ids(tokenizer, conversation: Union[str, List[dict]]) -> List[int]:
    """Token ids of a conversation (a user message, or a list of {"role", "content"}) under the chat
    template, ending with the generation prompt. Rendered to text, then tokenized without special
    tokens: apply_chat_template(tokenize=True) returns a list in transformers 4 and a dict in 5."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; kangaroo_ext prompts the model as a chat")
    messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_ids(model=None, eos_token_id=None, tokenizer=None) -> List[int]:
    """The ids that end an answer: eos_token_id if given (an int or a list), else the model's generation
    config, else its config, else the tokenizer's. [] when none is known."""
    candidates = [eos_token_id]
    if model is not None:
        candidates += [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                       getattr(getattr(model, "config", None), "eos_token_id", None)]
    if tokenizer is not None:
        candidates.append(getattr(tokenizer, "eos_token_id", None))
    eos = next((c for c in candidates if c is not None), None)
    if eos is None:
        return []
    ids = [eos] if isinstance(eos, int) else list(eos)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids


# ---- files written atomically ------------------------------------------------------------------------

def atomic_write(path: str, write: Callable, binary: bool = False):
    """write(file) into a temp file beside `path`, fsync, then os.replace: readers never see half a file,
    and an interrupted write leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def finite(obj):
    """NaN / inf -> null: strict JSON, and a long run must never fail at the very end over one number."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str, obj, indent: int = 1):
    obj = finite(obj)
    atomic_write(path, lambda f: (json.dump(obj, f, indent=indent, allow_nan=False), f.write("\n")))


def progress_bar(enabled: bool, **kw):
    """tqdm on a terminal; into a log file (no terminal) a line every 15 s instead of a stream of updates."""
    from tqdm.auto import tqdm
    return tqdm(disable=not enabled, mininterval=0.5 if sys.stderr.isatty() else 15.0, **kw)


# ---- where a result was measured ----------------------------------------------------------------------

# What decides the code a measurement ran (bench/ is left out: it also holds the results themselves).
CODE_PATHS = ("csrc", "kangaroo_ext", "triton_kernels", "setup.py")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout this package runs from


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name with the number of threads torch uses."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _git(root, *args, env=None) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=60, check=True,
                          env=env).stdout.strip()


def git_commit(root: Optional[str] = None) -> Tuple[str, Optional[bool]]:
    """(sha, dirty). KANGAROO_COMMIT wins when set (a copied tree whose .git may be stale, as on the
    device machines: dirty is then unknown); else the checkout this package runs from; else "unknown"."""
    forced = config.text("KANGAROO_COMMIT")
    if forced:
        return forced, None
    root = root or _ROOT
    try:
        return _git(root, "rev-parse", "HEAD"), bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def code_trees(root: Optional[str] = None) -> Optional[Dict[str, str]]:
    """{path: git object hash} of CODE_PATHS as they are on disk (tracked and untracked files that git does
    not ignore), through a scratch index, so the checkout's own index is untouched. Equal bytes give equal
    hashes in any copy of the checkout, whatever state its .git is in, so which_commit() can name the
    commit a result was measured on even when the copy's HEAD is stale. None without a usable git."""
    root = root or _ROOT
    if not os.path.exists(os.path.join(root, ".git")):  # an installed package, not a checkout (or a copy)
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "GIT_INDEX_FILE": os.path.join(tmp, "index")}
            dirs = [d for d in CODE_PATHS if os.path.exists(os.path.join(root, d))]
            if not dirs:
                return None
            _git(root, "add", "-A", "--", *dirs, env=env)
            tree = _git(root, "write-tree", env=env)
            return {d: _git(root, "rev-parse", f"{tree}:{d}") for d in dirs}
    except (OSError, subprocess.SubprocessError):
        return None


def which_commit(trees: Dict[str, str], root: Optional[str] = None, depth: int = 500) -> List[str]:
    """Commits among the last `depth` of HEAD whose CODE_PATHS objects equal `trees` (newest first)."""
    root = root or _ROOT
    found = []
    for sha in _git(root, "log", f"-{depth}", "--format=%h").split():
        listing = _git(root, "ls-tree", sha, "--", *trees)
        have = {line.split("\t", 1)[1]: line.split()[2] for line in listing.splitlines()}
        if have == trees:
            found.append(sha)
    return found


def provenance(device) -> dict:
    """What every committed result records: device, UTC date, commit (and whether the tree was dirty),
    code_trees, torch and Python versions, and the run-time switches in effect (config.run_flags)."""
    import torch
    commit, dirty = git_commit()
    return {"device": device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "dirty": dirty, "code_trees": code_trees(), "torch": torch.__version__,
            "python": platform.python_version(), "run_flags": config.run_flags()}
